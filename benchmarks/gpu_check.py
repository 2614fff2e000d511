"""GPU check: one command that runs every GPU code path of dmdl in minutes and prints one table.

    python benchmarks/gpu_check.py                    # one GPU, under 8 minutes
    python benchmarks/gpu_check.py --cpu              # the same steps at toy size (CI, ~1 minute)
    python benchmarks/gpu_check.py --out check.md     # also save the table (.md or .json)

Steps (each row says ok or FAILED with a one-line reason; the exit code is 1 when any failed):

(a) Stage-2 training speed: the network of ``recipes/sysu.yaml`` (resnet50_agw, 288x144,
    P x K from the recipe: batch 2 views x 128 x 2 modalities = 512) with channels_last, fp16
    AMP with the gradient scaler, then bf16: timed steps of the real stage-2 batch loss
    (``CrossModalityStage.batch_loss``: intra-modality contrast, CAI, cross-modal triplet, MMD;
    memories built from random unit features) fed by the training loop's DataLoader over a
    random 288x144 image cache with the recipe's augmentation and workers. Images/s, peak GPU
    memory, share of step time spent waiting for data. Then flip-averaged feature extraction
    (``extract_features``) images/s.
(b) Pseudo-labelling: faiss-gpu exact k-NN (k = cluster.k1) of 22,258 x 2,048 clustered unit
    features (SYSU-MM01's visible train set) against the CPU exact search: recall and seconds;
    then the full pseudo-labelling (k-NN + Jaccard + DBSCAN, ``cluster_features``) of the
    visible (22,258) and infrared (11,909) sets.
(c) End to end through the real CLI (subprocesses): a synthetic set rendered at 288x144 in the
    SYSU-MM01 layout, ``prepare-data --dataset sysu`` with ``recipes/sysu.yaml`` (AMP on), one
    short epoch of ``pretrain-single`` and ``train-cross``, ``evaluate``, ``export``.
(d) The projected wall time of the full SYSU-MM01 recipe (both stages' epochs x iterations
    from ``recipes/sysu.yaml``, plus per-epoch feature extraction and clustering of the train
    set) from (a) and (b). Stage 1 is costed at the stage-2 step time (an upper bound: its
    loss has no CAI or cross-modal terms).

``--cpu`` runs the same steps on the CPU at toy size (resnet18, 32x16 / 64x32 images, a few
steps, a few thousand features) with the recipe's mixed precision forced on the CPU
(``DMDL_CPU_AMP=1``; fp16 kernels on a CPU are slow, so the end-to-end run uses bf16 there).
Its figures say that the code runs, not how fast a GPU is.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dmdl_cli.recipe import Recipe, load_recipe  # noqa: E402

SYSU_RECIPE = REPO / "recipes" / "sysu.yaml"
# SYSU-MM01's train set (395 identities): images per modality. Data set facts, not recipe keys.
SYSU_TRAIN_VISIBLE = 22_258
SYSU_TRAIN_INFRARED = 11_909
SYSU_TRAIN_IDS = 395
GIB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class Sizes:
    """How big each step runs: the real sizes on a GPU, toy sizes with ``--cpu``."""

    arch: str
    height: int  # input of the training-speed step (a)
    width: int
    clusters_per_batch: int | None  # None: the recipe's P and K
    instances: int | None
    warmup: int  # untimed steps first (cudnn autotuning, worker start)
    steps: int  # timed steps
    cache_images: int  # rows of the random image cache of (a)
    ids: int  # unified identities of (a)'s labels and memories
    workers: int | None  # None: the recipe's run.workers
    knn_visible: int  # (b) feature rows
    knn_infrared: int
    knn_dim: int
    render: tuple[int, int]  # (c) synthetic images rendered and cached at this size
    e2e_ids: tuple[int, int, int]  # (c) train / val / test identities
    e2e_per_cam: int  # images of each identity by each camera
    e2e_iters: int
    e2e_amp: str | None  # None: the recipe's train.amp
    timeout_s: int  # per CLI command of (c)
    fp16_size: tuple[int, int] | None = None  # (height, width) of the fp16 step, when not the above


GPU_SIZES = Sizes(arch="resnet50_agw", height=288, width=144, clusters_per_batch=None,
                  instances=None, warmup=5, steps=50, cache_images=4096, ids=SYSU_TRAIN_IDS,
                  workers=None, knn_visible=SYSU_TRAIN_VISIBLE, knn_infrared=SYSU_TRAIN_INFRARED,
                  knn_dim=2048, render=(288, 144), e2e_ids=(8, 1, 4), e2e_per_cam=3,
                  e2e_iters=4, e2e_amp=None, timeout_s=300)
# 48 x 24, not smaller: at 32 x 16 resnet18's layer3 sees 2 x 1 maps, where torch 2.14's bf16
# CPU convolution (oneDNN) gives different values from call to call, now and then NaN. The fp16
# step runs at 32 x 16 (fp16_size), one step without warm-up: a CPU has no fast fp16
# convolution (about 10 s for 16 images at 32 x 16, 40 s at 48 x 24), and the toy figures show
# that the code runs, not how fast a GPU is.
CPU_SIZES = Sizes(arch="resnet18", height=48, width=24, clusters_per_batch=2, instances=2,
                  warmup=0, steps=1, fp16_size=(32, 16), cache_images=64, ids=6, workers=1, knn_visible=1200,
                  knn_infrared=600, knn_dim=64, render=(64, 32), e2e_ids=(6, 1, 3), e2e_per_cam=2,
                  e2e_iters=2, e2e_amp="bf16", timeout_s=120)


@dataclasses.dataclass
class Row:
    step: str
    setting: str
    result: str = ""
    status: str = "ok"
    figures: dict[str, Any] = dataclasses.field(default_factory=dict)  # for (d) and --out json


class Check:
    """Collects rows; a failing step becomes a FAILED row with its one-line reason."""

    def __init__(self) -> None:
        self.rows: list[Row] = []

    def run(self, step: str, setting: str, func: Callable[[], tuple[str, dict[str, Any]]]) -> Row:
        row = Row(step, setting)
        start = time.perf_counter()
        try:
            row.result, row.figures = func()
        except Exception as err:  # noqa: BLE001 - every failure is reported, none aborts the check
            row.status = "FAILED"
            row.result = one_line(err)
            if os.environ.get("GPU_CHECK_TRACEBACK"):
                traceback.print_exc()
        row.figures.setdefault("seconds", round(time.perf_counter() - start, 2))
        self.rows.append(row)
        return row

    def fail(self, step: str, setting: str, reason: str) -> None:
        self.rows.append(Row(step, setting, reason, "FAILED"))

    @property
    def failed(self) -> bool:
        return any(r.status != "ok" for r in self.rows)


def one_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    text = f"{type(err).__name__}: {lines[-1] if lines else ''}"
    return text if len(text) <= 200 else text[:197] + "..."


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------
# (a) stage-2 training speed


def check_recipe(sizes: Sizes) -> Recipe:
    """recipes/sysu.yaml at the check's sizes (no ImageNet file needed: random initialisation)."""
    sets = ["model.pretrained=null", f"model.arch={sizes.arch}", f"data.height={sizes.height}",
            f"data.width={sizes.width}", f"stage2.iters={sizes.warmup + sizes.steps}"]
    if sizes.clusters_per_batch:
        sets += [f"stage2.clusters_per_batch={sizes.clusters_per_batch}",
                 f"stage2.instances={sizes.instances}"]
    if sizes.workers is not None:
        sets.append(f"run.workers={sizes.workers}")
    return load_recipe(SYSU_RECIPE, overrides=sets)


def make_runtime(device: torch.device, amp: torch.dtype | None):
    from dmdl_cli.runtime import Runtime

    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    return Runtime(device, amp, channels_last=True)


def random_cache(folder: Path, n: int, height: int, width: int) -> Path:
    """(n, H, W, 3) uint8 random images in the workspace cache format, with its integrity
    record (``open_cache`` refuses a cache without one)."""
    from dmdl_cli.data.cache import cache_record, write_record

    path = folder / f"cache-{height}x{width}.u8"
    cache = np.memmap(path, dtype=np.uint8, mode="w+", shape=(n, height, width, 3))
    rng = np.random.default_rng(0)
    for start in range(0, n, 256):
        stop = min(n, start + 256)
        cache[start:stop] = rng.integers(0, 256, size=(stop - start, height, width, 3), dtype=np.uint8)
    cache.flush()
    del cache
    write_record(path, cache_record(path, n, height, width))
    return path


def stage2_context(recipe: Recipe, runtime, cache_path: Path, n: int, ids: int):
    """A TrainState of stage 2 at the epoch where every loss term is on, with its epoch state:
    unified labels over both modalities and memories from random unit features."""
    from dmdl_cli.data.cache import open_cache
    from dmdl_cli.data.index import IndexTable
    from dmdl_cli.context import StageContext
    from dmdl_cli.model.cai import modality_prior
    from dmdl_cli.model.loading import build_from_recipe
    from dmdl_cli.training.cross import FUSED, CrossModalityStage
    from dmdl_cli.training.state import TrainState

    stage = recipe.stage2
    thresholds = [stage.cross_sampler_from, stage.onehot_epochs] + [e for e, _ in stage.triplet_ramp]
    epoch = max([0] + [e for e in thresholds if e != "never"])  # every term of the loss on
    rows = np.arange(n)
    modality = ((rows // ids) % 2).astype(np.int8)  # every id in both modalities
    labels = (rows % ids).astype(np.int64)  # (N,) unified ids
    index = IndexTable(paths=[""] * n, pids=np.full(n, -1), cams=np.zeros(n), modality=modality,
                       split=np.full(n, "train"))
    model = build_from_recipe(recipe, pretrained=False).to(runtime.device)
    model = model.to(memory_format=torch.channels_last).train()
    generator = torch.Generator().manual_seed(0)

    def unit(count: int) -> torch.Tensor:  # (count, D) L2-normalised
        return F.normalize(torch.randn(count, model.feat_dim, generator=generator), dim=1)

    saved = {"epoch": epoch, "labels": labels,
             "conf": np.random.default_rng(0).uniform(0.3, 1.0, n).astype(np.float32),
             "ids": {0: np.arange(ids), 1: np.arange(ids)},
             "prior": modality_prior(labels, modality).numpy(), "num_ids": ids,
             "memories": {0: unit(ids), 1: unit(ids), FUSED: unit(ids)}}
    logic = CrossModalityStage()
    ctx = StageContext(None, recipe, logic.spec, runtime)
    ctx.index, ctx.train_rows = index, rows
    ctx.cache = open_cache(cache_path, n, recipe.data.height, recipe.data.width)
    t = TrainState(ctx, logic, model, epoch=epoch)
    t.epoch_state = logic.restore_epoch(t, saved)
    return t


def train_speed(sizes: Sizes, device: torch.device, amp: torch.dtype, cache_path: Path):
    """Timed steps of the real stage-2 step: images/s, peak memory, data-wait share."""
    from dmdl_cli.data.augment import AugmentConfig
    from dmdl_cli.data.train_dataset import ViewDataset
    from dmdl_cli.runtime import make_grad_scaler
    from dmdl_cli.training.loop import batch_features, make_loader, plan_items, step_plan, to_batch

    recipe = check_recipe(sizes)
    runtime = make_runtime(device, amp)
    n = sizes.cache_images
    t = stage2_context(recipe, runtime, cache_path, n, sizes.ids)
    aug = AugmentConfig.from_recipe(recipe.augment, modality_specific=recipe.cbt.augment)
    t.dataset = ViewDataset(cache_path, t.ctx.index.modality, aug, shape=(n, sizes.height, sizes.width, 3))
    optimizer = torch.optim.Adam(t.model.parameters(), lr=recipe.stage2.lr,
                                 weight_decay=recipe.stage2.weight_decay)
    scaler = make_grad_scaler(runtime)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    wait = compute = 0.0
    images = skipped = 0
    t0 = time.perf_counter()
    batches = t.epoch_state.batches
    plans = [step_plan(t, keys) for keys in batches]
    loader = make_loader(t.dataset, [plan_items(k, p, 0) for k, p in zip(batches, plans)], 0,
                         workers=recipe.run.workers, pin_memory=device.type == "cuda")
    for step, raw in enumerate(loader):
        t1 = time.perf_counter()
        batch = to_batch(raw, batches[step], plans[step], t)
        optimizer.zero_grad(set_to_none=True)
        batch["bn"] = batch_features(t, batch)
        loss, parts, update = t.logic.batch_loss(t, batch)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss {loss.item()} at step {step} ({parts})")
        scale = scaler.get_scale() if scaler.is_enabled() else 1.0
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        skipped += int(scaler.is_enabled() and scaler.get_scale() < scale)  # inf/NaN gradients
        with torch.no_grad():
            update()
        sync(device)
        t2 = time.perf_counter()
        if step >= sizes.warmup:
            wait, compute, images = wait + t1 - t0, compute + t2 - t1, images + batch["images"].shape[0]
        t0 = time.perf_counter()
    total = wait + compute
    figures = {"images_per_s": images / total, "step_s": total / sizes.steps,
               "data_wait_share": wait / total, "batch": images // sizes.steps,
               "loss": float(loss.item()), "skipped_steps": skipped,
               "scale": float(scaler.get_scale()) if scaler.is_enabled() else None}
    peak = ""
    if device.type == "cuda":
        figures["peak_gib"] = torch.cuda.max_memory_allocated(device) / GIB
        peak = f", peak {figures['peak_gib']:.1f} GiB"
    scale = ""
    if figures["scale"]:
        scale = (f", loss scale {figures['scale']:.0f} ({skipped} of {sizes.warmup + sizes.steps} "
                 "steps skipped for inf/NaN gradients)")
    text = (f"{figures['images_per_s']:,.0f} img/s ({figures['step_s']:.3f} s/step){peak}, "
            f"data wait {100 * figures['data_wait_share']:.1f}%, loss {figures['loss']:.3f}{scale}")
    return text, figures


def loader_speed(sizes: Sizes, device: torch.device, cache_path: Path):
    """The training DataLoader alone: how fast the recipe's workers augment (no network).

    The timed steps of ``train_speed`` start with up to ``workers x 4`` batches already
    prefetched during the warm-up, which can hide a slow loader; this rate cannot be hidden."""
    from dmdl_cli.data.augment import AugmentConfig
    from dmdl_cli.data.train_dataset import ViewDataset
    from dmdl_cli.training.loop import make_loader, plan_items, step_plan

    recipe = check_recipe(sizes)
    n = sizes.cache_images
    t = stage2_context(recipe, make_runtime(device, None), cache_path, n, sizes.ids)
    aug = AugmentConfig.from_recipe(recipe.augment, modality_specific=recipe.cbt.augment)
    dataset = ViewDataset(cache_path, t.ctx.index.modality, aug, shape=(n, sizes.height, sizes.width, 3))
    steps = [plan_items(keys, step_plan(t, keys), 0) for keys in t.epoch_state.batches]
    start = time.perf_counter()
    images, first = 0, None
    for raw in make_loader(dataset, steps, 0, workers=recipe.run.workers,
                           pin_memory=device.type == "cuda"):
        if first is None:
            first, start = time.perf_counter() - start, time.perf_counter()
            continue
        images += raw["images"].shape[0]
    rate = images / (time.perf_counter() - start)
    return (f"{rate:,.0f} img/s, {recipe.run.workers} loader workers (first batch after {first:.1f} s)",
            {"images_per_s": rate, "first_batch_s": first})


def feature_speed(sizes: Sizes, device: torch.device, cache_path: Path):
    """Flip-averaged feature extraction (the per-epoch clustering input) in the recipe's AMP."""
    from dmdl_cli.data.cache import open_cache
    from dmdl_cli.features.extract import extract_features
    from dmdl_cli.model.loading import build_from_recipe
    from dmdl_cli.runtime import AMP_DTYPES

    recipe = check_recipe(sizes)
    runtime = make_runtime(device, AMP_DTYPES[recipe.train.amp])
    n = sizes.cache_images
    cache = open_cache(cache_path, n, sizes.height, sizes.width)
    model = build_from_recipe(recipe, pretrained=False).to(device).to(memory_format=torch.channels_last)
    kwargs = dict(batch_size=recipe.run.feature_batch, flip=recipe.cluster.flip_average)
    extract_features(model, cache, np.arange(min(n, recipe.run.feature_batch)), runtime, **kwargs)
    sync(device)
    start = time.perf_counter()
    feats = extract_features(model, cache, np.arange(n), runtime, **kwargs)
    sync(device)
    seconds = time.perf_counter() - start
    if not np.isfinite(feats).all():
        raise FloatingPointError("non-finite features")
    rate = n / seconds
    flip = " (x2 with the flip)" if recipe.cluster.flip_average else ""
    return f"{rate:,.0f} img/s{flip}, {n} images in {seconds:.1f} s", {"images_per_s": rate}


# ---------------------------------------------------------------------------------------------
# (b) k-NN and pseudo-labelling


def clustered_unit_features(n: int, d: int, ids: int, seed: int) -> np.ndarray:
    """(n, d) float32 unit rows around ``ids`` random identity centres (a re-id-like layout)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((ids, d), dtype=np.float32)
    x = centres[rng.integers(0, ids, n)]
    x += rng.standard_normal((n, d), dtype=np.float32)  # as far from the centre as it is long
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def knn_recall(found: np.ndarray, exact: np.ndarray) -> float:
    """Mean share of each row's exact neighbours (self excluded) that ``found`` also lists."""
    a, b = found[:, 1:], exact[:, 1:]
    both = np.sort(np.concatenate([a, b], axis=1), axis=1)
    shared = (both[:, 1:] == both[:, :-1]).sum(axis=1)  # rows hold distinct ids
    return float(shared.mean() / b.shape[1])


def knn_check(sizes: Sizes, on_gpu: bool, features: np.ndarray):
    from dmdl_cli.clustering.neighbors import knn

    k = load_recipe(SYSU_RECIPE).cluster.k1
    use_gpu = True if on_gpu else None  # on a GPU host a missing faiss GPU is a failure
    if on_gpu:
        knn(features[:1024], k, use_gpu=True)  # GPU resources and kernels warm
    start = time.perf_counter()
    _, idx_gpu = knn(features, k, use_gpu=use_gpu)
    t_gpu = time.perf_counter() - start
    start = time.perf_counter()
    _, idx_cpu = knn(features, k, use_gpu=False)
    t_cpu = time.perf_counter() - start
    recall = knn_recall(idx_gpu, idx_cpu)
    if recall < 0.99:
        raise AssertionError(f"recall {recall:.4f} of the {'GPU' if on_gpu else 'auto'} search "
                             "against the CPU exact search is below 0.99")
    where = "GPU" if on_gpu else "auto (CPU)"
    return (f"recall@{k} {recall:.4f}; {where} {t_gpu:.2f} s, CPU exact {t_cpu:.2f} s",
            {"recall": recall, "seconds_search": t_gpu, "seconds_cpu": t_cpu})


def pseudo_label_check(on_gpu: bool, visible: np.ndarray, infrared: np.ndarray):
    from dmdl_cli.clustering.pseudo_labels import cluster_features

    cfg = load_recipe(SYSU_RECIPE).cluster
    parts, total = [], 0.0
    for name, feats in (("visible", visible), ("infrared", infrared)):
        start = time.perf_counter()
        labels, info = cluster_features(feats, k1=cfg.k1, k2=cfg.k2, eps=cfg.eps,
                                        min_samples=cfg.min_samples, knn_method=cfg.knn,
                                        use_gpu=True if on_gpu else None, return_info=True)
        seconds = time.perf_counter() - start
        total += seconds
        parts.append(f"{name} {len(feats):,}: {seconds:.1f} s, {info['clusters']} clusters")
    return "; ".join(parts), {"seconds_per_epoch": total}


# ---------------------------------------------------------------------------------------------
# (c) end to end through the CLI


def e2e_sets(sizes: Sizes) -> list[str]:
    """--set overrides: one short epoch per stage, clustering loose enough for an untrained net."""
    h, w = sizes.render
    sets = [f"data.height={h}", f"data.width={w}", f"model.arch={sizes.arch}",
            "model.pretrained=null", "cluster.k1=8", "cluster.k2=3", "cluster.min_samples=2",
            "cluster.eps=0.7", "eval.trials=1", "run.feature_batch=64"]
    # one epoch: the switches a one-epoch schedule never reaches are turned on from epoch 0 where
    # they can be (refinement, the cross-modality sampler) and off where they cannot (ramps)
    sets += ["stage2.k1_adopting=4", "stage1.refine_from=0", "stage2.onehot_epochs=0",
             "stage2.cross_sampler_from=0"]
    for stage in ("stage1", "stage2"):
        sets += [f"{stage}.epochs=1", f"{stage}.iters={sizes.e2e_iters}", f"{stage}.triplet_ramp=[]"]
        if sizes.clusters_per_batch:
            sets += [f"{stage}.clusters_per_batch={sizes.clusters_per_batch}",
                     f"{stage}.instances={sizes.instances}"]
    if sizes.workers is not None:
        sets.append(f"run.workers={sizes.workers}")
    if sizes.e2e_amp:
        sets.append(f"train.amp={sizes.e2e_amp}")
    return [item for s in sets for item in ("--set", s)]


def run_cli(args: list[str], env: dict[str, str], timeout: int) -> None:
    """``dmdl ARGS`` in a subprocess; RuntimeError with its error line when it fails."""
    proc = subprocess.run([sys.executable, "-m", "dmdl_cli", *args], capture_output=True,
                          text=True, env=env, cwd=REPO, timeout=timeout)
    if proc.returncode != 0:
        lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.strip()]
        errors = [ln for ln in lines if ln.startswith("error:")] or lines[-1:] or ["(no output)"]
        raise RuntimeError(f"exit {proc.returncode}: {errors[-1].strip()}")


def speed_note(ws: Path, stage: str) -> str:
    """The training loop's own speed record of the stage (images/s, data wait)."""
    records = [json.loads(line) for line in (ws / stage / "log.jsonl").read_text().splitlines()
               if line.strip()]
    speed = [r for r in records if r.get("kind") == "speed"]
    if not speed:
        return ""
    return f", {speed[-1]['images_per_s']:,.0f} img/s, data wait {100 * speed[-1]['data_wait_share']:.0f}%"


def end_to_end(check: Check, sizes: Sizes, folder: Path, cpu: bool) -> None:
    """(c): render a synthetic SYSU-MM01 tree, then every stage through the CLI, in order; a
    failed command leaves the later ones as FAILED 'not run' rows."""
    from dmdl_cli.data.synthetic import SyntheticConfig, generate

    h, w = sizes.render
    root, ws = folder / "synthetic-sysu", folder / "ws"
    env = {**os.environ, "DMDL_NO_PROGRESS": "1", "PYTHONPATH": os.pathsep.join(
        p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)}
    if cpu:
        env["DMDL_CPU_AMP"] = "1"  # the recipe's mixed precision on the CPU too
    amp = sizes.e2e_amp or load_recipe(SYSU_RECIPE).train.amp

    def render():
        summary = generate(root, ids=sizes.e2e_ids, seed=0, images_per_cam=sizes.e2e_per_cam,
                           layout="sysu", config=SyntheticConfig(height=h, width=w), workers=4)
        return f"{summary.get('images', '?')} images in {summary['seconds']:.1f} s", {}

    def cli(args: list, stage: str | None = None):
        def step():
            start = time.perf_counter()
            run_cli([str(a) for a in args] + ["--workspace", str(ws)], env, sizes.timeout_s)
            note = speed_note(ws, stage) if stage else ""
            return f"{time.perf_counter() - start:.1f} s{note}", {}
        return step

    steps = [
        ("render", f"synthetic SYSU-MM01 layout at {h}x{w}", render),
        ("prepare-data", "--dataset sysu, recipes/sysu.yaml",
         cli(["prepare-data", "--dataset", "sysu", "--root", root, "--recipe", SYSU_RECIPE,
              *e2e_sets(sizes)])),
        ("pretrain-single", f"1 epoch x {sizes.e2e_iters} iters, amp {amp}",
         cli(["pretrain-single"], "stage1")),
        ("train-cross", f"1 epoch x {sizes.e2e_iters} iters, amp {amp}",
         cli(["train-cross"], "stage2")),
        ("evaluate", "--mode all, 1 trial", cli(["evaluate", "--mode", "all"])),
        ("export", "ONNX + TorchScript, parity check", cli(["export"])),
    ]
    broken = None
    for name, setting, action in steps:
        if broken:
            check.fail(f"(c) CLI {name}", setting, f"not run: {broken} failed")
        elif check.run(f"(c) CLI {name}", setting, action).status != "ok":
            broken = name


# ---------------------------------------------------------------------------------------------
# (d) projection


def projection(train: dict, features: dict, clustering: dict) -> tuple[str, dict]:
    """Wall time of the full SYSU-MM01 recipe from the measured step, extraction and clustering."""
    recipe = load_recipe(SYSU_RECIPE)
    n_train = SYSU_TRAIN_VISIBLE + SYSU_TRAIN_INFRARED
    total, parts = 0.0, []
    for name in ("stage1", "stage2"):
        stage = getattr(recipe, name)
        batch = 2 * 2 * stage.clusters_per_batch * stage.instances  # 2 views x 2 modalities
        step_s = batch / train["images_per_s"]
        epoch_s = stage.iters * step_s + n_train / features["images_per_s"] + clustering["seconds_per_epoch"]
        total += stage.epochs * epoch_s
        parts.append(f"{name} {stage.epochs} x ({stage.iters} x {step_s:.2f} s + features "
                     f"{n_train / features['images_per_s']:.0f} s + clustering "
                     f"{clustering['seconds_per_epoch']:.0f} s)")
    return f"{total / 3600:.1f} h: " + "; ".join(parts), {"hours": total / 3600}


# ---------------------------------------------------------------------------------------------
# table and main


def header(device: torch.device, cpu: bool) -> str:
    import faiss

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    mode = "toy sizes on the CPU (--cpu): figures show the code runs, not GPU speed" if cpu else "full sizes"
    return (f"dmdl GPU check, {datetime.date.today().isoformat()}, {name}; torch {torch.__version__}"
            f", faiss {faiss.__version__}; {mode}")


def render_table(title: str, rows: list[Row]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, title_justify="left", show_lines=False)
    for column in ("step", "setting", "result", "status"):
        table.add_column(column, overflow="fold")
    for r in rows:
        table.add_row(r.step, r.setting, r.result,
                      "[green]ok[/]" if r.status == "ok" else f"[bold red]{r.status}[/]")
    Console(width=max(160, Console().width)).print(table)


def write_out(path: Path, title: str, rows: list[Row]) -> None:
    if path.suffix == ".json":
        text = json.dumps({"title": title, "rows": [dataclasses.asdict(r) for r in rows]}, indent=2)
    else:
        lines = [f"{title}", "", "| step | setting | result | status |", "|---|---|---|---|"]
        lines += [f"| {r.step} | {r.setting} | {r.result.replace('|', '/')} | {r.status} |" for r in rows]
        text = "\n".join(lines)
    path.write_text(text + "\n", encoding="utf-8")


def run_check(check: Check, cpu: bool, folder: Path) -> None:
    """Every step in order; each adds its row to ``check``."""
    sizes = CPU_SIZES if cpu else GPU_SIZES
    if not cpu and not torch.cuda.is_available():
        check.fail("(a-d)", "a CUDA GPU", "torch sees no CUDA GPU: run with --cpu for the toy check")
        return
    device = torch.device("cpu") if cpu else torch.device("cuda", 0)
    recipe = check_recipe(sizes)
    p, k = recipe.stage2.clusters_per_batch, recipe.stage2.instances
    workers = recipe.run.workers
    setting = (f"{sizes.arch} {sizes.height}x{sizes.width}, batch 2x{p * k}x2={4 * p * k}, "
               f"channels_last, {sizes.steps} steps, run.workers={workers}")
    cache_path = random_cache(folder, sizes.cache_images, sizes.height, sizes.width)
    speeds = {}
    for amp_name, amp in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
        step_sizes, step_cache = sizes, cache_path
        if amp is torch.float16 and sizes.fp16_size is not None:
            step_sizes = dataclasses.replace(sizes, height=sizes.fp16_size[0], width=sizes.fp16_size[1])
            step_cache = random_cache(folder, sizes.cache_images, *sizes.fp16_size)
        row = check.run(f"(a) stage-2 step {amp_name}",
                        setting.replace(f"{sizes.height}x{sizes.width}",
                                        f"{step_sizes.height}x{step_sizes.width}"),
                        lambda amp=amp, s=step_sizes, c=step_cache: train_speed(s, device, amp, c))
        speeds[amp_name] = row.figures if row.status == "ok" else None
    check.run("(a) data loader alone", f"{sizes.height}x{sizes.width}, two views, recipe augmentation, "
              f"run.workers={workers}", lambda: loader_speed(sizes, device, cache_path))
    feat_row = check.run("(a) feature extraction", f"{sizes.arch} {sizes.height}x{sizes.width}, "
                         f"amp {recipe.train.amp}, batch {recipe.run.feature_batch}",
                         lambda: feature_speed(sizes, device, cache_path))
    ids = SYSU_TRAIN_IDS if not cpu else 20
    visible = clustered_unit_features(sizes.knn_visible, sizes.knn_dim, ids, seed=1)
    infrared = clustered_unit_features(sizes.knn_infrared, sizes.knn_dim, ids, seed=2)
    knn_row = check.run("(b) k-NN exact", f"{sizes.knn_visible:,} x {sizes.knn_dim:,}, "
                        f"{'faiss GPU' if not cpu else 'auto (no GPU)'} vs CPU exact",
                        lambda: knn_check(sizes, not cpu, visible))
    label_row = check.run("(b) pseudo-labelling", "k-NN + Jaccard + DBSCAN, recipes/sysu.yaml cluster.*",
                          lambda: pseudo_label_check(not cpu, visible, infrared))
    end_to_end(check, sizes, folder, cpu)
    inputs = [speeds.get(recipe.train.amp, speeds["fp16"]),
              feat_row.figures if feat_row.status == "ok" else None,
              label_row.figures if label_row.status == "ok" else None]
    what = "SYSU-MM01 recipe, both stages" + (" (from toy CPU figures: not a forecast)" if cpu else "")
    if all(inputs) and knn_row.status == "ok":
        check.run("(d) projected wall time", what, lambda: projection(*inputs))
    else:
        check.fail("(d) projected wall time", what, "not computed: a step of (a) or (b) failed")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu", action="store_true", help="toy sizes on the CPU (CI)")
    parser.add_argument("--out", type=Path, help="also write the table to FILE (.md or .json)")
    args = parser.parse_args(argv)
    device = torch.device("cuda", 0) if torch.cuda.is_available() and not args.cpu else torch.device("cpu")
    os.environ.setdefault("DMDL_NO_PROGRESS", "1")
    start = time.perf_counter()
    check = Check()
    try:
        with tempfile.TemporaryDirectory(prefix="dmdl-gpu-check-") as tmp:
            run_check(check, args.cpu, Path(tmp))
    except Exception as err:  # noqa: BLE001 - set-up outside a step (disk, memory): still a row
        check.fail("(set-up)", "outside the steps", one_line(err))
    title = header(device, args.cpu) + f"; {time.perf_counter() - start:.0f} s in all"
    render_table(title, check.rows)
    if args.out:
        write_out(args.out, title, check.rows)
    return 1 if check.failed else 0


if __name__ == "__main__":
    sys.exit(main())
