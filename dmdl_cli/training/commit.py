"""A training run changes a stage's visible files only when it commits: with its first checkpoint.

Until then, what a new run writes for people and for later stages (its ``recipe.yaml``, the
label file of its first epoch) goes beside the files it will replace under a hidden pending
name (``stage1/.recipe.yaml.pending``, ``labels/.stage1-e001.npz.pending``), and its log
records are held in memory (``training/logs.py``). When its first ``last.pt`` is written
(``hooks.CheckpointHook``) the pending files are renamed into place, the held log replaces the
old one, and what the previous run wrote that this one has not (its ``final.pt``, later epoch
models and label files) goes. So a run that fails before its first checkpoint (a bad value, a
full disk, a broken pipe) leaves the stage exactly as it was, and ``train-cross`` still builds
on the stage-1 model that is there. A run killed outright leaves pending and temporary files
that the next run of the stage removes (:func:`clear_leftovers`: it holds the stage's lock, so
no live run owns them).

The renames of a commit follow the checkpoint within milliseconds; a process killed between
them leaves ``last.pt`` of the new run beside the previous run's recipe file, which ``--resume``
refuses by its recipe hash (``--force`` starts again).
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from dmdl_cli.atomic import remove_temporaries
from dmdl_cli.stages import StageSpec
from dmdl_cli.workspace import Workspace

PENDING = ".pending"


def pending_path(final: Path) -> Path:
    """``stage1/recipe.yaml`` -> ``stage1/.recipe.yaml.pending``."""
    return final.with_name(f".{final.name}{PENDING}")


class RunFiles:
    """Where a run writes a file that people and later stages read: beside it under its pending
    name until the run commits (:meth:`commit`), at its own name after that."""

    def __init__(self, *, committed: bool):
        self.committed = committed
        self.pending: dict[Path, Path] = {}  # final path -> pending path

    def path(self, final: Path) -> Path:
        if self.committed:
            return final
        self.pending[final] = pending_path(final)
        return self.pending[final]

    def commit(self) -> list[Path]:
        """Rename the pending files into place; returns their final paths."""
        moved = []
        for final, pending in self.pending.items():
            if pending.exists():
                os.replace(pending, final)
                moved.append(final)
        self.pending, self.committed = {}, True
        return moved

    def discard(self) -> None:
        """A run that stops before it commits: its pending files go, the stage stays as it was."""
        for pending in self.pending.values():
            pending.unlink(missing_ok=True)
        self.pending = {}


def clear_leftovers(ws: Workspace, spec: StageSpec) -> list[Path]:
    """Remove the pending and temporary files a killed run of ``spec`` left in its folder and
    among its label files (``.last.pt.*.tmp`` of a kill mid-write included); returns them."""
    folder, labels = ws.root / spec.folder, ws.root / "labels"
    found = [*folder.glob(f".*{PENDING}"), *labels.glob(f".{spec.labels_prefix}-e*.npz{PENDING}"),
             *labels.glob(f".{spec.labels_prefix}-e*.npz.*.tmp")]
    for path in found:
        if path.is_dir():  # .tensorboard.pending
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return found + remove_temporaries(folder)
