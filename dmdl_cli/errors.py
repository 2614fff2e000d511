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
