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

A new run (``--force`` or the first) changes nothing visible until it writes its first checkpoint:
its recipe file, first label file and log wait beside the previous run's (``training/commit.py``),
so a run that fails early (a bad value, a full disk, a broken pipe) leaves the stage as it was.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.distributed as dist

from dmdl_cli.console import log
from dmdl_cli.context import StageContext
from dmdl_cli.data.augment import AugmentConfig
from dmdl_cli.data.index import INFRARED, VISIBLE
from dmdl_cli.data.sampling import ResumableBatchSampler
from dmdl_cli.data.train_dataset import ViewDataset, collate_items, worker_error
from dmdl_cli.errors import DmdlError
from dmdl_cli.model.backbone import normalize_batch
from dmdl_cli.provenance import check_made_with, write_recipe
from dmdl_cli.recipe import StageRecipe, stage_augment
from dmdl_cli.runtime import Runtime, make_grad_scaler, seed_everything, set_rng_state
from dmdl_cli.stages import StageSpec
from dmdl_cli.training.commit import RunFiles, clear_leftovers
from dmdl_cli.training.distributed import broadcast_object, mean_over_ranks
from dmdl_cli.training.forward import ForwardPlan, GroupedForward, forward_plan, global_features
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
    if ctx.runtime.is_main:
        left = clear_leftovers(ctx.ws, logic.spec)
        if left:
            log(f"removed {len(left)} files a stopped {logic.spec.name} run left unfinished "
                f"({', '.join(sorted(ctx.ws.rel(p) for p in left))})")
    seed_everything(ctx.recipe.train.seed)
    if ctx.recipe.run.tensorboard:
        require_tensorboard()  # refuse before anything is written
    saved = _resume_point(ctx, logic.spec) if resume and not force else None
    if ctx.ledger is not None:
        ctx.ledger.set(resumed=saved is not None, deterministic=deterministic)
    t = _setup(ctx, logic, saved)
    # a new run's files stay beside the previous run's until its first checkpoint
    t.files = RunFiles(committed=saved is not None)
    stage_log = open_stage_log(ctx.ws.root / logic.spec.folder, main=ctx.runtime.is_main,
                               tensorboard=ctx.recipe.run.tensorboard, iters=t.stage.iters,
                               resume_at=t.resumed_at)
    t.log = stage_log
    ctx.record_input(ctx.ws.index_path, *logic.upstream_files(ctx))
    if ctx.runtime.is_main:
        recipe_file = write_recipe(t.files.path(logic.spec.recipe_file(ctx.ws)), ctx.recipe)
        if t.files.committed:
            ctx.record_output(recipe_file)
    every = Hooks([*standard_hooks(stage_log, replacing=force), *hooks])
    try:
        every.on_run_start(t)
        train_epochs(t, every)
        every.on_run_end(t)
    except BaseException:
        t.files.discard()  # stopped before its first checkpoint: the stage stays as it was
        raise
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
    """The epoch's steps from ``t.step`` on; this rank forwards its share of each global batch
    (``training/forward.py``)."""
    runtime = t.runtime
    batches = t.epoch_state.batches
    plans = [step_plan(t, keys) for keys in batches]
    loader = make_loader(t.dataset, [plan_items(keys, plan, runtime.rank) for keys, plan in zip(batches, plans)],
                         t.step, workers=t.recipe.run.workers,
                         pin_memory=runtime.device.type == "cuda")
    # the loader's processes check each row against its checksum as they read it: this
    # process only learns of a mismatch, so it records the rows as read (the ledger's rows_read)
    t.ctx.cache.mark_read(np.array([key[0] for batch in batches[t.step:] for key in batch],
                                   dtype=np.int64))
    t.ddp_model.train()
    try:
        for index, raw in zip(range(t.step, len(batches)), loader):
            hooks.on_step_start(t)
            loss, parts = optimizer_step(t, to_batch(raw, batches[index], plans[index], t))
            t.step += 1
            t.loss = mean_over_ranks(loss.detach(), runtime)
            t.parts = {name: mean_over_ranks(torch.tensor(value), runtime) for name, value in parts.items()}
            hooks.on_step_end(t)
    except DmdlError as err:  # from a loader process: its one line, not its traceback
        raise worker_error(err) from None


def step_plan(t: TrainState, keys: list) -> ForwardPlan:
    """The forward plan (BatchNorm groups, each rank's share) of the global batch ``keys``."""
    train = t.recipe.train
    modality = t.ctx.index.modality[[row for row, _ in keys]]
    return forward_plan(modality, mode=train.bn_groups, slices=train.bn_slices,
                        world=t.runtime.world_size)


def plan_items(keys: list, plan: ForwardPlan, rank: int) -> list[tuple[int, int, int]]:
    """The dataset items ``(row, aug_seed, view)`` rank ``rank`` forwards, in its order."""
    return [(*keys[j], v) for j, v in zip(plan.keys(rank).tolist(), plan.views(rank).tolist())]


def optimizer_step(t: TrainState, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
    """One step on ``batch``: the forward of this rank's images, the stage's loss over the
    global batch, the (scaled) backward pass and update, then the stage's no-grad memory
    update. Returns the loss and its named parts."""
    t.optimizer.zero_grad(set_to_none=True)
    batch["bn"] = batch_features(t, batch)
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


def batch_features(t: TrainState, batch: dict[str, Any]) -> torch.Tensor:
    """``(2B, D)`` BN-neck features of the global batch (view A of every key, then view B),
    with gradient: this rank forwards its BatchNorm groups, then every rank's rows are gathered."""
    plan: ForwardPlan = batch["plan"]
    rank = t.runtime.rank
    with t.runtime.autocast():
        _, bn = t.ddp_model(batch["images"], plan.groups[rank], plan.stats[rank])  # (n_r, D)
    return global_features(bn, plan, t.runtime)


def to_batch(raw: dict[str, torch.Tensor], keys: list, plan: ForwardPlan, t: TrainState
             ) -> dict[str, Any]:
    """This rank's images (normalised float on the device) and the global batch's keys: rows
    and modality ``(B,)`` of every key, and the forward plan."""
    runtime = t.runtime
    images = raw["images"]
    rows = torch.tensor([row for row, _ in keys], dtype=torch.int64)
    return {
        "images": runtime.to_input(normalize_batch(images) if images.dtype == torch.uint8 else images),
        "rows": rows.to(runtime.device),  # (B,) index rows of the keys
        "modality": torch.from_numpy(t.ctx.index.modality[rows.numpy()]).long().to(runtime.device),
        "plan": plan,
    }


def load_batch(t: TrainState, keys: list) -> dict[str, Any]:
    """The batch ``keys`` as a step receives it, loaded in this process without a DataLoader
    (benchmarks and tests); ``batch_features(t, batch)`` then forwards it."""
    plan = step_plan(t, keys)
    items = plan_items(keys, plan, t.runtime.rank)
    return to_batch(collate_items([t.dataset[item] for item in items]), keys, plan, t)


def make_loader(dataset: ViewDataset, steps: list, start: int, *, workers: int,
                pin_memory: bool) -> torch.utils.data.DataLoader:
    """The items of each step (``steps[s]``: this rank's ``(row, aug_seed, view)``) from step
    ``start`` on, augmented by ``workers`` processes."""
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=ResumableBatchSampler(steps, start=start),
        collate_fn=collate_items,
        num_workers=workers,
        pin_memory=pin_memory,
        persistent_workers=False,
        prefetch_factor=4 if workers > 0 else None,
    )


# -- start, resume or refuse; setup ---------------------------------------------------------


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
    problem = resume_problem(saved, spec.section(recipe), len(ctx.index))
    if problem:
        raise _unresumable(ws.rel(last), spec, problem)
    log(f"resuming {spec.name} from {ws.rel(last)}: epoch {meta['epoch'] + 1}, "
        f"step {meta['step']} (weights, optimiser, memories and RNG states come from it)")
    return saved


#: what a hand-edited or damaged resume point raises while it is restored
_RESTORE_ERRORS = (KeyError, TypeError, ValueError, RuntimeError, IndexError, AttributeError)
_RESUME_ENTRIES = ("model", "optimizer", "scheduler", "scaler", "epoch_state", "rng", "meta")


def _unresumable(name: str, spec, problem: str) -> DmdlError:
    return DmdlError(f"{name} cannot be resumed: {problem} (the file was damaged or edited); "
                     f"pass --force to start {spec.name} again (`dmdl {spec.command} --force`)")


def _whole_number(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def resume_problem(saved: dict[str, Any], stage: StageRecipe, rows: int) -> str | None:
    """What makes ``saved`` (a ``last.pt``) unfit to resume a stage of ``stage``'s schedule over
    an index of ``rows`` images, in words; None when it fits. A position outside the schedule
    would otherwise end the run at once with a ``final.pt`` that was never trained."""
    for key in _RESUME_ENTRIES:
        if not isinstance(saved.get(key), dict):
            return f"its {key!r} entry is missing or not a mapping"
    epoch, step = saved["meta"].get("epoch"), saved["meta"].get("step")
    if not _whole_number(epoch) or not 0 <= epoch < stage.epochs:
        return f"meta.epoch {epoch!r} is not an epoch of the stage (0..{stage.epochs - 1})"
    if not _whole_number(step) or not 0 <= step <= stage.iters:
        return f"meta.step {step!r} is not a step of an epoch (0..{stage.iters})"
    state = saved["epoch_state"]
    labels, conf, memories = state.get("labels"), state.get("conf"), state.get("memories")
    if state.get("epoch") != epoch:
        return f"epoch_state.epoch {state.get('epoch')!r} is not meta.epoch {epoch}"
    if not isinstance(memories, dict) or not memories or not all(
            isinstance(m, torch.Tensor) and m.ndim == 2 for m in memories.values()):
        return "epoch_state.memories is not a set of (clusters, dim) tensors"
    if not (isinstance(labels, np.ndarray) and labels.dtype.kind in "iu" and labels.shape == (rows,)):
        shape = getattr(labels, "shape", type(labels).__name__)
        return f"epoch_state.labels is {shape}, expected {rows} integers (one per index row)"
    ids = sum(m.shape[0] for m in memories.values())
    if labels.size and (labels.min() < -1 or labels.max() >= ids):
        return f"epoch_state.labels holds ids outside -1..{ids - 1} (the memories' rows)"
    if not (isinstance(conf, np.ndarray) and conf.shape == (rows,) and np.isfinite(conf).all()):
        return f"epoch_state.conf is not {rows} finite confidences"
    return None


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
    _check_bn_groups(recipe, stage, runtime)
    ddp_model = GroupedForward(model)
    if runtime.distributed:
        ddp_model = torch.nn.parallel.DistributedDataParallel(
            ddp_model, device_ids=[runtime.device.index] if runtime.device.type == "cuda" else None)
    aug = AugmentConfig.from_recipe(stage_augment(recipe, stage), modality_specific=recipe.cbt.augment)
    dataset = ViewDataset(cache, ctx.index.modality, aug)
    t = TrainState(ctx, logic, model, ddp_model, optimizer,
                   torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(stage)),
                   make_grad_scaler(runtime), dataset, origin=origin)
    if saved is not None:
        _restore(t, saved)
    return t


def _check_bn_groups(recipe, stage: StageRecipe, runtime: Runtime) -> None:
    """Refuse, before anything is written, a number of processes that cannot share the
    recipe's BatchNorm groups (a batch holds P x K keys of each modality)."""
    per_modality = stage.clusters_per_batch * stage.instances
    forward_plan(np.repeat([VISIBLE, INFRARED], per_modality), mode=recipe.train.bn_groups,
                 slices=recipe.train.bn_slices, world=runtime.world_size)


def _lr_lambda(stage: StageRecipe) -> Callable[[int], float]:
    return lambda epoch: stage.lr_gamma ** (epoch // stage.lr_step)


def _restore(t: TrainState, saved: dict[str, Any]) -> None:
    """Weights, optimiser, schedule, scaler, the epoch's state and every RNG from ``last.pt``
    (checked by :func:`resume_problem`; what still does not fit is one line, not a traceback)."""
    meta = saved["meta"]
    try:
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
        # the saved epoch's labels: what the next labelling's criteria compare with
        t.labelled = (meta["epoch"], t.logic.saved_labelling(t, saved["epoch_state"]))
        set_rng_state(saved["rng"])
    except _RESTORE_ERRORS as err:
        first = " ".join(line.strip() for line in str(err).strip().splitlines()[:2])[:200]
        raise _unresumable(t.ctx.ws.rel(t.spec.last(t.ctx.ws)), t.spec,
                           f"{type(err).__name__}: {first}") from None
