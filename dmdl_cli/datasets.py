"""The table of data sets: one record per data set, and the only place their names, readers,
default recipes and evaluation protocols are written.

The recipe's ``data.dataset`` choices, the CLI's ``--dataset`` choices, its ``--mode`` choices and
default recipe, prepare-data (which reader, whether ``--trial`` and ``--root`` apply) and the
evaluation protocols all read this table. Adding a data set is a record here, its reader and its
recipe file (docs/architecture.md). This module imports neither torch nor the readers: a record
names its reader as ``module:function``, imported when prepare-data reads the data set, so the
CLI can list and check names without loading anything heavy.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from dmdl_cli.errors import DmdlError

# Evaluation protocol kinds (implemented in dmdl_cli/evaluation/protocols.py):
# "sysu": infrared queries against a gallery of visible cameras named per mode, sampled per
#   (identity, camera), with excluded (query camera, gallery camera) pairs; de-duplicated CMC.
# "regdb": every row of the query modality against every row of the other; one trial, plain CMC.
# "llcm": every row of the query modality against a gallery of the other modality sampled per
#   (identity, camera); a query ignores its own identity seen by its own camera; de-duplicated CMC.
PROTOCOL_KINDS = ("sysu", "regdb", "llcm")
CROSS_MODES = ("visible-to-infrared", "infrared-to-visible")  # the query modality goes first


@dataclass(frozen=True)
class DataSet:
    """One data set.

    ``reader``: ``module:function`` returning its :class:`~dmdl_cli.data.index.IndexTable`,
    called as ``reader(root)`` (``reader(root, trial=t)`` when ``trials``). ``recipe``: its
    default recipe in ``recipes/``. ``protocol``: one of :data:`PROTOCOL_KINDS`; ``modes``: its
    evaluation modes (``--mode``). ``trials``: the raw set holds numbered train/test splits
    (``--trial``, ``data.trial``). ``generated``: prepare-data generates it with the synthetic
    generator from the recipe's ``synthetic:`` section (``--root`` optional).
    ``gallery_cameras``: per mode, the cameras a ``sysu`` gallery is drawn from;
    ``excluded_cameras``: (query camera, gallery camera) pairs never compared.
    """

    name: str
    title: str  # for people: "SYSU-MM01"
    reader: str
    recipe: str
    protocol: str
    modes: tuple[str, ...]
    trials: bool = False
    generated: bool = False
    gallery_cameras: dict[str, tuple[int, ...]] = field(default_factory=dict)
    excluded_cameras: tuple[tuple[int, int], ...] = ()


_SOURCES = "dmdl_cli.data.sources"
# SYSU-MM01: visible cameras 1, 2 (indoor), 4, 5; infrared 3 (indoor), 6. A camera-3 query never
# meets a camera-2 image: the two film the same room.
_SYSU_CAMERAS = {"all-search": (1, 2, 4, 5), "indoor-search": (1, 2)}
_SYSU_EXCLUDED = ((3, 2),)

DATA_SETS: dict[str, DataSet] = {record.name: record for record in (
    DataSet("sysu", "SYSU-MM01", f"{_SOURCES}:read_sysu", "sysu.yaml", "sysu", tuple(_SYSU_CAMERAS),
            gallery_cameras=_SYSU_CAMERAS, excluded_cameras=_SYSU_EXCLUDED),
    DataSet("regdb", "RegDB", f"{_SOURCES}:read_regdb", "regdb.yaml", "regdb", CROSS_MODES,
            trials=True),
    DataSet("llcm", "LLCM", f"{_SOURCES}:read_llcm", "llcm.yaml", "llcm", CROSS_MODES),
    # the embedded synthetic set, generated in the SYSU-MM01 layout and evaluated like it
    DataSet("synthetic", "synthetic", f"{_SOURCES}:read_sysu", "demo.yaml", "sysu",
            tuple(_SYSU_CAMERAS), generated=True, gallery_cameras=_SYSU_CAMERAS,
            excluded_cameras=_SYSU_EXCLUDED),
)}
DATASET_NAMES: tuple[str, ...] = tuple(DATA_SETS)
# every evaluation mode of any data set, in table order (the CLI's --mode choices)
ALL_MODES: tuple[str, ...] = tuple(dict.fromkeys(
    mode for record in DATA_SETS.values() for mode in record.modes))


def dataset_record(name: str) -> DataSet:
    """The record of data set ``name``; one :class:`DmdlError` line for a name not in the table."""
    record = DATA_SETS.get(name)
    if record is None:
        raise DmdlError(f"unknown data set {name!r}: use one of {', '.join(DATA_SETS)} "
                        "(a new one is a record in dmdl_cli/datasets.py)")
    return record
