"""The image cache: every image decoded and resized once into one memory-mapped uint8 array.

``data/cache-{H}x{W}.u8`` is a raw C-order array of shape ``(N, H, W, 3)`` (RGB, uint8) with no
header; row ``i`` is the image of index row ``i``. Loaders open it read-only with
:func:`open_cache` and slice rows without decoding anything, so data loading costs a memory copy.

Decoding: PIL, converted to RGB (grey IR images become three equal channels), resized with
bilinear filtering to exactly ``H x W`` (:func:`load_image`). The file is written through
:func:`dmdl_cli.atomic.atomic_output`: the rows go into a temporary file (memory-mapped), which is
renamed into place only when every image decoded.
"""
from __future__ import annotations

import os
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from dmdl_cli.atomic import atomic_output
from dmdl_cli.console import make_progress
from dmdl_cli.errors import DmdlError

__all__ = ["cache_name", "load_image", "build_cache", "open_cache", "read_rows"]

_CHUNK = 64  # images per worker task


def cache_name(height: int, width: int) -> str:
    """File name of the cache for images of ``height`` x ``width``."""
    return f"cache-{int(height)}x{int(width)}.u8"


def load_image(path: str, height: int, width: int) -> np.ndarray:
    """Decode ``path`` to RGB and resize (bilinear) to ``(height, width, 3)`` uint8."""
    with Image.open(path) as img:
        img = img.convert("RGB")
        if img.size != (width, height):
            img = img.resize((width, height), Image.BILINEAR)
        return np.asarray(img, dtype=np.uint8)


def _fill(rows: np.memmap, paths: Sequence[str], start: int, stop: int, height: int, width: int) -> int:
    for i in range(start, stop):
        try:
            rows[i] = load_image(paths[i], height, width)
        except Exception as err:  # noqa: BLE001 - report any decoder failure as a user error
            raise DmdlError(
                f"{paths[i]}: cannot decode image ({err or type(err).__name__}); replace the file "
                "or rerun `dmdl prepare-data --force --skip-bad-images`"
            ) from None
    return stop - start


def build_cache(
    paths: Sequence[str],
    out_path: str | os.PathLike[str],
    height: int,
    width: int,
    *,
    workers: int | None = None,
    progress: bool = True,
) -> np.memmap:
    """Decode + resize ``paths`` into ``out_path`` ((N, H, W, 3) uint8) and open it read-only.

    Decoding runs on ``workers`` threads (default: up to 8, bounded by the CPU count; PIL
    releases the GIL while decoding). ``progress`` shows a bar with the images per second.
    A file that does not decode raises :class:`DmdlError` and leaves ``out_path`` untouched.
    """
    n = len(paths)
    if n == 0:
        raise DmdlError(f"{out_path}: no images to cache; the index is empty (check the data root)")
    if height < 1 or width < 1:
        raise ValueError(f"cache size {height}x{width} must be positive")
    n_workers = max(1, workers or min(8, os.cpu_count() or 1))
    chunks = [(s, min(n, s + _CHUNK)) for s in range(0, n, _CHUNK)]
    with atomic_output(out_path) as tmp:
        rows = np.memmap(tmp, dtype=np.uint8, mode="w+", shape=(n, height, width, 3))
        try:
            bar = make_progress("img")
            bar.disable = bar.disable or not progress
            with bar, ThreadPoolExecutor(n_workers) as pool:
                task = bar.add_task(f"cache {height}x{width}", total=n, info="")
                pending = {pool.submit(_fill, rows, paths, s, e, height, width) for s, e in chunks}
                while pending:
                    done, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for fut in done:
                        err = fut.exception()
                        if err is not None:
                            for other in pending:
                                other.cancel()
                            raise err
                        bar.advance(task, fut.result())
            rows.flush()
        finally:
            del rows
    return open_cache(out_path, n, height, width)


def open_cache(path: str | os.PathLike[str], n: int, height: int, width: int) -> np.memmap:
    """Open the cache at ``path`` read-only as ``(n, height, width, 3)`` uint8.

    Raises :class:`DmdlError` naming the file when it is missing or its size does not match.
    """
    path = Path(path)
    expected = int(n) * int(height) * int(width) * 3
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise DmdlError(f"{path}: image cache missing; build it with `dmdl prepare-data`") from None
    if size != expected or expected == 0:
        raise DmdlError(
            f"{path}: image cache holds {size} bytes, expected {expected} for {n} images of "
            f"{height}x{width}; rebuild it with `dmdl prepare-data --force`"
        )
    return np.memmap(path, dtype=np.uint8, mode="r", shape=(int(n), int(height), int(width), 3))


def read_rows(cache: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """``(len(rows), H, W, 3)`` uint8 images of cache ``rows``, in the order of ``rows``.

    The memmap is read in ascending row order (much faster than random reads), then reordered.
    """
    rows = np.asarray(rows, dtype=np.int64)
    ascending = np.argsort(rows, kind="stable")
    images = np.empty((len(rows), *cache.shape[1:]), dtype=cache.dtype)
    images[ascending] = cache[rows[ascending]]
    return images
