"""Stop training cleanly on SIGTERM, SIGINT (Ctrl-C) or SIGUSR1.

Cluster schedulers send SIGTERM before they kill a job (SLURM can send SIGUSR1 ahead of the time
limit with ``--signal=USR1@120``), and people press Ctrl-C. While a stage trains, the first of
these signals only sets a flag; the loop finishes the step it is in, writes ``last.pt`` at that
step, marks the run ``interrupted`` in the ledger and exits with 128 + the signal number (143
for SIGTERM, 130 for SIGINT). ``--resume`` then continues as if never stopped. A second signal
acts at once: an exception (KeyboardInterrupt for Ctrl-C), so that a checkpoint being written is
not left as a temporary file and the ledger says ``interrupted``; a third acts as it would
without dmdl (the handlers are put back after the second). A signal the process was started
with ignored (SIGINT in a shell's background job) stays ignored.
"""
from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist

from dmdl_cli.errors import Interrupted

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class StopRequest:
    """A context manager that turns the stop signals into a flag the training loop polls."""

    def __init__(self) -> None:
        self.signum = 0
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():  # handlers live there only
            for sig in STOP_SIGNALS:
                if signal.getsignal(sig) is signal.SIG_IGN:
                    continue  # ignored by whoever started us (a background job's SIGINT): keep it so
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        self._restore()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if not self.signum:  # the first: a flag the loop polls at the end of the step
            self.signum = signum
            return
        # a second acts at once, as an exception, so that a checkpoint half written is removed
        # and the ledger says `interrupted`; a third acts as it would without dmdl
        previous = self._previous.get(signum)
        self._restore()
        if callable(previous):  # Python's Ctrl-C handler: KeyboardInterrupt
            previous(signum, frame)
            return
        raise Interrupted(f"stopped at once by a second {signal_name(signum)}: the last "
                          "checkpoint written is the resume point (`--resume`)", signum)

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def requested(self, runtime: Any) -> int:
        """The signal that asked to stop, 0 if none. Under DDP every rank calls this at the same
        points and they agree (a signal seen by any rank stops all of them at the same step)."""
        if not runtime.distributed:
            return self.signum
        flag = torch.tensor([self.signum], device=runtime.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"
