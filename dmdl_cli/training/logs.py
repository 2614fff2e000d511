"""A stage's log: ``WS/<stage>/log.jsonl``, one JSON object per line, and optionally the same
numbers as TensorBoard events (``run.tensorboard``, :mod:`dmdl_cli.training.tensorboard`).

Records carry ``kind`` (``start``, ``labels``, ``step``, ``speed``, ``epoch``, ``monitor``,
``end``), the 0-based ``epoch`` and the ``step`` within it; ``dmdl_cli/report/logs.py`` reads
them.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from dmdl_cli.atomic import atomic_write_text
from dmdl_cli.training.commit import pending_path
from dmdl_cli.training.tensorboard import TensorBoardLog

LOG_FILE = "log.jsonl"


class JsonLog:
    """``WS/<stage>/log.jsonl``; only the main rank writes (``enabled``)."""

    def __init__(self, path: Path, enabled: bool, held: bool = False):
        self.path = path
        self.enabled = enabled
        # a new run: records are held in memory until it writes its first checkpoint, so a run
        # that fails early leaves the previous run's log as it was (training/commit.py)
        self.held: list[str] | None = [] if held else None

    def release(self) -> None:
        """Replace the previous run's log with the records held so far; append from now on."""
        if self.held is None or not self.enabled:
            return
        atomic_write_text(self.path, "".join(line + "\n" for line in self.held))
        self.held = None

    def truncate_after(self, epoch: int, step: int) -> None:
        """On resume: drop records written after the checkpoint (they will be written again)."""
        if not self.enabled or not self.path.is_file():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by the kill
            if (rec.get("epoch", 0), rec.get("step", 0)) <= (epoch, step) and rec.get("kind") != "end":
                kept.append(line)
        atomic_write_text(self.path, "".join(k + "\n" for k in kept))

    def __call__(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        line = json.dumps(record, default=_json_default)
        if self.held is not None:
            self.held.append(line)
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(line + "\n")

    def close(self) -> None:
        return None


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


def open_stage_log(folder: Path, *, main: bool, tensorboard: bool, iters: int,
                   resume_at: tuple[int, int] | None) -> JsonLog | TensorBoardLog:
    """The log of the stage that owns ``folder``: its ``log.jsonl`` and, with ``tensorboard``,
    the same numbers as TensorBoard events. A new run (``resume_at`` None) holds its records
    back and writes its events into a pending folder until it commits (``release``), so the
    previous run's log and events stay until then."""
    jsonl = JsonLog(folder / LOG_FILE, enabled=main, held=resume_at is None and main)
    if not (tensorboard and main):
        return jsonl
    events = folder / "tensorboard"
    pending = None
    if resume_at is None:
        pending = pending_path(events)
        shutil.rmtree(pending, ignore_errors=True)
    return TensorBoardLog(jsonl, events, iters, resume_at=resume_at, pending=pending)
