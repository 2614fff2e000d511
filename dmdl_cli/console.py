"""One rich console for the whole tool, and the progress bar every long loop uses."""
from __future__ import annotations

import os
import sys

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from dmdl_cli.errors import OutputClosed


class _Console(Console):
    def on_broken_pipe(self) -> None:
        """rich's own handling (the rest of the output goes to /dev/null), but the command stops
        with an error the ledger can name instead of rich's bare ``SystemExit(1)``."""
        self.quiet = True
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        raise OutputClosed()


# A terminal's own width; else $COLUMNS when set (rich reads it); else 132 columns (logs, pipes).
console = _Console(highlight=False,
                   width=None if sys.stdout.isatty() or os.environ.get("COLUMNS", "").isdigit() else 132)


def log(message: str) -> None:
    """A line of stage logging: what was read, what was written, how long it took.

    Not re-wrapped (``soft_wrap``): a path in it stays one piece that can be copied."""
    console.print(message, soft_wrap=True)


class RateColumn(ProgressColumn):
    """Items per second, where one progress step may stand for several items (``per_step``)."""

    def __init__(self, unit: str):
        super().__init__()
        self.unit = unit

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        if speed is None:
            return Text(f"-- {self.unit}/s", style="cyan")
        rate = speed * float(task.fields.get("per_step", 1))
        return Text(f"{rate:,.1f} {self.unit}/s", style="cyan")


def make_progress(unit: str = "img") -> Progress:
    """A progress bar with count, rate (``unit``/s), elapsed and remaining time, and an info
    field (``progress.update(task, info="loss 1.23")``). Add tasks with ``per_step=`` when one
    advance stands for several items (a training step of B images), and ``info=""``.

    The live display is off when ``DMDL_NO_PROGRESS`` is set (tests, CI logs).
    """
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        RateColumn(unit),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
        console=console,
        disable=bool(os.environ.get("DMDL_NO_PROGRESS")),
    )
