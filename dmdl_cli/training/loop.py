"""The one training loop both stages share.

A stage supplies a :class:`StageLogic`: how to (re)label the training set at the start of an
epoch and build its memories (:meth:`StageLogic.prepare_epoch`), and the loss of one batch
(:meth:`StageLogic.batch_loss`). This module owns everything else: epochs x iterations, the
optimiser and its step schedule, AMP and channels_last on GPU, DDP under ``torchrun``, the rich
progress bar, the JSON-lines log, test-set monitoring (logged, never used to pick a
checkpoint), and resumable checkpoints.

Resume contract: ``WS/<stage>/last.pt`` is written every ``run.checkpoint_every`` steps and at
each epoch end. It holds the model, optimiser, scheduler, AMP scaler, the epoch's pseudo labels,
confidences and memories, the epoch and the next step, and every RNG state. Batches are a
deterministic function of (seed, epoch, labels) and each image's augmentation of its own seed,
so a resumed run regenerates the epoch's batches and skips to the saved step: it continues as if
never stopped (bitwise on the CPU with ``--deterministic``). SIGTERM, SIGINT and SIGUSR1 stop a
run at the end of its current step with ``last.pt`` written there (``training/signals.py``).

``--force`` starts from scratch but keeps the previous run's ``final.pt``, ``last.pt``, log and
labels until the new run writes its first checkpoint: a new run that fails early (a bad value,
a full disk) leaves the previous models as they were.
"""
from __future__ import annotations

import functools
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist

from dmdl_cli import __version__
from dmdl_cli.atomic import atomic_write_text
from dmdl_cli.console import log, make_progress
from dmdl_cli.data.augment import AugmentConfig
from dmdl_cli.data.cache import open_cache
from dmdl_cli.data.index import IndexTable, read_index
from dmdl_cli.data.sampling import ResumableBatchSampler
from dmdl_cli.data.train_dataset import TwoViewDataset, collate_views
from dmdl_cli.errors import DmdlError, Interrupted
from dmdl_cli.features.extract import extract_features
from dmdl_cli.model.backbone import normalize_batch
from dmdl_cli.features.batchnorm import recalibrate_batchnorm, recalibration_rows
from dmdl_cli.provenance import write_recipe
from dmdl_cli.recipe import Recipe, StageRecipe
from dmdl_cli.stages import StageSpec
from dmdl_cli.runtime import (Runtime, make_grad_scaler, rng_state, seed_everything, select_runtime,
                              set_rng_state)
from dmdl_cli.training.distributed import broadcast_object, mean_over_ranks, rank_slice
from dmdl_cli.training.signals import StopRequest, signal_name
from dmdl_cli.training.tensorboard import TensorBoardLog, require_tensorboard
from dmdl_cli.workspace import Workspace, load_checkpoint, save_checkpoint

LOG_FILE = "log.jsonl"


@dataclass
class TrainContext:
    """What a stage's logic may read: the workspace, recipe, runtime, data and model."""

    ws: Workspace
    recipe: Recipe
    stage: StageRecipe
    runtime: Runtime
    index: IndexTable
    train_rows: np.ndarray  # (N,) index rows of the training split
    modality: np.ndarray  # (N,) int8 modality of each train row (0 visible, 1 infrared)
    cache: np.ndarray  # (N_all, H, W, 3) uint8 memmap
    model: torch.nn.Module
    true_ids: np.ndarray | None  # (N,) true identities: DIAGNOSTICS ONLY, never used to train
    log: Callable[[dict[str, Any]], None]

    @functools.cached_property
    def train_position(self) -> np.ndarray:
        """(N_all,) position of each index row among the train rows (-1 for test rows)."""
        pos = np.full(len(self.index), -1, dtype=np.int64)
        pos[self.train_rows] = np.arange(len(self.train_rows))
        return pos

    @property
    def bare_model(self) -> torch.nn.Module:
        """The network without its DistributedDataParallel wrapper."""
        return self.model.module if hasattr(self.model, "module") else self.model

    def recalibrate(self, epoch: int) -> None:
        """Re-estimate BatchNorm statistics on ``train.bn_recalibration`` clean train images."""
        count = self.recipe.train.bn_recalibration
        if count <= 0:
            return
        rows = recalibration_rows(self.train_rows, count, self.recipe.train.seed, epoch)
        layers = recalibrate_batchnorm(self.bare_model, self.cache, rows, self.runtime,
                                       batch_size=self.recipe.train.bn_recalibration_batch)
        log(f"re-estimated {layers} BatchNorm layers on {len(rows)} clean train images")

    def train_features(self) -> np.ndarray:
        """(N, D) L2-normalised features of every train image (flip-averaged when the recipe
        says so)."""
        return extract_features(self.bare_model, self.cache, self.train_rows, self.runtime,
                                batch_size=self.recipe.run.feature_batch,
                                flip=self.recipe.cluster.flip_average, description="train features")


@dataclass
class EpochState:
    """Everything a stage derives at the start of an epoch; saved in resume checkpoints."""

    labels: np.ndarray  # (N,) int64 per train row, -1 = outlier; batches are drawn from these
    batches: list = field(default_factory=list)  # [[(train position, aug seed), ...], ...]
    extra: dict[str, Any] = field(default_factory=dict)  # stage-specific (confidences, ids, ...)
    memories: dict[str, torch.nn.Module] = field(default_factory=dict)


class StageLogic:
    """The stage-specific part of training (see the module docstring)."""

    spec: StageSpec  # the stage's record in dmdl_cli/stages.py
    resuming = False  # set by the loop: the weights will come from last.pt, not initial_model

    def prepare_epoch(self, ctx: TrainContext, epoch: int) -> EpochState:  # pragma: no cover
        raise NotImplementedError

    def restore_epoch(self, ctx: TrainContext, saved: dict[str, Any]) -> EpochState:  # pragma: no cover
        raise NotImplementedError

    def save_epoch(self, state: EpochState) -> dict[str, Any]:  # pragma: no cover
        raise NotImplementedError

    def batch_loss(self, ctx: TrainContext, state: EpochState, epoch: int, batch: dict[str, torch.Tensor]
                   ) -> tuple[torch.Tensor, dict[str, float], Callable[[], None]]:  # pragma: no cover
        """Return (loss, named parts for the log, a no-grad memory update to run after the step)."""
        raise NotImplementedError

    def initial_model(self, ctx_recipe: Recipe, ws: Workspace) -> tuple[torch.nn.Module, str]:  # pragma: no cover
        """The network the stage starts from and one line saying where it came from."""
        raise NotImplementedError

    def inputs(self, ws: Workspace) -> list[Path]:
        """Workspace files the stage reads (recorded with their sha256 in the manifest)."""
        return [ws.index_path]


def _lr_lambda(stage: StageRecipe) -> Callable[[int], float]:
    return lambda epoch: stage.lr_gamma ** (epoch // stage.lr_step)


class JsonLog:
    """``WS/<stage>/log.jsonl``: one JSON object per line (per-step losses, per-epoch stats)."""

    def __init__(self, path: Path, enabled: bool, held: bool = False):
        self.path = path
        self.enabled = enabled
        # --force: records are held in memory until the new run writes its first checkpoint,
        # so a run that fails early leaves the previous run's log as it was
        self.held: list[str] | None = [] if held else None

    def release(self) -> None:
        """Replace the previous run's log with the records held so far; append from now on."""
        if self.held is None or not self.enabled:
            return
        atomic_write_text(self.path, "".join(line + "\n" for line in self.held))
        self.held = None

    def truncate_after(self, epoch: int, step: int) -> None:
        """On resume: drop records written after the checkpoint (they will be written again)."""
        if not self.enabled or not self.path.is_file():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by the kill
            if (rec.get("epoch", 0), rec.get("step", 0)) <= (epoch, step) and rec.get("kind") != "end":
                kept.append(line)
        atomic_write_text(self.path, "".join(k + "\n" for k in kept))

    def __call__(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        line = json.dumps(record, default=_json_default)
        if self.held is not None:
            self.held.append(line)
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(line + "\n")


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


def _make_loader(ctx: TrainContext, batches: list, start: int, dataset: TwoViewDataset):
    sampler = ResumableBatchSampler(batches, start=start)
    workers = ctx.recipe.run.workers
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=collate_views,
        num_workers=workers,
        pin_memory=ctx.runtime.device.type == "cuda",
        persistent_workers=False,
        prefetch_factor=4 if workers > 0 else None,
    )


def _checkpoint_meta(recipe: Recipe, logic: StageLogic, epoch: int, step: int, complete: bool) -> dict[str, Any]:
    return {
        "stage": logic.spec.name,
        "epoch": epoch,
        "step": step,
        "complete": complete,
        "arch": recipe.model.arch,
        "input_size": [recipe.data.height, recipe.data.width],
        "recipe_hash": recipe.hash(),
        "stage_hash": logic.spec.hash(recipe),
        "dmdl_version": __version__,
        "recipe": recipe.to_dict(),  # the values themselves, so a checkpoint explains itself
    }


class StageFiles:
    """What one stage run writes: ``last.pt``, ``final.pt``, ``epoch-NNN.pt``, log, labels.

    With ``--force`` (``replacing``) the previous run's files stay until this run writes its
    first ``last.pt``; then its ``final.pt``, the epoch models and label files this run has not
    rewritten yet, and its log are retired. Only the main rank writes.
    """

    def __init__(self, ws: Workspace, logic: StageLogic, *, replacing: bool, main: bool):
        self.ws, self.logic, self.main = ws, logic, main
        self.folder, self.last, self.final = ws.root / logic.spec.folder, logic.spec.last(ws), logic.spec.final(ws)
        self.replacing = replacing and main
        self.log = JsonLog(self.folder / LOG_FILE, enabled=main, held=self.replacing)

    def save_last(self, state: dict[str, Any], epoch: int) -> None:
        if not self.main:
            return
        save_checkpoint(self.last, state)
        if self.replacing:
            self._retire_previous(epoch)

    def _retire_previous(self, epoch: int) -> None:
        """Remove what the previous run wrote and this one (now at 0-based ``epoch``) has not."""
        self.replacing = False
        self.final.unlink(missing_ok=True)
        for path in self.folder.glob("epoch-*.pt"):  # this run has written epochs 1..epoch
            if _number(path.stem, "epoch-") > epoch:
                path.unlink(missing_ok=True)
        for path in self.ws.dir("labels").glob(f"{self.logic.spec.labels_prefix}-e*.npz"):
            if _number(path.stem, f"{self.logic.spec.labels_prefix}-e") > epoch + 1:
                path.unlink(missing_ok=True)
        self.log.release()


def _number(stem: str, prefix: str) -> int:
    """``epoch-007`` -> 7 (a name that does not parse counts as not ours: -1)."""
    try:
        return int(stem[len(prefix):]) if stem.startswith(prefix) else -1
    except ValueError:
        return -1


def _resume_point(ws: Workspace, recipe: Recipe, logic: StageLogic, last_path: Path) -> dict[str, Any] | None:
    """The saved state of ``last.pt`` to resume from (checked against the recipe), or None."""
    if not last_path.is_file():
        log(f"no {ws.rel(last_path)} to resume: starting {logic.spec.name} from the beginning")
        return None
    saved = load_checkpoint(last_path, what="resume checkpoint")
    meta = saved["meta"]
    if meta.get("stage_hash") != logic.spec.hash(recipe):
        raise DmdlError(
            f"{ws.rel(last_path)} was written with another recipe (hash "
            f"{meta.get('recipe_hash')}, now {recipe.hash()}): resume with the recipe of "
            f"that run (the workspace's recipe.yaml) or pass --force to start again")
    log(f"resuming {logic.spec.name} from {ws.rel(last_path)}: epoch {meta['epoch'] + 1}, "
        f"step {meta['step']} (weights, optimiser, memories and RNG states come from it)")
    return saved


def run_stage(ws: Workspace, recipe: Recipe, logic: StageLogic, *, resume: bool, force: bool,
              deterministic: bool) -> Path:
    """Train one stage to its end; returns the path of ``final.pt``."""
    last_path, final_path = logic.spec.last(ws), logic.spec.final(ws)
    command = logic.spec.command
    runtime = select_runtime(recipe, deterministic=deterministic)
    seed_everything(recipe.train.seed)
    if recipe.run.tensorboard:
        require_tensorboard()  # refuse before anything is written

    with ws.locked() if runtime.is_main else _nullcontext(ws):
        if final_path.is_file() and not force:
            if resume:
                log(f"{ws.rel(final_path)} exists: {logic.spec.name} is finished, nothing to resume")
                return final_path
            raise DmdlError(
                f"{ws.rel(final_path)} exists: {logic.spec.name} already finished; pass --force to "
                f"train it again from scratch (`dmdl {command} --force`)")
        if last_path.is_file() and not force and not resume:
            raise DmdlError(
                f"{ws.rel(last_path)} holds a partial {logic.spec.name} run: pass --resume to continue "
                f"it or --force to start again (`dmdl {command} --resume|--force`)")
        saved = _resume_point(ws, recipe, logic, last_path) if resume and not force else None
        files = StageFiles(ws, logic, replacing=force, main=runtime.is_main)
        logic.resuming = saved is not None
        train = _setup(ws, recipe, logic, runtime, files, saved)
        stage_run = ws.stage_run(command, recipe, resumed=saved is not None) if runtime.is_main else _nullcontext(None)
        with stage_run as run, StopRequest() as stop:
            if run is not None:
                for path in logic.inputs(ws):
                    run.add_input(path)
                run.add_output(write_recipe(logic.spec.recipe_file(ws), recipe))
            _train_epochs(train, stop, command)
            if runtime.is_main:
                train.ctx.recalibrate(train.stage.epochs)
                save_checkpoint(final_path, {"model": train.model.state_dict(),
                                             "meta": _checkpoint_meta(recipe, logic, train.stage.epochs - 1,
                                                                      train.stage.iters, True)})
                train.ctx.log({"kind": "end", "epoch": train.stage.epochs, "step": 0})
                run.add_output(final_path)
                log(f"wrote {final_path} (the last epoch: no checkpoint is selected on "
                    "the test set)")
        if runtime.distributed:
            dist.barrier()
    return final_path


@dataclass
class _Training:
    """Everything the epoch loop works with (built by :func:`_setup`)."""

    ctx: TrainContext
    logic: StageLogic
    stage: StageRecipe
    files: StageFiles
    model: torch.nn.Module
    optimizer: Any
    scheduler: Any
    scaler: Any
    dataset: TwoViewDataset
    start_epoch: int
    start_step: int
    epoch_state: EpochState | None


def _setup(ws: Workspace, recipe: Recipe, logic: StageLogic, runtime: Runtime, files: StageFiles,
           saved: dict[str, Any] | None) -> _Training:
    """Data, model, optimiser and schedule; restored from ``saved`` when resuming."""
    stage: StageRecipe = getattr(recipe, logic.spec.name)
    index = read_index(ws.index_path)
    train_rows = index.rows(split="train")
    if len(train_rows) == 0:
        raise DmdlError(f"{ws.index_path} has no train rows: nothing to train on")
    cache = open_cache(ws.cache_path(recipe.data.height, recipe.data.width), len(index),
                       recipe.data.height, recipe.data.width)
    model, init_info = logic.initial_model(recipe, ws)
    model.to(runtime.device)
    if runtime.channels_last:
        model.to(memory_format=torch.channels_last)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=stage.lr, weight_decay=stage.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(stage))
    scaler = make_grad_scaler(runtime)
    train_model: torch.nn.Module = model
    if runtime.distributed:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[runtime.device.index] if runtime.device.type == "cuda" else None)

    has_ids = bool((index.pids[train_rows] >= 0).any())
    ctx = TrainContext(ws, recipe, stage, runtime, index, train_rows,
                       index.modality[train_rows].astype(np.int8), cache, train_model,
                       index.pids[train_rows] if has_ids else None, _training_log(recipe, files, saved))
    start_epoch, start_step, epoch_state = 0, 0, None
    if saved is not None:
        meta = saved["meta"]
        start_epoch, start_step = meta["epoch"], meta["step"]
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        scaler.load_state_dict(saved["scaler"])
        if start_step < stage.iters:
            epoch_state = logic.restore_epoch(ctx, saved["epoch_state"])
        else:  # saved at an epoch end: the next epoch starts afresh
            start_epoch, start_step = start_epoch + 1, 0
        set_rng_state(saved["rng"])
        ctx.log.truncate_after(meta["epoch"], meta["step"])
    else:
        ctx.log({"kind": "start", "epoch": 0, "step": 0, "stage": logic.spec.name,
                   "recipe_hash": recipe.hash(), "init": init_info})

    aug = AugmentConfig.from_recipe(recipe.augment, modality_specific=recipe.cbt.augment)
    dataset = TwoViewDataset(ws.cache_path(recipe.data.height, recipe.data.width),
                             ctx.index.modality, aug, shape=cache.shape)
    return _Training(ctx, logic, stage, files, model, optimizer, scheduler, scaler, dataset,
                     start_epoch, start_step, epoch_state)


def _training_log(recipe: Recipe, files: StageFiles, saved: dict[str, Any] | None):
    """The stage's JSON-lines log, also written as TensorBoard events with
    ``run.tensorboard`` (a forced re-run starts a new event folder: events are a log, not a
    model, so they are not held back like ``log.jsonl``)."""
    if not (recipe.run.tensorboard and files.main):
        return files.log
    folder = files.folder / "tensorboard"
    if saved is None:
        shutil.rmtree(folder, ignore_errors=True)
    resume_at = (saved["meta"]["epoch"], saved["meta"]["step"]) if saved is not None else None
    return TensorBoardLog(files.log, folder, getattr(recipe, files.logic.spec.name).iters, resume_at=resume_at)


def _train_epochs(t: _Training, stop: StopRequest, command: str) -> None:
    """Every remaining epoch: label, train, checkpoint; stop cleanly when a signal asks."""
    ctx, logic, stage, runtime, recipe = t.ctx, t.logic, t.stage, t.ctx.runtime, t.ctx.recipe
    epoch_state, start_step = t.epoch_state, t.start_step
    for epoch in range(t.start_epoch, stage.epochs):
        t_epoch = time.perf_counter()
        if epoch_state is None:
            # Pseudo-labelling runs once, on rank 0; the other ranks receive its result
            # (and the re-estimated BatchNorm statistics with DDP's buffer broadcast).
            payload = None
            if runtime.is_main:
                ctx.recalibrate(epoch)
                payload = logic.save_epoch(logic.prepare_epoch(ctx, epoch))
            epoch_state = logic.restore_epoch(ctx, broadcast_object(payload, runtime))
            start_step = 0
            _stop_if_asked(t, stop, epoch_state, epoch, 0, command)
        _train_epoch(t, stop, epoch_state, epoch, start_step, command)
        lr = t.optimizer.param_groups[0]["lr"]  # this epoch's rate (before the step)
        t.scheduler.step()
        t.files.save_last(_full_state(t, epoch_state, epoch, stage.iters), epoch)
        seconds = time.perf_counter() - t_epoch
        ctx.log({"kind": "epoch", "epoch": epoch, "step": stage.iters, "seconds": round(seconds, 2),
                 "lr": lr})
        _stop_if_asked(t, stop, None, epoch, stage.iters, command)
        if recipe.run.eval_every and (epoch + 1) % recipe.run.eval_every == 0 and runtime.is_main:
            _monitor(ctx, epoch)
        if recipe.run.keep_epochs and runtime.is_main:
            save_checkpoint(t.files.folder / f"epoch-{epoch + 1:03d}.pt",
                            {"model": t.model.state_dict(),
                             "meta": _checkpoint_meta(recipe, logic, epoch, stage.iters, True)})
        epoch_state = None


def _stop_if_asked(t: _Training, stop: StopRequest, state: EpochState | None, epoch: int,
                   step: int, command: str) -> None:
    """When a stop signal arrived: write ``last.pt`` at (epoch, step) (unless ``state`` is None:
    it was just written) and raise :class:`Interrupted`."""
    signum = stop.requested(t.ctx.runtime)
    if not signum:
        return
    if state is not None:
        t.files.save_last(_full_state(t, state, epoch, step), epoch)
    ws = t.ctx.ws
    raise Interrupted(
        f"{t.logic.spec.name} stopped by {signal_name(signum)} at epoch {epoch + 1} step {step}: "
        f"{ws.rel(t.files.last)} holds that step; continue with `dmdl {command} --workspace "
        f"{ws.root} --resume`", signum)


class _nullcontext:
    def __init__(self, value: Any):
        self.value = value

    def __enter__(self) -> Any:
        return self.value

    def __exit__(self, *exc: Any) -> None:
        return None


def _full_state(t: _Training, epoch_state: EpochState, epoch: int, step: int) -> dict[str, Any]:
    return {
        "model": t.model.state_dict(),
        "optimizer": t.optimizer.state_dict(),
        "scheduler": t.scheduler.state_dict(),
        "scaler": t.scaler.state_dict(),
        "epoch_state": t.logic.save_epoch(epoch_state),
        "rng": rng_state(),
        "meta": _checkpoint_meta(t.ctx.recipe, t.logic, epoch, step, False),
    }


def _to_batch(raw: dict[str, torch.Tensor], runtime: Runtime) -> dict[str, torch.Tensor]:
    """Two uint8 views -> one normalised float input (2B, 3, H, W): view A rows, then view B."""
    images = torch.cat([raw["view_a"], raw["view_b"]])
    return {
        "images": runtime.to_input(normalize_batch(images)),
        "rows": raw["row"].to(runtime.device).long(),  # (B,) positions into the train rows
        "modality": raw["modality"].to(runtime.device).long(),  # (B,)
    }


def _train_epoch(t: _Training, stop: StopRequest, state: EpochState, epoch: int, start_step: int,
                 command: str) -> None:
    ctx, logic, optimizer, scaler = t.ctx, t.logic, t.optimizer, t.scaler
    runtime, recipe, stage = ctx.runtime, ctx.recipe, ctx.stage
    batches = [rank_slice(b, runtime.rank, runtime.world_size) for b in state.batches]
    loader = _make_loader(ctx, batches, start_step, t.dataset)
    ctx.model.train()
    images_per_step = 2 * sum(len(b) for b in state.batches[:1])
    wait = compute = 0.0
    with make_progress("img") as progress:
        task = progress.add_task(f"{logic.spec.name} epoch {epoch + 1}/{stage.epochs}",
                                 total=stage.iters, completed=start_step, per_step=images_per_step,
                                 info="")
        t0 = time.perf_counter()
        for step, raw in enumerate(loader, start=start_step):
            t1 = time.perf_counter()
            wait += t1 - t0
            batch = _to_batch(raw, runtime)
            optimizer.zero_grad(set_to_none=True)
            loss, parts, update = logic.batch_loss(ctx, state, epoch, batch)
            if not torch.isfinite(loss):
                raise DmdlError(
                    f"{logic.spec.name} loss became {loss.item()} at epoch {epoch + 1} step {step}: "
                    "lower the learning rate or disable AMP (--set train.amp=off), then --resume")
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            with torch.no_grad():
                update()
            t0 = time.perf_counter()
            compute += t0 - t1
            done = step + 1
            shown = mean_over_ranks(loss.detach(), runtime)
            record = {"kind": "step", "epoch": epoch, "step": done, "loss": round(shown, 5),
                      **{k: round(mean_over_ranks(torch.tensor(v), runtime), 5) for k, v in parts.items()}}
            if done % 10 == 0 or done == stage.iters:
                ctx.log(record)
            progress.update(task, advance=1, info=f"loss {shown:.3f}")
            if done < stage.iters:  # at the epoch's end the caller writes last.pt
                written = done % recipe.run.checkpoint_every == 0
                if written:
                    t.files.save_last(_full_state(t, state, epoch, done), epoch)
                _stop_if_asked(t, stop, None if written else state, epoch, done, command)
    total = max(wait + compute, 1e-9)
    steps = stage.iters - start_step
    ctx.log({"kind": "speed", "epoch": epoch, "step": stage.iters,
             "images_per_s": round(steps * images_per_step * runtime.world_size / total, 1),
             "data_wait_share": round(wait / total, 3)})


def _monitor(ctx: TrainContext, epoch: int) -> None:
    """Test-set monitoring: logged for the curious, never used to choose a checkpoint."""
    from dmdl_cli.evaluation.evaluate import run_protocol
    from dmdl_cli.evaluation.protocols import protocol_modes

    test_rows = ctx.index.rows(split="test")
    if len(test_rows) == 0:
        return
    feats = extract_features(ctx.bare_model, ctx.cache, test_rows, ctx.runtime,
                             batch_size=ctx.recipe.run.feature_batch, description="test features")
    test = ctx.index.select(test_rows)
    dataset = ctx.ws.dataset["name"]
    mode = protocol_modes(dataset)[0]
    summary, _, _ = run_protocol(dataset, mode, feats, test, ctx.recipe,
                                 trials=ctx.recipe.eval.trials, shots=ctx.recipe.eval.shots)
    ctx.log({"kind": "monitor", "epoch": epoch, "step": ctx.stage.iters, "mode": mode,
             "rank1": round(float(summary["cmc"][0]), 4), "mAP": round(summary["mAP"], 4),
             "note": "test-set monitoring only; never selects a checkpoint"})
    log(f"  monitor (test set, not used for selection): {mode} Rank-1 "
        f"{100 * summary['cmc'][0]:.1f} mAP {100 * summary['mAP']:.1f}")


