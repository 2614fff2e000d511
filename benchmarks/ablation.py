"""The DMDL ablation on the embedded synthetic set: baseline, +CAI, +CBT, full DMDL, 3 seeds.

    python benchmarks/ablation.py [--seeds 1 2 3] [--workdir runs/ablation] [--out benchmarks/results/ablation.md]

Each variant is the data set recipe (``recipes/demo.yaml``) with one overlay of
``recipes/ablation/``. The variants that share their stage-1 settings share the stage-1 run of a
seed (CAI acts only in stage 2): per seed, stage 1 runs once without CBT (for baseline and
+CAI) and once with CBT (for +CBT and DMDL). Everything is evaluated on SYSU-style
all-search (10 gallery trials); the table gives mean ± std over seeds. Nothing is tuned on the
test split: the recipe is fixed before this script runs. Re-running skips finished runs.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
VARIANTS = (  # name, overlay, stage-1 group (the CBT setting)
    ("baseline", "baseline", "plain"),
    ("+CAI", "cai", "plain"),
    ("+CBT", "cbt", "cbt"),
    ("DMDL (CAI + CBT)", "dmdl", "cbt"),
)
STAGE1_OVERLAY = {"plain": "baseline", "cbt": "cbt"}


def dmdl(*args: str) -> str:
    env = {**os.environ, "DMDL_NO_PROGRESS": "1"}
    proc = subprocess.run([sys.executable, "-m", "dmdl_cli", *args], cwd=REPO, env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"dmdl {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--recipe", default="recipes/demo.yaml")
    parser.add_argument("--workdir", default="runs/ablation")
    parser.add_argument("--out", default="benchmarks/results/ablation.md")
    parser.add_argument("--set", dest="sets", action="append", default=[],
                        help="extra recipe override for every run (section.key=value)")
    args = parser.parse_args()
    work = (REPO / args.workdir).resolve()
    sets = [x for kv in args.sets for x in ("--set", kv)]
    base = work / "data"
    if not (base / "manifest.json").is_file():
        dmdl("prepare-data", "--dataset", "synthetic", "--workspace", str(base), "--recipe",
             str(REPO / args.recipe), *sets)
    results: dict[str, list[dict]] = {name: [] for name, _, _ in VARIANTS}
    timings: dict[str, float] = {}
    for seed in args.seeds:
        for group, overlay in STAGE1_OVERLAY.items():
            s1 = work / f"seed{seed}-{group}-stage1"
            if not (s1 / "stage1" / "final.pt").is_file():
                shutil.rmtree(s1, ignore_errors=True)
                shutil.copytree(base, s1, ignore=shutil.ignore_patterns(".lock"))
                start = time.perf_counter()
                dmdl("pretrain-single", "--workspace", str(s1), "--overlay",
                     str(REPO / "recipes" / "ablation" / f"{overlay}.yaml"), "--set", f"train.seed={seed}", *sets)
                timings[f"stage1 seed {seed} {group}"] = time.perf_counter() - start
        for name, overlay, group in VARIANTS:
            ws = work / f"seed{seed}-{overlay}"
            result = ws / "eval" / "all-search-stage2-final.json"
            if not result.is_file():
                shutil.rmtree(ws, ignore_errors=True)
                shutil.copytree(work / f"seed{seed}-{group}-stage1", ws,
                                ignore=shutil.ignore_patterns(".lock", "features"))
                common = ["--workspace", str(ws), "--overlay",
                          str(REPO / "recipes" / "ablation" / f"{overlay}.yaml"), "--set", f"train.seed={seed}", *sets]
                start = time.perf_counter()
                dmdl("train-cross", *common)
                timings[f"stage2 seed {seed} {overlay}"] = time.perf_counter() - start
                dmdl("evaluate", *common, "--mode", "all-search")
            data = json.loads(result.read_text())
            results[name].append({"seed": seed, **data["mean"]})
            print(f"seed {seed} {name:<18} Rank-1 {100 * data['mean']['cmc'][0]:6.2f}  "
                  f"mAP {100 * data['mean']['mAP']:6.2f}  mINP {100 * data['mean']['mINP']:6.2f}", flush=True)

    lines = [
        "| variant | CAI | CBT | Rank-1 | mAP | mINP | mAP per seed |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, overlay, group in VARIANTS:
        rows = results[name]
        r1 = np.array([100 * r["cmc"][0] for r in rows])
        mp = np.array([100 * r["mAP"] for r in rows])
        mi = np.array([100 * r["mINP"] for r in rows])
        per_seed = ", ".join(f"{v:.1f}" for v in mp)
        lines.append(f"| {name} | {'yes' if overlay in ('cai', 'dmdl') else 'no'} | "
                     f"{'yes' if group == 'cbt' else 'no'} | {r1.mean():.1f} ± {r1.std():.1f} | "
                     f"{mp.mean():.1f} ± {mp.std():.1f} | {mi.mean():.1f} ± {mi.std():.1f} | {per_seed} |")
    header = (f"Synthetic set, all-search (IR query -> visible gallery, single-shot, 10 trials), "
              f"recipe `{args.recipe}`, seeds {' '.join(map(str, args.seeds))}; mean ± std over seeds.\n"
              f"Regenerate: `python benchmarks/ablation.py --seeds {' '.join(map(str, args.seeds))}`"
              + (f" {' '.join('--set ' + s for s in args.sets)}" if args.sets else "") + "\n\n")
    out = REPO / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(header + "\n".join(lines) + "\n")
    print(header + "\n".join(lines))
    if timings:
        print("\nseconds: " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()))


if __name__ == "__main__":
    main()
