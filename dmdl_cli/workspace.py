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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from dmdl_cli import __version__
from dmdl_cli.atomic import atomic_output, atomic_write_json, atomic_write_text, sha256_file
from dmdl_cli.errors import DmdlError, Interrupted
from dmdl_cli.recipe import Recipe, load_recipe
from dmdl_cli.stages import STAGES

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
RECIPE_FILE = "recipe.yaml"
LOCK_FILE = ".lock"
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


class WorkspaceLock:
    """An exclusive ``flock`` on ``WS/.lock``; the holder's pid is written into the file.

    The kernel releases a flock when its process dies, so a killed run never leaves a stale lock.
    """

    def __init__(self, path: Path):
        self.path = path
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            if err.errno in (errno.EAGAIN, errno.EACCES):
                raise DmdlError(
                    f"workspace {self.path.parent} is in use by another dmdl process "
                    f"(pid {holder}); wait for it to finish or stop it"
                ) from None
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


@dataclass
class StageRun:
    """One entry of the manifest ledger, filled in while a stage runs."""

    workspace: "Workspace"
    entry: dict[str, Any]
    outputs: list[str] = field(default_factory=list)

    def add_input(self, path: Path, sha256: str | None = None) -> None:
        self.entry["inputs"].append(self.workspace.file_record(path, sha256))
        self.workspace.write_manifest()

    def add_output(self, path: Path, sha256: str | None = None) -> None:
        record = self.workspace.file_record(path, sha256)
        self.entry["outputs"] = [o for o in self.entry["outputs"] if o["path"] != record["path"]]
        self.entry["outputs"].append(record)
        self.workspace.write_manifest()

    def set(self, **info: Any) -> None:
        self.entry.setdefault("info", {}).update(info)
        self.workspace.write_manifest()


class Workspace:
    """A workspace folder. Open it with :meth:`open` (must exist) or :meth:`create`."""

    def __init__(self, root: str | os.PathLike[str]):
        self.root = Path(root).expanduser().resolve()
        self.manifest: dict[str, Any] = {}
        # how this command's recipe was resolved (--recipe, --overlay, --set, inherited keys);
        # set by dmdl_cli.provenance and recorded in each ledger entry
        self.recipe_origin: dict[str, Any] | None = None
        self._lock = WorkspaceLock(self.root / LOCK_FILE)

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
        """Open an existing workspace or start an empty one (nothing is written until a lock)."""
        ws = cls(root)
        if ws.manifest_path.is_file():
            ws.manifest = ws._read_manifest()
        else:
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
        except (OSError, json.JSONDecodeError) as err:
            raise DmdlError(
                f"{self.manifest_path} is unreadable ({err.__class__.__name__}): the workspace is "
                "damaged; prepare a new workspace with `dmdl prepare-data`"
            ) from None
        version = data.get("format_version") if isinstance(data, dict) else None
        if version != FORMAT_VERSION:
            raise DmdlError(
                f"{self.manifest_path} has workspace format version {version!r}, this dmdl "
                f"({__version__}) reads version {FORMAT_VERSION}: prepare a new workspace with "
                "`dmdl prepare-data`, or use the dmdl version that wrote it"
            )
        problem = manifest_problem(data)
        if problem:
            raise DmdlError(
                f"{self.manifest_path} is malformed ({problem}): the workspace is damaged; restore "
                "the file or prepare a new workspace with `dmdl prepare-data`"
            )
        return data

    def write_manifest(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.manifest_path, self.manifest)

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
                f"{self.repair_hint()}"
            )
        return self.dataset

    def repair_hint(self) -> str:
        """The command that rebuilds a damaged index or cache (a plain re-run; no --force)."""
        data = self.dataset or {}
        args = f" --dataset {data['name']}" if data.get("name") else " --dataset ..."
        if data.get("root") and Path(data["root"]) != self.root / "synthetic":
            args += f" --root {data['root']}"
        return (f"re-run `dmdl prepare-data --workspace {self.root}{args}` with the options that "
                "prepared it (no --force needed): it rebuilds what is damaged")

    def runs(self, stage: str | None = None) -> list[dict[str, Any]]:
        runs = self.manifest.get("runs", [])
        return [r for r in runs if stage is None or r["stage"] == stage]

    # -- lock and stage runs ------------------------------------------------------------------
    @contextlib.contextmanager
    def locked(self) -> Iterator["Workspace"]:
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock.acquire()
        try:
            # Another process may have changed the ledger before we took the lock.
            if self.manifest_path.is_file():
                self.manifest = self._read_manifest()
            yield self
        finally:
            self._lock.release()

    @contextlib.contextmanager
    def stage_run(self, stage: str, recipe: Recipe, **info: Any) -> Iterator[StageRun]:
        """Record a stage run in the ledger: running -> done, or failed with the error."""
        entry: dict[str, Any] = {
            "stage": stage,
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
        if self.recipe_origin is not None:
            entry["recipe_origin"] = self.recipe_origin
        self.manifest.setdefault("runs", []).append(entry)
        self.write_manifest()
        run = StageRun(self, entry)
        try:
            yield run
        except BaseException as err:
            stopped = isinstance(err, (KeyboardInterrupt, Interrupted))
            entry["status"] = "interrupted" if stopped else "failed"
            entry["error"] = str(err) or err.__class__.__name__
            entry["ended"] = _now()
            self.write_manifest()
            raise
        entry["status"] = "done"
        entry["ended"] = _now()
        self.write_manifest()

    # -- recipe -------------------------------------------------------------------------------
    def save_recipe(self, recipe: Recipe) -> None:
        atomic_write_text(self.recipe_path, recipe.to_yaml())

    def resolve_recipe(
        self, path: str | None, overlays: list[str] | None = None, overrides: list[str] | None = None
    ) -> Recipe:
        """The recipe a command runs with: ``path`` or else the workspace's own, plus overrides."""
        base: str | None = path
        if base is None:
            if not self.recipe_path.is_file():
                raise DmdlError(
                    f"{self.recipe_path} is missing: pass --recipe FILE or run `dmdl prepare-data`"
                )
            base = str(self.recipe_path)
        return load_recipe(base, overlays=overlays or (), overrides=overrides or ())


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
    return from_plain(state)


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
