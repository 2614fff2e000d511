"""Training dataset: the augmented views of cached images, a pure function of
``(row, seed, view)``.

The sampler (:mod:`dmdl_cli.data.sampling`) hands out keys ``(row, aug_seed)``; every key has two
views, and the training loop asks for the *items* ``(row, aug_seed, view)`` its process forwards
(``training/forward.py``). The dataset reads row ``row`` of the uint8 image cache
``(N, H, W, 3)`` and draws the view from a ``torch.Generator`` seeded with ``aug_seed``: both
views of a key come from the same generator, whichever of them a process loads. Nothing depends
on worker identity, worker count or global RNG state, so a resumed run reproduces every batch bit
for bit.

The dataset pickles without its image array: a DataLoader worker re-opens the memmap lazily from
``(path, shape, offset)`` on first access.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from dmdl_cli.data.augment import AugmentConfig, make_view
from dmdl_cli.data.cache import ImageCache
from dmdl_cli.data.index import INFRARED, VISIBLE
from dmdl_cli.errors import DmdlError

__all__ = ["ViewDataset", "collate_items", "worker_error"]


class ViewDataset(Dataset):
    """Augmented views of cached images, keyed by ``(row, seed, view)``.

    Args:
        images: the image cache: the workspace's :class:`~dmdl_cli.data.cache.ImageCache` (each
            row checked against its checksum as it is read, in whichever process reads it), a
            path to a raw uint8 file holding ``shape`` = ``(N, H, W, 3)``
            from byte ``offset`` on (opened read-only as a memmap, lazily, once per process),
            or an array ``(N, H, W, 3)`` uint8 (an ``np.memmap`` is re-opened from its file in
            workers instead of being pickled).
        modality: ``(N,)`` ints, 0 visible / 1 infrared, aligned with the cache rows.
        config: the augmentation (:class:`AugmentConfig`).
        shape: ``(N, H, W, 3)``; required with a path, checked against an array.
        offset: byte offset of row 0 in the file (0 for a bare cache).

    ``dataset[(row, seed, view)]`` returns ``{"image": (3, H', W'), "row": int, "modality": int,
    "view": int}``: view 0 (A) or 1 (B) of the key ``(row, seed)``, uint8 or, with the reference
    augmentation, normalised float32; the same item always returns the same tensor.
    """

    def __init__(self, images: str | Path | np.ndarray, modality: Sequence[int] | np.ndarray,
                 config: AugmentConfig, *, shape: Sequence[int] | None = None,
                 offset: int = 0) -> None:
        self.config = config
        self.modality = np.asarray(modality).astype(np.int64, copy=True)  # (N,)
        self._array: np.ndarray | None = None
        self._path: str | None = None
        self._offset = int(offset)
        if isinstance(images, ImageCache):  # the workspace cache: every row read is checked
            self._shape = images.shape
            self._array = images
        elif isinstance(images, (str, Path)):
            if shape is None:
                raise ValueError("ViewDataset: `shape` (N, H, W, 3) is required with a path")
            self._path = str(images)
            self._shape = tuple(int(s) for s in shape)
            path = Path(self._path)
            expected = self._offset + int(np.prod(self._shape))
            if not path.is_file() or path.stat().st_size < expected:
                raise DmdlError(f"{path}: image cache missing or shorter than {expected} bytes; "
                                "re-run `dmdl prepare-data` with the options that prepared the "
                                "workspace (no --force needed): it rebuilds the cache")
        else:
            arr = images
            if not isinstance(arr, np.ndarray) or arr.dtype != np.uint8 or arr.ndim != 4 \
                    or arr.shape[3] != 3:
                raise ValueError("ViewDataset: images must be a uint8 array (N, H, W, 3)")
            if shape is not None and tuple(shape) != arr.shape:
                raise ValueError(f"ViewDataset: shape {tuple(shape)} != array shape {arr.shape}")
            self._shape = tuple(arr.shape)
            if isinstance(arr, np.memmap) and getattr(arr, "filename", None):
                self._path = str(arr.filename)
                self._offset = int(arr.offset)
            self._array = arr
        if self.modality.shape != (self._shape[0],):
            raise ValueError(f"ViewDataset: modality has shape {self.modality.shape}, "
                             f"expected ({self._shape[0]},)")
        bad = ~np.isin(self.modality, (VISIBLE, INFRARED))
        if bad.any():
            raise ValueError(f"ViewDataset: modality values must be {VISIBLE} or {INFRARED}")

    # -- pickling: never ship a memmap's contents to a worker ---------------------------------
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        if self._path is not None:
            state["_array"] = None  # (an ImageCache pickles without its memory map by itself)
        return state

    @property
    def images(self) -> np.ndarray:
        """The cache ``(N, H, W, 3)`` uint8, opened on first use in this process."""
        if self._array is None:
            self._array = np.memmap(self._path, dtype=np.uint8, mode="r", offset=self._offset,
                                    shape=self._shape)
        return self._array

    @property
    def shape(self) -> tuple[int, ...]:
        return self._shape

    def __len__(self) -> int:
        return self._shape[0]

    def image(self, row: int) -> torch.Tensor:
        """Row ``row`` of the cache as uint8 ``(3, H, W)`` (a copy, channel first)."""
        hwc = self.images[row]  # (H, W, 3): an ImageCache returns a checked copy
        if not isinstance(self.images, ImageCache):
            hwc = np.array(hwc, dtype=np.uint8, copy=True)
        return torch.from_numpy(hwc).permute(2, 0, 1).contiguous()

    def __getitem__(self, item: tuple[int, int, int]) -> dict[str, Any]:
        row, seed, view = int(item[0]), int(item[1]), int(item[2])
        if not 0 <= row < self._shape[0]:
            raise IndexError(f"row {row} out of range [0, {self._shape[0]})")
        if view not in (0, 1):
            raise ValueError(f"view must be 0 (A) or 1 (B), got {view}")
        generator = torch.Generator().manual_seed(seed)
        modality = int(self.modality[row])
        image = make_view(self.image(row), modality, self.config, generator, "ab"[view])
        return {"image": image, "row": row, "modality": modality, "view": view}


def worker_error(err: DmdlError) -> DmdlError:
    """A DmdlError raised in a DataLoader worker comes back wrapped with the worker's traceback
    ("Caught CacheDamaged in DataLoader worker process 0. Original Traceback ..."): its one line."""
    text = str(err).strip()
    if not text.startswith("Caught "):
        return err
    last = text.splitlines()[-1]
    return type(err)(last.partition(": ")[2] or last)


def collate_items(samples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Stack samples of :class:`ViewDataset` in order: ``images`` ``(n, 3, H, W)``; ``row``,
    ``modality``, ``view`` int64 ``(n,)``."""
    return {
        "images": torch.stack([s["image"] for s in samples]),
        "row": torch.tensor([s["row"] for s in samples], dtype=torch.int64),
        "modality": torch.tensor([s["modality"] for s in samples], dtype=torch.int64),
        "view": torch.tensor([s["view"] for s in samples], dtype=torch.int64),
    }
