"""The image cache: every image decoded and resized once into one memory-mapped uint8 array.

``data/cache-{H}x{W}.u8`` is a raw C-order array of shape ``(N, H, W, 3)`` (RGB, uint8) with no
header; row ``i`` is the image of index row ``i``. Commands open it read-only with
:func:`open_cache` (an :class:`ImageCache`) and read rows without decoding anything, so data
loading costs a memory copy and a checksum.

Decoding: PIL, converted to RGB (grey IR images become three equal channels; 16-bit grey images
are scaled to 8 bits, not clipped), resized to exactly ``H x W`` with the recipe's filter
(``data.resize``: bilinear, or bicubic as the reference; :func:`load_image`), which the integrity
record names: a cache built with another filter than a command asks for is refused, and a plain
``prepare-data`` rebuilds it. The rows are written with ``pwrite`` into a temporary file whose space is
reserved first (``posix_fallocate``), so a full disk is an error naming the file and the space
needed (never the SIGBUS a write through a memory map gets), and the file is renamed into place
only when every image decoded (:func:`dmdl_cli.atomic.atomic_output`).

Integrity: the cache has no header, so ``cache-{H}x{W}.u8.json`` beside it records its shape,
size, full sha256 and the crc32 of every row (``row_checksums``). Every row a command reads is
checked against its crc32 as it is read (:class:`ImageCache`: feature extraction, the training
loader's worker processes, BatchNorm re-estimation, pictures), so a flipped byte anywhere stops
the command with one line instead of changing a result; ``prepare-data`` checks the full sha256
(it reads the whole file once: about a second per GiB from the page cache) and rebuilds a
damaged cache. The check costs about 25 us per 288 x 144 row (``benchmarks/cache_bench.py``).
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import threading
import time
import warnings
import zlib
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from dmdl_cli.atomic import atomic_output, atomic_write_json, sha256_file
from dmdl_cli.console import make_progress
from dmdl_cli.errors import DmdlError
from dmdl_cli.workspace import repair_hint

__all__ = ["open_image", "to_rgb", "resize_image", "load_image", "build_cache", "open_cache",
           "cache_resize", "ImageCache",
           "CacheDamaged", "read_rows", "row_checksums", "record_path",
           "read_record", "write_record", "cache_record", "verify_cache"]

_CHUNK = 64  # images per worker task
ROW_CHECKSUM = "crc32"  # of every row, in the integrity record (zlib.crc32: ~5 GB/s)
SAMPLE_ROWS = 256  # rows spread over the file, checked when it is opened


#: PIL modes of 16-bit grey images (16-bit PNG and TIFF infrared frames): scaled to 8 bits
_WIDE_GREY = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_WIDE_MAX = 65535
_OPEN_LOCK = threading.Lock()  # warnings filters are process-wide: one open at a time changes them


def open_image(path: str | os.PathLike[str]) -> Image.Image:
    """``PIL.Image.open`` (lazy: only the header is read) without PIL's decompression-bomb
    warning: a large photo is legitimate here, it is resized to the cache size. PIL still
    refuses an image of more than twice its pixel limit, as an error."""
    with _OPEN_LOCK, warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        return Image.open(path)


def to_rgb(img: Image.Image) -> Image.Image:
    """``img`` as RGB. PIL's own conversion clips a 16-bit grey image at 255 (nearly all white):
    such an image is scaled to 8 bits instead (v / 257, rounded)."""
    if img.mode in _WIDE_GREY:
        wide = np.clip(np.asarray(img, dtype=np.float64), 0, _WIDE_MAX)  # (H, W)
        img = Image.fromarray(np.round(wide * (255 / _WIDE_MAX)).astype(np.uint8), mode="L")
    return img.convert("RGB")


#: the PIL filter of each ``data.resize`` choice (recipe.RESIZE_FILTERS)
RESIZE_FILTERS = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}
OLD_RESIZE = "bilinear"  # what a record without a "resize" field was built with


def resize_image(img: Image.Image, height: int, width: int, resize: str) -> np.ndarray:
    """An RGB PIL image resized with filter ``resize`` to ``(height, width, 3)`` uint8 (as is
    when it already has that size)."""
    if img.size != (width, height):
        img = img.resize((width, height), RESIZE_FILTERS[resize])
    return np.asarray(img, dtype=np.uint8)


def load_image(path: str, height: int, width: int, resize: str = OLD_RESIZE) -> np.ndarray:
    """Decode ``path`` to RGB (:func:`to_rgb`) and resize (filter ``resize``) to
    ``(height, width, 3)`` uint8."""
    with open_image(path) as img:
        return resize_image(to_rgb(img), height, width, resize)


class CacheDamaged(DmdlError):
    """A cache row whose bytes do not match the crc32 its integrity record holds."""


def row_checksums(images: np.ndarray) -> np.ndarray:
    """``(k,)`` uint32: the crc32 of each row of ``images`` ``(k, H, W, 3)`` uint8."""
    return np.fromiter((zlib.crc32(np.ascontiguousarray(row)) for row in images), dtype=np.uint32,
                       count=len(images))


def _decode(paths: Sequence[str], start: int, stop: int, height: int, width: int,
            resize: str) -> np.ndarray:
    """``(stop - start, H, W, 3)`` uint8: images ``start..stop`` decoded and resized."""
    out = np.empty((stop - start, height, width, 3), dtype=np.uint8)
    for i in range(start, stop):
        try:
            out[i - start] = load_image(paths[i], height, width, resize)
        except Exception as err:  # noqa: BLE001 - report any decoder failure as a user error
            raise DmdlError(
                f"{paths[i]}: cannot decode image ({err or type(err).__name__}); replace the file "
                "or rerun `dmdl prepare-data --force --skip-bad-images`"
            ) from None
    return out


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    """Write all of ``data`` at ``offset`` (a full disk raises OSError(ENOSPC) here)."""
    while len(data):
        written = os.pwrite(fd, data, offset)
        data, offset = data[written:], offset + written


def _fill(fd: int, paths: Sequence[str], start: int, stop: int, height: int, width: int,
          resize: str, checksums: np.ndarray) -> int:
    rows = _decode(paths, start, stop, height, width, resize)
    checksums[start:stop] = row_checksums(rows)
    _pwrite_all(fd, memoryview(rows).cast("B"), start * height * width * 3)
    return stop - start


def _reserve(fd: int, size: int, target: Path) -> None:
    """Reserve ``size`` bytes for the file open as ``fd`` before anything is decoded: a disk
    without room for the cache is refused at once, naming what it needs."""
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as err:
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            free = shutil.disk_usage(target.parent).free
            raise DmdlError(
                f"cannot write {target}: {err.strerror} (the cache needs {size / 2**20:.1f} MiB, "
                f"{free / 2**20:.1f} MiB are free there); free some disk space or choose a "
                "smaller data.height x data.width, then re-run the command") from None
        if err.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise
        os.ftruncate(fd, size)  # a file system that cannot reserve: the writes say it is full


def build_cache(
    paths: Sequence[str],
    out_path: str | os.PathLike[str],
    height: int,
    width: int,
    *,
    workers: int | None = None,
    progress: bool = True,
    resize: str = OLD_RESIZE,
) -> "ImageCache":
    """Decode + resize (filter ``resize``) ``paths`` into ``out_path`` ((N, H, W, 3) uint8) and
    open it read-only.

    Decoding runs on ``workers`` threads (default: up to 8, bounded by the CPU count; PIL
    releases the GIL while decoding). ``progress`` shows a bar with the images per second.
    A file that does not decode, or a disk without room, raises :class:`DmdlError` and leaves
    ``out_path`` untouched and no temporary file behind.
    """
    n = len(paths)
    if n == 0:
        raise DmdlError(f"{out_path}: no images to cache; the index is empty (check the data root)")
    if height < 1 or width < 1:
        raise ValueError(f"cache size {height}x{width} must be positive")
    n_workers = max(1, workers or min(8, os.cpu_count() or 1))
    chunks = [(s, min(n, s + _CHUNK)) for s in range(0, n, _CHUNK)]
    checksums = np.zeros(n, dtype=np.uint32)
    with atomic_output(out_path) as tmp:
        fd = os.open(tmp, os.O_WRONLY)
        try:
            _reserve(fd, n * height * width * 3, Path(out_path))
            bar = make_progress("img")
            bar.disable = bar.disable or not progress
            with bar, ThreadPoolExecutor(n_workers) as pool:
                task = bar.add_task(f"cache {height}x{width}", total=n, info="")
                pending = {pool.submit(_fill, fd, paths, s, e, height, width, resize, checksums)
                           for s, e in chunks}
                while pending:
                    done, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for fut in done:
                        err = fut.exception()
                        if err is not None:
                            for other in pending:
                                other.cancel()
                            raise err
                        bar.advance(task, fut.result())
        finally:
            os.close(fd)
        record = cache_record(tmp, n, height, width, checksums, resize=resize)  # in the page cache
    write_record(out_path, record)
    return open_cache(out_path, n, height, width, resize=resize)


def record_path(path: str | os.PathLike[str]) -> Path:
    """``cache-HxW.u8`` -> ``cache-HxW.u8.json``: the cache's integrity record."""
    path = Path(path)
    return path.with_name(path.name + ".json")


def _file_row_checksums(path: Path, n: int, height: int, width: int) -> np.ndarray:
    """The crc32 of every row of the cache file at ``path``, read in chunks."""
    cache = np.memmap(path, dtype=np.uint8, mode="r", shape=(n, height, width, 3))
    try:
        return np.concatenate([row_checksums(cache[s:s + _CHUNK]) for s in range(0, n, _CHUNK)])
    finally:
        del cache


def cache_record(path: str | os.PathLike[str], n: int, height: int, width: int,
                 checksums: np.ndarray | None = None, *, resize: str = OLD_RESIZE) -> dict:
    """The integrity record of the cache file at ``path``: shape, bytes, sha256, the crc32 of
    every row (``checksums`` when the writer computed them, else read from the file) and the
    filter its images were resized with."""
    path = Path(path)
    if checksums is None:
        checksums = _file_row_checksums(path, int(n), int(height), int(width))
    return {"images": int(n), "height": int(height), "width": int(width),
            "bytes": path.stat().st_size, "sha256": sha256_file(path),
            "row_checksum": ROW_CHECKSUM, "resize": resize,
            # 8 hex digits per row, in row order (big-endian: each group reads as the crc32)
            "row_checksums": np.asarray(checksums, dtype=">u4").tobytes().hex()}


def record_checksums(record: dict | None, n: int) -> np.ndarray | None:
    """``(n,)`` uint32 row checksums of an integrity record; None when it has none for ``n``
    rows (a record of an older dmdl, or a damaged one)."""
    if not record or record.get("row_checksum") != ROW_CHECKSUM:
        return None
    text = record.get("row_checksums")
    if not isinstance(text, str) or len(text) != 8 * int(n):
        return None
    try:
        return np.frombuffer(bytes.fromhex(text), dtype=">u4").astype(np.uint32)
    except ValueError:
        return None


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
    """Full check (prepare-data): does the cache's sha256 match its record, which holds every
    row's checksum? And the seconds it took."""
    start = time.perf_counter()
    record = read_record(path)
    path = Path(path)
    ok = (record is not None and path.is_file()
          and path.stat().st_size == int(n) * int(height) * int(width) * 3
          and record.get("images") == n and record_checksums(record, n) is not None
          and record.get("sha256") == sha256_file(path))
    return ok, time.perf_counter() - start


class ImageCache:
    """The image cache opened read-only: ``(N, H, W, 3)`` uint8 rows, each checked against its
    crc32 as it is read (``cache[i]``, ``cache[rows]``, ``cache[a:b]``, :func:`read_rows`).

    A row that does not match raises :class:`CacheDamaged` naming the file, the row and the
    repair. The rows this process read are remembered (:meth:`read_summary`: what the ledger
    records as read). The object pickles without its memory map (a DataLoader worker re-opens
    the file on first use and checks what it reads alike).
    """

    dtype = np.dtype(np.uint8)
    ndim = 4

    def __init__(self, path: str | os.PathLike[str], shape: tuple[int, int, int, int],
                 checksums: np.ndarray, sha256: str):
        self.path = Path(path)
        self.shape = tuple(int(s) for s in shape)
        self.checksums = np.asarray(checksums, dtype=np.uint32)  # (N,)
        self.sha256 = sha256  # of the whole file, as prepared (its record's)
        self._rows: np.memmap | None = None
        self._read: np.ndarray | None = None  # (N,) bool: rows read (and checked) here

    def __len__(self) -> int:
        return self.shape[0]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_rows": None, "_read": None}

    @property
    def rows(self) -> np.memmap:
        """The raw memory map (unchecked: read through indexing instead)."""
        if self._rows is None:
            self._rows = np.memmap(self.path, dtype=np.uint8, mode="r", shape=self.shape)
        return self._rows

    def __getitem__(self, key) -> np.ndarray:
        n = self.shape[0]
        if isinstance(key, (int, np.integer)):
            row = int(key) + n if key < 0 else int(key)
            if not 0 <= row < n:
                raise IndexError(f"row {key} out of range [0, {n})")
            image = np.array(self.rows[row])
            if zlib.crc32(image) != self.checksums[row]:
                self._check(np.array([row]), image[None])  # raises, naming the row
            self.mark_read(row)
            return image
        if isinstance(key, slice):
            rows = np.arange(n)[key]
        else:
            rows = np.asarray(key)
            if rows.ndim != 1 or rows.dtype.kind not in "iu":
                raise TypeError("index an ImageCache by a row, a slice or a 1-D array of rows")
            rows = np.where(rows < 0, rows + n, rows).astype(np.int64)
            if rows.size and not (0 <= rows.min() and rows.max() < n):
                raise IndexError(f"rows outside [0, {n})")
        images = np.empty((len(rows), *self.shape[1:]), dtype=np.uint8)
        sums = np.empty(len(rows), dtype=np.uint32)
        for i, row in enumerate(rows):  # each row summed while it is in the CPU's cache
            images[i] = self.rows[row]
            sums[i] = zlib.crc32(images[i])
        self._check(rows, images, sums=sums)
        return images

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        images = self[:]
        return images if dtype is None else images.astype(dtype)

    def _check(self, rows: np.ndarray, images: np.ndarray, *, sums: np.ndarray | None = None,
               mark: bool = True) -> None:
        sums = row_checksums(images) if sums is None else sums
        bad = np.flatnonzero(sums != self.checksums[rows])
        if bad.size:
            named = ", ".join(str(r) for r in rows[bad][:5]) + (" ..." if bad.size > 5 else "")
            raise CacheDamaged(
                f"{self.path}: row {named} does not match its checksum in "
                f"{record_path(self.path).name} (the cache is damaged: a flipped bit, a bad disk "
                f"block or an edit); {repair_hint()}")
        if mark:
            self.mark_read(rows)

    def check_sample(self) -> None:
        """Check :data:`SAMPLE_ROWS` rows spread over the file (a few MiB: milliseconds), so a
        cache cut short or overwritten in a stretch is refused when it is opened, before a
        command builds its model; the rows it reads are checked again as they are."""
        rows = np.unique(np.linspace(0, self.shape[0] - 1, min(self.shape[0], SAMPLE_ROWS))
                         .round().astype(np.int64))
        self._check(rows, self.rows[rows], mark=False)

    def mark_read(self, rows: np.ndarray | int) -> None:
        """Remember ``rows`` as read (and checked): also rows a DataLoader worker read."""
        if self._read is None:
            self._read = np.zeros(self.shape[0], dtype=bool)
        self._read[rows] = True

    def read_summary(self) -> dict:
        """What this process read: ``rows_read`` and ``read_sha256``, the sha256 of the crc32s
        (big-endian) of the rows read, in row order. Every row read matched its crc32, so this
        names exactly the bytes the command's results come from."""
        mask = self._read if self._read is not None else np.zeros(self.shape[0], dtype=bool)
        sums = self.checksums[mask].astype(">u4").tobytes()
        return {"rows_read": int(mask.sum()), "read_sha256": hashlib.sha256(sums).hexdigest()}


def cache_resize(record: dict | None) -> str:
    """The resize filter an integrity record says its cache was built with."""
    return str((record or {}).get("resize", OLD_RESIZE))


def open_cache(path: str | os.PathLike[str], n: int, height: int, width: int, *,
               resize: str | None = None) -> ImageCache:
    """Open the cache at ``path`` read-only as ``(n, height, width, 3)`` uint8.

    Raises :class:`DmdlError` naming the file when it is missing, its size does not match, its
    integrity record is missing or holds no checksum for each of its rows, or (``resize``
    given) it was resized with another filter; rows are checked as they are read
    (:class:`ImageCache`).
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
    record = read_record(path)
    if record is None:
        raise DmdlError(f"{path}: image cache has no integrity record ({record_path(path).name}); "
                        f"{repair_hint()}")
    if resize is not None and cache_resize(record) != resize:
        raise DmdlError(f"{path}: the cache was resized {cache_resize(record)} but the recipe asks "
                        f"data.resize {resize}: re-run `dmdl prepare-data` with the options that "
                        "prepared the workspace (no --force needed) to rebuild it with that filter")
    checksums = record_checksums(record, n)
    if checksums is None:
        raise DmdlError(f"{path}: its integrity record {record_path(path).name} has no checksum "
                        f"of each row (an older dmdl wrote it, or it is damaged); {repair_hint()} "
                        "(it adds them without decoding the images again)")
    cache = ImageCache(path, (int(n), int(height), int(width), 3), checksums,
                       str(record.get("sha256")))
    cache.check_sample()
    return cache


def read_rows(cache: np.ndarray | ImageCache, rows: np.ndarray) -> np.ndarray:
    """``(len(rows), H, W, 3)`` uint8 images of cache ``rows``, in the order of ``rows``
    (checked against their checksums when ``cache`` is an :class:`ImageCache`).

    The cache is read in ascending row order (much faster than random reads), then reordered.
    """
    rows = np.asarray(rows, dtype=np.int64)
    ascending = np.argsort(rows, kind="stable")
    images = np.empty((len(rows), *cache.shape[1:]), dtype=cache.dtype)
    images[ascending] = cache[rows[ascending]]
    return images
