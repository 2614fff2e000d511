"""The image cache: every image decoded and resized once into one memory-mapped uint8 array.

``data/cache-{H}x{W}.u8`` is a raw C-order array of shape ``(N, H, W, 3)`` (RGB, uint8) with no
header; row ``i`` is the image of index row ``i``. Loaders open it read-only with
:func:`open_cache` and slice rows without decoding anything, so data loading costs a memory copy.

Decoding: PIL, converted to RGB (grey IR images become three equal channels), resized with
bilinear filtering to exactly ``H x W`` (:func:`load_image`). The file is written through
:func:`dmdl_cli.atomic.atomic_output`: the rows go into a temporary file (memory-mapped), which is
renamed into place only when every image decoded.

Integrity: the cache has no header, so ``cache-{H}x{W}.u8.json`` beside it records its shape,
size, full sha256 and the sha256 of a fixed sample of rows (:data:`SAMPLE_ROWS` rows spread
evenly over the file). :func:`open_cache`, which every stage goes through, checks the size and
the sampled hash (milliseconds: a few MiB are read); ``prepare-data`` checks the full sha256
(it reads the whole file once: about a second per GiB from the page cache) and rebuilds a
damaged cache.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from dmdl_cli.atomic import atomic_output, atomic_write_json, sha256_file
from dmdl_cli.console import make_progress
from dmdl_cli.errors import DmdlError
from dmdl_cli.workspace import repair_hint

__all__ = ["load_image", "build_cache", "open_cache", "read_rows", "record_path",
           "read_record", "write_record", "cache_record", "verify_cache"]

_CHUNK = 64  # images per worker task
#: Rows hashed by the quick check when a stage opens the cache (spread evenly over the file).
SAMPLE_ROWS = 256


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
        record = cache_record(tmp, n, height, width)  # hashed while the rows are in memory
    write_record(out_path, record)
    return open_cache(out_path, n, height, width)


def record_path(path: str | os.PathLike[str]) -> Path:
    """``cache-HxW.u8`` -> ``cache-HxW.u8.json``: the cache's integrity record."""
    path = Path(path)
    return path.with_name(path.name + ".json")


def sample_rows(n: int) -> np.ndarray:
    """The rows the quick check hashes: up to SAMPLE_ROWS rows spread evenly, first and last
    included."""
    return np.unique(np.linspace(0, n - 1, min(n, SAMPLE_ROWS)).round().astype(np.int64))


def sample_sha256(cache: np.ndarray) -> str:
    digest = hashlib.sha256()
    for row in sample_rows(len(cache)):
        digest.update(np.ascontiguousarray(cache[row]).tobytes())
    return digest.hexdigest()


def cache_record(path: str | os.PathLike[str], n: int, height: int, width: int) -> dict:
    """The integrity record of the cache file at ``path``: shape, bytes, sha256, sampled sha256."""
    path = Path(path)
    cache = np.memmap(path, dtype=np.uint8, mode="r", shape=(int(n), int(height), int(width), 3))
    record = {"images": int(n), "height": int(height), "width": int(width),
              "bytes": path.stat().st_size, "sha256": sha256_file(path),
              "sample_rows": len(sample_rows(n)), "sample_sha256": sample_sha256(cache)}
    del cache
    return record


def write_record(path: str | os.PathLike[str], record: dict) -> None:
    atomic_write_json(record_path(path), record)


def read_record(path: str | os.PathLike[str]) -> dict | None:
    """The integrity record of the cache at ``path``, or None when it is missing or unreadable."""
    try:
        record = json.loads(record_path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def verify_cache(path: str | os.PathLike[str], n: int, height: int, width: int) -> tuple[bool, float]:
    """Full check (prepare-data): does the cache's sha256 match its record? And the seconds it took."""
    start = time.perf_counter()
    record = read_record(path)
    path = Path(path)
    ok = (record is not None and path.is_file()
          and path.stat().st_size == int(n) * int(height) * int(width) * 3
          and record.get("images") == n and record.get("sha256") == sha256_file(path))
    return ok, time.perf_counter() - start


def open_cache(path: str | os.PathLike[str], n: int, height: int, width: int) -> np.memmap:
    """Open the cache at ``path`` read-only as ``(n, height, width, 3)`` uint8.

    Raises :class:`DmdlError` naming the file when it is missing, its size does not match, or
    its sampled rows do not hash to what its record says (the quick integrity check).
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
            f"{height}x{width}; {repair_hint()}"
        )
    cache = np.memmap(path, dtype=np.uint8, mode="r", shape=(int(n), int(height), int(width), 3))
    record = read_record(path)
    if record is None:
        raise DmdlError(f"{path}: image cache has no integrity record ({record_path(path).name}); "
                        f"{repair_hint()}")
    if record.get("sample_sha256") != sample_sha256(cache):
        raise DmdlError(f"{path}: image cache is damaged (its sampled rows do not match "
                        f"{record_path(path).name}); {repair_hint()}")
    return cache


def read_rows(cache: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """``(len(rows), H, W, 3)`` uint8 images of cache ``rows``, in the order of ``rows``.

    The memmap is read in ascending row order (much faster than random reads), then reordered.
    """
    rows = np.asarray(rows, dtype=np.int64)
    ascending = np.argsort(rows, kind="stable")
    images = np.empty((len(rows), *cache.shape[1:]), dtype=cache.dtype)
    images[ascending] = cache[rows[ascending]]
    return images
