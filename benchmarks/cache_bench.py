"""What checking every cache row against its crc32 costs, at the paper's 288 x 144.

A loader step is what one training batch costs the data side: the rows read from the cache and
their two augmented views made (``ViewDataset`` + ``collate_items``, one process), for the
default batch of 2 x P x K images. It is timed over a plain memory map (no check) and over the
workspace's ``ImageCache`` (every row checked); likewise a batch of feature extraction's reads
(``read_rows``). Prints figures; asserts nothing.

    python benchmarks/cache_bench.py [--rows 600] [--steps 8]
"""
from __future__ import annotations

import argparse
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np
import torch

from dmdl_cli.data.augment import AugmentConfig
from dmdl_cli.data.cache import cache_record, open_cache, read_rows, write_record
from dmdl_cli.data.train_dataset import ViewDataset, collate_items
from dmdl_cli.recipe import Recipe


def best_of(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=600, help="rows of the synthetic cache")
    parser.add_argument("--steps", type=int, default=12, help="loader steps timed (median)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    recipe = Recipe()
    height, width = recipe.data.height, recipe.data.width  # 288 x 144
    batch = 2 * recipe.stage1.clusters_per_batch * recipe.stage1.instances  # both modalities
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"cache-{height}x{width}.u8"
        # images with structure (smooth ramps plus noise), as a cache holds
        base = np.linspace(0, 255, height * width * 3).reshape(height, width, 3)
        rows = np.clip(base[None] + rng.normal(0, 30, (args.rows, 1, 1, 3)), 0, 255).astype(np.uint8)
        rows.tofile(path)
        write_record(path, cache_record(path, args.rows, height, width))
        checked = open_cache(path, args.rows, height, width)
        plain = np.memmap(path, dtype=np.uint8, mode="r", shape=(args.rows, height, width, 3))
        modality = rng.integers(0, 2, args.rows)
        config = AugmentConfig.from_recipe(recipe.augment, modality_specific=True)
        keys = [(int(r), int(s), view) for r, s in zip(rng.integers(0, args.rows, batch),
                                                       rng.integers(0, 2**31, batch)) for view in (0, 1)]
        sets = {"plain memmap": ViewDataset(plain, modality, config),
                "ImageCache (checked)": ViewDataset(checked, modality, config)}
        times: dict[str, list[float]] = {name: [] for name in sets}
        for _ in range(args.steps):  # interleaved, so that a busy machine slows both alike
            for name, dataset in sets.items():
                start = time.perf_counter()
                collate_items([dataset[k] for k in keys])
                times[name].append(time.perf_counter() - start)
        step = {name: float(np.median(t)) for name, t in times.items()}
        sorted_rows = np.sort(rng.choice(args.rows, min(batch, args.rows), replace=False))
        reads = {"plain memmap": best_of(lambda: read_rows(plain, sorted_rows), args.steps * 4),
                 "ImageCache (checked)": best_of(lambda: read_rows(checked, sorted_rows),
                                                 args.steps * 4)}
        one = np.ascontiguousarray(rows[0])
        crc = best_of(lambda: [zlib.crc32(one) for _ in range(100)], 5) / 100
        del plain, checked, sets
    print(f"cache {height}x{width}: {height * width * 3 / 1024:.0f} KiB per row; batch of {batch} "
          f"images (2 x P {recipe.stage1.clusters_per_batch} x K {recipe.stage1.instances}); "
          f"torch threads 1")
    print(f"crc32 of one row: {crc * 1e6:.1f} us ({height * width * 3 / crc / 1e9:.2f} GB/s)")
    for name in step:
        print(f"loader step, {name}: {step[name] * 1000:.1f} ms "
              f"({step[name] / batch * 1e3:.2f} ms per image, two views)")
    extra = step["ImageCache (checked)"] - step["plain memmap"]
    print(f"checksum cost per loader step: {batch * crc * 1000:.2f} ms of crc32 = "
          f"{100 * batch * crc / step['plain memmap']:.2f} % of the step; measured difference of "
          f"the medians over {args.steps} interleaved steps: {extra * 1000:+.2f} ms "
          f"({100 * extra / step['plain memmap']:+.2f} %)")
    for name in reads:
        print(f"read_rows of {len(sorted_rows)} rows (feature extraction), {name}: "
              f"{reads[name] * 1000:.1f} ms")


if __name__ == "__main__":
    main()
