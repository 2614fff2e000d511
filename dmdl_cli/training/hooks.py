"""Hooks: the work around the training loop's epochs and steps.

The loop (``training/loop.py``) only labels epochs and takes optimiser steps; everything else
happens in hooks, called in order at these events (each gets the :class:`TrainState` ``t``):

================  ==========================================================================
on_run_start      once, after the model, optimiser and schedule are built (and restored
                  from ``last.pt`` on resume: ``t.resumed_at`` is then set)
on_epoch_start    an epoch begins: ``t.epoch_state`` is None when its labels are about to be
                  made, or the restored state of an epoch resumed mid-way
on_epoch_ready    the epoch's labels, memories and batches are in ``t.epoch_state``; its
                  steps start at ``t.step`` (0, or the step resumed from)
on_step_start     a batch has arrived; the step begins
on_step_end       an optimiser step is done: ``t.step`` counts it, ``t.loss`` and ``t.parts``
                  hold its loss (mean over ranks)
on_epoch_end      the epoch's last step is done and the learning-rate schedule has stepped
on_run_end        every epoch is done (not called when the run stops early)
close             always, last, however the run ends: release what the hook holds open
================  ==========================================================================

Hooks run on every rank (under ``torchrun`` the stop signal is agreed between ranks at the
same events); the ones that write files write on the main rank only. The standard hooks, in
their order (:func:`standard_hooks`): :class:`ProgressHook`, :class:`LogHook`,
:class:`BatchNormHook`, :class:`CriteriaHook`, :class:`CheckpointHook`, :class:`StopHook`.
Hooks passed to ``run_stage`` (test-set monitoring, ``dmdl_cli/evaluation/monitor.py``) run
after them.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Iterable

from dmdl_cli import __version__
from dmdl_cli.console import log, make_progress
from dmdl_cli.errors import Interrupted
from dmdl_cli.features.batchnorm import recalibrate_batchnorm, recalibration_rows
from dmdl_cli.recipe import Recipe
from dmdl_cli.runtime import rng_state
from dmdl_cli.selected import epoch_file, selected_path
from dmdl_cli.stages import StageSpec
from dmdl_cli.training.labelling import log_criteria
from dmdl_cli.training.signals import StopRequest, signal_name
from dmdl_cli.training.state import TrainState
from dmdl_cli.workspace import save_checkpoint

class Hook:
    """A hook does nothing at any event; subclasses override the events they need."""

    def on_run_start(self, t: TrainState) -> None:
        pass

    def on_epoch_start(self, t: TrainState) -> None:
        pass

    def on_epoch_ready(self, t: TrainState) -> None:
        pass

    def on_step_start(self, t: TrainState) -> None:
        pass

    def on_step_end(self, t: TrainState) -> None:
        pass

    def on_epoch_end(self, t: TrainState) -> None:
        pass

    def on_run_end(self, t: TrainState) -> None:
        pass

    def close(self) -> None:
        pass


class Hooks(Hook):
    """Several hooks as one: each event calls them in order."""

    def __init__(self, hooks: Iterable[Hook]):
        self.hooks = list(hooks)

    def _each(self, event: str, t: TrainState) -> None:
        for hook in self.hooks:
            getattr(hook, event)(t)

    def on_run_start(self, t: TrainState) -> None:
        self._each("on_run_start", t)

    def on_epoch_start(self, t: TrainState) -> None:
        self._each("on_epoch_start", t)

    def on_epoch_ready(self, t: TrainState) -> None:
        self._each("on_epoch_ready", t)

    def on_step_start(self, t: TrainState) -> None:
        self._each("on_step_start", t)

    def on_step_end(self, t: TrainState) -> None:
        self._each("on_step_end", t)

    def on_epoch_end(self, t: TrainState) -> None:
        self._each("on_epoch_end", t)

    def on_run_end(self, t: TrainState) -> None:
        self._each("on_run_end", t)

    def close(self) -> None:
        for hook in self.hooks:
            hook.close()


class ProgressHook(Hook):
    """The progress bar of each epoch and its ``speed`` and ``epoch`` log records: images per
    second, the share of time spent waiting for data, the epoch's seconds and learning rate."""

    def __init__(self) -> None:
        self.bar: Any = None

    def on_epoch_start(self, t: TrainState) -> None:
        self.started = time.perf_counter()
        self.lr = t.optimizer.param_groups[0]["lr"]  # this epoch's rate: the schedule steps at its end

    def on_epoch_ready(self, t: TrainState) -> None:
        self.per_step = 2 * sum(len(b) for b in t.epoch_state.batches[:1])  # images, both views
        self.first_step, self.wait, self.compute = t.step, 0.0, 0.0
        self.bar = make_progress("img")
        self.bar.start()
        self.task = self.bar.add_task(f"{t.spec.name} epoch {t.epoch + 1}/{t.stage.epochs}",
                                      total=t.stage.iters, completed=t.step, per_step=self.per_step,
                                      info="")
        self.clock = time.perf_counter()

    def on_step_start(self, t: TrainState) -> None:
        now = time.perf_counter()
        self.wait, self.clock = self.wait + now - self.clock, now

    def on_step_end(self, t: TrainState) -> None:
        now = time.perf_counter()
        self.compute, self.clock = self.compute + now - self.clock, now
        self.bar.update(self.task, advance=1, info=f"loss {t.loss:.3f}")

    def on_epoch_end(self, t: TrainState) -> None:
        self.close()
        total = max(self.wait + self.compute, 1e-9)
        steps = t.stage.iters - self.first_step
        t.log({"kind": "speed", "epoch": t.epoch, "step": t.stage.iters,
               "images_per_s": round(steps * self.per_step / total, 1),  # global batch images
               "data_wait_share": round(self.wait / total, 3)})
        t.log({"kind": "epoch", "epoch": t.epoch, "step": t.stage.iters,
               "seconds": round(time.perf_counter() - self.started, 2), "lr": self.lr})

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None


class LogHook(Hook):
    """The run's own records in the stage log: ``start`` (on resume instead: drop the records
    written after the checkpoint, they are written again) and a ``step`` record every
    ``run.log_every`` steps and at each epoch's end. ``log`` is the log ``t.log`` writes
    to (``training/logs.py``); it is closed at the end."""

    def __init__(self, log: Any):
        self.log = log

    def on_run_start(self, t: TrainState) -> None:
        if t.resumed_at is not None:
            self.log.truncate_after(*t.resumed_at)
        else:
            # the selection rule as the run declares it before training (dmdl select applies
            # this one: select: is in no stage's hash, so a --resume could change the file's)
            t.log({"kind": "start", "epoch": 0, "step": 0, "stage": t.spec.name,
                   "recipe_hash": t.recipe.hash(), "init": t.origin,
                   "select": dataclasses.asdict(t.recipe.select)})

    def on_step_end(self, t: TrainState) -> None:
        if t.step % t.recipe.run.log_every == 0 or t.step == t.stage.iters:
            t.log({"kind": "step", "epoch": t.epoch, "step": t.step, "loss": round(t.loss, 5),
                   **{name: round(value, 5) for name, value in t.parts.items()}})

    def close(self) -> None:
        self.log.close()


class BatchNormHook(Hook):
    """Re-estimate BatchNorm statistics on ``train.bn_recalibration`` clean train images
    before each epoch's labelling and before ``final.pt`` (main rank; DDP broadcasts the
    statistics to the other ranks with the buffers)."""

    def on_epoch_start(self, t: TrainState) -> None:
        if t.epoch_state is None:  # the epoch's labels are made next
            self.recalibrate(t, t.epoch)

    def on_run_end(self, t: TrainState) -> None:
        self.recalibrate(t, t.stage.epochs)

    @staticmethod
    def recalibrate(t: TrainState, epoch: int) -> None:
        count = t.recipe.train.bn_recalibration
        if count <= 0 or not t.runtime.is_main:
            return
        rows = recalibration_rows(t.ctx.train_rows, count, t.recipe.train.seed, epoch)
        layers = recalibrate_batchnorm(t.model, t.ctx.cache, rows, t.runtime,
                                       batch_size=t.recipe.train.bn_recalibration_batch)
        log(f"re-estimated {layers} BatchNorm layers on {len(rows)} clean train images")


class CriteriaHook(Hook):
    """The final model's ``criteria`` record (docs/selection.md): its train features labelled as
    the stage would label them at the epoch after its last, compared with the last epoch's
    labels, so that a selection rule can choose the final model too. Runs after
    :class:`BatchNormHook` (the features of the model ``final.pt`` holds), main rank only; the
    epochs' own records are written by the stages as they label (``training/labelling.py``)."""

    def on_run_end(self, t: TrainState) -> None:
        if not t.runtime.is_main:
            return
        feats = t.train_features()  # (N, D)
        log_criteria(t, t.logic.final_labelling(t, feats), feats, t.stage.epochs)


def checkpoint_meta(recipe: Recipe, spec: StageSpec, epoch: int, step: int, complete: bool) -> dict[str, Any]:
    """The ``meta`` of a stage checkpoint: where it stands and what made it."""
    return {
        "stage": spec.name,
        "epoch": epoch,
        "step": step,
        "complete": complete,
        "arch": recipe.model.arch,
        "input_size": [recipe.data.height, recipe.data.width],
        "recipe_hash": recipe.hash(),
        "stage_hash": spec.hash(recipe),
        "dmdl_version": __version__,
        "recipe": recipe.to_dict(),  # the values themselves, so a checkpoint explains itself
    }


def resume_state(t: TrainState) -> dict[str, Any]:
    """What ``last.pt`` holds: enough to continue at (``t.epoch``, ``t.step``) bit for bit."""
    return {
        "model": t.model.state_dict(),
        "optimizer": t.optimizer.state_dict(),
        "scheduler": t.scheduler.state_dict(),
        "scaler": t.scaler.state_dict(),
        "epoch_state": t.epoch_state.saved(),
        "rng": rng_state(),
        "meta": checkpoint_meta(t.recipe, t.spec, t.epoch, t.step, False),
    }


class CheckpointHook(Hook):
    """``last.pt`` every ``run.checkpoint_every`` steps and at each epoch's end,
    ``epoch-NNN.pt`` with ``run.keep_epochs``, and at the end ``final.pt`` (with the log's
    ``end`` record and the ledger's output). Only the main rank writes.

    The first ``last.pt`` a new run writes commits it (``training/commit.py``): its pending
    recipe and label files go into place and its held log replaces the previous one
    (``release``); with ``replacing`` (``--force``) the previous run's ``final.pt``, its
    ``selected.pt`` (``dmdl select``) and the epoch models and label files this run has not
    rewritten yet are removed then too.
    """

    def __init__(self, *, replacing: bool, release: Callable[[], None]):
        self.replacing = replacing
        self.release = release
        self.saved_at: tuple[int, int] | None = None  # (epoch, step) that last.pt holds

    def on_run_start(self, t: TrainState) -> None:
        self.saved_at = t.resumed_at
        self.replacing = self.replacing and t.runtime.is_main

    def on_step_end(self, t: TrainState) -> None:
        if t.step < t.stage.iters and t.step % t.recipe.run.checkpoint_every == 0:
            self.save_last(t)  # (at the epoch's end: after the schedule's step)

    def on_epoch_end(self, t: TrainState) -> None:
        self.save_last(t)
        if t.recipe.run.keep_epochs and t.runtime.is_main:
            save_checkpoint(t.spec.path(t.ctx.ws, epoch_file(t.epoch + 1)), {
                "model": t.model.state_dict(),
                "meta": checkpoint_meta(t.recipe, t.spec, t.epoch, t.stage.iters, True)})

    def on_run_end(self, t: TrainState) -> None:
        if not t.runtime.is_main:
            return
        final = t.spec.final(t.ctx.ws)
        save_checkpoint(final, {"model": t.model.state_dict(),
                                "meta": checkpoint_meta(t.recipe, t.spec, t.stage.epochs - 1,
                                                        t.stage.iters, True)})
        t.log({"kind": "end", "epoch": t.stage.epochs, "step": 0})
        t.ctx.record_output(final)
        log(f"wrote {final} (the last epoch: no checkpoint is selected on the test set)")

    def save_last(self, t: TrainState) -> None:
        """Write ``last.pt`` at (``t.epoch``, ``t.step``) unless it already holds that step."""
        if self.saved_at == (t.epoch, t.step):
            return
        self.saved_at = (t.epoch, t.step)
        if not t.runtime.is_main:
            return
        save_checkpoint(t.spec.last(t.ctx.ws), resume_state(t))
        if not t.files.committed:
            self._commit(t)

    def _commit(self, t: TrainState) -> None:
        """The run's first checkpoint is written: its pending files go into place, its held log
        replaces the previous one, and (``--force``) what the previous run wrote that this one
        (now at ``t.epoch``) has not is removed (``training/commit.py``)."""
        ws, spec = t.ctx.ws, t.spec
        t.ctx.record_output(*(p for p in t.files.commit() if p == spec.recipe_file(ws)))
        if self.replacing:
            self.replacing = False
            spec.final(ws).unlink(missing_ok=True)
            selected_path(ws, spec).unlink(missing_ok=True)  # it chose among the previous run's
            for path in (ws.root / spec.folder).glob("epoch-*.pt"):  # this run wrote 1..t.epoch
                if _number(path.stem, "epoch-") > t.epoch:
                    path.unlink(missing_ok=True)
            for path in ws.dir("labels").glob(f"{spec.labels_prefix}-e*.npz"):
                if _number(path.stem, f"{spec.labels_prefix}-e") > t.epoch + 1:
                    path.unlink(missing_ok=True)
        self.release()


def _number(stem: str, prefix: str) -> int:
    """``epoch-007`` -> 7 (a name that does not parse counts as not ours: -1)."""
    try:
        return int(stem[len(prefix):]) if stem.startswith(prefix) else -1
    except ValueError:
        return -1


class StopHook(Hook):
    """SIGTERM, SIGINT or SIGUSR1 (``training/signals.py``) stop the run at the next step
    boundary: ``last.pt`` is written there (through ``checkpoints``, unless it already holds
    that step) and :class:`Interrupted` raised, which the ledger records as ``interrupted``."""

    def __init__(self, checkpoints: CheckpointHook):
        self.checkpoints = checkpoints
        self.request: StopRequest | None = None

    def on_run_start(self, t: TrainState) -> None:
        self.request = StopRequest().__enter__()

    def on_epoch_ready(self, t: TrainState) -> None:
        self._stop_if_asked(t)

    def on_step_end(self, t: TrainState) -> None:
        if t.step < t.stage.iters:  # at the epoch's end: once last.pt is written there
            self._stop_if_asked(t)

    def on_epoch_end(self, t: TrainState) -> None:
        self._stop_if_asked(t)

    def close(self) -> None:
        if self.request is not None:
            self.request.__exit__(None, None, None)
            self.request = None

    def _stop_if_asked(self, t: TrainState) -> None:
        signum = self.request.requested(t.runtime)
        if not signum:
            return
        self.checkpoints.save_last(t)
        ws, spec = t.ctx.ws, t.spec
        raise Interrupted(
            f"{spec.name} stopped by {signal_name(signum)} at epoch {t.epoch + 1} step {t.step}: "
            f"{ws.rel(spec.last(ws))} holds that step; continue with `dmdl {spec.command} "
            f"--workspace {ws.root} --resume`", signum)


def standard_hooks(log: Any, *, replacing: bool) -> list[Hook]:
    """The hooks every training run has, in order (see the module docstring); ``log`` is the
    stage's log (``training/logs.py``), ``replacing`` says ``--force``."""
    checkpoints = CheckpointHook(replacing=replacing, release=log.release)
    return [ProgressHook(), LogHook(log), BatchNormHook(), CriteriaHook(), checkpoints,
            StopHook(checkpoints)]
