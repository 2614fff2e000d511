"""eps robustness and the eps sweep (dmdl_cli/clustering/eps.py), and `dmdl cluster --eps-sweep`."""
from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import assert_refused, clustered_features, copy_workspace, load_benchmark
from dmdl_cli.clustering.eps import (
    EpsGrid,
    SweepRow,
    eps_sweep,
    jaccard_graph,
    labels_at,
    parse_eps_grid,
    pick_eps,
    relabel_around,
    sweep_reach,
)
from dmdl_cli.clustering.pseudo_labels import cluster_features
from dmdl_cli.errors import DmdlError
from dmdl_cli.recipe import ClusterRecipe

CFG = ClusterRecipe(k1=10, k2=4, eps=0.6, min_samples=4)
planted = load_benchmark("eps_rule_bench").planted


def test_a_graph_reaching_further_gives_the_labelling_s_labels():
    x, _ = clustered_features(400, n_ids=20, sigma=0.8, seed=1)
    graph = jaccard_graph(x, CFG, reach=0.8)
    assert graph.reach == 0.8 and graph.size == 400
    for eps in (0.5, 0.6, 0.7):
        want = cluster_features(x, k1=CFG.k1, k2=CFG.k2, eps=eps, min_samples=CFG.min_samples)
        assert np.array_equal(labels_at(graph, eps, CFG.min_samples), want), eps
    tighter, looser = relabel_around(graph, 0.6, 0.05, CFG.min_samples)
    assert np.array_equal(tighter, labels_at(graph, 0.55, CFG.min_samples))
    assert np.array_equal(looser, cluster_features(x, k1=10, k2=4, eps=0.65, min_samples=4))
    with pytest.raises(ValueError, match="reach"):
        labels_at(graph, 0.85, 4)
    with pytest.raises(DmdlError, match="reach must be in"):
        jaccard_graph(x, CFG, reach=1.0)


def test_the_training_s_labelling_with_margins_keeps_its_labels(capsys):
    """cluster_modalities with a margin (the training's, for the criteria) labels exactly as
    without, and adds the labels at eps -+ margin of the same graph."""
    from dmdl_cli.clustering.modalities import cluster_modalities, criteria_labels

    x, _ = clustered_features(300, n_ids=15, sigma=0.8, seed=2)
    modality = np.arange(300) % 2
    rows = np.arange(300) + 1000
    plain = cluster_modalities(CFG, x, rows, modality, k1={1: 6})
    margins = cluster_modalities(CFG, x, rows, modality, k1={1: 6}, margin=0.05)
    for m in (0, 1):
        a, b = plain[m], margins[m]
        assert np.array_equal(a.labels, b.labels) and np.array_equal(a.rows, b.rows)
        assert np.array_equal(a.centroids, b.centroids) and a.tighter is None
        graph = jaccard_graph(x[modality == m], CFG, reach=0.65, k1=6 if m else CFG.k1)
        tighter, looser = relabel_around(graph, 0.6, 0.05, CFG.min_samples)
        assert np.array_equal(b.tighter, tighter) and np.array_equal(b.looser, looser)
    labelled = criteria_labels(margins, {0: np.zeros(150, np.int64), 1: np.ones(150, np.int64)})
    assert labelled.modalities[1].looser is margins[1].looser
    assert labelled.modalities[1].unified.tolist() == [1] * 150
    # eps -+ margin outside (0, 1): the labels still, no re-runs, and a warning
    wide = cluster_modalities(CFG, x, rows, modality, margin=0.5)
    assert np.array_equal(wide[0].labels, plain[0].labels) and wide[0].looser is None
    assert "eps robustness is not computed" in capsys.readouterr().out


def test_parse_eps_grid():
    grid = parse_eps_grid("0.4:0.7:0.05")
    assert grid == EpsGrid((0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7), 0.05)
    assert parse_eps_grid(" 0.5:0.5:0.1 ") == EpsGrid((0.5,), 0.1)
    assert parse_eps_grid("0.3:0.8:0.1").values[-1] == 0.8  # 0.3 + 5 * 0.1, rounded
    assert sweep_reach(grid) == 0.75
    for text, words in (("0.4:0.7", "START:STOP:STEP"), ("a:0.7:0.1", "must be numbers"),
                        ("0.4:0.7:0", "STEP must be > 0"), ("0.4:0.7:-0.1", "STEP must be > 0"),
                        ("0.7:0.4:0.05", "START <= STOP"), ("0.05:0.5:0.05", "START - STEP > 0"),
                        ("0.4:0.98:0.05", "STOP + STEP < 1"), ("0.4:0.7:nan", "finite"),
                        ("0.1:0.8:0.0001", "more than")):
        with pytest.raises(DmdlError, match="--eps-sweep") as err:
            parse_eps_grid(text)
        assert words in str(err.value) and "\n" not in str(err.value), text


def _rows(scores, shares=None):
    shares = shares or [0.1] * len(scores)
    return [SweepRow(round(0.1 * (i + 1), 9), 0, 5, 0, s, r, 1.0, 1.0)
            for i, (r, s) in enumerate(zip(scores, shares))]


def test_pick_eps_takes_the_first_peak_above_the_floor():
    # a bump at 0.2 below half the best is no peak; 0.5 is the first real peak (not 0.8, higher)
    picked, reason, scores = pick_eps(_rows([0.1, 0.2, 0.15, 0.6, 0.9, 0.7, 0.8, 1.0]))
    assert picked == 0.5 and "first peak" in reason and scores[0.8] == 1.0
    assert pick_eps(_rows([0.1, 0.2, 0.15, 0.6, 0.9, 0.7]), min_peak=0.1)[0] == 0.2
    # a flat peak: its middle (lower middle of an even run)
    assert pick_eps(_rows([0.2, 0.9, 0.9, 0.9, 0.5]))[0] == 0.3
    assert pick_eps(_rows([0.2, 0.9, 0.9, 0.9, 0.9, 0.5]))[0] == 0.3
    # rising to the end: the last eps; falling from the start: the first
    assert pick_eps(_rows([0.1, 0.5, 0.9]))[0] == 0.3
    assert pick_eps(_rows([0.9, 0.5, 0.1]))[0] == 0.1
    # the collapse guard removes an eps before peaks are looked for
    assert pick_eps(_rows([0.2, 0.9, 1.0], [0.1, 0.2, 0.9]))[0] == 0.2
    none, why, _ = pick_eps(_rows([0.5, 0.9], [0.8, 0.9]))
    assert none is None and "largest cluster" in why


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("family, spread, sigma", [(4, 0.6, 0.5), (3, 0.5, 0.5), (1, 1.0, 0.4)])
def test_the_sweep_finds_the_planted_eps_region(seed, family, spread, sigma):
    """People in families of look-alikes: small eps splits people, large eps merges families
    (stable too); the rule must land where the labels recover the people (ARI within 15 % of
    the grid's best: benchmarks/eps_rule_bench.py finds >= 0.89 on 108 other configurations),
    without reading them."""
    x, ids = planted(36, 20, 32, sigma, family, spread, seed)
    grid = parse_eps_grid("0.1:0.9:0.05")
    graph = jaccard_graph(x, CFG, reach=sweep_reach(grid))
    result = eps_sweep({0: graph}, grid, min_samples=CFG.min_samples, true_ids={0: ids})
    ari = {row.eps: row.ari for row in result.rows}
    assert result.picked is not None
    assert ari[result.picked] >= 0.85 * max(ari.values()), (result.picked, result.reason, ari)
    if family > 1:  # families merge beyond the pick
        assert ari[0.9] < ari[result.picked]
    # the rule never reads the identities
    blind = eps_sweep({0: graph}, grid, min_samples=CFG.min_samples)
    assert blind.picked == result.picked and blind.scores == result.scores
    assert all(row.ari is None for row in blind.rows)


def test_the_sweep_scores_modalities_equally_and_checks_the_reach():
    x, _ = planted(24, 20, 32, 0.5, 3, 0.5, 0)
    y, _ = planted(24, 10, 32, 0.5, 1, 1.0, 1)
    grid = parse_eps_grid("0.4:0.6:0.1")
    graphs = {0: jaccard_graph(x, CFG, reach=0.7), 1: jaccard_graph(y, CFG, reach=0.7)}
    result = eps_sweep(graphs, grid, min_samples=4)
    assert [(r.eps, r.modality) for r in result.rows] == [(e, m) for e in grid.values for m in (0, 1)]
    for eps in grid.values:
        pair = [r.eps_robustness for r in result.rows if r.eps == eps]
        assert result.scores[eps] == pytest.approx(np.mean(pair))
    json.dumps(result.to_dict(), allow_nan=False)
    with pytest.raises(ValueError, match="reaches"):
        eps_sweep({0: jaccard_graph(x, CFG, reach=0.65)}, grid, min_samples=4)


def test_cluster_eps_sweep_through_the_cli(tiny_workspace, tmp_path, run_cli):
    ws = copy_workspace(tiny_workspace, tmp_path)
    result = run_cli(["cluster", "--workspace", ws, "--checkpoint", "imagenet",
                      "--eps-sweep", "0.35:0.65:0.1"])
    assert result.exit_code == 0, result.output
    record = json.loads((ws / "labels" / "eps-sweep-random-init.json").read_text())
    assert record["grid"] == [0.35, 0.45, 0.55, 0.65] and record["step"] == 0.1
    assert len(record["rows"]) == 8 and record["picked"] in record["grid"]
    assert all(row["ari"] is not None for row in record["rows"])  # the synthetic set has ids
    assert f"picked eps {record['picked']:g}" in result.output and "ARI*" in result.output
    assert not list((ws / "labels").glob("cluster-*.npz"))  # a sweep labels nothing
    manifest = json.loads((ws / "manifest.json").read_text())
    assert any(str(o.get("path", o)).endswith("eps-sweep-random-init.json")
               for run in manifest["runs"] for o in run.get("outputs", []))
    # a bad grid: one line, nothing written
    for text in ("0.4:0.7", "0.5:0.99:0.05"):
        before = sorted(p.name for p in (ws / "labels").iterdir())
        assert_refused(run_cli(["cluster", "--workspace", ws, "--eps-sweep", text]), "--eps-sweep")
        assert sorted(p.name for p in (ws / "labels").iterdir()) == before
