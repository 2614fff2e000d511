"""benchmarks/ablation.py: which runs share a stage 1, and the tables it writes (no training)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import load_benchmark

REPO = Path(__file__).resolve().parents[1]




ab = load_benchmark("ablation")


def _plan(tmp_path):
    return ab.Plan(tmp_path, REPO / "recipes" / "demo.yaml", ["stage1.iters=2"], 1,
                   tmp_path / "source" / "backbone.pth")


def test_stage1_is_shared_exactly_when_its_sections_hash_equal(tmp_path):
    plan = _plan(tmp_path)
    args = ab.parse_args(["--settings", "scratch", "source", "--seeds", "1", "2", "--switches", "all"])
    runs = ab.select_runs(args)
    tasks, unavailable = ab.plan_tasks(plan, runs)
    stage1 = [t for t in tasks if t.after is None]
    stage2 = [t for t in tasks if t.after is not None]
    assert len(stage2) + len(unavailable) == len(runs)
    by_run = {t.key: t.after for t in stage2}
    for setting in ("scratch", "source"):
        for seed in (1, 2):
            s1 = {v: by_run[f"{setting}/{seed}/{v}"] for v in ab.VARIANTS}
            # CAI acts in stage 2 only: baseline and +CAI share, +CBT and DMDL share; each CBT
            # part alone (rows 3-5) trains a stage 1 of its own
            assert s1["baseline"] == s1["cai"] != s1["cbt"] == s1["dmdl"]
            assert len({s1[v] for v in ("cai", "cai-augment", "cai-refine", "cai-align", "cbt")}) == 5
    # the initialisation and the seed are part of stage 1
    assert by_run["scratch/1/baseline"] != by_run["source/1/baseline"] != by_run["source/2/baseline"]
    switch_runs = [r for r in runs if r.switch]
    assert len(switch_runs) == 2 * len(ab.SWITCHES)
    for run in unavailable:  # a key this build does not know yet is named, never a crash
        assert run.switch and "unknown recipe key" in unavailable[run]
    assert len(stage1) == len(set(by_run.values())) >= 8


def test_tables_average_the_finished_seeds(tmp_path):
    plan = _plan(tmp_path)
    args = ab.parse_args(["--settings", "scratch", "--variants", "baseline", "dmdl", "--seeds", "1", "2",
                          "--out", str(tmp_path / "a.md"), "--json", str(tmp_path / "a.json")])
    runs = ab.select_runs(args)
    for run, (r1, m) in zip(runs, [(0.30, 0.20), (0.50, 0.40), (0.10, 0.30)]):  # seed 2 dmdl unfinished
        folder = plan.run_dir(run)
        (folder / "eval").mkdir(parents=True)
        (folder / ab.RESULT).write_text(json.dumps({"mean": {"cmc": [r1], "mAP": m, "mINP": m / 2}}))
        (folder / ab.MARKER).write_text(json.dumps({"recipe_hash": plan.recipe_hash(run)}))
    ab.write_results(plan, args, runs, {})
    text = (tmp_path / "a.md").read_text()
    assert ("| 1 baseline (visible channel aug.) | no | no | no | no | 20.0 ± 10.0 | 25.0 ± 5.0 | "
            "12.5 ± 2.5 | 2 | 20.0, 30.0 |") in text
    assert "| 7 DMDL (CAI + CBT) | yes | yes | yes | yes | 50.0 | 40.0 | 20.0 | 1 | 40.0 |" in text
    summary = ab.summary_table(plan, ["scratch"], [1, 2], ["baseline", "dmdl"])
    assert summary[2] == ("| 1 baseline (visible channel aug.) | `baseline` | no CAI; visible channel "
                          "exchange only | 25.0 ± 5.0 |")
    assert summary[3] == ("| 7 DMDL (CAI + CBT) | `dmdl` | CAI; full views, refinement, alignment | "
                          "40.0 (1 of 2 seeds) |")
    records = json.loads((tmp_path / "a.json").read_text())["runs"]
    assert [r["result"] is None for r in records] == [False, False, False, True]
    # a result made with other settings is stale: not reported
    plan.sets = ["stage1.iters=3"]
    assert ab.read_result(plan, runs[0]) is None


def test_switch_summary_gives_each_switch_against_faithful_dmdl(tmp_path):
    plan = _plan(tmp_path)
    done = {ab.Run("source", "dmdl", 1): 0.30, ab.Run("source", "dmdl", 2): 0.40,
            ab.Run("source", "dmdl", 1, "joint-batchnorm"): 0.20}
    for run, m in done.items():
        folder = plan.run_dir(run)
        (folder / "eval").mkdir(parents=True)
        (folder / ab.RESULT).write_text(json.dumps({"mean": {"cmc": [m], "mAP": m, "mINP": m / 2}}))
        (folder / ab.MARKER).write_text(json.dumps({"recipe_hash": plan.recipe_hash(run)}))
    lines = ab.switch_summary(plan, [1, 2], ["joint-batchnorm", "biased-mmd", "dmdl-v1-augment"])
    assert lines[2] == "| — (all on) | — | 35.0 ± 5.0 | 0 |"
    assert lines[3] == ("| BatchNorm per slice of the reference's 4-GPU batch | `train.bn_groups=joint` | "
                        "20.0 (1 of 2 seeds) | -15.0 |")
    assert lines[4].endswith("| — | — |")  # not run: no figure, no delta
    assert "`augment.pipeline=dmdl-v1 ...`" in lines[5]


def test_unknown_switch_is_refused():
    with pytest.raises(SystemExit):
        ab.parse_args(["--switches", "no-such-switch"])


@pytest.mark.parametrize("jobs", [1, 2])
def test_tasks_run_after_their_stage1_and_failures_propagate(jobs):
    order = []

    def ok(key):
        return lambda: order.append(key)

    def boom():
        raise RuntimeError("dmdl pretrain-single failed")

    tasks = [ab.Task("s1-a", ok("s1-a")), ab.Task("a1", ok("a1"), after="s1-a"),
             ab.Task("s1-b", boom), ab.Task("b1", ok("b1"), after="s1-b"),
             ab.Task("a2", ok("a2"), after="s1-a")]
    failed = ab.run_tasks(tasks, jobs)
    assert set(failed) == {"s1-b", "b1"} and "s1-b" in failed["b1"]
    assert sorted(order) == ["a1", "a2", "s1-a"] and order.index("s1-a") < order.index("a1")


def test_update_docs_replaces_only_what_lies_between_the_markers(tmp_path):
    page = tmp_path / "results.md"
    start, end = ab.DOCS_MARKERS
    page.write_text(f"# Results\n\nintro\n{start}\nold table\n{end}\n\nafter\n")
    ab.update_docs(page, "| new | table |\n")
    assert page.read_text() == f"# Results\n\nintro\n{start}\n| new | table |\n{end}\n\nafter\n"
    page.write_text("# Results without markers\n")
    with pytest.raises(SystemExit, match="ablation:start"):
        ab.update_docs(page, "x")


def test_copies_share_the_data_and_stage1_files_and_copy_the_rest(tmp_path):
    src = tmp_path / "src"
    for rel in ("data/cache.u8", "stage1/epoch-001.pt", "labels/stage1-e001.npz", "manifest.json",
                "features/x.npy", "stage2/last.pt"):
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_text(rel)
    ab.copy_workspace(src, tmp_path / "dst")
    same = lambda rel: (src / rel).stat().st_ino == (tmp_path / "dst" / rel).stat().st_ino  # noqa: E731
    assert same("data/cache.u8") and same("stage1/epoch-001.pt")
    assert not same("labels/stage1-e001.npz") and not same("manifest.json")
    assert not (tmp_path / "dst" / "features").exists() and not (tmp_path / "dst" / "stage2").exists()
