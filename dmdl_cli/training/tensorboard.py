"""Optional TensorBoard event files beside a stage's ``log.jsonl`` (``run.tensorboard: true``).

:class:`TensorBoardLog` wraps the JSON-lines log: every record still goes to ``log.jsonl`` and
its numbers also become TensorBoard scalars under ``WS/<stage>/tensorboard``, on the step axis
``epoch x iterations + step``. The ``tensorboard`` package is an optional extra
(``pip install -e '.[tensorboard]'``); asking for it without the package is one error line
before anything is written.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from dmdl_cli.errors import DmdlError

SKIPPED = ("kind", "epoch", "step", "stage", "note", "mode", "recipe_hash", "init", "prior",
           "previous_epoch")
MODALITIES = ("visible", "infrared")


def require_tensorboard() -> type:
    """torch's ``SummaryWriter``; a DmdlError naming the fix when the package is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise DmdlError("run.tensorboard is true but the tensorboard package is not installed: "
                        "pip install -e '.[tensorboard]', or --set run.tensorboard=false") from None
    return SummaryWriter


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """{tag: value} of one log record: losses, pseudo-label statistics, the label-free
    criteria (``criteria/...``, on the step axis of the epoch whose labels they describe; a
    criterion not defined that epoch is left out), speed, monitoring."""
    kind = record.get("kind")
    group = {"step": "loss", "labels": "labels", "criteria": "criteria", "speed": "speed",
             "epoch": "epoch", "monitor": "monitor_test"}.get(kind)
    if group is None:
        return {}
    out: dict[str, float] = {}
    for key, value in record.items():
        if key in SKIPPED:
            continue
        if key in MODALITIES and isinstance(value, dict):
            out.update({f"{group}/{key}_{k}": float(v) for k, v in value.items()
                        if isinstance(v, (int, float)) and not isinstance(v, bool)})
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[f"{group}/{key}"] = float(value)
    return out


class TensorBoardLog:
    """A JSON-lines log (``JsonLog``) that also writes each record's scalars to TensorBoard."""

    def __init__(self, jsonl, folder: Path, iters: int, resume_at: tuple[int, int] | None = None,
                 pending: Path | None = None):
        """``resume_at`` (epoch, step) of a resumed run: events written after it are dropped,
        as ``log.jsonl`` drops its records (they are written again). ``pending``: a new run's
        events go there until :meth:`release` puts them in ``folder`` (replacing the old)."""
        self.jsonl = jsonl
        self.iters = iters
        self.folder, self.pending = folder, pending
        purge = None if resume_at is None else resume_at[0] * iters + resume_at[1] + 1
        self.writer = require_tensorboard()(log_dir=str(pending or folder), purge_step=purge)

    def truncate_after(self, epoch: int, step: int) -> None:
        self.jsonl.truncate_after(epoch, step)

    def release(self) -> None:
        """The run committed: its events replace the previous run's (the open event file
        follows its folder's rename)."""
        self.jsonl.release()
        if self.pending is not None:
            self.writer.flush()
            shutil.rmtree(self.folder, ignore_errors=True)
            os.replace(self.pending, self.folder)
            self.pending = None

    def close(self) -> None:
        self.writer.close()
        if self.pending is not None:  # the run stopped before it committed
            shutil.rmtree(self.pending, ignore_errors=True)

    def __call__(self, record: dict[str, Any]) -> None:
        self.jsonl(record)
        step = int(record.get("epoch", 0)) * self.iters + int(record.get("step", 0))
        for tag, value in scalars(record).items():
            self.writer.add_scalar(tag, value, step)
        if record.get("kind") in ("epoch", "end"):
            self.writer.flush()
