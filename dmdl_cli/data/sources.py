"""Readers of the raw data-set layouts, and the bad-image scan.

Each reader walks a data set in its published layout and returns an
:class:`~dmdl_cli.data.index.IndexTable` whose paths point into the raw tree (nothing is copied).
A root that is missing, in another layout, or inconsistent raises a one-line
:class:`~dmdl_cli.errors.DmdlError` naming the file and what to fix.

* **SYSU-MM01** (``sysu``; also ``synthetic``, written in the same layout):
  ``cam1..cam6/<pid 4 digits>/<nnnn>.jpg``; visible cams 1, 2, 4, 5, infrared cams 3, 6;
  ``exp/train_id.txt``, ``val_id.txt``, ``test_id.txt`` (comma-separated ids). The train split is
  the train + val identities, the test split the test identities, all six cameras each.
* **RegDB** (``regdb``): ``Visible/``, ``Thermal/`` and ``idx/{train,test}_{visible,thermal}_{t}.txt``
  for trial ``t`` in 1..10 (lines ``relative/path label``); camera 1 visible, 2 thermal.
* **LLCM** (``llcm``): ``idx/{train,test}_{vis,nir}.txt`` (lines ``relative/path label``); the camera
  is read from the path (``.../camK/...``, else a ``_cKK_`` file-name tag).

Rows are ordered train then test; within a split by camera (SYSU) or index file order.
"""
from __future__ import annotations

import importlib
import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from dmdl_cli.data.index import INFRARED, VISIBLE, IndexTable
from dmdl_cli.datasets import dataset_record
from dmdl_cli.errors import DmdlError

__all__ = [
    "IMAGE_EXTENSIONS",
    "SYSU_MODALITY",
    "REGDB_TRIALS",
    "read_source",
    "read_sysu",
    "read_regdb",
    "read_llcm",
    "find_bad_images",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")
SYSU_MODALITY: dict[int, int] = {1: VISIBLE, 2: VISIBLE, 3: INFRARED, 4: VISIBLE, 5: VISIBLE, 6: INFRARED}
REGDB_TRIALS = range(1, 11)
_MAX_LISTED = 10


def _listing(items: Sequence[object], limit: int = _MAX_LISTED) -> str:
    """``a, b, c`` (first ``limit`` items) plus ``and N more`` when there are more."""
    shown = ", ".join(str(x) for x in items[:limit])
    more = len(items) - limit
    return f"{shown} and {more} more" if more > 0 else shown


def read_source(dataset: str, root: str | os.PathLike[str], *, trial: int = 1) -> IndexTable:
    """Index of the data set ``dataset`` (a record of ``dmdl_cli/datasets.py``) stored at
    ``root``, read by the record's reader.

    ``trial`` selects the split of a data set with trials (RegDB: 1..10); others ignore it.
    """
    record = dataset_record(dataset)
    root_path = Path(root).expanduser()
    if not root_path.exists():
        raise DmdlError(f"{root_path}: data root does not exist; check the path "
                        f"(for {dataset}, point it at the folder holding the raw data set)")
    if not root_path.is_dir():
        raise DmdlError(f"{root_path}: data root is not a folder; point it at the data-set folder")
    module, _, function = record.reader.partition(":")
    reader = getattr(importlib.import_module(module), function)
    return reader(root_path.absolute(), **({"trial": trial} if record.trials else {}))


# ----------------------------------------------------------------------------------------------
# SYSU-MM01
# ----------------------------------------------------------------------------------------------

def _read_id_file(path: Path) -> list[int]:
    if not path.is_file():
        raise DmdlError(f"{path}: id file missing; the SYSU-MM01 layout needs exp/train_id.txt, "
                        "val_id.txt and test_id.txt")
    text = path.read_text(encoding="utf-8", errors="replace")
    tokens = [t for t in re.split(r"[,\s]+", text) if t]
    ids: list[int] = []
    for tok in tokens:
        try:
            ids.append(int(tok))
        except ValueError:
            raise DmdlError(f"{path}: {tok!r} is not an identity number; the file must be one "
                            "comma-separated line of integers") from None
    return ids


def _image_files(folder: Path) -> list[str]:
    with os.scandir(folder) as it:
        names = [e.name for e in it if e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS)]
    return sorted(names)


def read_sysu(root: Path) -> IndexTable:
    """Index of a SYSU-MM01 tree (see the module docstring)."""
    root = Path(root).absolute()
    cams = {c: root / f"cam{c}" for c in SYSU_MODALITY}
    present = [c for c, p in cams.items() if p.is_dir()]
    exp = root / "exp"
    if not present and not (exp / "train_id.txt").is_file():
        raise DmdlError(f"{root}: no cam1..cam6 folders and no exp/train_id.txt: not the "
                        "SYSU-MM01 layout; point the data root at the SYSU-MM01 folder")
    missing = [f"cam{c}" for c in cams if c not in present]
    if missing:
        raise DmdlError(f"{root}: missing camera folder(s) {', '.join(missing)} of the SYSU-MM01 "
                        "layout (cam1..cam6/<pid>/<nnnn>.jpg); restore them")
    splits = {name: _read_id_file(exp / f"{name}_id.txt") for name in ("train", "val", "test")}
    for name in ("train", "test"):
        if not splits[name]:
            raise DmdlError(f"{exp / f'{name}_id.txt'}: id file is empty; it must list the "
                            f"{name} identities as one comma-separated line")
    train_ids = sorted(set(splits["train"]) | set(splits["val"]))
    test_ids = sorted(set(splits["test"]))
    overlap = sorted(set(train_ids) & set(test_ids))
    if overlap:
        raise DmdlError(f"{exp / 'test_id.txt'}: identities {_listing(overlap)} are also in "
                        "train_id.txt/val_id.txt; an identity belongs to one split")

    # camera -> pid -> sorted file names, for the pids named in the id files
    wanted = set(train_ids) | set(test_ids)
    found: dict[int, dict[int, tuple[Path, list[str]]]] = {}
    for c, folder in cams.items():
        found[c] = {}
        with os.scandir(folder) as it:
            for entry in it:
                if not entry.is_dir() or not entry.name.isdigit():
                    continue
                pid = int(entry.name)
                if pid in wanted:
                    files = _image_files(Path(entry.path))
                    if files:
                        found[c][pid] = (Path(entry.path), files)
    for name, ids in (("train/val", train_ids), ("test", test_ids)):
        empty = [p for p in ids if not any(p in found[c] for c in cams)]
        if empty:
            file = "exp/train_id.txt or exp/val_id.txt" if name == "train/val" else "exp/test_id.txt"
            raise DmdlError(f"{root}: {len(empty)} identities named in {file} have no images in "
                            f"cam1..cam6: {_listing([f'{p:04d}' for p in empty])}; restore their "
                            "folders or remove them from the id file")

    paths: list[str] = []
    pids: list[int] = []
    cam_col: list[int] = []
    split_col: list[str] = []
    for split, ids in (("train", train_ids), ("test", test_ids)):
        for c in cams:
            for pid in ids:
                if pid not in found[c]:
                    continue
                base, files = found[c][pid]
                paths.extend(str(base / f) for f in files)
                pids.extend([pid] * len(files))
                cam_col.extend([c] * len(files))
                split_col.extend([split] * len(files))
    mods = [SYSU_MODALITY[c] for c in cam_col]
    return IndexTable(paths, pids, cam_col, mods, split_col)


# ----------------------------------------------------------------------------------------------
# list files shared by RegDB and LLCM
# ----------------------------------------------------------------------------------------------

def _read_list(root: Path, path: Path, layout_hint: str) -> tuple[list[str], list[int], list[int]]:
    """Parse a ``relative/path label`` list; returns (absolute paths, labels, line numbers)."""
    if not path.is_file():
        raise DmdlError(f"{path}: index file missing; {layout_hint}")
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    paths: list[str] = []
    labels: list[int] = []
    linenos: list[int] = []
    for lineno, line in enumerate(lines, start=1):
        line = line.strip()
        if not line:
            continue
        parts = line.rsplit(None, 1)
        if len(parts) != 2:
            raise DmdlError(f"{path}:{lineno}: expected 'relative/path label', got {line[:60]!r}; "
                            "fix or re-create the index file")
        try:
            label = int(parts[1])
        except ValueError:
            raise DmdlError(f"{path}:{lineno}: label {parts[1]!r} is not an integer; fix or "
                            "re-create the index file") from None
        rel = parts[0].replace("\\", "/").lstrip("/")
        if rel.startswith("./"):
            rel = rel[2:]
        paths.append(str(root / rel))
        labels.append(label)
        linenos.append(lineno)
    if not paths:
        raise DmdlError(f"{path}: index file is empty; it must list 'relative/path label' lines "
                        "(re-download or re-create it)")
    missing = [f"{os.path.relpath(p, root)} (line {n})"
               for p, n in zip(paths, linenos) if not os.path.isfile(p)]
    if missing:
        raise DmdlError(f"{path}: {len(missing)} listed images do not exist under {root}: "
                        f"{_listing(missing)}; "
                        "restore them or fix the index file")
    return paths, labels, linenos


# ----------------------------------------------------------------------------------------------
# RegDB
# ----------------------------------------------------------------------------------------------

def read_regdb(root: Path, *, trial: int = 1) -> IndexTable:
    """Index of RegDB trial ``trial`` (1..10): train and test lists of both modalities."""
    root = Path(root).absolute()
    if isinstance(trial, bool) or not isinstance(trial, (int, np.integer)) or trial not in REGDB_TRIALS:
        raise DmdlError(f"RegDB trial {trial!r} is out of range; choose a trial in 1..10")
    have = {name: (root / name).is_dir() for name in ("Visible", "Thermal", "idx")}
    if not any(have.values()):
        raise DmdlError(f"{root}: no Visible/, Thermal/ or idx/ folder: not the RegDB layout; "
                        "point the data root at the RegDB folder")
    missing = [f"{n}/" for n, ok in have.items() if not ok]
    if missing:
        raise DmdlError(f"{root}: missing {', '.join(missing)} of the RegDB layout "
                        "(Visible/, Thermal/, idx/); restore them")
    hint = f"RegDB needs idx/{{train,test}}_{{visible,thermal}}_{trial}.txt"
    tables = []
    for split in ("train", "test"):
        for name, mod, cam in (("visible", VISIBLE, 1), ("thermal", INFRARED, 2)):
            paths, labels, _ = _read_list(root, root / "idx" / f"{split}_{name}_{trial}.txt", hint)
            n = len(paths)
            tables.append(IndexTable(paths, labels, [cam] * n, [mod] * n, [split] * n))
    return IndexTable.concat(tables)


# ----------------------------------------------------------------------------------------------
# LLCM
# ----------------------------------------------------------------------------------------------

_CAM_DIR = re.compile(r"(?:^|/)cam(\d+)(?:/|$)", re.IGNORECASE)
_CAM_TAG = re.compile(r"_c(\d+)[_s.]", re.IGNORECASE)


def _llcm_camera(path: str) -> int | None:
    m = _CAM_DIR.search(path)
    if m is None:
        m = _CAM_TAG.search(os.path.basename(path))
    return int(m.group(1)) if m else None


def read_llcm(root: Path) -> IndexTable:
    """Index of LLCM from its four list files; cameras parsed from the image paths."""
    root = Path(root).absolute()
    idx = root / "idx"
    names = {(split, tag): idx / f"{split}_{tag}.txt"
             for split in ("train", "test") for tag in ("vis", "nir")}
    if not idx.is_dir() or not any(p.is_file() for p in names.values()):
        raise DmdlError(f"{root}: no idx/train_vis.txt, train_nir.txt, test_vis.txt or "
                        "test_nir.txt: not the LLCM layout; point the data root at the LLCM folder")
    hint = "LLCM needs idx/train_vis.txt, train_nir.txt, test_vis.txt and test_nir.txt"
    tables = []
    for (split, tag), path in names.items():
        paths, labels, linenos = _read_list(root, path, hint)
        cams = []
        for p, n in zip(paths, linenos):
            cam = _llcm_camera(os.path.relpath(p, root).replace(os.sep, "/"))
            if cam is None:
                raise DmdlError(f"{path}:{n}: no camera in {os.path.relpath(p, root)!r} (expected "
                                "a camK folder or a _cKK_ tag); fix the index file")
            cams.append(cam)
        mod = VISIBLE if tag == "vis" else INFRARED
        tables.append(IndexTable(paths, labels, cams, [mod] * len(paths), [split] * len(paths)))
    return IndexTable.concat(tables)


# ----------------------------------------------------------------------------------------------
# bad images
# ----------------------------------------------------------------------------------------------

def _check_image(path: str) -> str | None:
    """``None`` if ``path`` decodes completely, else the reason it does not."""
    try:
        size = os.path.getsize(path)
    except OSError as err:
        return f"cannot read ({err.strerror or err})"
    if size == 0:
        return "empty file (0 bytes)"
    try:
        with Image.open(path) as img:
            img.verify()
        with Image.open(path) as img:
            img.load()
    except UnidentifiedImageError:
        return "not an image"
    except Exception as err:  # noqa: BLE001 - any decoder failure means a bad image
        msg = str(err) or type(err).__name__
        return f"truncated or corrupt ({msg})"
    return None


def find_bad_images(paths: Sequence[str], *, workers: int | None = None) -> list[tuple[str, str]]:
    """Images among ``paths`` that do not decode: ``[(path, reason), ...]`` in input order.

    Catches zero-byte files, truncated files and files that are not images (PIL open + verify,
    then a full decode). Runs on ``workers`` threads (default: up to 8, bounded by the CPUs).
    """
    if not paths:
        return []
    n_workers = max(1, workers or min(8, os.cpu_count() or 1))
    if n_workers == 1:
        reasons = [_check_image(p) for p in paths]
    else:
        with ThreadPoolExecutor(n_workers) as pool:
            reasons = list(pool.map(_check_image, paths))
    return [(p, r) for p, r in zip(paths, reasons) if r is not None]
