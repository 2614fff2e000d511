"""Ranked-list pictures: size and frames of one picture, which queries are drawn, and the
per-query AP they are chosen by (it must agree with the evaluation's mAP)."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from conftest import copy_workspace, invoke
from dmdl_cli.data.index import read_index
from dmdl_cli.evaluation.metrics import query_average_precision, rank_metrics
from dmdl_cli.evaluation.protocols import build_trials
from dmdl_cli.evaluation.visualize import (
    BORDER, CELL_HEIGHT, COLOURS, GAP, PAD, TEXT_WIDTH, TITLE_LINE, Cell, first_match_rank,
    ranked_list_image, spread_queries, worst_queries,
)


def _crop(h: int, w: int, value: int) -> np.ndarray:
    return np.full((h, w, 3), value, dtype=np.uint8)


def test_small_crops_are_upscaled_and_framed_by_hit_or_miss():
    hits = [True, False, True]
    query = Cell(_crop(64, 32, 50), ("query AP 0.50", "id 1 cam 3"), COLOURS["query"])
    gallery = [Cell(_crop(64, 32, 200), (f"#{i + 1} d 0.100", "id 1 cam 1"),
                    COLOURS["hit" if hit else "miss"]) for i, hit in enumerate(hits)]
    picture = ranked_list_image(query, gallery)
    cell_w = TEXT_WIDTH + 2 * BORDER  # a 64x32 crop becomes 128x64, narrower than its caption
    assert picture.width == 4 * cell_w + GAP + 2 * PAD
    assert picture.height > CELL_HEIGHT + 2 * BORDER
    lefts = [0] + [cell_w + GAP + i * (cell_w + PAD) for i in range(3)]
    assert picture.getpixel((lefts[0] + 1, 1)) == COLOURS["query"]
    for left, hit in zip(lefts[1:], hits):
        assert picture.getpixel((left + 1, 1)) == COLOURS["hit" if hit else "miss"]
        # the crop itself sits inside the frame, drawn 128 px high
        centre = left + cell_w // 2
        column = [picture.getpixel((centre, y)) for y in range(picture.height)]
        assert sum(1 for c in column if c == (200, 200, 200)) == CELL_HEIGHT


def test_a_title_moves_the_cells_down():
    cells = [Cell(_crop(64, 32, 200), ("a", "b"), COLOURS["hit"]) for _ in range(3)]
    plain = ranked_list_image(cells[0], cells[1:])
    titled = ranked_list_image(cells[0], cells[1:], title=("data set, protocol", "query 1", "legend"))
    assert titled.height == plain.height + 3 * TITLE_LINE + PAD and titled.width == plain.width
    assert titled.getpixel((1, 3 * TITLE_LINE + PAD + 1)) == COLOURS["hit"]


def test_first_match_rank_counts_the_kept_gallery_in_distance_order():
    from dmdl_cli.data.index import IndexTable
    from dmdl_cli.evaluation.protocols import Trial

    # query row 0 (id 7); gallery rows 1..4 with ids 3, 7, 5, 7; row 2 is excluded for the query
    test = IndexTable(paths=["q", "a", "b", "c", "d"], pids=[7, 3, 7, 5, 7], cams=[3, 1, 1, 2, 2],
                      modality=[1, 0, 0, 0, 0], split=["test"] * 5)
    dist = np.array([[0.1, 0.2, 0.3, 0.4]])  # (Q=1, G=4): gallery order a, b, c, d
    keep_all = Trial(query=np.array([0]), gallery=np.array([1, 2, 3, 4]), exclude=None,
                     dedup=False, seed=None)
    assert first_match_rank(test, keep_all, dist, 0) == 2
    excluded = Trial(query=np.array([0]), gallery=np.array([1, 2, 3, 4]),
                     exclude=np.array([[False, True, False, False]]), dedup=False, seed=None)
    assert first_match_rank(test, excluded, dist, 0) == 3  # b is not shown: d comes third
    none = Trial(query=np.array([0]), gallery=np.array([1, 3]), exclude=None, dedup=False,
                 seed=None)
    assert first_match_rank(test, none, dist[:, :2], 0) is None


def test_large_crops_keep_their_size():
    cells = [Cell(_crop(288, 144, 90), ("a", "b"), COLOURS["hit"]) for _ in range(11)]
    picture = ranked_list_image(cells[0], cells[1:])
    assert picture.width == 11 * (144 + 2 * BORDER) + GAP + 9 * PAD
    assert 288 + 2 * BORDER < picture.height < 288 + 2 * BORDER + 60


def test_worst_queries_are_the_lowest_ap_ones_worst_first():
    # 4 queries, gallery ids [0, 1, 2, 3]; query i has identity i and finds it at rank i + 1,
    # except query 3 whose identity is absent (not valid: never drawn as a failure)
    g_pids = np.array([0, 1, 2, 9])
    q_pids = np.array([0, 1, 2, 3])
    dist = np.ones((4, 4), dtype=np.float32)
    for q in range(4):
        dist[q, q] = 0.1 * (q + 1)  # the own-id entry moves down the list with q
        others = [g for g in range(4) if g != q]
        for r, g in enumerate(others):
            dist[q, g] = 0.2 + 0.1 * r if r < q else 0.9 + r
    ap = query_average_precision(dist, q_pids, g_pids)
    assert ap[:3] == pytest.approx([1.0, 1 / 2, 1 / 3]) and np.isnan(ap[3])
    assert worst_queries(ap, 2).tolist() == [2, 1]
    assert worst_queries(ap, 10).tolist() == [2, 1, 0]


def test_spread_queries_cover_the_list_without_repeats():
    assert spread_queries(100, 3).tolist() == [0, 50, 99]
    assert spread_queries(2, 5).tolist() == [0, 1]
    assert spread_queries(10, 0).tolist() == []


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_per_query_ap_averages_to_the_evaluation_map(dtype):
    rng = np.random.default_rng(0)
    q_pids, g_pids = rng.integers(0, 12, 40), rng.integers(0, 15, 90)
    dist = rng.integers(0, 20, (40, 90)).astype(dtype)  # many ties: stable order matters
    exclude = rng.random((40, 90)) < 0.2
    ap = query_average_precision(dist, q_pids, g_pids, exclude)
    expected = rank_metrics(dist, q_pids, g_pids, np.zeros(40), np.zeros(90), exclude=exclude)
    assert np.nanmean(ap) == pytest.approx(expected["mAP"], abs=1e-12)
    assert int((~np.isnan(ap)).sum()) == expected["num_valid"]


def test_evaluate_draws_spread_and_worst_queries(tiny_workspace, tmp_path):
    ws = copy_workspace(tiny_workspace, tmp_path)
    result = invoke(["evaluate", "-w", ws, "--mode", "all-search", "--checkpoint", "imagenet",
                     "--trials", "1", "--visualize", "2", "--visualize-worst", "3"])
    assert result.exit_code == 0, result.output
    ranks = ws / "eval" / "ranks"
    spread = sorted(ranks.glob("all-search-random-init-query*.png"))
    worst = sorted(ranks.glob("all-search-random-init-worst*.png"))
    assert len(spread) == 2
    # the worst three are the three lowest-AP queries of the first trial, worst first
    test = read_index(ws / "data" / "index.csv")
    test = test.select(test.rows(split="test"))
    trial = build_trials("synthetic", "all-search", pids=test.pids, cams=test.cams,
                         modality=test.modality, trials=1, shots=1)[0]
    with np.load(next((ws / "features").glob("*-test-64x32.npz"))) as cached:
        feats = cached["features"]
    dist = 2.0 - 2.0 * (feats[trial.query] @ feats[trial.gallery].T)
    ap = query_average_precision(dist, test.pids[trial.query], test.pids[trial.gallery],
                                 trial.exclude)
    lowest = trial.query[np.argsort(ap, kind="stable")[:3]]
    # readable names: the kind and order of the picture, the query's identity and camera
    assert [p.name for p in worst] == [
        f"all-search-random-init-worst0{n}-id{test.pids[q]}-cam{test.cams[q]}.png"
        for n, q in zip((1, 2, 3), lowest)]
    assert [p.name.split("-id")[0] for p in spread] == [
        "all-search-random-init-query01", "all-search-random-init-query02"]
    for path in spread + worst:
        with Image.open(path) as img:
            assert img.height > CELL_HEIGHT + 3 * TITLE_LINE and img.width > 11 * 64
    assert f"wrote 5 ranked lists (first trial) to {ranks.resolve()}" in result.output
