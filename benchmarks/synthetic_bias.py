"""The modality bias of the embedded synthetic set, measured with hand-made features.

A DIAGNOSTIC of the data set, not of dmdl: nearest-neighbour retrieval (euclidean) on the test
split with features that need no learning, gallery images of the query's camera excluded, so
that docs/synthetic.md can say which cues transfer across modalities and which do not:

* garment colour (mean RGB of torso and legs), split into luminance and chroma (RGB minus
  luminance): the visible-only shortcut and the part of it that survives in infrared;
* colour layout (a 6 x 3 grid of mean colours);
* a polarity-free gradient-orientation histogram (shape and texture).

    python benchmarks/synthetic_bias.py [--root DIR] [--seed 0]

Without ``--root`` the default set is generated into a temporary folder (a few seconds).
``tests/test_synthetic.py`` imports these descriptors and asserts the pattern on a small set.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dmdl_cli.data.cache import load_image  # noqa: E402
from dmdl_cli.data.index import INFRARED, VISIBLE  # noqa: E402
from dmdl_cli.data.sources import read_source  # noqa: E402
from dmdl_cli.data.synthetic import generate  # noqa: E402
from dmdl_cli.evaluation.metrics import rank_metrics  # noqa: E402

LUMA = np.array([0.299, 0.587, 0.114])
IMAGE_SIZE = (96, 48)  # the generator's default; the garment windows below assume it


def garment_colour(x: np.ndarray) -> np.ndarray:
    """Mean RGB of the torso and of the legs of (N, 96, 48, 3) images in [0, 1]: (N, 6)."""
    return np.concatenate([x[:, 28:48, 18:30].mean((1, 2)), x[:, 58:80, 18:30].mean((1, 2))], 1)


def luminance_chroma(colour: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Split garment colours (N, 6) into luminance (N, 2) and chroma (N, 6) = RGB - luminance."""
    rgb = colour.reshape(-1, 2, 3)
    lum = rgb @ LUMA
    return lum, (rgb - lum[..., None]).reshape(-1, 6)


def colour_layout(x: np.ndarray, gh: int = 6, gw: int = 3) -> np.ndarray:
    """Mean colour of each cell of a gh x gw grid: (N, gh * gw * 3)."""
    n, h, w, _ = x.shape
    return x.reshape(n, gh, h // gh, gw, w // gw, 3).mean((2, 4)).reshape(n, -1)


def gradient_histogram(x: np.ndarray, gh: int = 8, gw: int = 4, bins: int = 6) -> np.ndarray:
    """Polarity-free shape/texture descriptor: per-image standardised grey level, gradient
    orientation histograms in a gh x gw grid (square-rooted, L2-normalised): (N, gh * gw * bins)."""
    g = x @ LUMA
    g = (g - g.mean((1, 2), keepdims=True)) / (g.std((1, 2), keepdims=True) + 1e-6)
    gx, gy = np.zeros_like(g), np.zeros_like(g)
    gx[:, :, 1:-1] = g[:, :, 2:] - g[:, :, :-2]
    gy[:, 1:-1] = g[:, 2:] - g[:, :-2]
    mag, ang = np.hypot(gx, gy), np.mod(np.arctan2(gy, gx), np.pi)
    b = np.minimum((ang / np.pi * bins).astype(int), bins - 1)
    n, h, w = g.shape
    hist = np.stack([(mag * (b == k)).reshape(n, gh, h // gh, gw, w // gw).sum((2, 4))
                     for k in range(bins)], -1).reshape(n, -1)
    hist = np.sqrt(hist)
    return hist / (np.linalg.norm(hist, axis=1, keepdims=True) + 1e-9)


def retrieval(feat: np.ndarray, pids: np.ndarray, cams: np.ndarray, query: np.ndarray,
              gallery: np.ndarray) -> tuple[float, float]:
    """Rank-1 (plain CMC) and mAP of euclidean nearest-neighbour retrieval, same-camera gallery
    images excluded, by the evaluation's own ``rank_metrics``."""
    d = ((feat[query][:, None, :] - feat[gallery][None, :, :]) ** 2).sum(-1)  # (Q, G)
    same_camera = cams[query][:, None] == cams[gallery][None, :]  # (Q, G)
    m = rank_metrics(d, pids[query], pids[gallery], cams[query], cams[gallery], max_rank=1,
                     exclude=same_camera, dedup=False)
    return float(m["cmc"][0]), float(m["mAP"])


def load_test_split(root: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Test images (N, 96, 48, 3) in [0, 1], with their pids, cameras and modalities."""
    table = read_source("synthetic", root)
    test = table.rows(split="test")
    imgs = np.stack([load_image(table.paths[i], *IMAGE_SIZE) for i in test]).astype(np.float64) / 255
    return imgs, table.pids[test], table.cams[test], table.modality[test]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, help="a generated synthetic set (sysu layout)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the set generated without --root")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = args.root
        if root is None:
            root = Path(tmp) / "synthetic"
            generate(root, seed=args.seed)
        imgs, pids, cams, mods = load_test_split(root)
    vis, ir = np.flatnonzero(mods == VISIBLE), np.flatnonzero(mods == INFRARED)
    colour = garment_colour(imgs)
    lum, chroma = luminance_chroma(colour)
    features = {
        "garment mean colour (torso + legs RGB, 6-d)": colour,
        "garment luminance (2-d)": lum,
        "garment chroma (RGB - luminance, 6-d)": chroma,
        "colour layout (6 x 3 grid of mean colours)": colour_layout(imgs),
        "gradient-orientation histogram (8 x 4 x 6, polarity-free)": gradient_histogram(imgs),
    }
    print(f"test split: {len(np.unique(pids))} identities, {len(vis)} visible, {len(ir)} infrared "
          f"images; chance Rank-1 about {100 / len(np.unique(pids)):.1f} %")
    print("| features | visible -> visible R1 / mAP | infrared -> visible R1 / mAP | infrared -> infrared R1 / mAP |")
    print("|---|---|---|---|")
    for name, feat in features.items():
        cells = [retrieval(feat, pids, cams, q, g) for q, g in ((vis, vis), (ir, vis), (ir, ir))]
        print(f"| {name} | " + " | ".join(f"{100 * r1:.1f} / {100 * ap:.1f}" for r1, ap in cells) + " |")


if __name__ == "__main__":
    main()
