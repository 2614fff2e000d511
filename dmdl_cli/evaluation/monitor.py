"""Test-set monitoring while a stage trains (``run.eval_every``): logged for the curious, never
used to choose a checkpoint.

A training hook that lives here because it evaluates: evaluation sits above training, so
training never imports it; the command runner passes :class:`MonitorHook` to ``run_stage``.
"""
from __future__ import annotations

from dmdl_cli.console import log
from dmdl_cli.evaluation.evaluate import run_protocol
from dmdl_cli.evaluation.protocols import protocol_modes
from dmdl_cli.features.extract import extract_features
from dmdl_cli.training.hooks import Hook
from dmdl_cli.training.state import TrainState


class MonitorHook(Hook):
    """Every ``run.eval_every`` epochs (main rank): the data set's first protocol on the test
    split, as a ``monitor`` log record and one line."""

    def on_epoch_end(self, t: TrainState) -> None:
        every = t.recipe.run.eval_every
        if not every or (t.epoch + 1) % every != 0 or not t.runtime.is_main:
            return
        index, recipe = t.ctx.index, t.recipe
        test_rows = index.rows(split="test")
        if len(test_rows) == 0:
            return
        feats = extract_features(t.model, t.ctx.cache, test_rows, t.runtime,
                                 batch_size=recipe.run.feature_batch, description="test features")
        dataset = t.ctx.ws.dataset["name"]
        mode = protocol_modes(dataset)[0]
        summary, _, _ = run_protocol(dataset, mode, feats, index.select(test_rows), recipe,
                                     trials=recipe.eval.trials, shots=recipe.eval.shots)
        t.log({"kind": "monitor", "epoch": t.epoch, "step": t.stage.iters, "mode": mode,
               "rank1": round(float(summary["cmc"][0]), 4), "mAP": round(summary["mAP"], 4),
               "note": "test-set monitoring only; never selects a checkpoint"})
        log(f"  monitor (test set, not used for selection): {mode} Rank-1 "
            f"{100 * summary['cmc'][0]:.1f} mAP {100 * summary['mAP']:.1f}")
