"""The branches the GPU path shares with the CPU, run on the CPU.

Mixed precision (bf16 autocast through both stages' batch losses; fp16 with the gradient
scaler), channels_last through the backbone, the faiss GPU k-NN guarded so that a missing or
failing GPU index falls back to the CPU with one line, and ``benchmarks/gpu_check.py --cpu``.
"""
from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dmdl_cli.clustering import neighbors
from dmdl_cli.context import StageContext
from dmdl_cli.data.augment import AugmentConfig
from dmdl_cli.data.index import IndexTable
from dmdl_cli.data.train_dataset import ViewDataset
from dmdl_cli.errors import DmdlError
from dmdl_cli.model.backbone import build_model
from dmdl_cli.model.cai import modality_prior
from dmdl_cli.recipe import load_recipe
from dmdl_cli.runtime import CPU_AMP_ENV, Runtime, make_grad_scaler, select_runtime
from dmdl_cli.training.cross import FUSED, CrossModalityStage
from dmdl_cli.training.loop import batch_features, load_batch
from dmdl_cli.training.single import SingleModalityStage
from dmdl_cli.training.state import TrainState

from conftest import load_benchmark

REPO = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
# images, identities per modality, input size. 48 x 24 rather than 32 x 16: at 32 x 16 layer3 of
# resnet18 sees 2 x 1 maps, where torch 2.14's bf16 CPU convolution (oneDNN) returns different
# values from call to call, now and then NaN, for the same input and weights.
N, IDS, H, W = 48, 4, 48, 24
# The fp16 steps run at 32 x 16: a CPU has no fast fp16 convolution (about 10 s a step at this
# size, four times that at 48 x 24), and the scaler's logic does not depend on the size.
FP16_H, FP16_W = 32, 16
# bf16 keeps 8 mantissa bits: features differ from fp32 by ~1e-2 and the memory logits divide
# them by tau = 0.05, so the batch loss may move by a few percent.
BF16_RELATIVE_TOLERANCE = 0.05
# Every stage-1 and stage-2 loss term switched on at epoch 5 (refinement, triplet, MMD, CAI,
# cross-modality sampler).
TERMS_ON = [
    "model.arch=resnet18", "model.pretrained=null", f"data.height={H}", f"data.width={W}",
    "stage1.clusters_per_batch=2", "stage1.instances=2", "stage1.iters=1", "stage1.refine_from=0",
    "stage1.triplet_ramp=[[0, 1.0]]",
    "stage2.clusters_per_batch=2", "stage2.instances=2", "stage2.iters=1", "stage2.onehot_epochs=0",
    "stage2.cross_sampler_from=0", "stage2.triplet_ramp=[[0, 1.0]]",
]
EPOCH = 5
CHANNELS_LAST_TOLERANCE = 1e-3  # relative L2 error of an output (measured: <= 2.2e-4)


def _unit(rows: int, dim: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(rows, dim, generator=torch.Generator().manual_seed(seed)), dim=1)


@pytest.fixture(scope="module")
def recipe():
    return load_recipe(REPO / "recipes" / "sysu.yaml", overrides=TERMS_ON)


@pytest.fixture(scope="module")
def data():
    """Labels, modality and a random image cache (N, H, W, 3) of the training set."""
    return _data(H, W)


def _data(height: int, width: int):
    rng = np.random.default_rng(0)
    rows = np.arange(N)
    modality = ((rows // IDS) % 2).astype(np.int8)  # every id in both modalities
    labels = (rows % IDS).astype(np.int64)
    cache = rng.integers(0, 256, size=(N, height, width, 3), dtype=np.uint8)
    return labels, modality, cache


def _context(recipe, data, logic, runtime: Runtime, model) -> TrainState:
    """A training state at EPOCH on the random cache, without a workspace."""
    labels, modality, cache = data
    ctx = StageContext(None, recipe, logic.spec, runtime)
    ctx.index = IndexTable(paths=[""] * N, pids=np.full(N, -1), cams=np.zeros(N), modality=modality,
                           split=np.full(N, "train"))
    ctx.cache, ctx.train_rows = cache, np.arange(N)
    return TrainState(ctx, logic, model, epoch=EPOCH)


def _stage_state(logic, t, data):
    """The logic's epoch state at EPOCH with memories of random unit features (also set as
    ``t.epoch_state``)."""
    labels, modality, _ = data
    dim = t.model.feat_dim
    conf = np.linspace(0.4, 1.0, N).astype(np.float32)
    if isinstance(logic, SingleModalityStage):  # per-modality ids, infrared offset by IDS
        global_labels = labels + IDS * modality
        saved = {"epoch": EPOCH, "labels": global_labels, "conf": conf, "offsets": {0: 0, 1: IDS},
                 "sizes": {0: IDS, 1: IDS}, "memories": {0: _unit(IDS, dim, 1), 1: _unit(IDS, dim, 2)}}
    else:
        saved = {"epoch": EPOCH, "labels": labels, "conf": conf,
                 "ids": {0: np.arange(IDS), 1: np.arange(IDS)},
                 "prior": modality_prior(labels, modality).numpy(), "num_ids": IDS,
                 "memories": {0: _unit(IDS, dim, 1), 1: _unit(IDS, dim, 2), FUSED: _unit(IDS, dim, 3)}}
    t.epoch_state = logic.restore_epoch(t, saved)
    return t.epoch_state


def _batch(recipe, data, t: TrainState) -> dict[str, torch.Tensor]:
    """The epoch's first batch, two augmented views, as the training loop hands it over (without
    its features: ``batch_features`` forwards it)."""
    _, modality, cache = data
    aug = AugmentConfig.from_recipe(recipe.augment, modality_specific=recipe.cbt.augment)
    t.dataset = ViewDataset(cache, modality, aug)
    return load_batch(t, t.epoch_state.batches[0])


def _model(seed: int = 0):
    torch.manual_seed(seed)
    return build_model("resnet18").train()


def _loss(recipe, data, stage_name: str, amp: torch.dtype | None) -> tuple[float, dict]:
    logic = SingleModalityStage() if stage_name == "stage1" else CrossModalityStage()
    runtime = Runtime(CPU, amp, channels_last=False)
    t = _context(recipe, data, logic, runtime, _model())
    _stage_state(logic, t, data)
    batch = _batch(recipe, data, t)
    batch["bn"] = batch_features(t, batch)
    loss, parts, _ = logic.batch_loss(t, batch)
    return float(loss.detach()), parts


@pytest.mark.parametrize("stage_name", ["stage1", "stage2"])
def test_bf16_autocast_loss_close_to_fp32(recipe, data, stage_name):
    fp32, parts32 = _loss(recipe, data, stage_name, None)
    bf16, parts16 = _loss(recipe, data, stage_name, torch.bfloat16)
    assert math.isfinite(bf16) and all(math.isfinite(v) for v in parts16.values())
    # every loss term is switched on (the unbiased MMD of the alignment may be negative)
    assert all(v != 0 for v in parts32.values()), parts32
    assert abs(bf16 - fp32) <= BF16_RELATIVE_TOLERANCE * abs(fp32), (bf16, fp32, parts16, parts32)


def test_grad_scaler_is_on_the_runtime_device_for_fp16_only():
    assert make_grad_scaler(Runtime(CPU, torch.float16, False)).is_enabled()
    for amp in (torch.bfloat16, None):
        assert not make_grad_scaler(Runtime(CPU, amp, False)).is_enabled()


def test_fp16_grad_scaler_steps_on_the_cpu():
    """The training loop's scaled step with torch.amp.GradScaler on the CPU: a step whose
    scaled gradients overflow is skipped and halves the scale; a step that fits updates every
    trained weight with finite values."""
    recipe = load_recipe(REPO / "recipes" / "sysu.yaml",
                         overrides=[*TERMS_ON, f"data.height={FP16_H}", f"data.width={FP16_W}"])
    data = _data(FP16_H, FP16_W)
    # channels_last as on a GPU (and the CPU's fp16 convolutions are ~5x faster in it)
    runtime = Runtime(CPU, torch.float16, channels_last=True)
    logic = CrossModalityStage()
    t = _context(recipe, data, logic, runtime, _model().to(memory_format=torch.channels_last))
    _stage_state(logic, t, data)
    batch = _batch(recipe, data, t)
    optimizer = torch.optim.Adam(t.model.parameters(), lr=1e-3)
    scaler = make_grad_scaler(runtime)

    def step() -> tuple[float, float]:
        before = scaler.get_scale() if scaler._scale is not None else scaler._init_scale
        optimizer.zero_grad(set_to_none=True)
        batch["bn"] = batch_features(t, batch)
        loss, _, update = logic.batch_loss(t, batch)
        assert torch.isfinite(loss)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        with torch.no_grad():
            update()
        return before, scaler.get_scale()

    weights = {n: p.detach().clone() for n, p in t.model.named_parameters()}
    before, after = step()  # at the initial scale 2**16: skipped (halved) or taken (kept)
    assert after in (before, before / 2)
    moved = any(not torch.equal(p, weights[n]) for n, p in t.model.named_parameters())
    assert moved == (after == before)
    scaler.update(new_scale=256.0)  # a scale at which fp16 gradients fit
    weights = {n: p.detach().clone() for n, p in t.model.named_parameters()}
    before, after = step()
    assert before == after == 256.0
    for name, param in t.model.named_parameters():
        assert torch.isfinite(param).all(), name
        if param.grad is not None and param.grad.abs().sum() > 0:
            assert not torch.equal(param, weights[name]), name


def test_cpu_amp_flag_keeps_the_recipe_precision(recipe, monkeypatch):
    monkeypatch.delenv(CPU_AMP_ENV, raising=False)
    plain = select_runtime(recipe)
    assert (plain.device.type, plain.amp_dtype, plain.channels_last) == ("cpu", None, False)
    monkeypatch.setenv(CPU_AMP_ENV, "1")
    forced = select_runtime(recipe)
    assert (forced.amp_dtype, forced.channels_last) == (torch.float16, True)


@pytest.mark.parametrize("arch", ["resnet50_agw", "resnet18"])
def test_channels_last_backbone_matches_contiguous(arch):
    torch.manual_seed(0)
    model = build_model(arch)
    model_cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
    x = torch.randn(4, 3, 64, 32)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        outputs = [(model.eval()(x), model_cl.eval()(x_cl))]  # (B, D) embeddings
        outputs += list(zip(model.train()(x), model_cl.train()(x_cl)))  # pool, BN-neck features
    for a, b in outputs:
        assert torch.isfinite(b).all()
        # the memory format only reorders the convolutions' sums: float32 rounding apart
        assert float((b - a).norm() / a.norm()) < CHANNELS_LAST_TOLERANCE


# --- faiss GPU guard -------------------------------------------------------------------------


@pytest.fixture
def fresh_guard(monkeypatch):
    """Clean fallback state and a record of the lines printed by the k-NN module."""
    import dmdl_cli.console

    monkeypatch.setattr(neighbors, "_GPU_FAILURE", None)
    monkeypatch.setattr(neighbors, "_FALLBACK_SAID", False)
    monkeypatch.setattr(neighbors, "_GPU_RESOURCES", None)
    lines: list[str] = []
    monkeypatch.setattr(dmdl_cli.console, "log", lines.append)
    return lines


def _features(n: int = 400, d: int = 16) -> np.ndarray:
    x = np.random.default_rng(0).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_faiss_without_gpu_support_on_a_cuda_host_says_one_line(fresh_guard, monkeypatch):
    import faiss

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.delattr(faiss, "StandardGpuResources", raising=False)
    x = _features()
    expected = neighbors.knn(x, 10, use_gpu=False)
    for _ in range(2):
        sims, idx = neighbors.knn(x, 10)
        np.testing.assert_array_equal(idx, expected[1])
    assert len(fresh_guard) == 1 and "no GPU support" in fresh_guard[0], fresh_guard
    with pytest.raises(DmdlError, match="faiss sees no GPU"):
        neighbors.knn(x, 10, use_gpu=True)


@pytest.mark.parametrize("method", ["exact", "ivf"])
def test_failing_gpu_search_falls_back_to_the_cpu_once(fresh_guard, monkeypatch, method):
    import faiss

    calls = []

    def broken(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("CUDA error: no kernel image is available for execution\nmore")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(neighbors, "_faiss_gpu_count", lambda module: 1)
    monkeypatch.setattr(neighbors, "_gpu_resources", lambda: object())
    monkeypatch.setattr(faiss, "knn_gpu", broken)
    monkeypatch.setattr(faiss, "index_cpu_to_gpu", broken)
    x = _features(800)
    options = {"nlist": 8, "nprobe": 8} if method == "ivf" else {}  # nprobe = nlist: exact
    expected = neighbors.knn(x, 10, method=method, use_gpu=False, **options)
    for _ in range(2):
        _, idx = neighbors.knn(x, 10, method=method, **options)
        np.testing.assert_array_equal(idx, expected[1])
    assert len(calls) == 1  # later searches go straight to the CPU
    assert len(fresh_guard) == 1, fresh_guard
    assert "GPU search failed" in fresh_guard[0] and "no kernel image" in fresh_guard[0]
    assert "more" not in fresh_guard[0]
    with pytest.raises(DmdlError, match="failed earlier"):
        neighbors.knn(x, 10, use_gpu=True)


def test_required_gpu_search_failure_is_not_hidden(fresh_guard, monkeypatch):
    import faiss

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(neighbors, "_faiss_gpu_count", lambda module: 1)
    monkeypatch.setattr(neighbors, "_gpu_resources", lambda: object())
    monkeypatch.setattr(faiss, "knn_gpu", broken)
    with pytest.raises(RuntimeError, match="out of memory"):
        neighbors.knn(_features(), 10, use_gpu=True)
    assert fresh_guard == []


# --- benchmarks/gpu_check.py -----------------------------------------------------------------


def test_gpu_check_reports_a_failing_step_as_a_row(monkeypatch):
    check = load_benchmark("gpu_check").Check()
    check.run("(x) fine", "s", lambda: ("done", {"v": 1}))
    row = check.run("(y) broken", "s", lambda: 1 / 0)
    assert row.status == "FAILED" and row.result == "ZeroDivisionError: division by zero"
    assert [r.status for r in check.rows] == ["ok", "FAILED"] and check.failed


def test_gpu_check_cpu_mode_runs_every_step(tmp_path):
    out = tmp_path / "check.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    env.pop(CPU_AMP_ENV, None)
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--cpu",
                           "--out", str(out)], capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=600)
    table = json.loads(out.read_text())
    rows = {r["step"]: r for r in table["rows"]}
    failed = {k: r["result"] for k, r in rows.items() if r["status"] != "ok"}
    assert proc.returncode == 0 and not failed, (failed, proc.stdout[-3000:], proc.stderr[-3000:])
    expected = ["(a) stage-2 step fp16", "(a) stage-2 step bf16", "(a) data loader alone",
                "(a) feature extraction",
                "(b) k-NN exact", "(b) pseudo-labelling", "(c) CLI render", "(c) CLI prepare-data",
                "(c) CLI pretrain-single", "(c) CLI train-cross", "(c) CLI evaluate",
                "(c) CLI export", "(d) projected wall time"]
    assert list(rows) == expected
    for amp in ("fp16", "bf16"):
        figures = rows[f"(a) stage-2 step {amp}"]["figures"]
        assert figures["images_per_s"] > 0 and 0 <= figures["data_wait_share"] < 1
        assert math.isfinite(figures["loss"]) and figures["batch"] == 16
    assert rows["(a) stage-2 step fp16"]["figures"]["scale"] > 0  # the scaler ran
    assert rows["(a) stage-2 step bf16"]["figures"]["scale"] is None
    assert rows["(b) k-NN exact"]["figures"]["recall"] == 1.0
    assert rows["(d) projected wall time"]["figures"]["hours"] > 0
    assert "(c) CLI export" in proc.stdout and "toy sizes on the CPU" in proc.stdout


def test_run_threads_sets_the_cpu_threads_of_torch_and_faiss(monkeypatch):
    """``run.threads`` (unhashed: it changes no result beyond rounding) sets torch's intra-op
    threads and the OMP_NUM_THREADS faiss reads; 0 leaves both as they were."""
    from dmdl_cli.clustering.neighbors import faiss_threads
    from dmdl_cli.recipe import load_recipe

    before = torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    try:
        select_runtime(load_recipe(REPO / "recipes" / "demo.yaml", overrides=["run.threads=0"]))
        assert torch.get_num_threads() == before and faiss_threads() == 2
        select_runtime(load_recipe(REPO / "recipes" / "demo.yaml", overrides=["run.threads=1"]))
        assert torch.get_num_threads() == 1 and faiss_threads() == 1
    finally:
        torch.set_num_threads(before)
