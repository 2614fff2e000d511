"""User-facing errors.

Every problem a user can fix (bad input, missing file, incompatible workspace) is raised as a
:class:`DmdlError` whose message names the file and the fix. The CLI prints it as one line and
exits non-zero; nothing else in the code base prints tracebacks at users.
"""
from __future__ import annotations


class DmdlError(Exception):
    """An error the user can fix; ``str(err)`` is the one line the CLI prints."""

    exit_code = 1


class NotImplementedStage(DmdlError):
    """A stage whose issue is still open (scaffolding, not a result)."""

    exit_code = 2


class Interrupted(DmdlError):
    """A run stopped by a signal (SIGTERM, SIGINT, SIGUSR1) after it saved its resume point.

    Exits with the shell's convention for a signal, 128 + the signal number (143 for SIGTERM,
    130 for SIGINT), so schedulers and scripts see why it stopped.
    """

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum


class OutputClosed(Interrupted):
    """The reader of the output went away (``dmdl ... | head``): the command stops as a
    process killed by SIGPIPE would (exit 141), and the ledger says why."""

    def __init__(self) -> None:
        import signal

        super().__init__("stopped: its output was closed (a broken pipe, e.g. `dmdl ... | head`); "
                         "redirect the output to a file to keep it running", signal.SIGPIPE)
