"""The workspace contract (docs/workspace.md): layout, manifest ledger, lock, checkpoints, labels.

Every stage reads its inputs from and writes its outputs to one workspace folder, so stages can be
chained from a shell script, run alone, resumed, or re-run with another recipe. The manifest is
the ledger of what produced what; it is rewritten atomically after every change.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import fcntl
import io
import json
import os
import re
import subprocess
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np

from dmdl_cli import __version__
from dmdl_cli.atomic import atomic_output, atomic_write_json, atomic_write_text, sha256_file
from dmdl_cli.console import log
from dmdl_cli.errors import DmdlError, Interrupted
from dmdl_cli.recipe import Recipe
from dmdl_cli.stages import STAGES

if TYPE_CHECKING:
    from dmdl_cli.stages import StageSpec

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
RECIPE_FILE = "recipe.yaml"
LOCK_FILE = ".lock"
MANIFEST_LOCK = ".manifest.lock"  # held while the ledger is re-read and rewritten
DAMAGED_SUFFIX = ".damaged"  # manifest.json.damaged: a damaged ledger that prepare-data replaced
# every folder a stage owns (dmdl_cli/stages.py), and the feature cache evaluation and clustering share
STAGE_DIRS = tuple(dict.fromkeys([*(spec.folder for spec in STAGES.values()), "features"]))


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def git_commit() -> str | None:
    """The commit of the dmdl checkout this code runs from, if it is a git checkout."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "HEAD"],
            capture_output=True, text=True, timeout=5, check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def repair_hint(ws: "Workspace | None" = None) -> str:
    """The one text that says how to rebuild a damaged or missing index or cache: a plain
    re-run of prepare-data (no --force), with the workspace's own options when ``ws`` is known."""
    if ws is None:
        command, where = "dmdl prepare-data", " on this workspace"
    else:
        data = ws.dataset or {}
        command = f"dmdl prepare-data --workspace {ws.root} --dataset {data.get('name') or '...'}"
        if data.get("root") and Path(data["root"]) != ws.root / "synthetic":
            command += f" --root {data['root']}"
        where = ""
    return (f"re-run `{command}`{where} with the options that prepared it (no --force needed): "
            "it rebuilds what is damaged")


#: Types of the manifest fields the code reads: (key, allowed types); None stands for null.
_DATASET_FIELDS = (("name", (str,)), ("root", (str,)), ("fingerprint", (str,)),
                   ("index_sha256", (str,)), ("num_images", (int,)), ("trial", (int, type(None))),
                   ("skipped_bad_images", (list,)))
_RUN_FIELDS = (("stage", (str,)), ("status", (str,)), ("inputs", (list,)), ("outputs", (list,)),
               ("info", (dict,)))
_RECORD_FIELDS = (("path", (str,)), ("sha256", (str,)), ("bytes", (int,)))


def _wrong_type(where: str, value: Any, types: tuple) -> str | None:
    if isinstance(value, bool) and bool not in types or not isinstance(value, types):
        names = " or ".join("null" if t is type(None) else t.__name__ for t in types)
        return f"{where} is {type(value).__name__} {value!r:.40}, expected {names}"
    return None


def manifest_problem(data: dict[str, Any]) -> str | None:
    """The first field of a manifest with a wrong type, in words (None when it is sound)."""
    dataset = data.get("dataset")
    if dataset is not None:
        if not isinstance(dataset, dict):
            return _wrong_type("dataset", dataset, (dict, type(None)))
        for key, types in _DATASET_FIELDS:
            if key in dataset and (problem := _wrong_type(f"dataset.{key}", dataset[key], types)):
                return problem
    runs = data.get("runs", [])
    if not isinstance(runs, list):
        return _wrong_type("runs", runs, (list,))
    for i, run in enumerate(runs):
        if not isinstance(run, dict):
            return _wrong_type(f"runs[{i}]", run, (dict,))
        for key, types in _RUN_FIELDS:
            if key not in run and key in ("stage", "status"):
                return f"runs[{i}] has no {key}"
            if key in run and (problem := _wrong_type(f"runs[{i}].{key}", run[key], types)):
                return problem
        for side in ("inputs", "outputs"):
            for j, record in enumerate(run.get(side, [])):
                if not isinstance(record, dict):
                    return _wrong_type(f"runs[{i}].{side}[{j}]", record, (dict,))
                for key, types in _RECORD_FIELDS:
                    if key in record and (problem := _wrong_type(f"runs[{i}].{side}[{j}].{key}",
                                                                 record[key], types)):
                        return problem
    return None


class DamagedManifest(DmdlError):
    """``manifest.json`` is not JSON or has fields of the wrong type (cut short, hand-edited)."""

    def __init__(self, path: Path, reason: str):
        self.reason = reason  # "unreadable (JSONDecodeError)", "malformed (runs is str ...)"
        super().__init__(
            f"{path} is {reason}: restore it from a backup, or re-run `dmdl "
            f"prepare-data` with the options that prepared the workspace: it keeps the damaged "
            f"file as {MANIFEST}{DAMAGED_SUFFIX} and starts a new ledger")


def lock_file(folder: str | None) -> str:
    """``.lock`` (the whole workspace) or ``.lock-<folder>`` (the stage that owns ``folder``)."""
    return LOCK_FILE if folder is None else f"{LOCK_FILE}-{folder}"


def _alive(pid: str) -> bool:
    """Whether ``pid`` (as written in a lock file) names a running process."""
    if not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except OSError:  # alive, owned by another user
        return True
    return True


def _holder(text: str) -> tuple[str, str]:
    """(pid, what it runs) from a lock file's text ``"<pid> <command title>"``."""
    pid, _, what = text.strip().partition(" ")
    return pid or "unknown", what


def open_lock_file(path: Path) -> tuple[int, bool]:
    """(fd, writable) of a lock file. A new one gets the mode the umask gives (0664 under umask
    002), so a group sharing the workspace can lock it; one made by another user that this user
    cannot write is opened read-only (a flock needs no write access; the holder's pid is then
    not written into it)."""
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o666), True
    except PermissionError:
        return os.open(path, os.O_RDONLY), False


class WorkspaceLock:
    """A ``flock`` on a lock file of the workspace: exclusive (the holder writes its pid and
    what it runs into the file) or shared (several holders; nothing written).

    The kernel releases a flock when its process dies, so a killed run never leaves a stale lock.
    """

    def __init__(self, path: Path, *, shared: bool = False, holder: str = ""):
        self.path = path
        self.shared = shared
        self.holder = holder  # what the holder runs, for the refusal of others: "stage 1 (pretrain-single)"
        self._fd: int | None = None
        self._writable = False

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, self._writable = open_lock_file(self.path)
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except OSError as err:
            text = os.pread(fd, 256, 0).decode(errors="replace")
            os.close(fd)
            if err.errno in (errno.EAGAIN, errno.EACCES):
                raise DmdlError(self._refusal(text)) from None
            raise
        if not self.shared and self._writable:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()} {self.holder}".strip().encode() + b"\n", 0)
        self._fd = fd

    def _refusal(self, text: str) -> str:
        """Who holds the lock, in one line. A refused exclusive lock of the whole workspace is
        held shared by stage commands: each names itself in its own stage lock file."""
        holders = [_holder(text)] if text.strip() else []
        if self.path.name == LOCK_FILE and not any(_alive(pid) for pid, _ in holders):
            # held shared by stage commands (or the text is a killed holder's): each stage
            # command names itself in its own stage lock file
            holders = [h for f in sorted(self.path.parent.glob(f"{LOCK_FILE}-*"))
                       if _alive((h := _holder(f.read_text(errors="replace")))[0])]
        named = " and ".join(f"(pid {pid})" + (f" running {what}" if what else "")
                             for pid, what in holders)
        if not named:  # held shared: a later stage reads this stage's result while it runs
            readers = self._readers()
            named = ("that reads this stage's results (a later stage training from them: "
                     + ", ".join(f"pid {pid} running {what}" for pid, what in readers) + ")"
                     if readers else "(one that does not name itself: evaluate or cluster, "
                     "which may run several at once)")
        return (f"workspace {self.path.parent} is in use by another dmdl process {named}; "
                "wait for it to finish or stop it")

    def _readers(self) -> list[tuple[str, str]]:
        """Live holders of the stages that start from the stage owning this lock file (they
        hold it shared while they run; each names itself in its own stage lock file)."""
        readers = []
        for spec in STAGES.values():
            if spec.upstream and self.path.name == lock_file(STAGES[spec.upstream].folder):
                own = self.path.parent / lock_file(spec.folder)
                holder = _holder(own.read_text(errors="replace")) if own.is_file() else ("", "")
                if _alive(holder[0]):
                    readers.append(holder)
        return readers

    def release(self) -> None:
        if self._fd is not None:
            if not self.shared and self._writable:
                with contextlib.suppress(OSError):
                    os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


@dataclass
class StageRun:
    """One entry of the manifest ledger, filled in while a stage runs.

    The entry reaches ``manifest.json`` with the first input, output or info it writes (a
    command refused before that leaves the ledger as it was), then after every change.
    """

    workspace: "Workspace"
    entry: dict[str, Any]
    recorded: bool = False  # the entry is in manifest.json

    def add_input(self, path: Path, sha256: str | None = None, *, write: bool = True,
                  **details: Any) -> None:
        """Record a file the command read (``details``: more fields of its record, such as the
        rows read of the image cache); ``write=False`` keeps it in memory until the next write
        (an input opened before the command's checks are done)."""
        self._add("inputs", {**self.workspace.file_record(path, sha256), **details}, write)

    def add_output(self, path: Path, sha256: str | None = None) -> None:
        self._add("outputs", self.workspace.file_record(path, sha256), True)

    def _add(self, side: str, record: dict[str, Any], write: bool) -> None:
        """Record a file once per side (a second record of the same path replaces the first)."""
        self.entry[side] = [r for r in self.entry[side] if r["path"] != record["path"]] + [record]
        if write:
            self._write()

    def set(self, **info: Any) -> None:
        self.entry.setdefault("info", {}).update(info)
        self._write()

    def _write(self) -> None:
        self.recorded = True
        self.workspace.write_manifest()


class Workspace:
    """A workspace folder. Open it with :meth:`open` (must exist) or :meth:`create`."""

    def __init__(self, root: str | os.PathLike[str]):
        self.root = Path(root).expanduser().resolve()
        self.manifest: dict[str, Any] = {}
        self._exclusive = False  # holds the whole workspace: may change the manifest's dataset
        self._own_runs: dict[str, dict[str, Any]] = {}  # id -> the ledger entries this object writes
        self.damaged_manifest: str | None = None  # why manifest.json could not be read (create)

    # -- layout -------------------------------------------------------------------------------
    @property
    def manifest_path(self) -> Path:
        return self.root / MANIFEST

    @property
    def recipe_path(self) -> Path:
        return self.root / RECIPE_FILE

    @property
    def index_path(self) -> Path:
        return self.root / "data" / "index.csv"

    def cache_path(self, height: int, width: int) -> Path:
        return self.root / "data" / f"cache-{height}x{width}.u8"

    def dir(self, name: str) -> Path:
        if name not in STAGE_DIRS:
            raise ValueError(f"unknown workspace folder {name}")
        return self.root / name

    def rel(self, path: Path) -> str:
        path = Path(path).resolve()
        try:
            return str(path.relative_to(self.root))
        except ValueError:
            return str(path)

    # -- manifest -----------------------------------------------------------------------------
    @classmethod
    def open(cls, root: str | os.PathLike[str]) -> "Workspace":
        ws = cls(root)
        if not ws.root.is_dir():
            raise DmdlError(
                f"workspace {ws.root} does not exist: create it with "
                f"`dmdl prepare-data --workspace {ws.root} ...`"
            )
        if not ws.manifest_path.is_file():
            raise DmdlError(
                f"{ws.manifest_path} is missing: {ws.root} is not a dmdl workspace; "
                "run `dmdl prepare-data` into it first"
            )
        ws.manifest = ws._read_manifest()
        return ws

    @classmethod
    def create(cls, root: str | os.PathLike[str]) -> "Workspace":
        """Open an existing workspace or start an empty one (nothing is written until a lock).

        A damaged ledger (unreadable or malformed ``manifest.json``) is not fatal here (this is
        prepare-data, which repairs a workspace): a new ledger starts, and the first write keeps
        the damaged file as ``manifest.json.damaged`` (:attr:`damaged_manifest` says why)."""
        ws = cls(root)
        try:
            ws.manifest = ws._read_manifest() if ws.manifest_path.is_file() else {}
        except DamagedManifest as err:
            ws.damaged_manifest = err.reason
        if not ws.manifest:
            if ws.root.exists() and not ws.root.is_dir():
                raise DmdlError(f"workspace path {ws.root} exists and is not a folder")
            ws.manifest = {
                "format_version": FORMAT_VERSION,
                "dmdl_version": __version__,
                "created": _now(),
                "dataset": None,
                "runs": [],
            }
        return ws

    def _read_manifest(self) -> dict[str, Any]:
        try:
            data = json.loads(self.manifest_path.read_text(encoding="utf-8"))
        except OSError as err:
            raise DmdlError(f"{self.manifest_path} cannot be read ({err.strerror or err}): check "
                            "the file's permissions") from None
        except ValueError as err:  # not JSON, not UTF-8: cut short by a full disk, overwritten
            raise DamagedManifest(self.manifest_path, f"unreadable ({err.__class__.__name__})") from None
        version = data.get("format_version") if isinstance(data, dict) else None
        if version != FORMAT_VERSION:
            raise DmdlError(
                f"{self.manifest_path} has workspace format version {version!r}, this dmdl "
                f"({__version__}) reads version {FORMAT_VERSION}: prepare a new workspace with "
                "`dmdl prepare-data`, or use the dmdl version that wrote it"
            )
        problem = manifest_problem(data)
        if problem:
            raise DamagedManifest(self.manifest_path, f"malformed ({problem})")
        return data

    def write_manifest(self) -> None:
        """Write this object's ledger entries into ``manifest.json``.

        Several commands write the ledger at once (each stage has its own lock), so each write is
        a short critical section under ``WS/.manifest.lock``: the file is re-read, this object's
        runs replace their entries on disk by ``id`` (or are appended), and the result is renamed
        into place. Only the holder of the whole workspace (prepare-data) changes ``dataset``.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        fd, _ = open_lock_file(self.root / MANIFEST_LOCK)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # held for a read and a rename: milliseconds
            if self.damaged_manifest is not None:
                self._keep_damaged_manifest()
            merged = self._read_manifest() if self.manifest_path.is_file() else dict(self.manifest)
            if self._exclusive or not self.manifest_path.is_file():
                merged["dataset"] = self.manifest.get("dataset")
            runs = [self._own_runs.get(run.get("id"), run) for run in merged.get("runs", [])]
            on_disk = {run.get("id") for run in runs}
            runs += [run for key, run in self._own_runs.items() if key not in on_disk]
            merged["runs"] = runs
            atomic_write_json(self.manifest_path, merged)
            self.manifest = merged
        finally:
            os.close(fd)  # releases the flock

    def _keep_damaged_manifest(self) -> None:
        """Move a damaged ``manifest.json`` aside (``manifest.json.damaged``): a new ledger starts."""
        aside = self.manifest_path.with_name(MANIFEST + DAMAGED_SUFFIX)
        os.replace(self.manifest_path, aside)
        log(f"[yellow]{self.manifest_path} was {self.damaged_manifest}: kept as "
            f"{aside}; a new ledger starts here[/]")
        self.damaged_manifest = None

    def file_record(self, path: Path, sha256: str | None = None) -> dict[str, Any]:
        """{path, sha256, bytes} of a file; ``sha256`` when the caller already hashed it."""
        path = Path(path)
        return {"path": self.rel(path), "sha256": sha256 or sha256_file(path),
                "bytes": path.stat().st_size}

    @property
    def dataset(self) -> dict[str, Any] | None:
        return self.manifest.get("dataset")

    def require_dataset(self) -> dict[str, Any]:
        if not self.dataset or not self.index_path.is_file():
            raise DmdlError(
                f"{self.index_path} is missing: run `dmdl prepare-data --workspace {self.root}` first"
            )
        expected = self.dataset.get("index_sha256")
        if expected and sha256_file(self.index_path) != expected:
            raise DmdlError(
                f"{self.index_path} does not match the manifest (it was changed or half-written): "
                f"{repair_hint(self)}"
            )
        return self.dataset

    def amend_run(self, entry: dict[str, Any], **fields: Any) -> None:
        """Change fields of another command's ledger entry (a dead run's, or a run whose outputs
        a ``prepare-data --force`` removed) at this object's next :meth:`write_manifest`; only
        the holder of the whole workspace does this. An entry without an id (an older dmdl's)
        cannot be told apart and is left as it is."""
        if entry.get("id"):
            self._own_runs[entry["id"]] = {**self._own_runs.get(entry["id"], entry), **fields}

    def runs(self, command: str | None = None) -> list[dict[str, Any]]:
        """The ledger entries (of ``command`` only, when given: the entries' ``stage`` field)."""
        runs = self.manifest.get("runs", [])
        return [r for r in runs if command is None or r["stage"] == command]

    # -- lock and stage runs ------------------------------------------------------------------
    @contextlib.contextmanager
    def locked(self, spec: "StageSpec | None" = None, *, reads: tuple[str, ...] | list[str] = ()
               ) -> Iterator["Workspace"]:
        """Hold the locks a command needs while it writes.

        ``spec`` None or exclusive (prepare-data): ``WS/.lock`` exclusively, alone in the
        workspace. Any other stage: ``WS/.lock`` shared (no prepare-data meanwhile) and its own
        ``WS/.lock-<folder>`` exclusively (shared for a ``concurrent`` stage: evaluate, cluster),
        so ``evaluate`` runs while ``train-cross`` trains but two ``train-cross`` do not; a stage
        that starts from an upstream stage's result also holds that stage's lock shared, so
        ``pretrain-single --force`` cannot replace stage 1 under a running ``train-cross``;
        ``reads`` names more stages whose locks are held shared (``select``, which points into
        their folders, waits for no training of them). Refused at once, naming the holder, when
        one is taken.
        """
        whole = spec is None or spec.exclusive
        locks = [WorkspaceLock(self.root / LOCK_FILE, shared=not whole,
                               holder=spec.title if spec is not None else "")]
        if not whole:
            locks.append(WorkspaceLock(self.root / lock_file(spec.folder), shared=spec.concurrent,
                                       holder=spec.title))
            for name in ([spec.upstream] if spec.upstream is not None else []) + list(reads):
                locks.append(WorkspaceLock(self.root / lock_file(STAGES[name].folder),
                                           shared=True, holder=spec.title))
        self.root.mkdir(parents=True, exist_ok=True)
        try:
            for lock in locks:
                lock.acquire()
            self._exclusive = whole
            # Another process may have changed the ledger before we took the lock.
            if self.manifest_path.is_file() and self.damaged_manifest is None:
                self.manifest = self._read_manifest()
            yield self
        finally:
            self._exclusive = False
            for lock in reversed(locks):
                lock.release()  # a lock never acquired: nothing to do

    @contextlib.contextmanager
    def stage_run(self, command: str, recipe: Recipe, *, origin: dict[str, Any] | None = None,
                  **info: Any) -> Iterator[StageRun]:
        """Record a run of ``command`` in the ledger (its ``stage`` field): running -> done, or
        failed with the error. ``origin``: how its recipe was resolved (``--recipe``,
        ``--overlay``, ``--set``, inherited keys; ``dmdl_cli.provenance.resolve_recipe``).

        Each entry has an ``id``: concurrent commands merge their own entries into the file by
        it (:meth:`write_manifest`). The entry is written with the first input, output or info
        the command records (:class:`StageRun`): a command refused before, or one with nothing
        to do, leaves the ledger (and a new workspace) as it was.
        """
        entry: dict[str, Any] = {
            "id": uuid.uuid4().hex[:16],
            "stage": command,
            "status": "running",
            "recipe_hash": recipe.hash(),
            "started": _now(),
            "ended": None,
            "pid": os.getpid(),
            "dmdl_version": __version__,
            "git_commit": git_commit(),
            "inputs": [],
            "outputs": [],
            "info": dict(info),
        }
        if origin is not None:
            entry["recipe_origin"] = origin
        self._own_runs[entry["id"]] = entry
        run = StageRun(self, entry)
        try:
            yield run
        except BaseException as err:
            stopped = isinstance(err, (KeyboardInterrupt, Interrupted))
            entry["status"] = "interrupted" if stopped else "failed"
            entry["error"] = (f"exited with status {err.code}" if isinstance(err, SystemExit)
                              else str(err) or err.__class__.__name__)
            entry["ended"] = _now()
            self._close(run)
            raise
        entry["status"] = "done"
        entry["ended"] = _now()
        self._close(run)

    def _close(self, run: StageRun) -> None:
        """Write the final state of an entry that is in the ledger; forget one that never was."""
        if run.recorded:
            self.write_manifest()
        else:
            del self._own_runs[run.entry["id"]]

    # -- recipe -------------------------------------------------------------------------------
    def save_recipe(self, recipe: Recipe) -> None:
        atomic_write_text(self.recipe_path, recipe.to_yaml())


# ---------------------------------------------------------------------------------------------
# Checkpoints and pseudo-label files


#: Tag of a numpy array stored as a tensor inside a checkpoint (see :func:`to_plain`).
_NUMPY_TAG = "__numpy__"


def to_plain(obj: Any) -> Any:
    """``obj`` with every numpy array / scalar replaced by a tagged tensor.

    Checkpoints hold only tensors and plain containers (dict, list, tuple, str, numbers), the
    things ``torch.load(weights_only=True)`` reads without running code. Numpy arrays (pseudo
    labels, confidences) become ``{"__numpy__": tensor, "dtype": "<i8", "scalar": False}`` and
    come back as the same arrays through :func:`from_plain`. Containers without numpy inside
    are returned as they are (a state dict keeps its ``_metadata``).
    """
    import torch

    if isinstance(obj, (np.ndarray, np.generic)):
        array = np.asarray(obj)
        if array.dtype.kind not in "biuf":
            raise TypeError(f"a checkpoint cannot hold a numpy array of dtype {array.dtype}")
        return {_NUMPY_TAG: torch.from_numpy(np.array(array, order="C", copy=True)),
                "dtype": array.dtype.str, "scalar": isinstance(obj, np.generic)}
    return _map_container(obj, to_plain)


def from_plain(obj: Any) -> Any:
    """Undo :func:`to_plain`: tagged tensors become the numpy arrays they were."""
    if isinstance(obj, dict) and _NUMPY_TAG in obj:
        array = obj[_NUMPY_TAG].numpy().astype(np.dtype(obj["dtype"]), copy=False)
        return array[()] if obj.get("scalar") else array
    return _map_container(obj, from_plain)


def _map_container(obj: Any, func: Any) -> Any:
    """``func`` applied to the values of a dict / list / tuple; ``obj`` itself when none changed."""
    if isinstance(obj, dict):
        values = {k: func(v) for k, v in obj.items()}
        if all(values[k] is v for k, v in obj.items()):
            return obj
        out = type(obj)(values) if type(obj) is not dict else values
        if hasattr(obj, "_metadata"):
            out._metadata = obj._metadata  # type: ignore[attr-defined]
        return out
    if type(obj) in (list, tuple):
        items = [func(v) for v in obj]
        return obj if all(a is b for a, b in zip(items, obj)) else type(obj)(items)
    return obj


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """torch.save into a temp file + fsync + rename: a kill mid-write keeps the previous file.

    Numpy arrays are stored as tensors (:func:`to_plain`) so the safe loader reads them back.
    The file is serialised in memory and written by Python, so a full disk or a file-size limit
    is an OSError that names the file (torch's own writer reports a bare RuntimeError).
    """
    import torch

    buffer = io.BytesIO()
    torch.save(to_plain(state), buffer)
    with atomic_output(path) as tmp:
        with open(tmp, "wb") as handle:
            handle.write(buffer.getbuffer())


def read_checkpoint_bytes(path: Path, *, what: str = "checkpoint") -> bytes:
    """The bytes of a checkpoint file, read once (hash them and load them from memory)."""
    path = Path(path)
    if not path.is_file():
        raise DmdlError(f"{what} {path} does not exist: check the path")
    try:
        return path.read_bytes()
    except OSError as err:
        raise DmdlError(f"{what} {path} cannot be read ({err.strerror or err}): check the file") from None


def _unsafe_global(err: Exception) -> str | None:
    """The Python object a refused file wanted to call, as torch's safe loader names it
    ("... unsupported GLOBAL posix.system ..."), or None for a file that is merely damaged."""
    found = re.search(r"GLOBAL ([\w.]+)", str(err))
    return found.group(1) if found else None


def load_checkpoint(path: Path, *, what: str = "checkpoint", data: bytes | None = None) -> dict[str, Any]:
    """A dmdl checkpoint, read with ``torch.load(weights_only=True)``: tensors and plain
    containers only, so a crafted file cannot run code. ``data``: the file's bytes, already
    read (they are loaded from memory, so the bytes hashed are the bytes loaded)."""
    import pickle

    import torch

    path = Path(path)
    if data is None:
        data = read_checkpoint_bytes(path, what=what)
    try:
        with warnings.catch_warnings():  # torch's notes on pickle protocols: the refusal says it all
            warnings.simplefilter("ignore")
            state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        unsafe = _unsafe_global(err)
        if unsafe is None:
            raise DmdlError(f"{what} {path} cannot be read (UnpicklingError): the file is damaged or "
                            "not a dmdl checkpoint") from None
        raise DmdlError(
            f"{what} {path} refused: loading it would call {unsafe}, and dmdl loads only tensors "
            "and plain containers so that a file cannot run code; it is not a dmdl checkpoint"
        ) from None
    except Exception as err:  # noqa: BLE001 - any decode failure is a corrupt file to the user
        raise DmdlError(
            f"{what} {path} cannot be read ({err.__class__.__name__}): the file is damaged or not "
            "a dmdl checkpoint"
        ) from None
    if not isinstance(state, dict) or "model" not in state or "meta" not in state:
        raise DmdlError(f"{what} {path} is not a dmdl checkpoint (no model/meta entries)")
    for key in ("model", "meta"):
        if not isinstance(state[key], dict):
            raise DmdlError(f"{what} {path} is not a dmdl checkpoint ({key} is a "
                            f"{type(state[key]).__name__}, not a mapping)")
    try:
        return from_plain(state)
    except (AttributeError, KeyError, TypeError, ValueError) as err:
        raise DmdlError(f"{what} {path} is damaged: an array entry does not decode "
                        f"({type(err).__name__}: {str(err)[:120]})") from None


def save_labels(path: Path, labels: np.ndarray, **meta: Any) -> None:
    """Pseudo labels aligned with index rows (int32, -1 = outlier) plus provenance."""
    buffer = io.BytesIO()
    extra = {k: np.asarray(v) for k, v in meta.items() if isinstance(v, np.ndarray)}
    scalars = {k: v for k, v in meta.items() if not isinstance(v, np.ndarray)}
    np.savez(buffer, labels=np.asarray(labels, dtype=np.int32),
             meta=np.asarray(json.dumps(scalars, sort_keys=True)), **extra)
    with atomic_output(path) as tmp:
        tmp.write_bytes(buffer.getvalue())


def load_labels(path: Path) -> tuple[np.ndarray, dict[str, Any], dict[str, np.ndarray]]:
    path = Path(path)
    if not path.is_file():
        raise DmdlError(f"pseudo-label file {path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as data:
            labels = data["labels"].astype(np.int64)
            meta = json.loads(str(data["meta"]))
            arrays = {k: data[k] for k in data.files if k not in ("labels", "meta")}
    except Exception as err:  # noqa: BLE001
        raise DmdlError(f"pseudo-label file {path} cannot be read ({err.__class__.__name__})") from None
    return labels, meta, arrays
