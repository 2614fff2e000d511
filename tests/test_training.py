"""Both training stages through the CLI on a tiny synthetic workspace: results, honesty, resume.

Every run uses ``--deterministic`` and one torch thread so that CPU results are bit-exact.
The runs go through the Typer app in this process (``dmdl_here``, in the subprocesses'
environment ENV, the process's state put back after each), which spares each the 2-4 s of a
fresh torch import; they give the same bits as a ``dmdl`` subprocess, so a run resumed here
after a subprocess was killed still ends on the uninterrupted run's weights. Subprocesses
remain where a real process is the point: SIGKILL and SIGTERM mid-run, a file-size limit
(``ulimit -f``), two ranks under torchrun.
"""
from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import Result

from conftest import discard_when_done, error_lines, invoke, linked_workspace

REPO = Path(__file__).resolve().parents[1]
# A schedule small enough for seconds on a CPU, large enough to cross every epoch switch
# (epochs counted from 0; triplet ramps hold strictly after the epoch named): stage 1 refines
# from epoch 1 and turns the triplet on after epoch 0; stage 2 leaves one-hot targets after
# epoch 0, clusters the adopting modality with stage2.k1_adopting and turns the cross-modality
# sampler (and the all-modality triplet) on at epoch 2. The reference switches (per-sample
# memory updates, per-modality triplets, camera-aware sampling, cross-modality memory update,
# sums over modalities) are the recipe defaults.
TINY = [
    "data.height=32", "data.width=16", "run.workers=0",
    "cluster.k1=8", "cluster.k2=3", "cluster.min_samples=2", "cluster.eps=0.7",
    "stage2.k1_adopting=6",
    "stage1.epochs=2", "stage1.iters=3", "stage1.clusters_per_batch=3", "stage1.instances=2",
    "stage1.refine_from=1", "stage1.triplet_ramp=[[0, 1.0]]",
    "stage2.epochs=3", "stage2.iters=2", "stage2.clusters_per_batch=3", "stage2.instances=2",
    "stage2.onehot_epochs=1", "stage2.cross_sampler_from=2", "stage2.triplet_ramp=[[0, 1.0]]",
    "run.checkpoint_every=2", "run.feature_batch=64", "train.bn_recalibration=40",
    "eval.trials=2",
]
# One-epoch variants: the epoch switches of TINY would never be reached (validation refuses
# thresholds past a stage's epochs), so they are switched off.
ONE_EPOCH_STAGE1 = ["--set", "stage1.epochs=1", "--set", "stage1.refine_from=never",
                    "--set", "stage1.triplet_ramp=[]"]
ONE_EPOCH_STAGE2 = ["--set", "stage2.epochs=1", "--set", "stage2.onehot_epochs=0",
                    "--set", "stage2.cross_sampler_from=never", "--set", "stage2.triplet_ramp=[]"]
ENV = {"DMDL_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
# in-process runs on one torch thread too, as the subprocesses (OMP_NUM_THREADS=1)
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _sets(extra: list[str] = ()) -> list[str]:
    out: list[str] = []
    for item in [*TINY, *extra]:
        out += ["--set", item]
    return out


def dmdl_here(*args: str, check: bool = True) -> Result:
    """``dmdl ARGS`` in this process, in the environment of this module's subprocesses (ENV),
    through conftest's ``invoke``: no exception and no traceback may escape, and what the
    command sets for its process (``--deterministic``, torch's threads, the seeded RNGs, the
    environment) is put back after it, as a process's end would."""
    with pytest.MonkeyPatch.context() as patch:
        for key, value in ENV.items():
            patch.setenv(key, value)
        result = invoke(args)
    if check and result.exit_code != 0:
        raise AssertionError(f"dmdl {' '.join(args)} failed ({result.exit_code}):\n{result.output}")
    return result


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    ws = tmp_path_factory.mktemp("train") / "ws"
    dmdl_here("prepare-data", "--dataset", "synthetic", "--workspace", str(ws), "--ids", "15",
              "--seed", "3", *_sets())
    return ws


@pytest.fixture(scope="module")
def stage1_done(prepared, tmp_path_factory, request) -> Path:
    ws = tmp_path_factory.mktemp("s1") / "ws"
    shutil.copytree(prepared, ws)
    dmdl_here("pretrain-single", "--workspace", str(ws), "--deterministic")
    yield ws
    discard_when_done(request, ws.parent)


def _state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=False)["model"]


def assert_same_weights(a: Path, b: Path) -> None:
    sa, sb = _state(a), _state(b)
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), f"{key} differs between {a} and {b}"


def test_pretrain_single_writes_results_and_logs(stage1_done: Path) -> None:
    ws = stage1_done
    assert (ws / "stage1" / "final.pt").is_file() and (ws / "stage1" / "last.pt").is_file()
    labels = sorted(p.name for p in (ws / "labels").glob("stage1-e*.npz"))
    assert labels == ["stage1-e001.npz", "stage1-e002.npz"]
    with np.load(ws / "labels" / "stage1-e002.npz") as data:
        lab = data["labels"]
        n_rows = sum(1 for _ in open(ws / "data" / "index.csv")) - 1
        assert lab.shape == (n_rows,) and lab.dtype == np.int32
        assert (lab >= 0).any()
    records = [json.loads(line) for line in (ws / "stage1" / "log.jsonl").read_text().splitlines()]
    kinds = {r["kind"] for r in records}
    assert {"start", "labels", "step", "epoch", "speed", "end"} <= kinds
    steps = [r for r in records if r["kind"] == "step"]
    assert all(np.isfinite(r["loss"]) for r in steps)
    assert any(r["triplet"] > 0 for r in steps if r["epoch"] >= 1)  # the ramp switched it on
    labels_recs = [r for r in records if r["kind"] == "labels"]
    assert "ari" in labels_recs[0]["visible"]  # diagnostics against true identities are logged
    manifest = json.loads((ws / "manifest.json").read_text())
    run = [r for r in manifest["runs"] if r["stage"] == "pretrain-single"][-1]
    assert run["status"] == "done"
    assert [o["path"] for o in run["outputs"]] == ["stage1/recipe.yaml", "stage1/final.pt"]


def test_final_model_carries_batchnorm_statistics_of_clean_train_images(stage1_done: Path) -> None:
    """With train.bn_recalibration, final.pt's running statistics are those re-estimated on the
    recipe's clean train images for its weights, not the training batches' moving average."""
    from dmdl_cli.data.cache import open_cache
    from dmdl_cli.data.index import read_index
    from dmdl_cli.features.batchnorm import batchnorm_layers, recalibrate_batchnorm, recalibration_rows
    from dmdl_cli.model.loading import resolve_model
    from dmdl_cli.recipe import load_recipe
    from dmdl_cli.runtime import select_runtime
    from dmdl_cli.workspace import Workspace

    ws = stage1_done
    recipe = load_recipe(ws / "recipe.yaml")
    assert recipe.train.bn_recalibration == 40
    model = resolve_model(Workspace(ws), recipe, str(ws / "stage1" / "final.pt")).model
    saved = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    index = read_index(ws / "data" / "index.csv")
    cache = open_cache(ws / "data" / "cache-32x16.u8", len(index), 32, 16)
    rows = recalibration_rows(index.rows(split="train"), 40, recipe.train.seed, recipe.stage1.epochs)
    for layer in batchnorm_layers(model):  # start from nothing: the result must not depend on it
        layer.running_mean.fill_(7.0)
        layer.running_var.fill_(7.0)
    # Compared exactly. The training run had one torch thread (this module's one_torch_thread),
    # so this re-estimation runs on one thread too: the same kernels then add the same float32 values in
    # the same order and the statistics are bit-identical. With the test process's default
    # thread count the sums are split across threads in another order, and the results differ
    # by float32 reduction-order noise (seen: 7e-6 on values of order 1 on another machine of
    # the same kind), which no fixed absolute tolerance bounds reliably.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        recalibrate_batchnorm(model, cache, rows, select_runtime(recipe, deterministic=True),
                              batch_size=recipe.train.bn_recalibration_batch)
    finally:
        torch.set_num_threads(threads)
    for key, value in model.state_dict().items():
        if "running" in key:
            assert torch.equal(value, saved[key]), (key, (value - saved[key]).abs().max().item())


def test_second_run_refuses_without_resume_or_force(stage1_done: Path) -> None:
    result = dmdl_here("pretrain-single", "--workspace", str(stage1_done), check=False)
    assert result.exit_code != 0
    assert "--force" in result.output  # and no traceback: dmdl_here checks
    result = dmdl_here("pretrain-single", "--workspace", str(stage1_done), "--resume")
    assert "nothing to resume" in result.output


def test_training_never_reads_true_train_identities(prepared: Path, stage1_done: Path, tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    shutil.copytree(prepared, ws)
    index = ws / "data" / "index.csv"
    rows = list(csv.reader(index.open()))
    header, body = rows[0], rows[1:]
    train = [i for i, r in enumerate(body) if r[4] == "train"]
    pids = [body[i][1] for i in train]
    original = [r[1] for r in body]
    rng = np.random.default_rng(0)
    for i, pid in zip(train, rng.permutation(pids)):
        body[i][1] = pid
    with index.open("w", newline="") as handle:
        csv.writer(handle, lineterminator="\n").writerows([header, *body])
    manifest = json.loads((ws / "manifest.json").read_text())
    from dmdl_cli.atomic import sha256_file

    manifest["dataset"]["index_sha256"] = sha256_file(index)
    (ws / "manifest.json").write_text(json.dumps(manifest))
    assert [r[1] for r in body] != original
    dmdl_here("pretrain-single", "--workspace", str(ws), "--deterministic")
    assert_same_weights(ws / "stage1" / "final.pt", stage1_done / "stage1" / "final.pt")


def test_sigkill_then_resume_is_bitwise_identical(prepared: Path, stage1_done: Path, tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    shutil.copytree(prepared, ws)
    proc, last = _start_until_first_checkpoint(ws, [], subprocess.DEVNULL)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (ws / "stage1" / "final.pt").exists()
    killed_at = torch.load(last, map_location="cpu", weights_only=False)["meta"]
    assert (killed_at["epoch"], killed_at["step"]) < (1, 3)
    out = dmdl_here("pretrain-single", "--workspace", str(ws), "--deterministic", "--resume")
    assert "resuming stage1" in out.output
    assert_same_weights(ws / "stage1" / "final.pt", stage1_done / "stage1" / "final.pt")
    # the resumed log holds each step record once
    records = [json.loads(x) for x in (ws / "stage1" / "log.jsonl").read_text().splitlines()]
    positions = [(r["epoch"], r["step"]) for r in records if r["kind"] == "step"]
    assert len(positions) == len(set(positions))
    # and the label-free criteria as the uninterrupted run logged them: the epoch after the
    # resume compares its labels with those last.pt kept. (A kill between the first last.pt
    # and the log's first write loses the records of epoch 0, which was not labelled again.)
    uninterrupted = [json.loads(x) for x in (stage1_done / "stage1" / "log.jsonl").read_text().splitlines()]
    criteria = {r["epoch"]: r for r in records if r["kind"] == "criteria"}
    want = {r["epoch"]: r for r in uninterrupted if r["kind"] == "criteria"}
    assert {1, 2} <= set(criteria) and criteria[1]["label_ari"] is not None
    assert all(criteria[e] == want[e] for e in criteria)


def _start_until_first_checkpoint(ws: Path, extra: list[str], output) -> tuple[subprocess.Popen, Path]:
    """Start ``pretrain-single --deterministic`` in a subprocess and return once it has written
    its first ``last.pt`` (still running: the test then kills or stops it)."""
    env = {**os.environ, **ENV}
    proc = subprocess.Popen([sys.executable, "-m", "dmdl_cli", "pretrain-single", "--workspace", str(ws),
                             "--deterministic", *extra], stdout=output, stderr=output, text=True,
                            env=env, cwd=REPO)
    last = ws / "stage1" / "last.pt"
    deadline = time.time() + 300
    while not last.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    assert proc.poll() is None, "the run finished before it could be stopped"
    return proc, last


def _last_run(ws: Path, stage: str) -> dict:
    manifest = json.loads((ws / "manifest.json").read_text())
    return [r for r in manifest["runs"] if r["stage"] == stage][-1]


def test_sigterm_mid_epoch_then_resume_is_bitwise_identical(prepared: Path, stage1_done: Path,
                                                            tmp_path: Path) -> None:
    """A scheduler's SIGTERM: the step in progress finishes, last.pt is written at that step,
    the ledger says interrupted, the exit code is 143; --resume ends bitwise identical to the
    uninterrupted run (the module's stage1_done), even with another ``run.checkpoint_every``.
    A checkpoint after every step (which changes no computation) tells the test when the
    epoch's first step is done."""
    ws = tmp_path / "ws"
    shutil.copytree(prepared, ws)
    every_step = ["--set", "run.checkpoint_every=1"]
    proc, last = _start_until_first_checkpoint(ws, every_step, subprocess.PIPE)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, out + err
    assert "Traceback" not in out + err
    lines = error_lines(out)
    assert len(lines) == 1 and "stopped by SIGTERM" in lines[0] and "--resume" in lines[0], out
    assert not (ws / "stage1" / "final.pt").exists()
    meta = load_checkpoint_meta(last)
    assert meta["epoch"] == 0 and 1 <= meta["step"] < 3, meta  # mid-epoch: iters is 3
    run = _last_run(ws, "pretrain-single")
    assert run["status"] == "interrupted" and "SIGTERM" in run["error"]
    # resumed with another run.checkpoint_every: a run: key changes no result, so it is accepted
    out = dmdl_here("pretrain-single", "--workspace", str(ws), "--deterministic", "--resume",
                    "--set", "run.checkpoint_every=3")
    assert f"epoch 1, step {meta['step']}" in out.output
    assert "starts from the untrained" not in out.output  # the weights come from last.pt
    assert_same_weights(ws / "stage1" / "final.pt", stage1_done / "stage1" / "final.pt")
    assert _last_run(ws, "pretrain-single")["status"] == "done"


def load_checkpoint_meta(path: Path) -> dict:
    from dmdl_cli.workspace import load_checkpoint

    return load_checkpoint(path)["meta"]


def test_failed_force_runs_keep_the_previous_models(stage1_done: Path, tmp_path: Path, snapshot) -> None:
    """--force that fails (a bad value, a file-size limit hit while writing) leaves the
    previous run's models byte-identical, and says why in one line naming the file."""
    ws = tmp_path / "ws"
    linked_workspace(stage1_done, ws)  # checkpoints hard-linked
    before = snapshot(ws / "stage1")
    labels_before = snapshot(ws / "labels")
    # a value refused on load (eps is an open interval) and one that fails after the start
    # (no cache at that size): the old code removed final.pt before either was found
    for bad, words in ((["--set", "cluster.eps=0"], ["cluster.eps", "open interval"]),
                       (["--set", "data.height=48"], ["cache-48x16.u8", "prepare-data"])):
        result = dmdl_here("pretrain-single", "--workspace", str(ws), "--force", *bad, check=False)
        assert result.exit_code == 1  # and no traceback: dmdl_here checks
        lines = error_lines(result.output)
        assert len(lines) == 1 and all(w in lines[0] for w in words), result.output
        assert snapshot(ws / "stage1") == before
    # a disk that fills up when the new run writes its first checkpoint (ulimit -f: EFBIG)
    limit_kib = (ws / "stage1" / "last.pt").stat().st_size // 1024 // 2
    proc = _limited(limit_kib, "pretrain-single", "--workspace", str(ws), "--deterministic", "--force")
    assert proc.returncode == 1 and "Traceback" not in proc.stdout + proc.stderr, proc.stdout + proc.stderr
    lines = error_lines(proc.stdout)
    assert len(lines) == 1 and f"cannot write {ws / 'stage1' / 'last.pt'}" in lines[0], proc.stdout
    assert "File too large" in lines[0]
    assert snapshot(ws / "stage1") == before  # final.pt, last.pt and the log as they were
    assert set(snapshot(ws / "labels")) == set(labels_before)  # e001 rewritten, e002 kept
    run = _last_run(ws, "pretrain-single")
    assert run["status"] == "failed" and "stage1/last.pt" in run["error"]
    # the previous checkpoint is still a valid resume point for the previous run
    assert load_checkpoint_meta(ws / "stage1" / "last.pt")["epoch"] == 1


def test_prepare_data_force_that_fails_keeps_the_stage_outputs(stage1_done: Path, tmp_path: Path,
                                                               snapshot) -> None:
    ws = tmp_path / "ws"
    linked_workspace(stage1_done, ws)  # checkpoints hard-linked
    cache = ws / "data" / "cache-32x16.u8"
    limit_kib = cache.stat().st_size // 1024 // 2
    assert (ws / "data" / "index.csv").stat().st_size < limit_kib * 1024  # only the cache fails
    before = snapshot(ws)
    proc = _limited(limit_kib, "prepare-data", "--dataset", "synthetic", "--workspace", str(ws),
                    "--ids", "15", "--seed", "3", "--force", *_sets())
    assert proc.returncode == 1 and "Traceback" not in proc.stdout + proc.stderr, proc.stdout + proc.stderr
    lines = error_lines(proc.stdout)
    assert len(lines) == 1 and f"cannot write {cache}" in lines[0], proc.stdout
    after = snapshot(ws)
    assert {k: v for k, v in after.items() if k != "manifest.json"} == \
        {k: v for k, v in before.items() if k != "manifest.json"}  # models, labels, data intact
    assert _last_run(ws, "prepare-data")["status"] == "failed"
    # a --force that succeeds retires them only after the new index and cache exist
    dmdl_here("prepare-data", "--dataset", "synthetic", "--workspace", str(ws), "--ids", "15",
              "--seed", "3", "--force", *_sets())
    assert not (ws / "stage1").exists() and not (ws / "labels").exists()
    assert not list(ws.glob(".retired-*"))


def _limited(kib: int, *args: str) -> subprocess.CompletedProcess:
    """``dmdl ARGS`` with a file-size limit of ``kib`` KiB (``ulimit -f``): a write beyond it
    fails with EFBIG (Python ignores SIGXFSZ), as on a full disk."""
    env = {**os.environ, **ENV}
    command = f"ulimit -f {kib}; exec \"$0\" -m dmdl_cli \"$@\""
    return subprocess.run(["bash", "-c", command, sys.executable, *args], capture_output=True,
                          text=True, env=env, cwd=REPO, timeout=600)


def test_a_kill_during_a_checkpoint_write_keeps_the_previous_one(tmp_path: Path, monkeypatch) -> None:
    from dmdl_cli.workspace import load_checkpoint, save_checkpoint

    path = tmp_path / "last.pt"
    save_checkpoint(path, {"model": {"w": torch.ones(3)}, "meta": {"step": 1}})

    def torn_save(obj, f, *args, **kwargs):  # writes half a file, then "dies"
        if hasattr(f, "write"):
            f.write(b"PK\x03\x04 half a checkpoint")
        else:
            Path(f).write_bytes(b"PK\x03\x04 half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", torn_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, {"model": {"w": torch.zeros(3)}, "meta": {"step": 2}})
    monkeypatch.undo()
    state = load_checkpoint(path)
    assert state["meta"]["step"] == 1 and torch.equal(state["model"]["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_train_cross_end_to_end_and_evaluate(stage1_done: Path, tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    linked_workspace(stage1_done, ws)  # checkpoints hard-linked
    dmdl_here("train-cross", "--workspace", str(ws), "--deterministic")
    assert (ws / "stage2" / "final.pt").is_file()
    assert sorted(p.name for p in (ws / "labels").glob("cross-e*.npz")) == [
        "cross-e001.npz", "cross-e002.npz", "cross-e003.npz"]
    records = [json.loads(x) for x in (ws / "stage2" / "log.jsonl").read_text().splitlines()]
    labels = [r for r in records if r["kind"] == "labels"]
    assert all(r["unified_ids"] > 0 and abs(sum(r["prior"]) - 1) < 1e-6 for r in labels)
    assert all("association_accuracy" in r for r in labels)
    steps = [r for r in records if r["kind"] == "step"]
    assert all(r["cai"] > 0 for r in steps)
    out = dmdl_here("evaluate", "--workspace", str(ws), "--mode", "all-search")
    assert "stage2-final" in out.output and "mAP" in out.output
    result = json.loads((ws / "eval" / "all-search-stage2-final.json").read_text())
    assert 0.0 <= result["mean"]["mAP"] <= 1.0 and len(result["per_trial"]) == 2


def test_a_gem_p_4_model_embeds_alike_through_embed_and_evaluate(prepared: Path, tmp_path: Path) -> None:
    """The network is built from the checkpoint's own model section: a model trained with
    model.gem_p=4 gives the same embeddings through dmdl_cli.embed() (no recipe given) as
    through evaluate's feature extraction. A checkpoint without its recipe (an older dmdl)
    falls back to the recipe defaults (p = 3) and embeds otherwise, unless given the recipe."""
    import dmdl_cli
    from dmdl_cli.data.index import read_index
    from dmdl_cli.model.loading import load_model
    from dmdl_cli.recipe import load_recipe
    from dmdl_cli.workspace import save_checkpoint

    ws = tmp_path / "ws"
    shutil.copytree(prepared, ws)
    dmdl_here("pretrain-single", "--workspace", str(ws), "--deterministic", *ONE_EPOCH_STAGE1,
              "--set", "stage1.iters=1", "--set", "train.bn_recalibration=0", "--set", "model.gem_p=4")
    final = ws / "stage1" / "final.pt"
    model, spec = load_model(final)
    assert spec.gem_p == 4.0 and float(model.pool.p) == 4.0
    dmdl_here("evaluate", "--workspace", str(ws), "--checkpoint", str(final), "--mode", "all-search")
    [cached] = (ws / "features").glob("*-test-32x16.npz")
    with np.load(cached) as data:
        evaluated, rows = data["features"], data["rows"]  # (N_test, D) from the image cache
    some = np.arange(0, len(rows), max(1, len(rows) // 8))
    paths = [read_index(ws / "data" / "index.csv").paths[r] for r in rows[some]]
    embedded = dmdl_cli.embed(paths, final, device="cpu")
    np.testing.assert_allclose(embedded, evaluated[some], atol=1e-5)

    state = torch.load(final, map_location="cpu", weights_only=True)
    older = tmp_path / "older.pt"  # as an older dmdl wrote it: no recipe in the meta
    save_checkpoint(older, {"model": state["model"],
                            "meta": {"arch": state["meta"]["arch"],
                                     "input_size": state["meta"]["input_size"]}})
    assert np.abs(dmdl_cli.embed(paths, older, device="cpu") - embedded).max() > 1e-3
    recipe = load_recipe(ws / "stage1" / "recipe.yaml")
    np.testing.assert_allclose(dmdl_cli.embed(paths, older, recipe=recipe, device="cpu"),
                               embedded, atol=1e-6)


def test_train_cross_refuses_without_stage1_or_with_another_recipe(prepared: Path, stage1_done: Path,
                                                                  tmp_path: Path) -> None:
    proc = dmdl_here("train-cross", "--workspace", str(prepared), check=False)
    assert proc.exit_code != 0 and "pretrain-single" in proc.output and "stage1/final.pt" in proc.output
    ws = tmp_path / "ws"
    linked_workspace(stage1_done, ws)  # checkpoints hard-linked
    proc = dmdl_here("train-cross", "--workspace", str(ws), "--set", "stage1.lr=0.001", check=False)
    assert proc.exit_code != 0 and "stage1.lr: 0.00035 -> 0.001" in proc.output
    # (and no traceback: dmdl_here checks)
    # the k1 of the adopting modality moved out of the `cluster` section: refused, naming its new key
    proc = dmdl_here("train-cross", "--workspace", str(ws), "--set", "cluster.k1_adopting=4", check=False)
    assert proc.exit_code != 0 and error_lines(proc.output) == [
        "error: recipe key 'cluster.k1_adopting' (--set cluster.k1_adopting=4) moved to "
        "stage2.k1_adopting: use stage2.k1_adopting instead (only stage 2 reads it, so stage 1's "
        "results no longer depend on it)"]
    # overrides that only change stage-2 parts (stage2.k1_adopting among them) keep stage 1 valid
    proc = dmdl_here("train-cross", "--workspace", str(ws), "--set", "cai.weight=0.25",
                     "--set", "stage2.k1_adopting=4", *ONE_EPOCH_STAGE2)
    assert (ws / "stage2" / "final.pt").is_file()
    assert "association.method" not in proc.output
    # an association without an adopting modality says that the adopting keys do not apply
    proc = dmdl_here("train-cross", "--workspace", str(ws), "--force",
                     "--set", "association.method=hungarian", *ONE_EPOCH_STAGE2)
    assert ("association.method hungarian: no modality adopts the other's ids, so "
            "stage2.k1_adopting and stage2.cross_memory_update do not apply") in " ".join(proc.output.split())


def _first_step(ws: Path, stage: str) -> dict:
    records = [json.loads(x) for x in (ws / stage / "log.jsonl").read_text().splitlines()]
    return [r for r in records if r["kind"] == "step"][0]


def test_cai_replaces_the_likelihood_term(stage1_done: Path, tmp_path: Path) -> None:
    # One iteration: the logged step is computed before any memory update, so both runs see
    # the same model, memories, batch and targets and differ only by the CAI switch. CAI
    # replaces likelihood modelling (docs/method.md section 3): with it on, mu * L_CAI takes the
    # place of the fused-memory term, which is still computed (and logged) for the targets.
    runs = {}
    for enabled in ("true", "false"):
        ws = tmp_path / f"cai-{enabled}"
        linked_workspace(stage1_done, ws)  # checkpoints hard-linked
        dmdl_here("train-cross", "--workspace", str(ws), "--deterministic", *ONE_EPOCH_STAGE2,
                  "--set", "stage2.iters=1", "--set", f"cai.enabled={enabled}")
        runs[enabled] = _first_step(ws, "stage2")
    on, off = runs["true"], runs["false"]
    assert off["cai"] == 0.0 and on["cai"] > 0.0 and on["fused"] > 0.0
    for part in ("intra", "fused", "triplet", "align"):
        assert on[part] == pytest.approx(off[part], abs=1e-5)
    weight = 0.5  # cai.weight of the recipe (mu)
    assert on["loss"] - off["loss"] == pytest.approx(weight * on["cai"] - off["fused"], abs=5e-5)
    assert abs(weight * on["cai"] - off["fused"]) > 1e-3  # the two terms differ: a real check


def _steps(ws: Path, stage: str) -> list[dict]:
    records = [json.loads(x) for x in (ws / stage / "log.jsonl").read_text().splitlines()]
    return [r for r in records if r["kind"] == "step"]


# Two gloo ranks against one process: BatchNorm groups as the reference's 4-GPU DataParallel
# slices the batch (P x K = 3 x 2 keys per modality: 12 items per modality, 4 groups of 6, two
# per rank), every step's loss over the whole global batch on every rank (triplet mining, MMD,
# CAI, the in-place memory gradient and the memory updates see all samples).
DDP_SCHEDULE = ["train.bn_groups=reference", "train.bn_slices=4", "run.log_every=1",
                "stage2.epochs=2", "stage2.cross_sampler_from=1", "stage2.memory_gradient=in-place"]
# The forward of each BatchNorm group is the same computation on one process and on a rank
# (one thread each), and so is the loss; only the gradient is summed in another order (the
# groups of each rank, then over the ranks): a float32 rounding of ~1e-7 that the first steps
# carry into the losses as ~1e-6 (measured: at most 1.3e-6 relative over the first epoch). Adam
# amplifies it later (it divides each gradient by its own running size, so a weight whose
# gradient is rounding noise moves by up to a learning rate either way), so the comparison covers
# the first epoch of each stage, from the same starting model. A rank that normalised, mined or
# aligned over its half alone moves the losses by percents.
DDP_LOSS_TOLERANCE = 2e-5


def _first_epoch_steps_agree(a: Path, b: Path, stage: str, iters: int) -> None:
    one, two = [[r for r in _steps(ws, stage) if r["epoch"] == 0] for ws in (a, b)]
    assert [r["step"] for r in one] == [r["step"] for r in two] == list(range(1, iters + 1))
    for x, y in zip(one, two):
        for key in x.keys() - {"kind", "epoch", "step"}:
            # relative to the step's loss: a term near 0 (the unbiased MMD is a difference of
            # kernel sums) carries the rounding of the sums it is the difference of
            assert y[key] == pytest.approx(x[key], abs=DDP_LOSS_TOLERANCE * abs(x["loss"])), (stage, x, y)


def _same_labels(a: Path, b: Path, name: str) -> None:
    with np.load(a / "labels" / name) as x, np.load(b / "labels" / name) as y:
        assert np.array_equal(x["labels"], y["labels"]), name


def test_two_processes_train_what_one_process_trains(prepared: Path, tmp_path: Path) -> None:
    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.exists():
        pytest.skip("torchrun is not installed next to this python")
    env = {**os.environ, **ENV}

    def two_ranks(command: str, ws: Path) -> None:
        proc = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "dmdl_cli",
                               command, "--workspace", str(ws), *_sets(DDP_SCHEDULE)],
                              capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
        assert proc.returncode == 0, proc.stdout + proc.stderr

    single, multi = tmp_path / "single", tmp_path / "ddp"
    shutil.copytree(prepared, single)
    shutil.copytree(prepared, multi)
    dmdl_here("pretrain-single", "--workspace", str(single), *_sets(DDP_SCHEDULE))
    two_ranks("pretrain-single", multi)
    _first_epoch_steps_agree(single, multi, "stage1", 3)
    _same_labels(single, multi, "stage1-e002.npz")  # from the models after one epoch
    # stage 2 from the same stage-1 model on one process and on two
    shutil.rmtree(multi)
    linked_workspace(single, multi)  # stage-1 checkpoints hard-linked
    dmdl_here("train-cross", "--workspace", str(single), *_sets(DDP_SCHEDULE))
    two_ranks("train-cross", multi)
    _first_epoch_steps_agree(single, multi, "stage2", 2)
    _same_labels(single, multi, "cross-e002.npz")


def test_sample_level_association_trains_through_the_cli(stage1_done: Path, tmp_path: Path) -> None:
    # the reference's RegDB association at a sample-level epoch: every visible sample takes the
    # label of its nearest infrared sample, so the unified ids are the infrared clusters
    ws = tmp_path / "ws"
    linked_workspace(stage1_done, ws)  # checkpoints hard-linked
    dmdl_here("train-cross", "--workspace", str(ws), "--deterministic", *ONE_EPOCH_STAGE2,
              "--set", "stage2.iters=1", "--set", "association.method=cluster-sample-alternating",
              "--set", "association.cluster_epochs=0")
    records = [json.loads(x) for x in (ws / "stage2" / "log.jsonl").read_text().splitlines()]
    labels = next(r for r in records if r["kind"] == "labels")
    assert labels["unified_ids"] == labels["infrared"]["clusters"]
    with np.load(ws / "labels" / "cross-e001.npz") as data:
        unified = data["labels"]
    index_modality = np.array([row["modality"] for row in csv.DictReader(open(ws / "data" / "index.csv"))])
    vis = unified[(index_modality == "visible")]
    assert (vis >= 0).any() and vis.max() < labels["unified_ids"]
