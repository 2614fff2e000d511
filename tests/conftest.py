"""Shared fixtures: tiny synthetic raw trees, a prepared tiny workspace, and CLI helpers.

Every session fixture builds its files once in its own ``tmp_path_factory`` folder. A test that
writes into a workspace must copy it first (``copy_workspace(tiny_workspace, tmp_path)``).

* ``synthetic_root``: a raw SYSU-MM01-layout tree of the synthetic set (ids (3, 1, 2): 4 train +
  val identities, 2 test; 2 images per identity and camera; 72 images).
* ``regdb_root``, ``llcm_root``: the same identities in the RegDB and LLCM layouts.
* ``sysu_workspace``: ``synthetic_root`` prepared as ``--dataset sysu`` at 64x32.
* ``tiny_workspace``: ``dmdl prepare-data --dataset synthetic --ids 9`` at 64x32 (the demo recipe:
  resnet18, no ImageNet weights; 270 images: 6 train identities, 3 test).
* ``trained_tiny``: ``tiny_workspace`` after both training stages on ``TRAINED_TINY_SETS`` (two
  epochs of one step each, epoch models kept), trained once per session for every module that
  needs a trained workspace: never written into; a test or module fixture that adds to it (evaluate,
  cluster, export, select, ...) works on ``linked_workspace(trained_tiny, ...)``.
* ``run_cli``: ``run_cli(["evaluate", ...])`` runs the Typer app in process and checks that no
  exception escaped it (only ``typer.Exit``/``SystemExit``) and no traceback was printed.
* ``snapshot``: ``snapshot(folder)`` -> {relative path: sha256} of every file below it.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import random
import shutil
import signal
import sys
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import pytest
import torch
from typer.testing import CliRunner, Result

from dmdl_cli.cli import app
from dmdl_cli.training.signals import STOP_SIGNALS
from dmdl_cli.workspace import LOCK_FILE, MANIFEST_LOCK

REPO = Path(__file__).resolve().parents[1]
TINY_SIZE = ("--set", "data.height=64", "--set", "data.width=32", "--set", "run.workers=1")
RAW_IDS = (3, 1, 2)  # train / val / test identities of the raw trees
RAW_IMAGES_PER_CAM = 2
RAW_SEED = 3
TINY_WORKSPACE_IDS = 9
HAS_TENSORBOARD = importlib.util.find_spec("tensorboard") is not None


def load_benchmark(name: str):
    """Import ``benchmarks/<name>.py`` as module ``name`` (registered in ``sys.modules``: its
    dataclasses look themselves up there)."""
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def torch_state_kept() -> Iterator[None]:
    """Torch's thread count and deterministic-algorithms flag (with its warn-only setting) put
    back as they were after the block."""
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    threads = torch.get_num_threads()
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
        torch.set_num_threads(threads)


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """``count`` torch threads inside the block. One on the shared 2-core test machines keeps
    float reductions in one order (a run compared with another must use it both times)."""
    with torch_state_kept():
        torch.set_num_threads(count)
        yield


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module (``pytestmark = pytest.mark.usefixtures(...)``)."""
    with torch_threads(1):
        yield


@contextlib.contextmanager
def process_state_kept():
    """What a dmdl command sets for its own process and a process's end would undo, put back
    after an in-process command, so that it does not leak into later tests: torch's
    deterministic flag (``--deterministic``), torch's thread count and ``os.environ``
    (``run.threads`` sets both), the global RNGs of Python, numpy and torch (seeded by the
    stages). The working directory and the stop-signal handlers are not put back but checked:
    a command that left them changed would change them for a library user too."""
    environ = dict(os.environ)
    rngs = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cwd = os.getcwd()
    handlers = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    try:
        with torch_state_kept():
            yield
    finally:
        for key in os.environ.keys() - environ.keys():
            del os.environ[key]
        os.environ.update(environ)
        random.setstate(rngs[0])
        np.random.set_state(rngs[1])
        torch.set_rng_state(rngs[2])
    assert os.getcwd() == cwd, "a dmdl command changed the working directory"
    assert {sig: signal.getsignal(sig) for sig in STOP_SIGNALS} == handlers, \
        "a dmdl command left its signal handlers installed"


def invoke(args: Sequence[str]) -> Result:
    """Run ``dmdl ARGS`` in process (the process's state kept: :func:`process_state_kept`);
    fail the test if an exception (not an exit) escaped."""
    with process_state_kept():
        result = CliRunner().invoke(app, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError(
            f"dmdl {' '.join(map(str, args))} raised {result.exception!r}\n{result.output}"
        ) from result.exception
    assert "Traceback" not in result.output, result.output
    return result


def error_lines(output: Result | str) -> list[str]:
    """The dmdl error lines of a CliRunner result's output or of a subprocess's text."""
    text = output if isinstance(output, str) else output.output
    return [line for line in text.splitlines() if line.startswith("error:")]


def tree_snapshot(folder: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under ``folder`` (hidden files included)."""
    folder = Path(folder)
    out = {}
    if not folder.exists():
        return out
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        for name in sorted(filenames):
            if name.startswith(LOCK_FILE + "-") or name == MANIFEST_LOCK:
                continue  # lock files: a stage's is made on its first use, and holds no data
            path = Path(dirpath) / name
            out[str(path.relative_to(folder))] = hashlib.sha256(path.read_bytes()).hexdigest()
        for name in dirnames:  # empty folders count too
            sub = Path(dirpath) / name
            if not any(sub.iterdir()):
                out[str(sub.relative_to(folder)) + "/"] = "<dir>"
    return out


FAILED_MODULES: set[Path] = set()  # test files with a failed test in this session
FAILED_FIXTURES: set[str] = set()  # fixtures (direct or not) of a failed test in this session


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.failed:
        FAILED_MODULES.add(Path(item.path))
        FAILED_FIXTURES.update(getattr(item, "fixturenames", ()))
    return report


def discard_when_done(request: pytest.FixtureRequest, folder: Path) -> None:
    """Remove a module or session fixture's folder (trained workspaces: hundreds of MB of
    checkpoints) once its module (its session) is done, unless a test of that module (a test
    that used the session fixture) failed: then it stays, to inspect. With pyproject's
    ``tmp_path_retention_policy = "failed"`` this keeps the suite's temporary files small."""
    if request.scope == "session":
        failed = request.fixturename in FAILED_FIXTURES
    else:
        failed = Path(request.node.path) in FAILED_MODULES
    if not failed:
        shutil.rmtree(folder, ignore_errors=True)


# Session fixtures whose folder goes once the last test that uses them is done, not at the end
# of the session: {fixture name: node id of its last test} and {fixture name: its discard}.
LAST_USER: dict[str, str] = {}
DISCARD: dict[str, Callable[[], None]] = {}


def pytest_configure(config):
    config.addinivalue_line("markers", "run_last: run this module after every other one (it "
                            "holds large files while it runs; the session fixtures' are gone then)")


@pytest.hookimpl(trylast=True)  # after -k / -m deselection
def pytest_collection_modifyitems(items):
    """Modules marked ``run_last`` go to the end, in their order (``sorted`` is stable); then
    each session fixture's last user is recorded."""
    items[:] = sorted(items, key=lambda item: item.get_closest_marker("run_last") is not None)
    for item in items:
        for name in getattr(item, "fixturenames", ()):
            LAST_USER[name] = item.nodeid


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item, nextitem):
    result = yield
    for name, nodeid in LAST_USER.items():
        if nodeid == item.nodeid and name in DISCARD:
            DISCARD[name]()  # the discard takes itself out of DISCARD (it runs once)
    return result


def discard_after_last_user(request: pytest.FixtureRequest, folder: Path) -> Callable[[], None]:
    """:func:`discard_when_done` for a session fixture, run when the last test of the session
    that uses it is done; returns it for the fixture's own teardown too (it runs once)."""
    def discard():
        if DISCARD.pop(request.fixturename, None) is not None:
            discard_when_done(request, folder)

    DISCARD[request.fixturename] = discard
    return discard


def copy_workspace(src: Path, tmp_path: Path, name: str = "ws") -> Path:
    dst = Path(tmp_path) / name
    shutil.copytree(src, dst, symlinks=True)
    return dst


def linked_workspace(src: Path, dst: Path) -> Path:
    """A copy of workspace ``src`` at ``dst`` whose checkpoints are hard links (dmdl replaces a
    checkpoint by a rename, never writes into it, so ``src`` stays as it was): a test that trains
    or edits checkpoints leaves no 100 MB copies behind. Delete it after the test."""
    def link_checkpoints(a, b):
        return os.link(a, b) if str(a).endswith(".pt") else shutil.copy2(a, b)

    shutil.copytree(src, dst, copy_function=link_checkpoints)
    return Path(dst)


@pytest.fixture(autouse=True)
def _no_progress(monkeypatch):
    monkeypatch.setenv("DMDL_NO_PROGRESS", "1")


@pytest.fixture(autouse=True)
def _torch_state_restored():
    """Each test leaves torch's thread count and deterministic-algorithms flag as it found them
    (a runtime selected in a test, as test_batchnorm does, sets them for the rest of the process,
    as a command does): no test runs with a state an earlier one left."""
    with torch_state_kept():
        yield


@pytest.fixture
def run_cli() -> Callable[[Sequence[str]], Result]:
    return invoke


@pytest.fixture
def snapshot() -> Callable[[Path], dict[str, str]]:
    return tree_snapshot


def _generate(tmp_path_factory, layout: str) -> Path:
    from dmdl_cli.data.synthetic import generate

    root = tmp_path_factory.mktemp(f"raw-{layout}") / layout
    generate(root, ids=RAW_IDS, seed=RAW_SEED, images_per_cam=RAW_IMAGES_PER_CAM, layout=layout,
             workers=1)
    return root


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    """Raw synthetic set in the SYSU-MM01 layout (read-only: copy it before changing it)."""
    return _generate(tmp_path_factory, "sysu")


@pytest.fixture(scope="session")
def regdb_root(tmp_path_factory) -> Path:
    return _generate(tmp_path_factory, "regdb")


@pytest.fixture(scope="session")
def llcm_root(tmp_path_factory) -> Path:
    return _generate(tmp_path_factory, "llcm")


def _prepare(args: Sequence[str]) -> Result:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DMDL_NO_PROGRESS", "1")
        result = invoke(args)
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture(scope="session")
def sysu_workspace(tmp_path_factory, synthetic_root) -> Path:
    """``synthetic_root`` prepared as SYSU-MM01 at 64x32 (read-only: copy it before writing)."""
    ws = tmp_path_factory.mktemp("sysu-ws") / "ws"
    _prepare(["prepare-data", "--dataset", "sysu", "--root", synthetic_root, "--workspace", ws,
              *TINY_SIZE])
    return ws


@pytest.fixture(scope="session")
def tiny_workspace(tmp_path_factory) -> Path:
    """The demo path: ``prepare-data --dataset synthetic --ids 9`` at 64x32 (copy before writing).

    The synthetic set lives outside the workspace (``--root``), so copies of the workspace
    still point at the same raw images.
    """
    base = tmp_path_factory.mktemp("tiny")
    ws = base / "ws"
    _prepare(["prepare-data", "--dataset", "synthetic", "--ids", str(TINY_WORKSPACE_IDS),
              "--seed", "0", "--root", base / "synthetic", "--workspace", ws, *TINY_SIZE])
    return ws


@pytest.fixture(scope="session")
def trained_tiny(tiny_workspace, tmp_path_factory, request) -> Path:
    """``tiny_workspace`` after ``pretrain-single`` and ``train-cross --deterministic`` on
    ``TRAINED_TINY_SETS`` (TensorBoard event files too when the extra is installed), once per
    session, removed after the last test that uses it. Read-only: add to a ``linked_workspace``
    of it."""
    ws = copy_workspace(tiny_workspace, tmp_path_factory.mktemp("trained-tiny"))
    discard = discard_after_last_user(request, ws.parent)  # 0.5 GB of checkpoints
    # one thread whichever module asks first: test_selection_workspace resumes stage 2 with one
    # and compares the logs
    with pytest.MonkeyPatch.context() as mp, torch_threads(1):
        mp.setenv("DMDL_NO_PROGRESS", "1")
        for command in ("pretrain-single", "train-cross"):
            result = invoke([command, "--workspace", ws, "--deterministic",
                             *set_args(TRAINED_TINY_SETS)])
            assert result.exit_code == 0, result.output
    yield ws
    discard()


def clustered_features(n: int, d: int = 32, n_ids: int = 25, sigma: float = 0.9, seed: int = 0):
    """Unit features around ``n_ids`` identity centres; returns (features (n, d) float32, ids (n,))."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_ids, d))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    ids = rng.integers(0, n_ids, n)
    x = centres[ids] + sigma * rng.standard_normal((n, d)) / np.sqrt(d)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32), ids


def assert_refused(result, *words: str) -> str:
    """Non-zero exit, exactly one error line holding ``words``; returns that line."""
    assert result.exit_code != 0, result.output
    lines = error_lines(result)
    assert len(lines) == 1, result.output
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


# One epoch of one step per training stage, on the tiny workspace: the epoch switches a one-epoch
# schedule never reaches are switched off (so no command warns about them).
STAGE1_SETS = ["stage1.epochs=1", "stage1.iters=1", "stage1.clusters_per_batch=3",
               "stage1.instances=2", "cluster.min_samples=2", "run.feature_batch=128",
               "stage1.refine_from=never", "stage1.triplet_ramp=[]"]
STAGE2_SETS = ["stage2.epochs=1", "stage2.iters=1", "stage2.clusters_per_batch=3",
               "stage2.instances=2", "stage2.onehot_epochs=0", "stage2.cross_sampler_from=never",
               "stage2.triplet_ramp=[]"]


def set_args(items: list[str]) -> list[str]:
    """``["a=1", "b=2"]`` -> ``["--set", "a=1", "--set", "b=2"]``."""
    return [arg for item in items for arg in ("--set", item)]


# The schedule of ``trained_tiny`` (the last --set of a key wins): two epochs of one step per stage
# with every epoch model kept (the label-free criteria of three models per stage; epoch models for
# `dmdl select`), stage 2's triplet weight ramping between its two epochs (a resumed run must agree).
TRAINED_TINY_SETS = [*STAGE1_SETS, *STAGE2_SETS, "stage1.epochs=2", "stage2.epochs=2",
                     "stage2.triplet_ramp=[[0, 0.5], [1, 1.0]]", "run.keep_epochs=true",
                     *(["run.tensorboard=true"] if HAS_TENSORBOARD else [])]
