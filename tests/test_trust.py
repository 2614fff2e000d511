"""Trust: checkpoints cannot run code, outputs follow the umask, evaluation files results under
the hash of the bytes it evaluated, a malformed ledger is one line, stop signals are deferred.

Training-based checks (SIGTERM then --resume, --force failures, a full disk) live in
tests/test_training.py next to the trained fixtures they reuse.
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import stat
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import assert_refused, copy_workspace, invoke
from dmdl_cli.atomic import atomic_write_text
from dmdl_cli.errors import DmdlError, Interrupted
from dmdl_cli.model.loading import initial_model
from dmdl_cli.recipe import load_recipe
from dmdl_cli.training.signals import StopRequest
from dmdl_cli.workspace import load_checkpoint, save_checkpoint


pytestmark = pytest.mark.usefixtures("one_torch_thread")


class _Payload:
    """Unpickling this runs a shell command that creates ``marker``: what a hostile .pt does."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


def _hostile_checkpoint(path: Path, marker: Path) -> Path:
    """A file that looks like a dmdl checkpoint (model, meta) and runs code when unpickled."""
    torch.save({"model": {"w": torch.zeros(1)}, "meta": {"arch": "resnet18", "input_size": [64, 32],
                                                         "run": _Payload(marker)}}, path)
    return path


def test_a_hostile_checkpoint_runs_nothing_on_any_loading_path(tiny_workspace, tmp_path):
    import dmdl_cli

    marker = tmp_path / "pwned"
    evil = _hostile_checkpoint(tmp_path / "evil.pt", marker)
    ws = copy_workspace(tiny_workspace, tmp_path)
    commands = {
        "evaluate": ["evaluate", "--workspace", ws, "--mode", "all-search", "--checkpoint", evil],
        "cluster": ["cluster", "--workspace", ws, "--checkpoint", evil],
        "export": ["export", "--workspace", ws, "--checkpoint", evil, "--format", "torchscript"],
    }
    for name, args in commands.items():
        assert_refused(invoke(args), str(evil), "refused", "system")
        assert not marker.exists(), name
    with pytest.raises(DmdlError, match="refused: loading it would call .*system"):
        dmdl_cli.embed([np.zeros((64, 32, 3), np.uint8)], evil)
    assert not marker.exists()

    # planted where a stage reads its own files: stage2 starts from stage1/final.pt ...
    (ws / "stage1").mkdir()
    planted = ws / "stage1" / "final.pt"
    planted.write_bytes(evil.read_bytes())
    assert_refused(invoke(["train-cross", "--workspace", ws]), str(planted), "refused")
    assert not marker.exists()
    # ... and --resume reads last.pt
    planted.unlink()
    (ws / "stage1" / "last.pt").write_bytes(evil.read_bytes())
    assert_refused(invoke(["pretrain-single", "--workspace", ws, "--resume"]), "stage1/last.pt",
                   "refused")
    assert not marker.exists()

    # the file is really hostile: the unsafe loader would have run it
    torch.load(evil, weights_only=False)
    assert marker.exists()


def test_resume_state_with_numpy_and_rng_round_trips_through_the_safe_loader(tmp_path):
    import random

    from dmdl_cli.runtime import rng_state, set_rng_state

    random.seed(1)
    np.random.seed(2)
    np.random.normal()  # a cached Gaussian is part of numpy's state too
    torch.manual_seed(3)
    state = {"model": torch.nn.BatchNorm1d(4).state_dict(), "meta": {"epoch": 0, "step": 2},
             "rng": rng_state(),
             "epoch_state": {"labels": np.arange(-1, 5, dtype=np.int64),
                             "conf": np.linspace(0, 1, 6, dtype=np.float32),
                             "ids": {0: np.array([3, 1]), 1: np.zeros(0, np.int64)},
                             "prior": np.float64(0.25), "num_ids": 7}}
    expected = (random.random(), np.random.normal(), torch.rand(3))
    save_checkpoint(tmp_path / "last.pt", state)
    # every entry is a tensor or a plain container: torch's safe loader reads the raw file
    torch.load(tmp_path / "last.pt", weights_only=True)
    back = load_checkpoint(tmp_path / "last.pt")
    for key, value in state["epoch_state"].items():
        got = back["epoch_state"][key]
        if isinstance(value, dict):
            assert all(np.array_equal(got[k], v) and got[k].dtype == v.dtype for k, v in value.items())
        else:
            assert np.array_equal(got, value) and type(got) is type(value), key
    assert back["model"]._metadata == state["model"]._metadata  # BatchNorm's version survives
    set_rng_state(back["rng"])
    again = (random.random(), np.random.normal(), torch.rand(3))
    assert expected[:2] == again[:2] and torch.equal(expected[2], again[2])


@pytest.mark.parametrize("umask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o007, 0o660, 0o770)])
def test_outputs_follow_the_umask(tmp_path, umask, file_mode, dir_mode):
    from dmdl_cli.data.synthetic import generate

    old = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "out" / "a.json", "{}")
        generate(tmp_path / "synthetic", ids=(2, 0, 1), seed=0, images_per_cam=1, workers=1)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "out" / "a.json").stat().st_mode) == file_mode
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == dir_mode
    root = tmp_path / "synthetic"
    assert stat.S_IMODE(root.stat().st_mode) == dir_mode  # mkdtemp alone would make it 0700
    image = next(root.rglob("*.jpg"))
    assert stat.S_IMODE(image.stat().st_mode) == file_mode


def test_a_prepared_workspace_is_readable_by_the_group(tmp_path, synthetic_root):
    from conftest import TINY_SIZE

    ws = tmp_path / "ws"
    old = os.umask(0o022)
    try:
        result = invoke(["prepare-data", "--dataset", "sysu", "--root", synthetic_root,
                         "--workspace", ws, *TINY_SIZE])
    finally:
        os.umask(old)
    assert result.exit_code == 0, result.output
    modes = {str(p.relative_to(ws)): stat.S_IMODE(p.stat().st_mode) for p in [ws, *ws.rglob("*")]}
    assert {m for p, m in modes.items() if (ws / p).is_dir()} == {0o755}, modes
    assert {m for p, m in modes.items() if (ws / p).is_file()} == {0o644}, modes
    assert "data/cache-64x32.u8" in modes and "manifest.json" in modes


def test_evaluation_records_the_hash_of_the_bytes_it_evaluated(tiny_workspace, tmp_path, monkeypatch):
    """A trainer replacing last.pt while evaluate loads it: results and features are filed
    under the bytes that were read and evaluated, not under the file that is there afterwards."""
    ws = copy_workspace(tiny_workspace, tmp_path)
    recipe = load_recipe(ws / "recipe.yaml")
    target = ws / "stage1" / "last.pt"
    meta = {"arch": "resnet18", "input_size": [64, 32], "stage": "stage1", "epoch": 0, "step": 1,
            "complete": False}
    save_checkpoint(target, {"model": initial_model(recipe).state_dict(), "meta": meta})
    evaluated = hashlib.sha256(target.read_bytes()).hexdigest()
    torch.manual_seed(99)
    newer = tmp_path / "newer.pt"
    other = load_recipe(ws / "recipe.yaml", overrides=["train.seed=5"])
    save_checkpoint(newer, {"model": initial_model(other).state_dict(), "meta": {**meta, "step": 2}})
    real_load = torch.load

    def load_while_the_trainer_writes(*args, **kwargs):
        os.replace(newer, target) if newer.exists() else None  # the trainer's atomic rename
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", load_while_the_trainer_writes)
    result = invoke(["evaluate", "--workspace", ws, "--mode", "all-search", "--trials", "1",
                     "--checkpoint", target])
    assert result.exit_code == 0, result.output
    assert not newer.exists()  # the swap did happen, after the bytes were read
    swapped_in = hashlib.sha256(target.read_bytes()).hexdigest()
    assert swapped_in != evaluated
    report = json.loads((ws / "eval" / "all-search-stage1-last.json").read_text())
    assert report["checkpoint"]["sha256"] == evaluated
    assert "(stage1, epoch 1 step 1)" in report["checkpoint"]["description"]  # epochs from 1
    features = [p.name for p in (ws / "features").glob("*-test-*.npz")]
    assert features and all(name.startswith(evaluated[:16]) for name in features)


@pytest.mark.parametrize("change, words", [
    (lambda m: m.update(runs="none"), ["runs is str", "expected list"]),
    (lambda m: m["runs"].append(7), ["runs[1] is int", "expected dict"]),
    (lambda m: m["runs"][0].update(outputs={"a": 1}), ["runs[0].outputs is dict"]),
    (lambda m: m["runs"][0]["outputs"][0].update(bytes="12"), ["runs[0].outputs[0].bytes is str"]),
    (lambda m: m["dataset"].update(num_images="many"), ["dataset.num_images is str", "expected int"]),
    (lambda m: m.update(dataset=[1]), ["dataset is list"]),
    (lambda m: m["runs"][0].pop("stage"), ["runs[0] has no stage"]),
])
def test_a_malformed_manifest_is_one_line(tiny_workspace, tmp_path, change, words):
    ws = copy_workspace(tiny_workspace, tmp_path)
    manifest = json.loads((ws / "manifest.json").read_text())
    change(manifest)
    (ws / "manifest.json").write_text(json.dumps(manifest))
    for args in (["evaluate", "--workspace", ws, "--checkpoint", "imagenet"],
                 ["pretrain-single", "--workspace", ws]):
        assert_refused(invoke(args), "manifest.json is malformed", *words)


def test_a_stop_signal_is_deferred_to_the_loop_and_a_second_one_acts_at_once():
    class _Single:
        distributed = False

    # Python's own Ctrl-C handler, whatever this process inherited: a shell starts background
    # jobs with SIGINT ignored, and an ignored signal stays ignored (tested below)
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    previous = signal.getsignal(signal.SIGINT)
    with StopRequest() as stop:
        assert stop.requested(_Single()) == 0
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C: no KeyboardInterrupt, only the flag
        assert stop.requested(_Single()) == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):  # the second Ctrl-C is not deferred
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is previous
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with StopRequest() as stop:
            os.kill(os.getpid(), signal.SIGINT)  # ignored before: still ignored, no stop asked
            assert stop.requested(_Single()) == 0
    finally:
        signal.signal(signal.SIGINT, inherited)
    with StopRequest() as stop:
        os.kill(os.getpid(), signal.SIGUSR1)  # SLURM's early warning
        assert stop.requested(_Single()) == signal.SIGUSR1
    assert Interrupted("x", signal.SIGTERM).exit_code == 143
    assert Interrupted("x", signal.SIGINT).exit_code == 130


def test_export_takes_the_lock_before_it_reads_the_checkpoint(tiny_workspace, tmp_path):
    """With a stage holding the lock, export is refused before it opens the checkpoint (here a
    hostile one: had it been read first, the refusal would name the file, not the lock)."""
    from dmdl_cli.workspace import WorkspaceLock

    ws = copy_workspace(tiny_workspace, tmp_path)
    evil = _hostile_checkpoint(tmp_path / "evil.pt", tmp_path / "pwned")
    holder = WorkspaceLock(ws / ".lock")
    holder.acquire()  # another open file description: flock conflicts even in this process
    try:
        result = invoke(["export", "--workspace", ws, "--checkpoint", evil, "--format", "torchscript"])
    finally:
        holder.release()
    line = assert_refused(result, "is in use by another dmdl process", f"pid {os.getpid()}")
    assert str(evil) not in line and not (tmp_path / "pwned").exists()
