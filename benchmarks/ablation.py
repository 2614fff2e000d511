"""The DMDL ablation on the embedded synthetic set: the paper's Table 3 rows and the switch
table, every table in one command.

    python benchmarks/ablation.py [--settings scratch source thermal-source] [--seeds 1 2 3]
        [--variants baseline cai cai-augment cai-refine cai-align cbt dmdl]
        [--switches all|none|NAME ...] [--jobs 1|2] [--threads 1] [--cai-share]
        [--set section.key=value ...] [--source KEY=VALUE ...] [--update-docs]

Settings (:data:`SETTINGS`): the default synthetic set trained from scratch; the same set from
the source-pretrained backbone (``benchmarks/source_pretrain.py``: the CPU miniature of ImageNet
weights, trained with labels on the visible images of another synthetic set with other people);
a thermal-like set (negative ``material_coupling``) from the source-pretrained backbone.
Variants: the data set recipe (``recipes/demo.yaml``) with one overlay of ``recipes/ablation/``,
the rows of the paper's Table 3 (:data:`VARIANTS`): the baseline with visible channel
augmentation (row 1), +CAI (2), CAI with each part of CBT alone (3-5: data augmentation, label
refinement, feature alignment), +CBT (6), DMDL (7). On the ``source`` setting, faithful DMDL is
also run with each switch of :data:`SWITCHES` turned off in turn (``--set`` overrides; edit the
table to change them). ``--update-docs`` writes the tables into docs/results.md between its
``<!-- ablation:start -->`` / ``<!-- ablation:end -->`` markers, and the Table 3 summary (mAP per
row and setting) into README.md between ``<!-- ablation-summary:start/end -->``.

Runs whose stage-1 recipe sections hash equal (:func:`dmdl_cli.stages.stage_hash`) share one
stage-1 run, copied into each stage-2 workspace. Every step is skipped when its result exists
and resumed when it was killed, so re-running the command continues where it stopped. Results:
``--out`` (markdown: mean ± std over seeds of all-search Rank-1 / mAP / mINP, and per-seed
rows) and ``--json``. Nothing is tuned on the test split: recipes are fixed before this runs.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dmdl_cli.atomic import atomic_write_text  # noqa: E402
from dmdl_cli.errors import DmdlError  # noqa: E402
from dmdl_cli.recipe import Recipe, load_recipe  # noqa: E402
from dmdl_cli.stages import stage_hash  # noqa: E402

# data set name -> the recipe's synthetic: keys that make it (--set; the demo's seed 0 and 90 ids)
DATA_SETS: dict[str, tuple[str, ...]] = {
    "default": (),
    "thermal": ("synthetic.material_coupling=-0.8",),
}
# setting -> (data set, initialisation: "scratch" or "source", title)
SETTINGS: dict[str, tuple[str, str, str]] = {
    "scratch": ("default", "scratch", "default set, trained from scratch"),
    "source": ("default", "source", "default set, from the source-pretrained backbone"),
    "thermal-source": ("thermal", "source",
                       "thermal-like set (material_coupling -0.8), from the source-pretrained backbone"),
}
# the README's column titles of the settings
SHORT_TITLES = {"scratch": "default set, from scratch", "source": "default set, source-pretrained",
                "thermal-source": "thermal-like set, source-pretrained"}
# variant -> (overlay in recipes/ablation/, label, CAI, CBT parts on: data augmentation, label
# refinement, feature alignment); the rows of the paper's Table 3 in its order
VARIANTS: dict[str, tuple[str, str, bool, tuple[bool, bool, bool]]] = {
    "baseline": ("baseline", "1 baseline (visible channel aug.)", False, (False, False, False)),
    "cai": ("cai", "2 +CAI", True, (False, False, False)),
    "cai-augment": ("cai-augment", "3 +CAI +augmentation", True, (True, False, False)),
    "cai-refine": ("cai-refine", "4 +CAI +label refinement", True, (False, True, False)),
    "cai-align": ("cai-align", "5 +CAI +feature alignment", True, (False, False, True)),
    "cbt": ("cbt", "6 +CBT", False, (True, True, True)),
    "dmdl": ("dmdl", "7 DMDL (CAI + CBT)", True, (True, True, True)),
}
# Faithful DMDL with one reference mechanism turned off at a time (what the reference trains
# explicitly, then what it trains through how it runs): name -> (what is turned off, the --set
# overrides that turn it off).
SWITCHES: dict[str, tuple[str, tuple[str, ...]]] = {
    "no-cross-memory": ("semi-cross-modality memory update", ("stage2.cross_memory_update=false",)),
    "no-k1-alternation": ("k1 alternation", ("stage2.k1_adopting=null",)),
    "joint-triplet": ("per-modality triplets", ("stage1.triplet=joint", "stage2.triplet=joint")),
    "mean-reduction": ("sums over modalities", ("stage1.loss_reduction=mean", "stage2.loss_reduction=mean")),
    "no-camera-aware": ("camera-aware sampling",
                        ("stage1.camera_aware_sampling=false", "stage2.camera_aware_sampling=false")),
    "batch-mean-memory": ("per-sample memory update",
                          ("stage1.memory_update=batch-mean", "stage2.memory_update=batch-mean")),
    "joint-batchnorm": ("BatchNorm per slice of the reference's 4-GPU batch", ("train.bn_groups=joint",)),
    "fixed-memory-gradient": ("in-place memory gradient", ("stage2.memory_gradient=fixed",)),
    "shared-cross-sampler": ("union cross-modality sampler", ("stage2.cross_sampler=shared",)),
    "dmdl-v1-augment": ("the reference's augmentation pipeline",
                        ("augment.pipeline=dmdl-v1", "augment.erasing_fill=random",
                         "augment.ir_channel_copy_p=0.5", "augment.ir_gray_p=1.0",
                         "augment.ir_pseudo_colour_scheme=formula-distinct")),
    "biased-mmd": ("the reference's MMD (unbiased, on BN-neck features)", ("cbt.mmd=biased-normalised",)),
}
SWITCH_SETTING, SWITCH_VARIANT = "source", "dmdl"
RESULT = "eval/all-search-stage2-final.json"
print_lock = threading.Lock()


def say(message: str) -> None:
    with print_lock:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


@dataclasses.dataclass(frozen=True)
class Run:
    setting: str
    variant: str
    seed: int
    switch: str | None = None  # a key of SWITCHES, None = the variant as is

    @property
    def name(self) -> str:
        return self.variant + (f"-{self.switch}" if self.switch else "")

    @property
    def data(self) -> str:
        return SETTINGS[self.setting][0]


@dataclasses.dataclass
class Plan:
    """Where everything lives and the command-line arguments every run shares."""

    work: Path
    recipe: Path
    sets: list[str]
    threads: int
    source_weights: Path

    def run_dir(self, run: Run) -> Path:
        return self.work / run.setting / f"seed{run.seed}-{run.name}"

    def data_dir(self, data: str) -> Path:
        return self.work / f"data-{data}"

    def overrides(self, run: Run) -> list[str]:
        init = SETTINGS[run.setting][1]
        pretrained = str(self.source_weights) if init == "source" else "null"
        switch = SWITCHES[run.switch][1] if run.switch else ()
        return ["data.dataset=synthetic", *DATA_SETS[run.data], f"train.seed={run.seed}",
                f"model.pretrained={pretrained}", *self.sets, *switch]

    def overlay(self, run: Run) -> Path:
        return REPO / "recipes" / "ablation" / f"{VARIANTS[run.variant][0]}.yaml"

    def args(self, run: Run) -> list[str]:
        return ["--recipe", str(self.recipe), "--overlay", str(self.overlay(run)),
                *[x for kv in self.overrides(run) for x in ("--set", kv)]]

    def resolve(self, run: Run) -> Recipe:
        return load_recipe(self.recipe, overlays=[self.overlay(run)], overrides=self.overrides(run))

    def recipe_hash(self, run: Run) -> str | None:
        """The run's full recipe hash; None when this build cannot express the run."""
        try:
            return self.resolve(run).hash()
        except DmdlError:
            return None


# --------------------------------------------------------------------------------------------
# running dmdl
# --------------------------------------------------------------------------------------------
def dmdl(plan: Plan, log_file: Path, *args: str) -> None:
    """One dmdl command; its output goes to ``log_file``; failure raises with the last lines."""
    env = {**os.environ, "DMDL_NO_PROGRESS": "1", "OMP_NUM_THREADS": str(plan.threads),
           "MKL_NUM_THREADS": str(plan.threads), "PYTHONPATH": str(REPO)}
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "a") as out:
        out.write(f"\n$ dmdl {' '.join(args)}\n")
        out.flush()
        proc = subprocess.run([sys.executable, "-m", "dmdl_cli", *args], cwd=REPO, env=env,
                              stdout=out, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = log_file.read_text().strip().splitlines()[-5:]
        raise RuntimeError(f"dmdl {args[0]} failed (see {log_file}):\n  " + "\n  ".join(tail))


def copy_workspace(src: Path, dst: Path) -> None:
    """Copy a workspace (atomically: a temp folder renamed); the data and stage-1 folders are
    hard-linked (their files are only ever replaced, never written in place: a stage-1 run
    with kept epochs shared by many stage-2 runs costs its disk once), features are left out."""
    tmp = dst.with_name(f".{dst.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)

    def link_or_copy(a: str, b: str) -> None:
        if Path(a).relative_to(src).parts[0] in ("data", "stage1"):
            try:
                os.link(a, b)
                return
            except OSError:
                pass
        shutil.copy2(a, b)

    shutil.copytree(src, tmp, copy_function=link_or_copy,
                    ignore=shutil.ignore_patterns(".lock", "features", "stage2", "eval", "*.tmp"))
    os.replace(tmp, dst)


def prepare_data(plan: Plan, data: str) -> None:
    ws = plan.data_dir(data)
    if (ws / "manifest.json").is_file() and (ws / "data" / "index.csv").is_file():
        return
    root = plan.work / f"synthetic-{data}"
    dmdl(plan, plan.work / "logs" / f"prepare-{data}.log", "prepare-data", "--dataset", "synthetic",
         "--root", str(root), "--workspace", str(ws), "--recipe", str(plan.recipe),
         *[x for kv in (*DATA_SETS[data], *plan.sets) for x in ("--set", kv)])
    say(f"prepared {ws}")


def source_backbone(plan: Plan, options: list[str], sets: list[str]) -> None:
    """benchmarks/source_pretrain.py with this plan's recipe and output (a no-op when done);
    points the plan at a copy named by the file's sha256."""
    spec = importlib.util.spec_from_file_location("source_pretrain", REPO / "benchmarks" / "source_pretrain.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    argv = ["--recipe", str(plan.recipe), "--out", str(plan.source_weights), "--threads", str(plan.threads),
            "--target-workspace", str(plan.data_dir("default")), *[x for kv in sets for x in ("--set", kv)]]
    for kv in options:
        key, _, value = kv.partition("=")
        argv += [f"--{key.replace('_', '-')}", value]
    module.main(argv)
    # the runs name the file by its content, so their recipe hash changes when it is retrained
    from dmdl_cli.atomic import sha256_file

    pinned = plan.source_weights.with_name(f"backbone-{sha256_file(plan.source_weights)[:16]}.pth")
    if not pinned.is_file():
        shutil.copy2(plan.source_weights, pinned)
    plan.source_weights = pinned


# --------------------------------------------------------------------------------------------
# tasks: stage 1 (shared by hash), stage 2 + evaluation per run
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Task:
    key: str
    work: Callable[[], None]
    after: str | None = None


def stage1_dir(plan: Plan, run: Run, s1_hash: str) -> Path:
    return plan.work / "stage1" / f"{run.data}-seed{run.seed}-{s1_hash}"


def stage1_task(plan: Plan, run: Run, folder: Path) -> Callable[[], None]:
    def work() -> None:
        if (folder / "stage1" / "final.pt").is_file():
            return
        if not folder.is_dir():
            copy_workspace(plan.data_dir(run.data), folder)
        start = time.perf_counter()
        dmdl(plan, folder / "ablation.log", "pretrain-single", "--workspace", str(folder), "--resume",
             *plan.args(run))
        seconds = time.perf_counter() - start
        atomic_write_text(folder / "ablation-stage1.json", json.dumps({"seconds": round(seconds, 1)}))
        say(f"stage 1 {folder.name} done ({seconds:.0f} s)")
    return work


MARKER = "ablation-recipe.json"  # the recipe hash a run folder was made for


def stage2_task(plan: Plan, run: Run, s1_folder: Path) -> Callable[[], None]:
    def work() -> None:
        folder = plan.run_dir(run)
        wanted = plan.recipe_hash(run)
        marker = folder / MARKER
        if folder.is_dir() and (not marker.is_file() or json.loads(marker.read_text()).get("recipe_hash") != wanted):
            say(f"{folder} was made for another recipe (or not finished copying): starting it again")
            shutil.rmtree(folder)
        if (folder / RESULT).is_file():
            return
        if not folder.is_dir():
            folder.parent.mkdir(parents=True, exist_ok=True)
            copy_workspace(s1_folder, folder)
            atomic_write_text(marker, json.dumps({"recipe_hash": wanted, "run": dataclasses.asdict(run)}))
        start = time.perf_counter()
        dmdl(plan, folder / "ablation.log", "train-cross", "--workspace", str(folder), "--resume", *plan.args(run))
        seconds = time.perf_counter() - start
        dmdl(plan, folder / "ablation.log", "evaluate", "--workspace", str(folder), "--mode", "all-search",
             "--checkpoint", str(folder / "stage2" / "final.pt"), *plan.args(run))
        s1 = json.loads((s1_folder / "ablation-stage1.json").read_text()) if (
            s1_folder / "ablation-stage1.json").is_file() else {}
        atomic_write_text(folder / "ablation-run.json", json.dumps({
            "stage1": s1_folder.name, "stage1_seconds": s1.get("seconds"), "stage2_seconds": round(seconds, 1)}))
        say(f"{run.setting} seed {run.seed} {run.name}: {describe(read_result(plan, run))} ({seconds:.0f} s)")
    return work


def plan_tasks(plan: Plan, runs: list[Run]) -> tuple[list[Task], dict[Run, str]]:
    """Tasks in order (stage 1 first, then its stage-2 runs), and the runs this build cannot
    express (a recipe key it does not know) with the reason."""
    tasks: list[Task] = []
    seen: set[str] = set()
    unavailable: dict[Run, str] = {}
    for run in runs:
        try:
            s1_hash = stage_hash(plan.resolve(run), "stage1")
        except DmdlError as err:  # e.g. a switch key this build does not know yet
            unavailable[run] = str(err).split("; ")[0]
            continue
        s1 = stage1_dir(plan, run, s1_hash)
        if s1.name not in seen:
            seen.add(s1.name)
            tasks.append(Task(s1.name, stage1_task(plan, run, s1)))
        tasks.append(Task(f"{run.setting}/{run.seed}/{run.name}", stage2_task(plan, run, s1), after=s1.name))
    return tasks, unavailable


def run_tasks(tasks: list[Task], jobs: int) -> dict[str, str]:
    """Run ``tasks`` on ``jobs`` threads, each after the task it depends on; returns failures."""
    pending, done, failed = list(tasks), set(), {}
    cond = threading.Condition()

    def next_task() -> Task | None:
        with cond:
            while True:
                for task in [t for t in pending if t.after in failed]:
                    pending.remove(task)
                    failed[task.key] = f"its stage 1 ({task.after}) failed"
                ready = next((t for t in pending if t.after is None or t.after in done), None)
                if ready is not None:
                    pending.remove(ready)
                    return ready
                if not pending:
                    return None
                cond.wait()

    def worker() -> None:
        while (task := next_task()) is not None:
            try:
                task.work()
                outcome = None
            except Exception as err:  # noqa: BLE001 - one failed run must not stop the others
                outcome = str(err)
                say(f"FAILED {task.key}: {err}")
            with cond:
                (done.add(task.key) if outcome is None else failed.__setitem__(task.key, outcome))
                cond.notify_all()

    threads = [threading.Thread(target=worker) for _ in range(max(1, jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return failed


# --------------------------------------------------------------------------------------------
# results
# --------------------------------------------------------------------------------------------
def read_result(plan: Plan, run: Run) -> dict[str, float] | None:
    """The run's all-search figures (%), or None when it has not finished with today's recipe."""
    folder = plan.run_dir(run)
    path, marker = folder / RESULT, folder / MARKER
    if not (path.is_file() and marker.is_file()):
        return None
    if json.loads(marker.read_text()).get("recipe_hash") != plan.recipe_hash(run):
        return None  # made with other settings: stale, redone by the next run of the script
    mean = json.loads(path.read_text())["mean"]
    out = {"rank1": 100 * mean["cmc"][0], "mAP": 100 * mean["mAP"], "mINP": 100 * mean["mINP"]}
    info = folder / "ablation-run.json"
    if info.is_file():
        out.update(json.loads(info.read_text()))
    return out


def describe(result: dict[str, float] | None) -> str:
    if result is None:
        return "no result"
    return f"Rank-1 {result['rank1']:.1f}, mAP {result['mAP']:.1f}, mINP {result['mINP']:.1f}"


def mean_std(values: list[float]) -> str:
    if not values:
        return "—"
    arr = np.asarray(values, dtype=float)
    return f"{arr.mean():.1f} ± {arr.std():.1f}" if len(arr) > 1 else f"{arr[0]:.1f}"


def per_seed(rows: list[dict]) -> str:
    return ", ".join(f"{r['mAP']:.1f}" for r in rows) or "—"


def variant_table(plan: Plan, setting: str, seeds: list[int], variants: list[str]) -> list[str]:
    lines = [f"### {SETTINGS[setting][2]}", "",
             "| Table 3 row | CAI | aug. | refine | align | Rank-1 | mAP | mINP | seeds | mAP per seed |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for variant in variants:
        _, label, cai, cbt = VARIANTS[variant]
        marks = " | ".join("yes" if on else "no" for on in (cai, *cbt))
        rows = [r for s in seeds if (r := read_result(plan, Run(setting, variant, s))) is not None]
        lines.append(f"| {label} | {marks} | "
                     f"{mean_std([r['rank1'] for r in rows])} | {mean_std([r['mAP'] for r in rows])} | "
                     f"{mean_std([r['mINP'] for r in rows])} | {len(rows)} | "
                     f"{per_seed(rows)} |")
    return lines + [""]


def switch_table(plan: Plan, seeds: list[int], switches: list[str], unavailable: dict[Run, str]) -> list[str]:
    lines = [f"### Faithful DMDL with one switch off ({SETTINGS[SWITCH_SETTING][2]})", "",
             "| run | turned off | --set | Rank-1 | mAP | Δ mAP | seeds | mAP per seed |",
             "|---|---|---|---|---|---|---|---|"]
    base = [r for s in seeds if (r := read_result(plan, Run(SWITCH_SETTING, SWITCH_VARIANT, s)))]
    base_map = float(np.mean([r["mAP"] for r in base])) if base else None
    lines.append(f"| faithful DMDL | — | — | {mean_std([r['rank1'] for r in base])} | "
                 f"{mean_std([r['mAP'] for r in base])} | 0 | {len(base)} | "
                 f"{per_seed(base)} |")
    for name in switches:
        what, sets = SWITCHES[name]
        runs = [Run(SWITCH_SETTING, SWITCH_VARIANT, s, name) for s in seeds]
        rows = [r for run in runs if (r := read_result(plan, run)) is not None]
        missing = next((unavailable[run] for run in runs if run in unavailable), None)
        delta = (f"{np.mean([r['mAP'] for r in rows]) - base_map:+.1f}" if rows and base_map is not None else "—")
        note = f" (not run here: {missing})" if missing and not rows else ""
        lines.append(f"| {name} | {what}{note} | `{' '.join(sets)}` | {mean_std([r['rank1'] for r in rows])} | "
                     f"{mean_std([r['mAP'] for r in rows])} | {delta} | {len(rows)} | "
                     f"{per_seed(rows)} |")
    return lines + [""]


def per_seed_table(plan: Plan, runs: list[Run]) -> list[str]:
    lines = ["### Every run", "",
             "| setting | run | seed | Rank-1 | mAP | mINP | stage 1 (shared) | stage-1 s | stage-2 s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for run in runs:
        r = read_result(plan, run)
        if r is None:
            continue
        lines.append(f"| {run.setting} | {run.name} | {run.seed} | {r['rank1']:.1f} | {r['mAP']:.1f} | "
                     f"{r['mINP']:.1f} | {r.get('stage1', '?')} | {r.get('stage1_seconds') or '—'} | "
                     f"{r.get('stage2_seconds') or '—'} |")
    return lines + [""]


# --------------------------------------------------------------------------------------------
# the CAI diagnostic (--cai-share)
# --------------------------------------------------------------------------------------------
def cai_share_of_run(plan: Plan, run: Run) -> dict | None:
    """Own-modality share of P(y|do(x)) at the target id on the run's final train features and
    final pseudo labels; the memories are the per-modality centroids of those features (the
    state every stage-2 epoch starts from). Cached in the run folder."""
    from dmdl_cli.data.cache import open_cache
    from dmdl_cli.data.index import read_index
    from dmdl_cli.evaluation.cai_share import own_modality_share
    from dmdl_cli.features.extract import extract_features
    from dmdl_cli.model.cai import modality_prior
    from dmdl_cli.model.loading import resolve_model
    from dmdl_cli.runtime import select_runtime
    from dmdl_cli.workspace import Workspace, load_labels

    folder = plan.run_dir(run)
    cached = folder / "cai-share.json"
    label_files = sorted((folder / "labels").glob("cross-e*.npz"))
    if read_result(plan, run) is None or not label_files:
        return None
    if cached.is_file():
        try:
            return json.loads(cached.read_text())
        except json.JSONDecodeError:  # cut short (by an earlier version's plain write): measure again
            cached.unlink()
    recipe, ws = plan.resolve(run), Workspace(folder)
    index = read_index(ws.index_path)
    cache = open_cache(ws.cache_path(recipe.data.height, recipe.data.width), len(index),
                       recipe.data.height, recipe.data.width)
    rows = index.rows(split="train")
    model = resolve_model(ws, recipe, str(folder / "stage2" / "final.pt")).model
    feats = extract_features(model, cache, rows, select_runtime(recipe), flip=recipe.cluster.flip_average,
                             batch_size=recipe.run.feature_batch)  # (N_train, D)
    labels = load_labels(label_files[-1])[0][rows]
    modality = index.modality[rows].astype(np.int64)
    memories, ids = [], []
    for m in (0, 1):
        sel = (modality == m) & (labels >= 0)
        mids = np.unique(labels[sel])
        cent = np.stack([feats[sel & (labels == y)].mean(0) for y in mids]) if len(mids) else \
            np.zeros((0, feats.shape[1]), np.float32)
        memories.append(cent / np.maximum(np.linalg.norm(cent, axis=1, keepdims=True), 1e-12))
        ids.append(mids)
    prior = modality_prior(labels, modality).numpy()
    out = own_modality_share(feats, memories, ids, prior, labels, modality, temp=recipe.stage2.temp)
    out["label_file"] = label_files[-1].name
    atomic_write_text(cached, json.dumps(out))
    return out


def cai_share_table(plan: Plan, runs: list[Run]) -> list[str]:
    lines = ["### CAI: own-modality share of P(y|do(x)) at the target id", "",
             "Final model's train features and final pseudo labels; memories = per-modality "
             "centroids of those features; 1 = the other modality adds nothing to the target.", "",
             "| setting | run | seed | share | visible | infrared | P(y\\|do(x)) at the target |",
             "|---|---|---|---|---|---|---|"]
    for run in runs:
        if not VARIANTS[run.variant][2]:
            continue
        s = cai_share_of_run(plan, run)
        if s is None:
            continue
        vis, ir = s["share_per_modality"]
        lines.append(f"| {run.setting} | {run.name} | {run.seed} | {s['share']:.3f} | {vis:.3f} | "
                     f"{ir:.3f} | {s['target_prob']:.3f} |")
    return lines + [""]


# --------------------------------------------------------------------------------------------
# the command
# --------------------------------------------------------------------------------------------
def select_runs(args: argparse.Namespace) -> list[Run]:
    runs = [Run(setting, variant, seed) for setting in args.settings for seed in args.seeds
            for variant in args.variants]
    if SWITCH_SETTING in args.settings:
        runs += [Run(SWITCH_SETTING, SWITCH_VARIANT, seed, name) for seed in args.seeds
                 for name in args.switches]
        if args.switches and SWITCH_VARIANT not in args.variants:  # the faithful reference row
            runs += [Run(SWITCH_SETTING, SWITCH_VARIANT, seed) for seed in args.seeds]
    return runs


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--switches", nargs="+", default=["all"],
                        help=f"switch runs on the {SWITCH_SETTING} setting: all, none, or names of {', '.join(SWITCHES)}")
    parser.add_argument("--recipe", default="recipes/demo.yaml")
    parser.add_argument("--workdir", default="runs/ablation")
    parser.add_argument("--out", default="benchmarks/results/ablation.md")
    parser.add_argument("--json", default="benchmarks/results/ablation.json")
    parser.add_argument("--jobs", type=int, default=1, choices=(1, 2), help="runs side by side")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--cai-share", action="store_true", help="add the CAI own-modality share table")
    parser.add_argument("--tables-only", action="store_true",
                        help="train nothing: the tables from the runs that finished (the others show as missing)")
    parser.add_argument("--update-docs", action="store_true",
                        help=f"also write the tables into {DOCS.relative_to(REPO)} and their summary into "
                             "README.md, between their ablation markers")
    parser.add_argument("--set", dest="sets", action="append", default=[],
                        help="recipe override for every run and the source backbone (section.key=value)")
    parser.add_argument("--source", action="append", default=[],
                        help="source-pretraining setting (e.g. epochs=1), see benchmarks/source_pretrain.py")
    args = parser.parse_args(argv)
    args.command = " ".join(["python benchmarks/ablation.py", *(sys.argv[1:] if argv is None else argv)])
    if args.switches == ["all"]:
        args.switches = list(SWITCHES)
    elif args.switches == ["none"]:
        args.switches = []
    unknown = [s for s in args.switches if s not in SWITCHES]
    if unknown:
        parser.error(f"unknown switch {unknown[0]}; choose from all, none, {', '.join(SWITCHES)}")
    return args


def how_trained(args: argparse.Namespace) -> str:
    """The sentence on threads and jobs: those of this command, or with ``--tables-only`` (which
    trains nothing) a pointer to the seconds each run recorded."""
    if args.tables_only:
        return ("Written from the finished runs by `--tables-only`; each run's seconds, as it "
                "was trained, are in the table of every run (`benchmarks/results/ablation.md`).")
    threads = "1 torch thread" if args.threads == 1 else f"{args.threads} torch threads"
    jobs = "1 run at a time" if args.jobs == 1 else f"{args.jobs} runs side by side"
    return f"{threads} per run, {jobs}."


def write_results(plan: Plan, args: argparse.Namespace, runs: list[Run], unavailable: dict[Run, str]) -> None:
    command = args.command
    trials = plan.resolve(Run(args.settings[0], args.variants[0], args.seeds[0])).eval.trials
    lines = ["## Ablation on the synthetic set", "",
             f"All-search (IR query -> visible gallery, single-shot, {trials} trials); recipe `{args.recipe}` "
             "with the overlays of `recipes/ablation/`; mean ± std (population) over the seeds that "
             f"finished. {how_trained(args)}",
             f"Regenerate: `{command}`", ""]
    for setting in args.settings:
        lines += variant_table(plan, setting, args.seeds, args.variants)
    if SWITCH_SETTING in args.settings and args.switches:
        lines += switch_table(plan, args.seeds, args.switches, unavailable)
    if args.cai_share:
        lines += cai_share_table(plan, runs)
    documented = len(lines)  # docs/results.md takes the tables up to here, not every run's row
    lines += per_seed_table(plan, runs)
    out = REPO / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, "\n".join(lines))
    records = [{**dataclasses.asdict(run), "result": read_result(plan, run),
                "unavailable": unavailable.get(run)} for run in runs]
    atomic_write_text(REPO / args.json, json.dumps({"command": command, "runs": records}, indent=1) + "\n")
    if args.update_docs:
        update_docs(DOCS, "\n".join(lines[1:documented]))  # the page has its own heading
        summary = summary_table(plan, args.settings, args.seeds, args.variants)
        if SWITCH_SETTING in args.settings and args.switches:
            summary += [""] + switch_summary(plan, args.seeds, args.switches)
        update_docs(README, "\n".join(summary), README_MARKERS)
    print("\n".join(lines))


def row_turns(variant: str) -> str:
    """What a Table 3 row turns on, in words: CAI and the CBT parts (row 1: only the visible
    channel exchange of the modality-specific views)."""
    _, _, cai, (augment, refine, align) = VARIANTS[variant]
    parts = [name for name, on in (("full views", augment), ("refinement", refine),
                                   ("alignment", align)) if on]
    cbt = ", ".join(parts) if parts else "visible channel exchange only"
    return f"{'CAI' if cai else 'no CAI'}; {cbt}"


def summary_table(plan: Plan, settings: list[str], seeds: list[int], variants: list[str]) -> list[str]:
    """The README's short form: each Table 3 row, its overlay and what it turns on, and its
    all-search mAP (mean ± std over seeds, seeds that finished in brackets when not all) per
    setting."""
    lines = ["| Table 3 row | overlay | turns on | " + " | ".join(SHORT_TITLES[s] for s in settings) + " |",
             "|---|---|---|" + "---|" * len(settings)]
    for variant in variants:
        cells = []
        for setting in settings:
            rows = [r for s in seeds if (r := read_result(plan, Run(setting, variant, s))) is not None]
            short = f" ({len(rows)} of {len(seeds)} seeds)" if rows and len(rows) < len(seeds) else ""
            cells.append(f"{mean_std([r['mAP'] for r in rows])}{short}" if rows else "—")
        lines.append(f"| {VARIANTS[variant][1]} | `{VARIANTS[variant][0]}` | {row_turns(variant)} | "
                     + " | ".join(cells) + " |")
    return lines


def switch_summary(plan: Plan, seeds: list[int], switches: list[str]) -> list[str]:
    """The README's short switch table: faithful DMDL's all-search mAP with one mechanism off."""
    base = [r["mAP"] for s in seeds if (r := read_result(plan, Run(SWITCH_SETTING, SWITCH_VARIANT, s)))]
    lines = [f"| faithful DMDL ({SHORT_TITLES[SWITCH_SETTING]}) without | `--set` | mAP | Δ mAP |",
             "|---|---|---|---|",
             f"| — (all on) | — | {mean_std(base)} | 0 |"]
    for name in switches:
        what, sets = SWITCHES[name]
        rows = [r["mAP"] for s in seeds if (r := read_result(plan, Run(SWITCH_SETTING, SWITCH_VARIANT, s, name)))]
        delta = f"{np.mean(rows) - np.mean(base):+.1f}" if rows and base else "—"
        short = f" ({len(rows)} of {len(seeds)} seeds)" if rows and len(rows) < len(seeds) else ""
        shown = sets[0] + (" ..." if len(sets) > 1 else "")
        lines.append(f"| {what} | `{shown}` | {mean_std(rows)}{short} | {delta} |")
    return lines


DOCS = REPO / "docs" / "results.md"
DOCS_MARKERS = ("<!-- ablation:start -->", "<!-- ablation:end -->")
README = REPO / "README.md"
README_MARKERS = ("<!-- ablation-summary:start -->", "<!-- ablation-summary:end -->")


def update_docs(path: Path, tables: str, markers: tuple[str, str] = DOCS_MARKERS) -> None:
    """Replace what lies between the ``markers`` lines of ``path`` by ``tables``."""
    text = path.read_text()
    start, end = markers
    if text.count(start) != 1 or text.count(end) != 1 or text.index(start) > text.index(end):
        raise SystemExit(f"{path}: needs one '{start}' line before one '{end}' line")
    head, rest = text.split(start)
    _, tail = rest.split(end)
    atomic_write_text(path, f"{head}{start}\n{tables.strip()}\n{end}{tail}")
    say(f"updated {path}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch  # this process extracts features for --cai-share and may train the source backbone

    torch.set_num_threads(args.threads)
    work = (REPO / args.workdir).resolve()
    plan = Plan(work, (REPO / args.recipe).resolve(), args.sets, args.threads,
                work / "source-backbone" / "backbone.pth")
    runs = select_runs(args)
    for data in sorted({run.data for run in runs} | ({"default"} if any(
            SETTINGS[s][1] == "source" for s in args.settings) else set())):
        prepare_data(plan, data)
    if any(SETTINGS[s][1] == "source" for s in args.settings):
        source_backbone(plan, args.source, args.sets)
    tasks, unavailable = plan_tasks(plan, runs)
    for run, why in unavailable.items():
        say(f"not run: {run.setting} seed {run.seed} {run.name}: {why}")
    say(f"{len(tasks)} tasks ({sum(t.after is None for t in tasks)} stage-1 runs), {args.jobs} at a time")
    failed = {} if args.tables_only else run_tasks(tasks, args.jobs)
    write_results(plan, args, runs, unavailable)
    for key, why in failed.items():
        say(f"FAILED {key}: {why}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
