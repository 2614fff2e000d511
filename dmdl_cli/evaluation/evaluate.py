"""Stage `evaluate`: the data set's cross-modality protocols for one checkpoint.

Reads the index, the cache and a checkpoint; extracts (or reuses) test features; runs every
trial of every requested protocol; prints Rank-1/5/10/20, mAP, mINP (mean ± std over trials)
and writes ``WS/eval/<mode>-<checkpoint>.json`` with the per-trial values, the resolved recipe
of the evaluation and the evaluated checkpoint's own recipe hash. Warns when a gallery holds
fewer identities than the largest rank reported (Rank-k then says little for large k).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
from rich.markup import escape
from rich.table import Table

from dmdl_cli.atomic import atomic_write_json
from dmdl_cli.console import console, log
from dmdl_cli.context import StageContext
from dmdl_cli.data.index import IndexTable
from dmdl_cli.errors import DmdlError
from dmdl_cli.features.extract import cached_features
from dmdl_cli.evaluation.metrics import mean_std, rank_metrics
from dmdl_cli.evaluation.protocols import build_trials, protocol_modes
from dmdl_cli.model.loading import LoadedModel
from dmdl_cli.recipe import Recipe

RANKS = (1, 5, 10, 20)


def trial_distance(q: np.ndarray, g: np.ndarray, recipe: Recipe, rerank: bool) -> np.ndarray:
    """(Q, G) distance of L2-normalised features: 2 - 2 cos, or k-reciprocal re-ranked."""
    if rerank:
        from dmdl_cli.clustering.rerank import rerank_distance

        return rerank_distance(q, g, k1=recipe.eval.rerank_k1, k2=recipe.eval.rerank_k2,
                               lambda_value=recipe.eval.rerank_lambda)
    return 2.0 - 2.0 * (q @ g.T)


def run_protocol(
    dataset: str,
    mode: str,
    feats: np.ndarray,
    test: IndexTable,
    recipe: Recipe,
    *,
    trials: int,
    shots: int,
    rerank: bool = False,
) -> tuple[dict[str, Any], list[dict[str, Any]], list]:
    """Metrics of every trial of one protocol over test features ``feats`` (rows of ``test``)."""
    trial_list = build_trials(dataset, mode, pids=test.pids, cams=test.cams, modality=test.modality,
                              trials=trials, shots=shots)
    per_trial = []
    for trial in trial_list:
        q, g = feats[trial.query], feats[trial.gallery]
        dist = trial_distance(q, g, recipe, rerank)
        result = rank_metrics(dist, test.pids[trial.query], test.pids[trial.gallery],
                              test.cams[trial.query], test.cams[trial.gallery],
                              exclude=trial.exclude, dedup=trial.dedup)
        result["seed"] = trial.seed
        per_trial.append(result)
    return mean_std(per_trial), per_trial, trial_list


def _pct(mean: float, std: float, trials: int) -> str:
    return f"{100 * mean:.2f}" + (f" ± {100 * std:.2f}" if trials > 1 else "")


def results_table(title: str, rows: list[tuple[str, dict[str, Any]]]) -> Table:
    table = Table(title=title)
    table.add_column("protocol")
    for r in RANKS:
        table.add_column(f"Rank-{r}", justify="right")
    table.add_column("mAP", justify="right")
    table.add_column("mINP", justify="right")
    table.add_column("trials", justify="right")
    for name, summary in rows:
        n = summary["trials"]
        cells = [_pct(summary["cmc"][r - 1], summary["cmc_std"][r - 1], n) for r in RANKS]
        table.add_row(name, *cells, _pct(summary["mAP"], summary["mAP_std"], n),
                      _pct(summary["mINP"], summary["mINP_std"], n), str(n))
    return table


def _jsonable(result: dict[str, Any]) -> dict[str, Any]:
    return {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in result.items()}


def _warn_small_gallery(mode: str, test: IndexTable, trial_list: list) -> None:
    """Rank-k over a gallery of fewer than k identities is (nearly) certain: say so."""
    ids = min(len(np.unique(test.pids[t.gallery])) for t in trial_list)
    if ids < max(RANKS):
        log(f"[yellow]warning:[/] the {mode} gallery holds {ids} identities, fewer than "
            f"Rank-{max(RANKS)}: Rank-k for k >= {ids} is trivially high here")


def _write_result(out: Path, dataset: str, protocol: dict[str, Any], loaded: LoadedModel,
                  recipe: Recipe, summary: dict[str, Any], per_trial: list, cache_sha256: str) -> None:
    atomic_write_json(out, {
        "dataset": dataset,
        "protocol": protocol,
        "checkpoint": {"name": loaded.name, "description": loaded.description,
                       "sha256": loaded.sha256,
                       # the recipe the checkpoint itself was trained with (None: untrained)
                       "recipe_hash": loaded.meta.get("recipe_hash"),
                       "stage_hash": loaded.meta.get("stage_hash")},
        "cache_sha256": cache_sha256,  # the image cache the features came from
        "recipe_hash": recipe.hash(),  # of this evaluation's recipe, given below in full
        "recipe": recipe.to_dict(),
        "mean": _jsonable(summary),
        "per_trial": [_jsonable(t) for t in per_trial],
    })
    log(f"wrote {escape(str(out))}")


def _check_options(dataset: str, mode: str, recipe: Recipe, trials: int | None, shots: int | None,
                   visualize: int, visualize_worst: int) -> tuple[list[str], int, int]:
    """The protocols to run and the trials and shots (the recipe's unless given); refuses bad
    values before anything is read."""
    valid = protocol_modes(dataset)
    modes = list(valid) if mode == "all" else [mode]
    for m in modes:
        if m not in valid:
            raise DmdlError(f"mode '{m}' does not apply to {dataset}: choose one of "
                            f"{', '.join(valid)} or all")
    trials = recipe.eval.trials if trials is None else trials  # --trials 0 is an error, not 10
    shots = recipe.eval.shots if shots is None else shots
    if trials < 1:
        raise DmdlError(f"--trials {trials}: use 1 or more gallery sampling trials")
    if shots not in (1, 10):
        raise DmdlError(f"--shots {shots}: use 1 (single-shot) or 10 (multi-shot)")
    for flag, value in (("--visualize", visualize), ("--visualize-worst", visualize_worst)):
        if value < 0:
            raise DmdlError(f"{flag} {value}: give the number of queries to draw (0 = none)")
    return modes, trials, shots


def evaluate(
    ctx: StageContext,
    *,
    mode: str = "all",
    trials: int | None = None,
    shots: int | None = None,
    rerank: bool = False,
    visualize: int = 0,
    visualize_worst: int = 0,
) -> dict[str, dict[str, Any]]:
    ws, recipe = ctx.ws, ctx.recipe
    dataset = ws.dataset["name"]
    modes, trials, shots = _check_options(dataset, mode, recipe, trials, shots, visualize,
                                          visualize_worst)
    test_rows = ctx.index.rows(split="test")
    if len(test_rows) == 0:
        raise DmdlError(f"{ws.index_path} has no test rows: this workspace cannot be evaluated")
    test, cache = ctx.index.select(test_rows), ctx.cache  # the cache is checked before the model is built
    loaded = ctx.model()
    log(f"evaluating {escape(loaded.description)}")
    start = time.perf_counter()
    feats, features_file, reused = cached_features(ws, loaded.model, loaded.sha256, "test", cache,
                                                   test_rows, ctx.runtime,
                                                   batch_size=recipe.run.feature_batch)
    (ctx.record_input if reused else ctx.record_output)(features_file)

    summaries: dict[str, dict[str, Any]] = {}
    table_rows = []
    for m in modes:
        summary, per_trial, trial_list = run_protocol(dataset, m, feats, test, recipe,
                                                      trials=trials, shots=shots, rerank=rerank)
        label = m + (" (re-ranked)" if rerank else "") + (f" {shots}-shot" if shots > 1 else "")
        table_rows.append((label, summary))
        summaries[m] = summary
        name = f"{m}{'-rerank' if rerank else ''}{f'-{shots}shot' if shots > 1 else ''}-{loaded.name}"
        _warn_small_gallery(m, test, trial_list)
        out = ctx.output(f"{name}.json")
        _write_result(out, dataset, {"mode": m, "trials": trials, "shots": shots, "rerank": rerank},
                      loaded, recipe, summary, per_trial, cache.sha256)
        ctx.record_output(out)
        if visualize or visualize_worst:
            _draw_ranked_lists(ctx, feats, test, test_rows, trial_list[0], name, rerank,
                               visualize, visualize_worst,
                               title=f"{dataset} {label}, checkpoint {loaded.name} "
                                     f"({_short(loaded)}), first of {trials} gallery trials")
    title = escape(f"{dataset}: {loaded.name} ({time.perf_counter() - start:.1f} s)")
    console.print(results_table(title, table_rows))
    return summaries


def _short(loaded) -> str:
    """What a checkpoint is, in a few words: its stage and epoch, or untrained."""
    meta = loaded.meta
    if meta.get("stage") == "untrained":
        return "untrained"
    epoch = meta.get("epoch")
    return f"{meta.get('stage', '?')}, epoch {epoch + 1 if isinstance(epoch, int) else '?'}"


def _draw_ranked_lists(ctx: StageContext, feats: np.ndarray, test: IndexTable, test_rows: np.ndarray,
                       first, name: str, rerank: bool, spread: int, worst: int, *,
                       title: str) -> None:
    """Pictures of the ranked lists of the first trial, recorded as outputs."""
    from dmdl_cli.evaluation.visualize import write_ranked_lists

    dist = trial_distance(feats[first.query], feats[first.gallery], ctx.recipe, rerank)
    ranks_dir = ctx.output("ranks")
    written = write_ranked_lists(ranks_dir, ctx.cache, test, test_rows, dist, first, name,
                                 spread=spread, worst=worst, title=title)
    ctx.record_output(*written)
    log(f"wrote {len(written)} ranked lists (first trial) to {escape(str(ranks_dir))}")
