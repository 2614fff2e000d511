"""The workspace contract: atomic writes, the lock, the manifest ledger, label and checkpoint files."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from dmdl_cli import __version__
from dmdl_cli.atomic import (
    atomic_output,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    sha256_file,
)
from dmdl_cli.errors import DmdlError
from dmdl_cli.provenance import resolve_recipe
from dmdl_cli.recipe import Recipe, load_recipe
from dmdl_cli.workspace import (
    FORMAT_VERSION,
    Workspace,
    load_checkpoint,
    load_labels,
    save_checkpoint,
    save_labels,
)

REPO = Path(__file__).resolve().parent.parent


def _listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def _child(code: str) -> subprocess.Popen:
    """A python child that runs ``code`` and prints 'ready' when it reached the critical point."""
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)


def _wait_ready(proc: subprocess.Popen) -> None:
    line = proc.stdout.readline()
    if line.strip() != "ready":
        proc.kill()
        raise AssertionError(f"child did not get ready: {line!r} {proc.stderr.read()}")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    proc.stdout.close()
    proc.stderr.close()


# --------------------------------------------------------------------------------------------
# atomic writes
# --------------------------------------------------------------------------------------------

def test_atomic_writes_replace_the_file_and_leave_no_temp(tmp_path):
    target = tmp_path / "sub" / "a.json"
    atomic_write_json(target, {"x": 1})  # creates the folder
    assert json.loads(target.read_text()) == {"x": 1}
    atomic_write_text(target, "second")
    assert target.read_text() == "second"
    atomic_write_bytes(target, b"\x00\x01")
    assert target.read_bytes() == b"\x00\x01"
    assert _listing(target.parent) == ["a.json"]
    assert sha256_file(target) == hashlib.sha256(b"\x00\x01").hexdigest()


def test_a_crash_between_write_and_rename_keeps_the_previous_file(tmp_path, monkeypatch):
    target = tmp_path / "manifest.json"
    target.write_text("previous")

    def crash(src, dst):
        raise OSError("simulated crash before the rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="simulated crash"):
        with atomic_output(target) as tmp:
            tmp.write_text("new content, complete")
            assert tmp.parent == target.parent and tmp != target
    assert target.read_text() == "previous"
    assert _listing(tmp_path) == ["manifest.json"]  # the temp file was removed
    with pytest.raises(OSError, match="simulated crash"):
        atomic_write_json(target, {"a": 1})
    assert target.read_text() == "previous" and _listing(tmp_path) == ["manifest.json"]


def test_an_error_while_writing_keeps_the_previous_file(tmp_path):
    target = tmp_path / "labels.npz"
    target.write_bytes(b"old")
    with pytest.raises(ZeroDivisionError):
        with atomic_output(target) as tmp:
            tmp.write_bytes(b"half")
            1 / 0
    assert target.read_bytes() == b"old" and _listing(tmp_path) == ["labels.npz"]
    # a new file that fails is not created at all
    with pytest.raises(KeyboardInterrupt):
        with atomic_output(tmp_path / "new.bin") as tmp:
            tmp.write_bytes(b"x")
            raise KeyboardInterrupt
    assert _listing(tmp_path) == ["labels.npz"]


def test_a_process_killed_while_writing_leaves_the_old_file_readable(tmp_path):
    target = tmp_path / "state.json"
    atomic_write_json(target, {"epoch": 1})
    proc = _child(f"""
        import sys, time
        from dmdl_cli.atomic import atomic_output
        with atomic_output({str(target)!r}) as tmp:
            with open(tmp, "w") as f:
                f.write('{{"epoch": 2, "half": ')
                f.flush()
            print("ready", flush=True)
            time.sleep(120)
    """)
    try:
        _wait_ready(proc)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        _stop(proc)
    assert proc.returncode == -signal.SIGKILL
    assert json.loads(target.read_text()) == {"epoch": 1}
    # the next write works whatever the killed one left behind
    atomic_write_json(target, {"epoch": 3})
    assert json.loads(target.read_text()) == {"epoch": 3}


# --------------------------------------------------------------------------------------------
# the lock
# --------------------------------------------------------------------------------------------

def test_lock_refuses_a_second_writer_in_another_process_and_names_its_pid(tmp_path):
    ws_dir = tmp_path / "ws"
    proc = _child(f"""
        import time
        from dmdl_cli.workspace import Workspace
        with Workspace({str(ws_dir)!r}).locked():
            print("ready", flush=True)
            time.sleep(120)
    """)
    try:
        _wait_ready(proc)
        with pytest.raises(DmdlError) as info:
            with Workspace(ws_dir).locked():
                pass
        message = str(info.value)
        assert f"(pid {proc.pid})" in message and str(ws_dir) in message
        assert "in use by another dmdl process" in message
    finally:
        _stop(proc)
    # the kernel released the killed holder's lock: no stale lock
    with Workspace(ws_dir).locked():
        assert (ws_dir / ".lock").read_text().strip() == str(os.getpid())
    assert (ws_dir / ".lock").read_text() == ""  # released: the pid is cleared


def test_lock_in_process_is_exclusive_and_released_on_error(tmp_path):
    a, b = Workspace(tmp_path / "ws"), Workspace(tmp_path / "ws")
    with a.locked():
        with pytest.raises(DmdlError, match=rf"pid {os.getpid()}\)"):
            with b.locked():
                pass
    with pytest.raises(RuntimeError):
        with a.locked():
            raise RuntimeError("stage failed")
    with b.locked():  # released after the error
        pass


# --------------------------------------------------------------------------------------------
# manifest ledger
# --------------------------------------------------------------------------------------------

def test_create_writes_nothing_until_a_stage_runs(tmp_path):
    ws = Workspace.create(tmp_path / "new")
    assert not (tmp_path / "new").exists()
    assert ws.manifest["format_version"] == FORMAT_VERSION and ws.manifest["runs"] == []
    assert ws.dataset is None
    with pytest.raises(DmdlError, match="index.csv is missing: run `dmdl prepare-data"):
        ws.require_dataset()


def test_stage_run_records_done_failed_and_interrupted(tmp_path):
    recipe = Recipe()
    ws = Workspace.create(tmp_path / "ws")
    out = tmp_path / "ws" / "stage1" / "last.pt"
    with ws.locked(), ws.stage_run("pretrain-single", recipe, note="x") as run:
        assert not ws.manifest_path.exists()  # nothing recorded yet: nothing written
        atomic_write_bytes(out, b"weights")
        run.add_output(out)
        on_disk = json.loads(ws.manifest_path.read_text())
        assert on_disk["runs"][-1]["status"] == "running"  # written with the first record
        run.add_output(out)  # recorded once
        run.add_input(out)
        run.set(epochs=2)
    ws2 = Workspace.open(tmp_path / "ws")
    entry = ws2.runs("pretrain-single")[-1]
    assert entry["status"] == "done" and entry["recipe_hash"] == recipe.hash()
    assert entry["dmdl_version"] == __version__ and entry["pid"] == os.getpid()
    assert entry["started"] <= entry["ended"]
    assert entry["outputs"] == [{"path": "stage1/last.pt", "sha256": sha256_file(out), "bytes": 7}]
    assert entry["inputs"][0]["path"] == "stage1/last.pt"
    assert entry["info"] == {"note": "x", "epochs": 2}
    assert "git_commit" in entry

    with pytest.raises(ValueError, match="boom"):
        with ws.locked(), ws.stage_run("train-cross", recipe) as run:
            run.add_input(out)
            raise ValueError("boom")
    with pytest.raises(KeyboardInterrupt):
        with ws.locked(), ws.stage_run("train-cross", recipe) as run:
            run.set(epoch=1)
            raise KeyboardInterrupt
    before = ws.manifest_path.read_bytes()
    with pytest.raises(DmdlError, match="refused"):  # before it records anything: no entry
        with ws.locked(), ws.stage_run("train-cross", recipe):
            raise DmdlError("refused")
    assert ws.manifest_path.read_bytes() == before
    runs = Workspace.open(tmp_path / "ws").runs("train-cross")
    assert [(r["status"], r.get("error")) for r in runs] == [("failed", "boom"),
                                                             ("interrupted", "KeyboardInterrupt")]
    assert all(r["ended"] for r in runs)
    assert len(Workspace.open(tmp_path / "ws").runs()) == 3


def test_open_refuses_what_is_not_a_readable_workspace(tmp_path):
    with pytest.raises(DmdlError, match="does not exist: create it with `dmdl prepare-data"):
        Workspace.open(tmp_path / "missing")
    (tmp_path / "plain").mkdir()
    with pytest.raises(DmdlError, match="manifest.json is missing: .* not a dmdl workspace"):
        Workspace.open(tmp_path / "plain")
    (tmp_path / "file").write_text("x")
    with pytest.raises(DmdlError, match="exists and is not a folder"):
        Workspace.create(tmp_path / "file")

    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "manifest.json").write_text("{ not json")
    for opener in (Workspace.open, Workspace.create):
        with pytest.raises(DmdlError, match="manifest.json is unreadable .* damaged"):
            opener(ws)
    (ws / "manifest.json").write_text(json.dumps({"format_version": 99, "runs": []}))
    for opener in (Workspace.open, Workspace.create):
        with pytest.raises(DmdlError) as info:
            opener(ws)
        message = str(info.value)
        assert "format version 99" in message and f"reads version {FORMAT_VERSION}" in message
        assert str(ws / "manifest.json") in message and "\n" not in message
    (ws / "manifest.json").write_text("[1, 2]")
    with pytest.raises(DmdlError, match="format version None"):
        Workspace.open(ws)


def test_resolve_recipe_uses_the_workspace_recipe_plus_overrides(tmp_path):
    ws = Workspace.create(tmp_path / "ws")
    ws.manifest["dataset"] = {"name": "synthetic"}
    with pytest.raises(DmdlError, match="recipe.yaml is missing: pass --recipe FILE"):
        resolve_recipe(ws, "evaluate", None, [], [])
    recipe = load_recipe(REPO / "recipes" / "demo.yaml", overrides=["data.height=64"])
    ws.save_recipe(recipe)
    resolved, origin = resolve_recipe(ws, "evaluate", None, [], [])
    assert resolved == recipe
    assert origin == {"recipe": str(ws.recipe_path), "overlays": [], "overrides": [], "inherited": []}
    assert resolve_recipe(ws, "evaluate", None, [], ["stage1.iters=1"])[0].stage1.iters == 1
    with pytest.raises(DmdlError, match="for data set 'sysu' but workspace .* holds 'synthetic'"):
        resolve_recipe(ws, "evaluate", str(REPO / "recipes" / "sysu.yaml"), [], [])
    # prepare-data: the workspace's recipe on a re-run, the data set's default with --force
    sysu = str(REPO / "recipes" / "sysu.yaml")
    assert resolve_recipe(ws, "prepare-data", None, [], [], default=sysu)[0] == recipe
    assert resolve_recipe(ws, "prepare-data", None, [], [], default=sysu, force=True)[0].data.dataset == "sysu"

# --------------------------------------------------------------------------------------------
# label and checkpoint files
# --------------------------------------------------------------------------------------------

def test_labels_round_trip_with_provenance(tmp_path):
    labels = np.array([0, 3, -1, 2, -1], dtype=np.int64)
    conf = np.linspace(0, 1, 5).astype(np.float32)
    path = tmp_path / "labels" / "stage1-e001.npz"
    save_labels(path, labels, epoch=1, recipe_hash="abc", confidence=conf)
    with np.load(path) as raw:
        assert raw["labels"].dtype == np.int32  # the on-disk contract
    got, meta, arrays = load_labels(path)
    assert got.dtype == np.int64 and np.array_equal(got, labels)
    assert meta == {"epoch": 1, "recipe_hash": "abc"}
    assert np.array_equal(arrays["confidence"], conf)
    with pytest.raises(DmdlError, match="does not exist"):
        load_labels(tmp_path / "nope.npz")
    (tmp_path / "bad.npz").write_bytes(b"garbage")
    with pytest.raises(DmdlError, match="bad.npz cannot be read"):
        load_labels(tmp_path / "bad.npz")


def test_checkpoints_round_trip_and_bad_files_are_one_line(tmp_path):
    import torch

    state = {"model": {"w": torch.arange(4.0)}, "meta": {"arch": "resnet18", "epoch": 2}}
    path = tmp_path / "stage1" / "last.pt"
    save_checkpoint(path, state)
    back = load_checkpoint(path)
    assert torch.equal(back["model"]["w"], torch.arange(4.0)) and back["meta"]["epoch"] == 2
    assert _listing(path.parent) == ["last.pt"]
    with pytest.raises(DmdlError, match="checkpoint .*missing.pt does not exist"):
        load_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"\x00not a checkpoint")
    with pytest.raises(DmdlError, match="junk.pt cannot be read .* damaged or not a dmdl checkpoint"):
        load_checkpoint(tmp_path / "junk.pt")
    torch.save({"weights": 1}, tmp_path / "other.pt")
    with pytest.raises(DmdlError, match="other.pt is not a dmdl checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
