"""Augmentation cost: images/s of ``make_views`` (both views of one image) on one thread.

One row per pipeline (``dmdl-v1``: the default keys; ``reference``: the ``augment`` section of
``recipes/sysu.yaml``), image size and modality, on smooth random images (visible: three
channels; infrared: three equal channels), cache size = network input size (no resize).
A DataLoader worker runs exactly this per image. Prints figures; never asserts.

    python benchmarks/augment_bench.py [--sizes 288x144 64x32] [--seconds 3]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dmdl_cli.data.augment import AugmentConfig, make_views  # noqa: E402
from dmdl_cli.data.index import INFRARED, VISIBLE  # noqa: E402
from dmdl_cli.recipe import load_recipe  # noqa: E402


def images(height: int, width: int, count: int, modality: int) -> list[torch.Tensor]:
    """``count`` uint8 (3, H, W) images: a smooth gradient per channel plus noise."""
    rng = np.random.default_rng(0)
    y, x = np.meshgrid(np.linspace(0, 1, height), np.linspace(0, 1, width), indexing="ij")
    out = []
    for _ in range(count):
        a, b, c = rng.uniform(30, 200, 3)
        rgb = np.stack([a * y + 40, b * x + 20, c * (1 - y) * x + 30])
        rgb = rgb + rng.normal(0, 6, rgb.shape)
        if modality == INFRARED:  # one intensity in all three channels, as the cache holds it
            rgb = np.broadcast_to(rgb.mean(axis=0), rgb.shape)
        out.append(torch.from_numpy(np.clip(np.rint(rgb), 0, 255).astype(np.uint8)).contiguous())
    return out


def rate(imgs: list[torch.Tensor], modality: int, cfg: AugmentConfig,
         seconds: float) -> tuple[float, float]:
    """Images per CPU second and per wall-clock second of make_views over ``imgs`` (cycled)
    for about ``seconds`` of CPU time. The CPU figure is the one to read on a shared machine:
    other processes slow the wall clock, not this process's CPU time."""
    for img in imgs[:5]:  # warm-up: first calls load tables and allocate
        make_views(img, modality, cfg, torch.Generator().manual_seed(0))
    done, cpu0, wall0 = 0, time.process_time(), time.perf_counter()
    while time.process_time() - cpu0 < seconds:
        for seed, img in enumerate(imgs):
            make_views(img, modality, cfg, torch.Generator().manual_seed(seed))
        done += len(imgs)
    return done / (time.process_time() - cpu0), done / (time.perf_counter() - wall0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["288x144", "64x32"])
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    reference = load_recipe(ROOT / "recipes" / "sysu.yaml").augment
    pipelines = {"dmdl-v1": AugmentConfig(),
                 "reference": AugmentConfig.from_recipe(reference, modality_specific=True)}
    print(f"make_views, one thread, torch {torch.__version__}")
    print(f"{'pipeline':<10} {'size':>8} {'modality':>9} {'images/CPU s':>13} {'CPU ms/image':>13} "
          f"{'images/wall s':>14}")
    for size in args.sizes:
        h, w = (int(v) for v in size.split("x"))
        for modality, name in ((VISIBLE, "visible"), (INFRARED, "infrared")):
            imgs = images(h, w, 16, modality)
            for pipeline, cfg in pipelines.items():
                cpu, wall = rate(imgs, modality, cfg, args.seconds)
                print(f"{pipeline:<10} {size:>8} {name:>9} {cpu:>13.0f} {1000 / cpu:>13.2f} "
                      f"{wall:>14.0f}")


if __name__ == "__main__":
    main()
