"""How well the label-free criteria track test accuracy, and what choosing by them costs.

    python benchmarks/selection.py [--settings scratch source thermal-source] [--seeds 1 2 3]
        [--eps 0.5 0.6 0.7] [--jobs 1|2] [--threads 1] [--set section.key=value ...]
        [--source KEY=VALUE ...] [--smoke] [--analyse-only]

Runs: faithful DMDL (``recipes/ablation/dmdl.yaml`` on ``recipes/demo.yaml``) on the settings
of ``benchmarks/ablation.py`` (its plan, tasks, stage-1 sharing and resumption are reused), per
seed and per eps of ``--eps`` (``cluster.eps``; default: the recipe's), with
``run.keep_epochs=true``. For every run and stage, every kept model (epoch 0 = the model the
stage started from):

- its criteria, from the train images only, into ``<run>/selection/criteria-<stage>.jsonl``
  (``dmdl_cli/selection/offline.py``; the records the training will log once integrated);
- its test-set figures, with ``dmdl evaluate`` (all-search), gathered into
  ``<run>/selection/test-<stage>.json``. The selector never reads these files.

Then, per setting, stage and eps, over the runs (seeds):

- per criterion, the Spearman and Kendall correlation with test mAP across the trained epochs
  (>= 1, the ones a rule chooses among): raw, partial
  on the epoch (the trend "later is better" removed), on first differences, and on the later
  half of the epochs only; signed so that + means the criterion's good direction goes with
  higher mAP; mean over runs with a bootstrap interval over seeds;
- per rule (``last``, then each criterion with the recipe's ``select:`` warm-up, tie and
  collapse guard), the regret against the best epoch of the stage (test mAP of the best epoch -
  test mAP of the chosen one) and the gain over the last epoch, with bootstrap intervals.

Criterion settings (delta, warm-up) are to be chosen on ``scratch`` only: the tables mark it as
the development setting and the others as held out. ``--smoke`` trains one seed of ``scratch``
for two epochs per stage (a few minutes on a CPU) to check the pipeline;
``--analyse-only`` reads the files already there and prints the tables.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import os
import sys
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from dmdl_cli.atomic import atomic_write_json, atomic_write_text  # noqa: E402
from dmdl_cli.clustering.criteria import DIRECTIONS, criterion_value, json_ready  # noqa: E402
from dmdl_cli.recipe import SelectRecipe  # noqa: E402
from dmdl_cli.selection.rule import choose_epoch  # noqa: E402

STAGES = ("stage1", "stage2")
VARIANT = "dmdl"
DEVELOPMENT = "scratch"  # the one setting criterion settings may be chosen on
# --smoke: two epochs of two steps per stage; the switches a two-epoch schedule never reaches off
SMOKE_SETS = ("stage1.epochs=2", "stage1.iters=2", "stage1.refine_from=never", "stage1.triplet_ramp=[]",
              "stage2.epochs=2", "stage2.iters=2", "stage2.onehot_epochs=0",
              "stage2.cross_sampler_from=never", "stage2.triplet_ramp=[]", "eval.trials=2")


def _ablation():
    spec = importlib.util.spec_from_file_location("ablation", REPO / "benchmarks" / "ablation.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------------------------------
# analysis: pure functions of per-epoch criteria and test mAP


@dataclasses.dataclass
class Curve:
    """One run's stage: its criteria records by epoch and its test mAP (%) by epoch."""

    setting: str
    seed: int
    stage: str
    eps: float | None
    records: list[dict[str, Any]]
    test_map: dict[int, float]

    @property
    def group(self) -> tuple[str, str, float | None]:
        return (self.setting, self.stage, self.eps)


def _rank_corr(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(Spearman, Kendall) of two series; NaN with fewer than 3 points or a constant series."""
    from scipy.stats import kendalltau, spearmanr

    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan"), float("nan")
    return float(spearmanr(x, y)[0]), float(kendalltau(x, y)[0])


def _partial(r_xy: float, r_xt: float, r_yt: float) -> float:
    """Partial correlation of x and y given t from the three pairwise ones (for Kendall's tau:
    Kendall's partial tau); NaN when x or y is a function of t."""
    if max(abs(r_xt), abs(r_yt)) > 1 - 1e-9:  # also NaN in, NaN out
        return float("nan")
    return (r_xy - r_xt * r_yt) / math.sqrt((1 - r_xt ** 2) * (1 - r_yt ** 2))


def epoch_correlations(values: Sequence[float], test_map: Sequence[float],
                       epochs: Sequence[int], direction: int = 1) -> dict[str, float]:
    """Rank correlations of a criterion with test mAP across epochs, times ``direction``.

    Keys ``spearman``/``kendall`` (raw), ``partial_spearman``/``partial_kendall`` (the epoch
    partialled out), ``diff_spearman``/``diff_kendall`` (first differences between consecutive
    epochs with a value), ``late_spearman``/``late_kendall`` (epochs from the median on). Epochs
    whose criterion is undefined (None / NaN) are left out. NaN when too few points remain.
    """
    x = np.array([np.nan if v is None else v for v in values], dtype=float)
    y, t = np.asarray(test_map, dtype=float), np.asarray(epochs, dtype=float)
    keep = np.isfinite(x) & np.isfinite(y)
    x, y, t = x[keep], y[keep], t[keep]
    out: dict[str, float] = {}
    out["spearman"], out["kendall"] = _rank_corr(x, y)
    (s_xt, k_xt), (s_yt, k_yt) = _rank_corr(x, t), _rank_corr(y, t)
    out["partial_spearman"] = _partial(out["spearman"], s_xt, s_yt)
    out["partial_kendall"] = _partial(out["kendall"], k_xt, k_yt)
    out["diff_spearman"], out["diff_kendall"] = _rank_corr(np.diff(x), np.diff(y))
    late = t >= np.median(t) if t.size else keep[:0]
    out["late_spearman"], out["late_kendall"] = _rank_corr(x[late], y[late])
    return {k: direction * v for k, v in out.items()}


def bootstrap_mean(values: Iterable[float], *, rounds: int = 2000, level: float = 0.95,
                   seed: int = 0) -> tuple[float, float, float, int]:
    """(mean, low, high, n) of the finite ``values`` with a percentile bootstrap interval of the
    mean (resampling the values, i.e. the seeds, with replacement). NaNs with no value."""
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], dtype=float)
    if v.size == 0:
        return float("nan"), float("nan"), float("nan"), 0
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, v.size, size=(rounds, v.size))].mean(axis=1)
    tail = (1 - level) / 2
    return float(v.mean()), float(np.quantile(means, tail)), float(np.quantile(means, 1 - tail)), int(v.size)


def curve_correlations(curve: Curve, criterion: str) -> dict[str, float]:
    """:func:`epoch_correlations` of one criterion on one curve, over the trained epochs
    (>= 1: the models a rule chooses among) with a record and a test mAP."""
    by_epoch = {int(r["epoch"]): r for r in curve.records}
    epochs = sorted(e for e in curve.test_map if e in by_epoch and e >= 1)
    return epoch_correlations([criterion_value(by_epoch[e], criterion) for e in epochs],
                              [curve.test_map[e] for e in epochs], epochs, DIRECTIONS[criterion])


def rule_outcome(curve: Curve, rule: SelectRecipe) -> dict[str, Any]:
    """What ``rule`` chooses on a curve and what it costs in test mAP (%).

    ``regret_best``: the best trained epoch's mAP (epochs >= 1 of the stage) minus the chosen
    one's; ``gain_last``: the chosen one's minus the last epoch's; ``fell_back``: no epoch was
    eligible (e.g. a stage-2 criterion on stage 1), so the rule took the last epoch.
    """
    trained = {e: m for e, m in curve.test_map.items() if e >= 1}
    if not trained:
        raise ValueError(f"{curve.setting} seed {curve.seed} {curve.stage}: no trained epoch "
                         "with a test mAP")
    last = max(trained)
    choice = choose_epoch(curve.records, rule, last_epoch=last)
    if choice.epoch not in curve.test_map:
        raise ValueError(f"{curve.setting} seed {curve.seed} {curve.stage}: the rule chose epoch "
                         f"{choice.epoch}, which has no test mAP")
    chosen = curve.test_map[choice.epoch]
    return {"epoch": choice.epoch, "map": chosen, "regret_best": max(trained.values()) - chosen,
            "gain_last": chosen - trained[last], "reason": choice.reason,
            "fell_back": rule.criterion != "last" and choice.value is None}


def rules_of(base: SelectRecipe) -> dict[str, SelectRecipe]:
    """``last`` and one rule per criterion, each with ``base``'s warm-up, tie and guard."""
    return {name: dataclasses.replace(base, criterion=name) for name in ("last", *DIRECTIONS)}


def _groups(curves: Iterable[Curve]) -> dict[tuple, list[Curve]]:
    out: dict[tuple, list[Curve]] = {}
    for c in curves:
        out.setdefault(c.group, []).append(c)
    return out


MEASURES = ("spearman", "kendall", "partial_spearman", "partial_kendall", "diff_spearman",
            "diff_kendall", "late_spearman", "late_kendall")


def correlation_table(curves: Sequence[Curve], *, rounds: int = 2000) -> list[dict[str, Any]]:
    """Rows (setting, stage, eps, criterion, measure) -> mean over runs with its bootstrap
    interval over seeds."""
    rows = []
    for (setting, stage, eps), group in sorted(_groups(curves).items(), key=lambda kv: str(kv[0])):
        for criterion in DIRECTIONS:
            per_run = [curve_correlations(c, criterion) for c in group]
            for measure in MEASURES:
                mean, lo, hi, n = bootstrap_mean([r[measure] for r in per_run], rounds=rounds)
                rows.append({"setting": setting, "stage": stage, "eps": eps, "criterion": criterion,
                             "measure": measure, "mean": mean, "low": lo, "high": hi, "runs": n})
    return rows


def regret_table(curves: Sequence[Curve], base: SelectRecipe, *, rounds: int = 2000
                 ) -> list[dict[str, Any]]:
    """Rows (setting, stage, eps, rule) -> mean chosen epoch, regret against the best epoch and
    gain over the last one, each mean over runs with its bootstrap interval over seeds."""
    rows = []
    for (setting, stage, eps), group in sorted(_groups(curves).items(), key=lambda kv: str(kv[0])):
        for name, rule in rules_of(base).items():
            outcomes = [rule_outcome(c, rule) for c in group]
            row: dict[str, Any] = {"setting": setting, "stage": stage, "eps": eps, "rule": name,
                                   "epochs": [o["epoch"] for o in outcomes],
                                   "fell_back": sum(o["fell_back"] for o in outcomes)}
            for key in ("regret_best", "gain_last"):
                row[key] = dict(zip(("mean", "low", "high", "runs"),
                                    bootstrap_mean([o[key] for o in outcomes], rounds=rounds)))
            rows.append(row)
    return rows


def _ci(mean: float, low: float, high: float) -> str:
    if not np.isfinite(mean):
        return "—"
    return f"{mean:+.2f} [{low:+.2f}, {high:+.2f}]"


def _title(setting: str, stage: str, eps: float | None) -> str:
    role = "development" if setting == DEVELOPMENT else "held out"
    return f"{setting} ({role}), {stage}" + (f", eps {eps:g}" if eps is not None else "")


def markdown(corr: list[dict[str, Any]], regret: list[dict[str, Any]], base: SelectRecipe) -> list[str]:
    """The two tables per (setting, stage, eps) as markdown lines."""
    lines = ["### Correlation of each criterion with test mAP across epochs", "",
             "Spearman ρ / Kendall τ, mean over seeds [95 % bootstrap interval over seeds]; signed "
             "so that + means the criterion's good direction goes with higher test mAP. partial: "
             "the epoch partialled out; Δ: first differences; late: epochs from the median on.", ""]
    groups = sorted({(r["setting"], r["stage"], r["eps"]) for r in corr}, key=str)
    for g in groups:
        lines += [f"#### {_title(*g)}", "",
                  "| criterion | runs | " + " | ".join(MEASURES) + " |",
                  "|---|---|" + "---|" * len(MEASURES)]
        for criterion in DIRECTIONS:
            cells = {r["measure"]: r for r in corr if (r["setting"], r["stage"], r["eps"]) == g
                     and r["criterion"] == criterion}
            runs = max((c["runs"] for c in cells.values()), default=0)
            lines.append(f"| {criterion} | {runs} | " + " | ".join(
                _ci(cells[m]["mean"], cells[m]["low"], cells[m]["high"]) for m in MEASURES) + " |")
        lines.append("")
    lines += ["### Regret of each rule", "",
              f"Test mAP (%) of the best epoch minus the chosen one's (regret), and of the chosen "
              f"minus the last epoch's (gain); mean over seeds [95 % bootstrap interval]. Rules: "
              f"warm-up {base.warmup}, tie to the {base.tie} epoch, tolerance {base.tolerance:g}, "
              f"largest cluster at most {base.max_largest_share:.0%}.", ""]
    for g in sorted({(r["setting"], r["stage"], r["eps"]) for r in regret}, key=str):
        lines += [f"#### {_title(*g)}", "",
                  "| rule | chosen epochs | regret vs best | gain vs last | runs | fell back to last |",
                  "|---|---|---|---|---|---|"]
        for r in (r for r in regret if (r["setting"], r["stage"], r["eps"]) == g):
            rb, gl = r["regret_best"], r["gain_last"]
            lines.append(f"| {r['rule']} | {', '.join(map(str, r['epochs']))} | "
                         f"{_ci(rb['mean'], rb['low'], rb['high'])} | "
                         f"{_ci(gl['mean'], gl['low'], gl['high'])} | {rb['runs']} | "
                         f"{r['fell_back']} |")
        lines.append("")
    return lines


# ---------------------------------------------------------------------------------------------
# files of a run: criteria (train images only) and test figures (never read by the selector)


def criteria_path(folder: Path, stage: str) -> Path:
    return folder / "selection" / f"criteria-{stage}.jsonl"


def test_path(folder: Path, stage: str) -> Path:
    return folder / "selection" / f"test-{stage}.json"


def read_curve(folder: Path, stage: str, *, setting: str, seed: int, eps: float | None) -> Curve | None:
    """A run's stage from its two files; None while either is missing."""
    crit, test = criteria_path(folder, stage), test_path(folder, stage)
    if not (crit.is_file() and test.is_file()):
        return None
    records = [json.loads(line) for line in crit.read_text().splitlines() if line.strip()]
    test_map = {int(e): float(v["mAP"]) for e, v in json.loads(test.read_text())["epochs"].items()}
    return Curve(setting, seed, stage, eps, records, test_map)


def write_criteria(folder: Path, stage: str, recipe, *, threads: int) -> None:
    """Criteria of every kept model of ``stage`` in the run workspace ``folder`` (train images)."""
    import torch

    from dmdl_cli.data.cache import open_cache
    from dmdl_cli.data.index import read_index
    from dmdl_cli.runtime import select_runtime
    from dmdl_cli.selection.offline import checkpoint_criteria
    from dmdl_cli.workspace import Workspace

    torch.set_num_threads(threads)
    ws = Workspace(folder)
    index = read_index(ws.index_path)
    cache = open_cache(ws.cache_path(recipe.data.height, recipe.data.width), len(index),
                       recipe.data.height, recipe.data.width)
    records = list(checkpoint_criteria(ws, recipe, stage, index=index, cache=cache,
                                       runtime=select_runtime(recipe)))
    atomic_write_text(criteria_path(folder, stage),
                      "".join(json.dumps(r, allow_nan=False) + "\n" for r in records))


def write_test_figures(ab, plan, run, folder: Path, stage: str, recipe) -> None:
    """``dmdl evaluate`` (all-search) of every kept model of ``stage``, gathered by epoch."""
    from dmdl_cli.model.loading import checkpoint_name
    from dmdl_cli.selection.offline import kept_checkpoints
    from dmdl_cli.workspace import Workspace

    ws = Workspace(folder)
    epochs = {}
    for epoch, path in kept_checkpoints(ws, stage).items():
        if str(path) == "imagenet":
            name = "random-init" if recipe.model.pretrained is None else "imagenet"
        else:
            name = checkpoint_name(ws, path)
        out = folder / "eval" / f"all-search-{name}.json"
        if not out.is_file():
            ab.dmdl(plan, folder / "selection.log", "evaluate", "--workspace", str(folder),
                    "--mode", "all-search", "--checkpoint", str(path), *plan.args(run))
        mean = json.loads(out.read_text())["mean"]
        epochs[str(epoch)] = {"mAP": 100 * mean["mAP"], "rank1": 100 * mean["cmc"][0],
                              "mINP": 100 * mean["mINP"], "checkpoint": name}
    atomic_write_json(test_path(folder, stage), {"stage": stage, "mode": "all-search", "epochs": epochs})


def selection_task(ab, plan, run, threads: int):
    """After a run's stage 2: criteria and test figures of every kept epoch of both stages."""
    def work() -> None:
        folder = plan.run_dir(run)
        recipe = plan.resolve(run)
        for stage in STAGES:
            if not criteria_path(folder, stage).is_file():
                write_criteria(folder, stage, recipe, threads=threads)
            if not test_path(folder, stage).is_file():
                write_test_figures(ab, plan, run, folder, stage, recipe)
        ab.say(f"selection files of {run.setting} seed {run.seed} written")
    return work


# ---------------------------------------------------------------------------------------------
# the command


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ab = _ablation()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--settings", nargs="+", default=list(ab.SETTINGS), choices=list(ab.SETTINGS))
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--eps", type=float, nargs="+", default=None,
                   help="cluster.eps values, one set of runs each (default: the recipe's)")
    p.add_argument("--recipe", default="recipes/demo.yaml")
    p.add_argument("--workdir", default="runs/selection")
    p.add_argument("--out", default="benchmarks/results/selection.md")
    p.add_argument("--json", default="benchmarks/results/selection.json")
    p.add_argument("--jobs", type=int, default=1, choices=(1, 2))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=2000, help="bootstrap resamples")
    p.add_argument("--set", dest="sets", action="append", default=[])
    p.add_argument("--source", action="append", default=[])
    p.add_argument("--smoke", action="store_true", help="one seed of scratch, two short epochs per stage")
    p.add_argument("--analyse-only", action="store_true", help="train nothing: tables from the files there")
    args = p.parse_args(argv)
    if args.smoke:
        args.settings, args.seeds = ["scratch"], args.seeds[:1]
        args.sets = [*SMOKE_SETS, *args.sets]
    return args


def plans(ab, args: argparse.Namespace) -> list[tuple[float | None, Any]]:
    """One ablation plan per eps (its own folder), all with ``run.keep_epochs=true``. The
    recipe's own eps is the plain plan (the work folder itself): its runs are the ones
    ``benchmarks/ablation.py`` runs as DMDL in the same work folder, trained once."""
    from dmdl_cli.recipe import load_recipe

    root = (REPO / args.workdir).resolve()
    recipe_eps = load_recipe(REPO / args.recipe, overrides=args.sets).cluster.eps
    out = []
    for eps in args.eps or [None]:
        if eps is not None and math.isclose(eps, recipe_eps):
            eps = None
        work = root if eps is None else root / f"eps-{eps:g}"
        sets = [*args.sets, "run.keep_epochs=true", *([f"cluster.eps={eps}"] if eps is not None else [])]
        out.append((eps, ab.Plan(work, (REPO / args.recipe).resolve(), sets, args.threads,
                                 root / "source-backbone" / "backbone.pth")))
    return out


def train(ab, args: argparse.Namespace, eps_plans: list) -> dict[str, str]:
    runs = [ab.Run(setting, VARIANT, seed) for setting in args.settings for seed in args.seeds]
    sources = any(ab.SETTINGS[s][1] == "source" for s in args.settings)
    tasks = []
    for i, (_, plan) in enumerate(eps_plans):
        for data in sorted({run.data for run in runs} | ({"default"} if sources else set())):
            ab.prepare_data(plan, data)
        if sources:
            if i == 0:
                ab.source_backbone(plan, args.source, args.sets)
            else:  # one source backbone for every eps
                plan.source_weights = eps_plans[0][1].source_weights
        planned, unavailable = ab.plan_tasks(plan, runs)
        for run, why in unavailable.items():
            ab.say(f"not run: {run.setting} seed {run.seed}: {why}")
        for task in planned:
            tasks.append(dataclasses.replace(task, key=f"{plan.work.name}/{task.key}",
                                             after=task.after and f"{plan.work.name}/{task.after}"))
        for run in runs:
            if run not in unavailable:
                key = f"{plan.work.name}/{run.setting}/{run.seed}/{run.name}"
                tasks.append(ab.Task(f"{key}/selection", selection_task(ab, plan, run, args.threads),
                                     after=key))
    ab.say(f"{len(tasks)} tasks, {args.jobs} at a time")
    return ab.run_tasks(tasks, args.jobs)


def gather(ab, args: argparse.Namespace, eps_plans: list) -> list[Curve]:
    curves = []
    for eps, plan in eps_plans:
        for setting in args.settings:
            for seed in args.seeds:
                folder = plan.run_dir(ab.Run(setting, VARIANT, seed))
                for stage in STAGES:
                    curve = read_curve(folder, stage, setting=setting, seed=seed, eps=eps)
                    if curve is not None:
                        curves.append(curve)
    return curves


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("DMDL_NO_PROGRESS", "1")  # logs, not a terminal
    ab = _ablation()
    eps_plans = plans(ab, args)
    failed = {} if args.analyse_only else train(ab, args, eps_plans)
    curves = gather(ab, args, eps_plans)
    if not curves:
        print(f"no run of {args.workdir} has both its criteria and test files yet")
        return 1
    base = eps_plans[0][1].resolve(ab.Run(args.settings[0], VARIANT, args.seeds[0])).select
    corr = correlation_table(curves, rounds=args.rounds)
    regret = regret_table(curves, base, rounds=args.rounds)
    command = " ".join(["python benchmarks/selection.py", *(sys.argv[1:] if argv is None else argv)])
    lines = ["## Label-free selection against test accuracy", "",
             f"Faithful DMDL on `{args.recipe}`; {len(curves)} stage curves. The selector reads "
             "the criteria files only; test figures are gathered apart from them.",
             f"Regenerate: `{command}`", "", *markdown(corr, regret, base)]
    atomic_write_text(REPO / args.out, "\n".join(lines) + "\n")
    atomic_write_json(REPO / args.json, json_ready({"command": command, "correlations": corr,
                                                    "regrets": regret}))
    print("\n".join(lines))
    for key, why in failed.items():
        ab.say(f"FAILED {key}: {why}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
