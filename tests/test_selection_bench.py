"""benchmarks/selection.py: correlations, regrets and bootstrap intervals on constructed numbers,
and the tables from a fake workspace of criteria and test files (nothing is trained)."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy.stats import kendalltau, rankdata, spearmanr

from conftest import load_benchmark
from dmdl_cli.recipe import SelectRecipe

sel = load_benchmark("selection")


def test_identical_curves_correlate_fully_raw_partial_and_on_differences():
    y = [1.0, 3.0, 2.0, 5.0, 4.0, 6.0]
    out = sel.epoch_correlations(y, y, list(range(6)))
    assert all(v == pytest.approx(1.0) for v in out.values()), out
    # a cost (lower is better) that falls as mAP rises is a good cost: signed +
    cost = sel.epoch_correlations([-v for v in y], y, list(range(6)), direction=-1)
    assert cost["spearman"] == pytest.approx(1.0) and cost["diff_kendall"] == pytest.approx(1.0)


def test_first_differences_by_hand():
    out = sel.epoch_correlations([0, 1, 3, 6], [0, 2, 3, 7], [1, 2, 3, 4])
    # differences (1, 2, 3) and (2, 1, 4): Spearman 0.5, Kendall 1/3
    assert out["diff_spearman"] == pytest.approx(0.5)
    assert out["diff_kendall"] == pytest.approx(1 / 3)


def test_a_criterion_that_only_follows_the_epoch_has_no_partial_correlation():
    epochs = list(range(8))
    test_map = [10, 20, 18, 30, 27, 35, 33, 36]  # rising, with wiggles
    trend = sel.epoch_correlations(epochs, test_map, epochs)
    assert trend["spearman"] > 0.9  # raw: it looks excellent
    assert math.isnan(trend["partial_spearman"]) and math.isnan(trend["partial_kendall"])


def test_partial_spearman_is_the_correlation_of_rank_residuals():
    rng = np.random.default_rng(0)
    t = np.arange(12)
    x = t + 3 * rng.standard_normal(12)
    y = t + 3 * rng.standard_normal(12) + 0.5 * x
    out = sel.epoch_correlations(list(x), list(y), list(t))
    rx, ry, rt = rankdata(x), rankdata(y), rankdata(t)

    def residual(a):
        slope, icpt = np.polyfit(rt, a, 1)
        return a - (slope * rt + icpt)

    want = np.corrcoef(residual(rx), residual(ry))[0, 1]
    assert out["partial_spearman"] == pytest.approx(want)
    assert out["spearman"] == pytest.approx(spearmanr(x, y)[0])
    assert out["kendall"] == pytest.approx(kendalltau(x, y)[0])
    late = t >= np.median(t)
    assert out["late_spearman"] == pytest.approx(spearmanr(x[late], y[late])[0])


def test_undefined_values_are_left_out_and_short_series_give_nan():
    out = sel.epoch_correlations([None, 1, 2, 3, float("nan")], [5, 1, 2, 3, 9], [0, 1, 2, 3, 4])
    assert out["spearman"] == pytest.approx(1.0)
    assert math.isnan(out["diff_spearman"])  # two differences only
    assert all(math.isnan(v) for v in sel.epoch_correlations([1, 2], [1, 2], [0, 1]).values())


def test_bootstrap_mean():
    mean, lo, hi, n = sel.bootstrap_mean([2.0, 2.0, 2.0])
    assert (mean, lo, hi, n) == (2.0, 2.0, 2.0, 3)
    values = [0.0, 1.0, 2.0, 3.0, 10.0]
    mean, lo, hi, n = sel.bootstrap_mean(values + [float("nan"), None])
    assert mean == pytest.approx(3.2) and n == 5 and lo < mean < hi
    assert lo >= 0.0 and hi <= 10.0
    assert sel.bootstrap_mean(values) == sel.bootstrap_mean(values)  # seeded
    assert math.isnan(sel.bootstrap_mean([])[0])


def _curve(seed, robustness, test_map, shares=None, setting="scratch", stage="stage2"):
    shares = shares or [0.1] * len(robustness)
    records = [{"kind": "criteria", "epoch": e, "eps_robustness": r, "label_ari": None if e == 0 else r,
                "largest_share": s} for e, (r, s) in enumerate(zip(robustness, shares))]
    return sel.Curve(setting, seed, stage, None, records, dict(enumerate(test_map)))


def test_rule_outcome_regrets_by_hand():
    curve = _curve(1, [0.9, 0.5, 0.8, 0.6, 0.7], [10.0, 20.0, 35.0, 30.0, 32.0])
    rules = sel.rules_of(SelectRecipe())
    by_rob = sel.rule_outcome(curve, rules["eps_robustness"])  # warm-up 1: epoch 0 excluded
    assert (by_rob["epoch"], by_rob["regret_best"], by_rob["gain_last"]) == (2, 0.0, 3.0)
    last = sel.rule_outcome(curve, rules["last"])
    assert (last["epoch"], last["regret_best"], last["gain_last"]) == (4, 3.0, 0.0)
    # the guard sends the rule elsewhere: epoch 2 holds a giant cluster
    guarded = _curve(1, [0.9, 0.5, 0.8, 0.6, 0.7], [10.0, 20.0, 35.0, 30.0, 32.0],
                     shares=[0.1, 0.1, 0.9, 0.1, 0.1])
    out = sel.rule_outcome(guarded, rules["eps_robustness"])
    assert (out["epoch"], out["regret_best"], out["gain_last"]) == (4, 3.0, 0.0)


def test_tables_over_seeds():
    curves = [_curve(1, [0.9, 0.5, 0.8, 0.6, 0.7], [10, 20, 35, 30, 32]),
              _curve(2, [0.9, 0.4, 0.6, 0.9, 0.5], [10, 22, 28, 33, 31]),
              _curve(3, [0.9, 0.3, 0.5, 0.6, 0.7], [11, 21, 24, 26, 30])]
    regret = {r["rule"]: r for r in sel.regret_table(curves, SelectRecipe(), rounds=500)}
    rob = regret["eps_robustness"]
    assert rob["epochs"] == [2, 3, 4]
    assert rob["regret_best"]["mean"] == pytest.approx(0.0)
    assert rob["gain_last"]["mean"] == pytest.approx((3 + 2 + 0) / 3)
    assert rob["gain_last"]["low"] <= rob["gain_last"]["mean"] <= rob["gain_last"]["high"]
    assert regret["last"]["regret_best"]["mean"] == pytest.approx((3 + 2 + 0) / 3)
    assert rob["fell_back"] == 0 and regret["pairs_kept"]["fell_back"] == 3  # no such criterion
    corr = sel.correlation_table(curves, rounds=500)
    row = next(r for r in corr if r["criterion"] == "eps_robustness" and r["measure"] == "spearman")
    per_run = [spearmanr(rob[1:], maps[1:])[0] for rob, maps in (  # trained epochs only
        ([0.9, 0.5, 0.8, 0.6, 0.7], [10, 20, 35, 30, 32]), ([0.9, 0.4, 0.6, 0.9, 0.5], [10, 22, 28, 33, 31]),
        ([0.9, 0.3, 0.5, 0.6, 0.7], [11, 21, 24, 26, 30]))]
    assert row["mean"] == pytest.approx(np.mean(per_run)) and row["runs"] == 3
    ari = next(r for r in corr if r["criterion"] == "label_ari" and r["measure"] == "spearman")
    assert ari["runs"] == 3
    # a criterion absent from every record: no run, no number
    assert next(r for r in corr if r["criterion"] == "mutual_nn")["runs"] == 0


def test_analysis_of_a_fake_workspace(tmp_path, capsys):
    """The command on files as the driver writes them, without training anything."""
    work = tmp_path / "work"
    rng = np.random.default_rng(0)
    for seed in (1, 2):
        folder = work / "scratch" / f"seed{seed}-dmdl" / "selection"
        folder.mkdir(parents=True)
        for stage in ("stage1", "stage2"):
            maps = np.cumsum(rng.uniform(0, 5, 5))
            records = [{"kind": "criteria", "epoch": e, "step": 0, "largest_share": 0.1,
                        **{name: float(rng.uniform()) for name in sel.DIRECTIONS}} for e in range(5)]
            (folder / f"criteria-{stage}.jsonl").write_text(
                "".join(json.dumps(r) + "\n" for r in records))
            (folder / f"test-{stage}.json").write_text(json.dumps(
                {"epochs": {str(e): {"mAP": float(m)} for e, m in enumerate(maps)}}))
    out, js = tmp_path / "out.md", tmp_path / "out.json"
    code = sel.main(["--analyse-only", "--settings", "scratch", "--seeds", "1", "2", "--workdir",
                     str(work), "--out", str(out), "--json", str(js), "--rounds", "200"])
    assert code == 0
    text = out.read_text()
    assert "scratch (development), stage1" in text and "scratch (development), stage2" in text
    assert "| eps_robustness | 2 |" in text and "| last | 4, 4 |" in text and "| 2 | 0 |" in text
    saved = json.loads(js.read_text())
    assert {r["rule"] for r in saved["regrets"]} == {"last", *sel.DIRECTIONS}
    assert text.strip() in capsys.readouterr().out
    # a workspace without files: said so, non-zero
    assert sel.main(["--analyse-only", "--settings", "source", "--seeds", "1", "--workdir",
                     str(work), "--out", str(out), "--json", str(js)]) == 1
