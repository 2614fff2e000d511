"""The one training loop both stages share.

A stage supplies a :class:`~dmdl_cli.training.state.StageLogic`: how to (re)label the training
set at the start of an epoch and build its memories, and the loss of one batch. This module
decides whether a run starts, resumes or is refused, builds the optimiser and its step
schedule (AMP and channels_last on GPU, DDP under ``torchrun``) and runs the epochs and steps.
Everything around them (checkpoints, the log, progress, BatchNorm re-estimation, stop
signals, test-set monitoring) is a hook: ``training/hooks.py`` lists the events and the
standard hooks.

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

from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist

from dmdl_cli.console import log
from dmdl_cli.context import StageContext
from dmdl_cli.data.augment import AugmentConfig
from dmdl_cli.data.sampling import ResumableBatchSampler
from dmdl_cli.data.train_dataset import TwoViewDataset, collate_views
from dmdl_cli.errors import DmdlError
from dmdl_cli.model.backbone import normalize_batch
from dmdl_cli.provenance import check_made_with, write_recipe
from dmdl_cli.recipe import StageRecipe
from dmdl_cli.runtime import Runtime, make_grad_scaler, seed_everything, set_rng_state
from dmdl_cli.stages import StageSpec, stage_spec
from dmdl_cli.training.distributed import broadcast_object, mean_over_ranks, rank_slice
from dmdl_cli.training.hooks import Hook, Hooks, standard_hooks
from dmdl_cli.training.logs import open_stage_log
from dmdl_cli.training.state import EpochState, StageLogic, TrainState
from dmdl_cli.training.tensorboard import require_tensorboard
from dmdl_cli.workspace import load_checkpoint


def run_stage(ctx: StageContext, logic: StageLogic, *, resume: bool, force: bool,
              deterministic: bool, hooks: Sequence[Hook] = ()) -> Path:
    """Train one stage to its end (the standard hooks, then ``hooks``); returns ``final.pt``.

    The command runner has taken the workspace lock, opened this command's ledger entry
    (``ctx.ledger``) and selected the runtime (``deterministic`` is already applied to it; the
    ledger records it). This function decides whether to start, resume or refuse.
    """
    if ctx.spec != logic.spec:
        raise ValueError(f"a {ctx.spec.name} context given to the {logic.spec.name} logic")
    final = logic.spec.final(ctx.ws)
    if _finished(ctx, logic.spec, resume=resume, force=force):
        return final
    seed_everything(ctx.recipe.train.seed)
    if ctx.recipe.run.tensorboard:
        require_tensorboard()  # refuse before anything is written
    saved = _resume_point(ctx, logic.spec) if resume and not force else None
    if ctx.ledger is not None:
        ctx.ledger.set(resumed=saved is not None, deterministic=deterministic)
    t = _setup(ctx, logic, saved)
    stage_log = open_stage_log(ctx.ws.root / logic.spec.folder, main=ctx.runtime.is_main,
                               replacing=force, tensorboard=ctx.recipe.run.tensorboard,
                               iters=t.stage.iters, resume_at=t.resumed_at)
    t.log = stage_log
    ctx.record_input(ctx.ws.index_path, *_upstream_results(ctx, logic.spec))
    if ctx.runtime.is_main:
        ctx.record_output(write_recipe(logic.spec.recipe_file(ctx.ws), ctx.recipe))
    every = Hooks([*standard_hooks(stage_log, replacing=force), *hooks])
    try:
        every.on_run_start(t)
        train_epochs(t, every)
        every.on_run_end(t)
    finally:
        every.close()
    if ctx.runtime.distributed:
        dist.barrier()
    return final


# -- the loop -------------------------------------------------------------------------------


def train_epochs(t: TrainState, hooks: Hook) -> None:
    """Every remaining epoch: label it (unless resumed mid-way), train its steps."""
    for epoch in range(t.epoch, t.stage.epochs):
        t.epoch = epoch
        hooks.on_epoch_start(t)
        if t.epoch_state is None:
            t.epoch_state, t.step = _label_epoch(t), 0
        hooks.on_epoch_ready(t)
        _train_steps(t, hooks)
        t.scheduler.step()
        hooks.on_epoch_end(t)
        t.epoch_state = None


def _label_epoch(t: TrainState) -> EpochState:
    """Pseudo-labelling runs once, on rank 0; the other ranks receive its result."""
    payload = t.logic.prepare_epoch(t).saved() if t.runtime.is_main else None
    return t.logic.restore_epoch(t, broadcast_object(payload, t.runtime))


def _train_steps(t: TrainState, hooks: Hook) -> None:
    """The epoch's steps from ``t.step`` on; this rank takes its slice of each batch."""
    runtime = t.runtime
    batches = [rank_slice(b, runtime.rank, runtime.world_size) for b in t.epoch_state.batches]
    loader = make_loader(t.dataset, batches, t.step, workers=t.recipe.run.workers,
                         pin_memory=runtime.device.type == "cuda")
    t.ddp_model.train()
    for raw in loader:
        hooks.on_step_start(t)
        loss, parts = optimizer_step(t, to_batch(raw, runtime))
        t.step += 1
        t.loss = mean_over_ranks(loss.detach(), runtime)
        t.parts = {name: mean_over_ranks(torch.tensor(value), runtime) for name, value in parts.items()}
        hooks.on_step_end(t)


def optimizer_step(t: TrainState, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
    """One step on ``batch``: the stage's loss, the (scaled) backward pass and update, then the
    stage's no-grad memory update. Returns the loss and its named parts."""
    t.optimizer.zero_grad(set_to_none=True)
    loss, parts, update = t.logic.batch_loss(t, batch)
    if not torch.isfinite(loss):
        raise DmdlError(
            f"{t.spec.name} loss became {loss.item()} at epoch {t.epoch + 1} step {t.step}: "
            "lower the learning rate or disable AMP (--set train.amp=off), then --resume")
    t.scaler.scale(loss).backward()
    t.scaler.step(t.optimizer)
    t.scaler.update()
    with torch.no_grad():
        update()
    return loss, parts


def to_batch(raw: dict[str, torch.Tensor], runtime: Runtime) -> dict[str, torch.Tensor]:
    """Two uint8 views -> one normalised float input (2B, 3, H, W): view A rows, then view B."""
    images = torch.cat([raw["view_a"], raw["view_b"]])
    return {
        "images": runtime.to_input(normalize_batch(images)),
        "rows": raw["row"].to(runtime.device).long(),  # (B,) positions into the train rows
        "modality": raw["modality"].to(runtime.device).long(),  # (B,)
    }


def make_loader(dataset: TwoViewDataset, batches: list, start: int, *, workers: int,
                pin_memory: bool) -> torch.utils.data.DataLoader:
    """The epoch's batches from number ``start`` on, augmented by ``workers`` processes."""
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=ResumableBatchSampler(batches, start=start),
        collate_fn=collate_views,
        num_workers=workers,
        pin_memory=pin_memory,
        persistent_workers=False,
        prefetch_factor=4 if workers > 0 else None,
    )


# -- start, resume or refuse; setup ---------------------------------------------------------


def _upstream_results(ctx: StageContext, spec: StageSpec) -> list[Path]:
    """The upstream stage's ``final.pt`` a stage starts from (none for stage 1), for the ledger."""
    return [stage_spec(spec.upstream).final(ctx.ws)] if spec.upstream else []


def _finished(ctx: StageContext, spec: StageSpec, *, resume: bool, force: bool) -> bool:
    """True when the stage is finished and ``--resume`` has nothing to do; refuses to start
    over a finished or partial run without ``--force`` (or ``--resume`` for a partial one)."""
    ws, last, final = ctx.ws, spec.last(ctx.ws), spec.final(ctx.ws)
    if final.is_file() and not force:
        if resume:
            log(f"{ws.rel(final)} exists: {spec.name} is finished, nothing to resume")
            return True
        raise DmdlError(
            f"{ws.rel(final)} exists: {spec.name} already finished; pass --force to "
            f"train it again from scratch (`dmdl {spec.command} --force`)")
    if last.is_file() and not force and not resume:
        raise DmdlError(
            f"{ws.rel(last)} holds a partial {spec.name} run: pass --resume to continue "
            f"it or --force to start again (`dmdl {spec.command} --resume|--force`)")
    return False


def _resume_point(ctx: StageContext, spec: StageSpec) -> dict[str, Any] | None:
    """The saved state of ``last.pt`` to resume from (checked against the recipe), or None."""
    ws, recipe, last = ctx.ws, ctx.recipe, spec.last(ctx.ws)
    if not last.is_file():
        log(f"no {ws.rel(last)} to resume: starting {spec.name} from the beginning")
        return None
    saved = load_checkpoint(last, what="resume checkpoint")
    meta = saved["meta"]
    check_made_with(ws, spec, last, meta, recipe,
                    f"pass --force to start {spec.name} again (`dmdl {spec.command} --force`)")
    log(f"resuming {spec.name} from {ws.rel(last)}: epoch {meta['epoch'] + 1}, "
        f"step {meta['step']} (weights, optimiser, memories and RNG states come from it)")
    return saved


def _setup(ctx: StageContext, logic: StageLogic, saved: dict[str, Any] | None) -> TrainState:
    """Model, optimiser, schedule and the data set of augmented views; restored from
    ``saved`` when resuming."""
    recipe, runtime = ctx.recipe, ctx.runtime
    stage: StageRecipe = logic.spec.section(recipe)
    # opened first: an index without train rows or a missing cache is refused before anything
    # is written
    ctx.train_rows  # noqa: B018 - opening is the check
    cache = ctx.cache
    model, origin = logic.initial_model(ctx, resuming=saved is not None)
    model.to(runtime.device)
    if runtime.channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad],
                                 lr=stage.lr, weight_decay=stage.weight_decay)
    ddp_model = model
    if runtime.distributed:
        ddp_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[runtime.device.index] if runtime.device.type == "cuda" else None)
    aug = AugmentConfig.from_recipe(recipe.augment, modality_specific=recipe.cbt.augment)
    dataset = TwoViewDataset(ctx.ws.cache_path(recipe.data.height, recipe.data.width),
                             ctx.index.modality, aug, shape=cache.shape)
    t = TrainState(ctx, logic, model, ddp_model, optimizer,
                   torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(stage)),
                   make_grad_scaler(runtime), dataset, origin=origin)
    if saved is not None:
        _restore(t, saved)
    return t


def _lr_lambda(stage: StageRecipe) -> Callable[[int], float]:
    return lambda epoch: stage.lr_gamma ** (epoch // stage.lr_step)


def _restore(t: TrainState, saved: dict[str, Any]) -> None:
    """Weights, optimiser, schedule, scaler, the epoch's state and every RNG from ``last.pt``."""
    meta = saved["meta"]
    t.model.load_state_dict(saved["model"])
    t.optimizer.load_state_dict(saved["optimizer"])
    t.scheduler.load_state_dict(saved["scheduler"])
    t.scaler.load_state_dict(saved["scaler"])
    t.resumed_at = (meta["epoch"], meta["step"])
    t.epoch, t.step = t.resumed_at
    if t.step < t.stage.iters:
        t.epoch_state = t.logic.restore_epoch(t, saved["epoch_state"])
    else:  # saved at an epoch end: the next epoch starts afresh
        t.epoch, t.step = t.epoch + 1, 0
    set_rng_state(saved["rng"])
