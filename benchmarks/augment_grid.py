"""The picture of docs/augmentation.md: two views of a few synthetic images under both pipelines.

Rows: visible and infrared images of the embedded synthetic set (``dmdl_cli.data.synthetic``,
three identities, rendered at the given size). Columns: the image, then view A and view B of
two augmentation draws under ``augment.pipeline: dmdl-v1`` (the default keys) and under
``reference`` (the ``augment`` section of ``recipes/sysu.yaml``). Float views of the reference
pipeline are un-normalised for display (N(0, 1) erasing noise clipped to [0, 1]).

    python benchmarks/augment_grid.py [--out docs/augmentation.png] [--height 128 --width 64]
"""
from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dmdl_cli.atomic import atomic_write_bytes  # noqa: E402
from dmdl_cli.data.augment import AugmentConfig, make_views  # noqa: E402
from dmdl_cli.data.index import INFRARED, VISIBLE  # noqa: E402
from dmdl_cli.data.normalisation import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from dmdl_cli.data.synthetic import make_camera, make_identity, render_image  # noqa: E402
from dmdl_cli.recipe import SyntheticRecipe, load_recipe  # noqa: E402

SEED = 0
PIDS = (3, 7, 12)
CAMERAS = {VISIBLE: 1, INFRARED: 3}  # a visible and an infrared camera of the SYSU layout
DRAWS = (0, 1)  # augmentation seeds shown per pipeline


def synthetic_images(height: int, width: int) -> list[tuple[int, int, torch.Tensor]]:
    """``(pid, modality, uint8 (3, H, W))`` for every identity, visible then infrared."""
    cfg = SyntheticRecipe(height=height, width=width)
    out = []
    for modality in (VISIBLE, INFRARED):
        camera = make_camera(CAMERAS[modality], modality, SEED, cfg)
        for pid in PIDS:
            rng = np.random.default_rng([SEED, pid, modality])
            hwc = render_image(make_identity(pid, SEED, cfg), camera, rng, cfg)  # (H, W, 3)
            out.append((pid, modality, torch.from_numpy(hwc.copy()).permute(2, 0, 1).contiguous()))
    return out


def displayable(view: torch.Tensor) -> np.ndarray:
    """A view as ``(H, W, 3)`` float in [0, 1]: uint8 / 255, or a normalised view un-normalised."""
    if view.dtype == torch.uint8:
        x = view.float() / 255.0
    else:
        mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
        x = view * std + mean
    return x.clamp(0.0, 1.0).permute(1, 2, 0).numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "augmentation.png")
    parser.add_argument("--height", type=int, default=128)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--dpi", type=int, default=100)
    args = parser.parse_args()
    reference = load_recipe(ROOT / "recipes" / "sysu.yaml").augment
    pipelines = {"dmdl-v1": AugmentConfig(),
                 "reference": AugmentConfig.from_recipe(reference, modality_specific=True)}
    images = synthetic_images(args.height, args.width)
    columns = 1 + len(pipelines) * len(DRAWS) * 2
    fig, axes = plt.subplots(len(images), columns, figsize=(columns * 1.05, len(images) * 1.9))
    for row, (pid, modality, img) in enumerate(images):
        cells = [(f"{'visible' if modality == VISIBLE else 'infrared'} {pid}", img)]
        for name, cfg in pipelines.items():
            for draw in DRAWS:
                view_a, view_b = make_views(img, modality, cfg,
                                            torch.Generator().manual_seed(1000 * pid + draw))
                cells += [(f"{name}\nA, draw {draw}", view_a), (f"{name}\nB, draw {draw}", view_b)]
        for col, (title, view) in enumerate(cells):
            ax = axes[row, col]
            ax.imshow(displayable(view), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0 or col == 0:
                ax.set_title(title if row == 0 else "", fontsize=7)
            if col == 0:
                ax.set_ylabel(title, fontsize=7)
    fig.suptitle("Two views per image: augment.pipeline dmdl-v1 (uint8, colour before the crop) "
                 "and reference (normalised, colour after the crop)", fontsize=8)
    fig.tight_layout()
    rendered, buffer = io.BytesIO(), io.BytesIO()
    fig.savefig(rendered, format="png", dpi=args.dpi)
    # a 256-colour palette keeps the file small (the synthetic images are noisy)
    Image.open(rendered).convert("RGB").quantize(colors=256).save(buffer, format="png",
                                                                  optimize=True)
    atomic_write_bytes(args.out, buffer.getvalue())
    print(f"wrote {args.out} ({len(buffer.getvalue())} bytes)")


if __name__ == "__main__":
    main()
