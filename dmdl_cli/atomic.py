"""Atomic file writes: temp file in the same folder + fsync + rename.

A reader (or a resumed run) therefore sees either the previous file or the complete new one,
never a half-written file, whatever moment the process is killed at.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

from dmdl_cli.errors import DmdlError

_HASH_CHUNK = 1 << 20
#: errors that mean "this file could not be written" (disk full, quota, file-size limit, I/O)
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO, errno.EROFS, errno.EACCES,
                 errno.EPERM}


def current_umask() -> int:
    """The process umask (read by setting it and putting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """Mode of a new regular file under the current umask (0644 under umask 022)."""
    return 0o666 & ~current_umask()


def dir_mode() -> int:
    """Mode of a new folder under the current umask (0755 under umask 022)."""
    return 0o777 & ~current_umask()


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some file systems do not allow opening folders
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on clean exit fsync it and rename it over ``path``.

    On an exception the temporary file is removed and ``path`` is left untouched. The file gets
    the mode a plain ``open`` would give it under the user's umask (``mkstemp`` alone makes it
    0600, unreadable to the group sharing a workspace). A failed write (disk full, file-size
    limit, I/O error) becomes a :class:`~dmdl_cli.errors.DmdlError` naming the file and cause.
    """
    target = Path(path)
    tmp: Path | None = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        tmp = Path(tmp_name)
        try:
            os.fchmod(fd, file_mode())
        finally:
            os.close(fd)
        yield tmp
        with open(tmp, "rb+") as handle:
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
        _fsync_dir(target.parent)
    except BaseException as err:
        if tmp is not None:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        if isinstance(err, OSError) and err.errno in _WRITE_ERRNOS:
            raise write_error(target, err) from None
        raise


TEMPORARY = ".*.tmp"  # what atomic_output writes into before the rename: .<name>.<random>.tmp


def remove_temporaries(folder: str | os.PathLike[str]) -> list[Path]:
    """Remove the temporary files of :func:`atomic_output` that a killed process left in
    ``folder`` (only for a caller that holds the folder alone: no live writer owns them)."""
    found = [p for p in Path(folder).glob(TEMPORARY) if p.is_file()]
    for path in found:
        path.unlink(missing_ok=True)
    return found


def write_failure(err: BaseException | None) -> OSError | None:
    """The OSError of a failed write (disk full, quota, file-size limit, I/O) in ``err`` or the
    errors it came from (a library may wrap it in its own), None when there is none."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in _WRITE_ERRNOS:
            return err
        err = err.__cause__ or err.__context__
    return None


def write_error(target: Path, err: OSError) -> DmdlError:
    """One line naming the file that could not be written and why."""
    cause = err.strerror or err.__class__.__name__
    hint = {errno.ENOSPC: "free some disk space", errno.EDQUOT: "free some of your disk quota",
            errno.EFBIG: "the file exceeds the file-size limit (ulimit -f)",
            errno.EROFS: "the file system is read-only", errno.EACCES: "check the permissions",
            errno.EPERM: "check the permissions"}.get(err.errno, "check the disk")
    return DmdlError(f"cannot write {target}: {cause} ({hint}); the previous file, if any, is "
                     "unchanged; re-run the command when it is fixed")


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    with atomic_output(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def sha256_file(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_HASH_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()
