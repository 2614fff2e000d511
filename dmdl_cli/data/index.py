"""The image index: one row per image (path, person id, camera, modality, split).

Every reader in :mod:`dmdl_cli.data.sources` returns an :class:`IndexTable`; the workspace keeps it
as ``data/index.csv``. Row ``i`` of the index is row ``i`` of the image cache, of every feature
array and of every pseudo-label file, so the order of the rows is part of the contract.

The csv has exactly the header ``path,pid,cam,modality,split``:

* ``path``: absolute path of the image file (quoted by the csv rules if it holds a comma);
* ``pid``: person id as the data set numbers it, ``-1`` when unknown;
* ``cam``: camera number (``>= 0``);
* ``modality``: ``visible`` or ``infrared`` (the only place these strings appear; in code the
  modality is :data:`VISIBLE` = 0 or :data:`INFRARED` = 1);
* ``split``: ``train`` or ``test``.
"""
from __future__ import annotations

import csv
import hashlib
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from dmdl_cli.atomic import atomic_write_bytes
from dmdl_cli.errors import DmdlError

__all__ = [
    "VISIBLE",
    "INFRARED",
    "MODALITY_NAMES",
    "SPLITS",
    "INDEX_HEADER",
    "IndexTable",
    "index_to_csv",
    "write_index",
    "read_index",
    "index_fingerprint",
]

VISIBLE = 0
INFRARED = 1
MODALITY_NAMES = ("visible", "infrared")  # index i = name of modality i
SPLITS = ("train", "test")
INDEX_HEADER = "path,pid,cam,modality,split"

_FIX = ("re-run `dmdl prepare-data` with the options that prepared the workspace (no --force "
        "needed): it rebuilds a damaged index")


@dataclass(eq=False)
class IndexTable:
    """Column arrays of the image index; all columns have the same length ``N``.

    ``paths``: absolute paths (list of str); ``pids``: int64 (-1 = unknown); ``cams``: int64;
    ``modality``: int8 (0 visible, 1 infrared); ``split``: str array (``train`` / ``test``).
    The constructor coerces array-likes to these dtypes and checks the lengths.
    """

    paths: list[str]
    pids: np.ndarray
    cams: np.ndarray
    modality: np.ndarray
    split: np.ndarray

    def __post_init__(self) -> None:
        self.paths = [str(p) for p in self.paths]
        self.pids = np.asarray(self.pids, dtype=np.int64).reshape(-1)
        self.cams = np.asarray(self.cams, dtype=np.int64).reshape(-1)
        self.modality = np.asarray(self.modality, dtype=np.int8).reshape(-1)
        self.split = np.asarray(self.split, dtype=str).reshape(-1)
        if self.split.size == 0:
            self.split = np.zeros(0, dtype="<U5")
        n = len(self.paths)
        sizes = {len(self.pids), len(self.cams), len(self.modality), len(self.split)}
        if sizes != {n}:
            raise ValueError(
                f"IndexTable columns differ in length: paths {n}, pids {len(self.pids)}, "
                f"cams {len(self.cams)}, modality {len(self.modality)}, split {len(self.split)}"
            )

    def __len__(self) -> int:
        return len(self.paths)

    @classmethod
    def empty(cls) -> "IndexTable":
        """A table with no rows."""
        return cls([], [], [], [], [])

    @classmethod
    def concat(cls, tables: Sequence["IndexTable"]) -> "IndexTable":
        """The rows of ``tables`` one after the other."""
        if not tables:
            return cls.empty()
        return cls(
            paths=[p for t in tables for p in t.paths],
            pids=np.concatenate([t.pids for t in tables]),
            cams=np.concatenate([t.cams for t in tables]),
            modality=np.concatenate([t.modality for t in tables]),
            split=np.concatenate([t.split.astype("<U5") for t in tables]),
        )

    def select(self, mask_or_idx: np.ndarray | Sequence[int] | Sequence[bool]) -> "IndexTable":
        """A new table with the rows picked by a boolean mask (length N) or integer positions."""
        sel = np.asarray(mask_or_idx)
        if sel.dtype == bool:
            if sel.shape != (len(self),):
                raise ValueError(f"mask of shape {sel.shape} for an index of {len(self)} rows")
            idx = np.flatnonzero(sel)
        else:
            idx = sel.astype(np.int64).reshape(-1)
        return IndexTable(
            paths=[self.paths[i] for i in idx],
            pids=self.pids[idx],
            cams=self.cams[idx],
            modality=self.modality[idx],
            split=self.split[idx],
        )

    def rows(self, split: str | None = None, modality: int | None = None) -> np.ndarray:
        """Positions (int64, ascending) of the rows of ``split`` and/or ``modality``."""
        mask = np.ones(len(self), dtype=bool)
        if split is not None:
            if split not in SPLITS:
                raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
            mask &= self.split == split
        if modality is not None:
            if modality not in (VISIBLE, INFRARED):
                raise ValueError(f"unknown modality {modality!r}; expected 0 or 1")
            mask &= self.modality == modality
        return np.flatnonzero(mask).astype(np.int64)


def index_to_csv(table: IndexTable) -> str:
    """The csv text of ``table`` (header + one line per row, ``\\n`` line ends)."""
    buf = io.StringIO()
    buf.write(INDEX_HEADER + "\n")
    writer = csv.writer(buf, lineterminator="\n")
    names = MODALITY_NAMES
    for path, pid, cam, mod, split in zip(
        table.paths, table.pids.tolist(), table.cams.tolist(), table.modality.tolist(),
        table.split.tolist(),
    ):
        writer.writerow((path, pid, cam, names[mod], split))
    return buf.getvalue()


def write_index(table: IndexTable, path: str | os.PathLike[str]) -> None:
    """Write ``table`` as csv to ``path`` atomically."""
    bad = np.flatnonzero((table.modality != VISIBLE) & (table.modality != INFRARED))
    if bad.size:
        raise ValueError(f"modality {table.modality[bad[0]]} in row {bad[0]}; expected 0 or 1")
    atomic_write_bytes(path, index_to_csv(table).encode("utf-8"))


def read_index(path: str | os.PathLike[str]) -> IndexTable:
    """Read and validate an index csv written by :func:`write_index`.

    Raises :class:`DmdlError` naming the file (and the line) when it is missing or corrupt.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DmdlError(f"{path}: index missing; create it with `dmdl prepare-data`") from None
    except (OSError, UnicodeDecodeError) as err:
        raise DmdlError(f"{path}: cannot read the index ({err}); {_FIX}") from None
    lines = text.splitlines()
    if not lines or lines[0] != INDEX_HEADER:
        first = lines[0][:60] if lines else "<empty file>"
        raise DmdlError(
            f"{path}:1: header is {first!r}, expected {INDEX_HEADER!r}; {_FIX}"
        )
    paths: list[str] = []
    pids: list[int] = []
    cams: list[int] = []
    mods: list[int] = []
    splits: list[str] = []
    reader = csv.reader(io.StringIO(text.split("\n", 1)[1] if "\n" in text else ""))
    records: list[tuple[int, list[str]]] = []  # (line number in the file, fields)
    try:
        for rec in reader:
            records.append((reader.line_num + 1, rec))
    except csv.Error as err:
        raise DmdlError(f"{path}:{reader.line_num + 1}: malformed csv ({err}); {_FIX}") from None
    for lineno, rec in records:
        where = f"{path}:{lineno}"
        if len(rec) != 5:
            raise DmdlError(f"{where}: expected 5 fields ({INDEX_HEADER}), got {len(rec)}; {_FIX}")
        p, pid_s, cam_s, mod_s, split_s = rec
        try:
            pid, cam = int(pid_s), int(cam_s)
        except ValueError:
            raise DmdlError(f"{where}: pid {pid_s!r} / cam {cam_s!r} are not integers; {_FIX}") from None
        if pid < -1 or cam < 0:
            raise DmdlError(f"{where}: pid {pid} must be >= -1 and cam {cam} >= 0; {_FIX}")
        if mod_s not in MODALITY_NAMES:
            raise DmdlError(f"{where}: modality {mod_s!r} is not visible/infrared; {_FIX}")
        if split_s not in SPLITS:
            raise DmdlError(f"{where}: split {split_s!r} is not train/test; {_FIX}")
        if not p:
            raise DmdlError(f"{where}: empty path; {_FIX}")
        paths.append(p)
        pids.append(pid)
        cams.append(cam)
        mods.append(MODALITY_NAMES.index(mod_s))
        splits.append(split_s)
    return IndexTable(paths, pids, cams, mods, splits)


def index_fingerprint(table: IndexTable) -> str:
    """sha256 (hex) of the csv text of ``table``: equal tables give equal fingerprints."""
    return hashlib.sha256(index_to_csv(table).encode("utf-8")).hexdigest()
