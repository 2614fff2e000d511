"""Tests of dmdl_cli.evaluation.metrics against hand-computed cases and a per-query loop."""
from __future__ import annotations

import numpy as np
import pytest

from dmdl_cli.evaluation import metrics
from dmdl_cli.evaluation.metrics import mean_std, rank_metrics


def _cams(n: int) -> np.ndarray:
    return np.ones(n, dtype=np.int64)


def test_ties_broken_by_gallery_order():
    # gallery index:      0    1    2    3    4
    dist = np.array([[0.5, 0.2, 0.2, 0.9, 0.2]])
    g_pids = np.array([7, 3, 7, 7, 5])
    # Stable ranking: g1 (0.2), g2 (0.2), g4 (0.2), g0 (0.5), g3 (0.9)
    # ranked ids:     3,        7,        5,        7,        7      -> positives at 1, 3, 4
    # AP  = (1/2 + 2/4 + 3/5) / 3 = 1.6 / 3 = 0.533333...
    # INP = 3 / 5 = 0.6
    # CMC (plain and dedup, de-duplicated list 3,7,5): first hit at rank index 1
    for dedup in (True, False):
        out = rank_metrics(dist, [7], g_pids, [3], _cams(5), max_rank=4, dedup=dedup)
        np.testing.assert_array_equal(out["cmc"], [0.0, 1.0, 1.0, 1.0])
        assert out["mAP"] == pytest.approx(1.6 / 3)
        assert out["mINP"] == pytest.approx(0.6)
        assert out["num_valid"] == 1
        assert out["cmc"].dtype == np.float64 and out["cmc"].shape == (4,)


def test_tie_at_top_goes_to_lower_gallery_index():
    # g0 (id 9, wrong) and g1 (id 4, right) tie at distance 0: g0 comes first.
    # ranked ids 9, 4, 4 -> positives at 1, 2: AP = (1/2 + 2/3)/2 = 7/12, INP = 2/3, Rank-1 = 0
    out = rank_metrics(np.array([[0.0, 0.0, 1.0]]), [4], [9, 4, 4], [1], _cams(3), max_rank=2)
    np.testing.assert_array_equal(out["cmc"], [0.0, 1.0])
    assert out["mAP"] == pytest.approx(7 / 12)
    assert out["mINP"] == pytest.approx(2 / 3)
    # Swapping the two tied columns puts the true match first: Rank-1 = 1.
    out = rank_metrics(np.array([[0.0, 0.0, 1.0]]), [4], [4, 9, 4], [1], _cams(3), max_rank=2)
    np.testing.assert_array_equal(out["cmc"], [1.0, 1.0])
    # ranked ids 4, 9, 4: AP = (1/1 + 2/3)/2 = 5/6, INP = 2/3
    assert out["mAP"] == pytest.approx(5 / 6)


def test_duplicate_gallery_identities_dedup_vs_plain():
    # ranked ids (distance increasing with gallery index): 2, 2, 2, 1, 3, 1; query id 1
    dist = np.arange(6, dtype=np.float64)[None, :]
    g_pids = np.array([2, 2, 2, 1, 3, 1])
    # plain: first positive at raw position 3            -> CMC [0, 0, 0, 1, 1]
    # dedup: identities in rank order 2, 1, 3 -> 1 at 1  -> CMC [0, 1, 1, 1, 1]
    # AP (never de-duplicated) = (1/4 + 2/6) / 2 = 7/24; INP = 2 / 6 = 1/3
    plain = rank_metrics(dist, [1], g_pids, [3], _cams(6), max_rank=5, dedup=False)
    dedup = rank_metrics(dist, [1], g_pids, [3], _cams(6), max_rank=5, dedup=True)
    np.testing.assert_array_equal(plain["cmc"], [0, 0, 0, 1, 1])
    np.testing.assert_array_equal(dedup["cmc"], [0, 1, 1, 1, 1])
    for out in (plain, dedup):
        assert out["mAP"] == pytest.approx(7 / 24)
        assert out["mINP"] == pytest.approx(1 / 3)


def test_exclusion_mask_and_skipped_queries():
    dist = np.array(
        [
            [0.1, 0.2, 0.3, 0.4],  # q0, id 1
            [0.1, 0.2, 0.3, 0.4],  # q1, id 4 (not in the gallery at all)
            [0.1, 0.2, 0.3, 0.4],  # q2, id 1
            [0.4, 0.1, 0.2, 0.3],  # q3, id 2 (its only match g1 is excluded)
        ]
    )
    q_pids = np.array([1, 4, 1, 2])
    g_pids = np.array([1, 2, 1, 3])
    exclude = np.zeros((4, 4), dtype=bool)
    exclude[0, 0] = True  # q0 ignores g0
    exclude[3, 1] = True  # q3 ignores g1
    # q0: kept list g1(2), g2(1), g3(3) -> positive at kept position 1:
    #     AP = 1/2, INP = 1/2, first hit index 1 (dedup list 2, 1, 3 -> also 1)
    # q1: no match -> skipped;  q3: only match excluded -> skipped
    # q2: list g0(1), g1(2), g2(1), g3(3) -> positives at 0, 2:
    #     AP = (1/1 + 2/3)/2 = 5/6, INP = 2/3, first hit index 0
    # valid = 2: CMC = [1/2, 1, 1], mAP = (1/2 + 5/6)/2 = 2/3, mINP = (1/2 + 2/3)/2 = 7/12
    for dedup in (True, False):
        out = rank_metrics(dist, q_pids, g_pids, _cams(4), _cams(4), max_rank=3,
                           exclude=exclude, dedup=dedup)
        assert out["num_valid"] == 2
        np.testing.assert_allclose(out["cmc"], [0.5, 1.0, 1.0])
        assert out["mAP"] == pytest.approx(2 / 3)
        assert out["mINP"] == pytest.approx(7 / 12)
    # Without the mask: q3 becomes valid (g1 at rank 0: AP = INP = 1) and q0 equals q2.
    # valid = 3: CMC = [1, 1, 1], mAP = (5/6 + 5/6 + 1)/3 = 8/9, mINP = (2/3 + 2/3 + 1)/3 = 7/9
    out = rank_metrics(dist, q_pids, g_pids, _cams(4), _cams(4), max_rank=3)
    assert out["num_valid"] == 3
    np.testing.assert_allclose(out["cmc"], [1.0, 1.0, 1.0])
    assert out["mAP"] == pytest.approx(8 / 9)
    assert out["mINP"] == pytest.approx(7 / 9)


def test_exclusion_shifts_dedup_rank():
    # ranked ids 5, 6, 5, 1 ; query id 1 ; g1 (id 6) excluded
    # kept ids 5, 5, 1 -> plain first hit at kept position 2, dedup list 5, 1 -> index 1
    # AP = 1/3, INP = 1/3
    dist = np.arange(4, dtype=np.float32)[None, :]
    exclude = np.array([[False, True, False, False]])
    plain = rank_metrics(dist, [1], [5, 6, 5, 1], [1], _cams(4), max_rank=3,
                         exclude=exclude, dedup=False)
    dedup = rank_metrics(dist, [1], [5, 6, 5, 1], [1], _cams(4), max_rank=3,
                         exclude=exclude, dedup=True)
    np.testing.assert_array_equal(plain["cmc"], [0, 0, 1])
    np.testing.assert_array_equal(dedup["cmc"], [0, 1, 1])
    assert plain["mAP"] == pytest.approx(1 / 3) and dedup["mINP"] == pytest.approx(1 / 3)


def test_no_valid_query_raises():
    with pytest.raises(ValueError, match="no valid query"):
        rank_metrics(np.zeros((2, 3)), [1, 2], [3, 4, 5], _cams(2), _cams(3))
    # every match excluded
    with pytest.raises(ValueError, match="no valid query"):
        rank_metrics(np.zeros((1, 2)), [1], [1, 2], [1], _cams(2),
                     exclude=np.array([[True, False]]))


def test_shape_checks():
    with pytest.raises(ValueError):
        rank_metrics(np.zeros((2, 3)), [1, 2], [1, 2], _cams(2), _cams(3))
    with pytest.raises(ValueError):
        rank_metrics(np.zeros((2, 3)), [1, 2], [1, 2, 3], _cams(2), _cams(2))
    with pytest.raises(ValueError):
        rank_metrics(np.zeros((2, 3)), [1, 2], [1, 2, 3], _cams(2), _cams(3),
                     exclude=np.zeros((2, 3), dtype=np.int64))


def _loop_reference(dist, q_pids, g_pids, exclude, max_rank, dedup):
    """Straightforward per-query evaluation, written like the SYSU/AGW reference code."""
    num_q, num_g = dist.shape
    cmc_sum = np.zeros(max_rank)
    aps, inps = [], []
    for i in range(num_q):
        order = np.argsort(dist[i], kind="stable")
        keep = np.ones(num_g, bool) if exclude is None else ~exclude[i, order]
        ranked_ids = g_pids[order][keep]
        hits = (ranked_ids == q_pids[i]).astype(np.int64)
        if not hits.any():
            continue
        if dedup:
            _, first_idx = np.unique(ranked_ids, return_index=True)
            unique_ids = ranked_ids[np.sort(first_idx)]
            k0 = int(np.flatnonzero(unique_ids == q_pids[i])[0])
        else:
            k0 = int(np.flatnonzero(hits)[0])
        cmc_sum[k0:] += 1
        cum = hits.cumsum()
        pos = np.flatnonzero(hits)
        aps.append(np.sum(cum[pos] / (pos + 1.0)) / hits.sum())
        inps.append(cum[pos[-1]] / (pos[-1] + 1.0))
    assert aps, "test case without a valid query"
    return cmc_sum / len(aps), float(np.mean(aps)), float(np.mean(inps)), len(aps)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("compare_per_log2", [0.0, 1e9])   # force the sort / compare path
@pytest.mark.parametrize("chunk_cells", [None, 37])
def test_random_against_loop_reference(monkeypatch, dtype, compare_per_log2, chunk_cells):
    monkeypatch.setattr(metrics, "_COMPARE_PER_LOG2", compare_per_log2)
    if chunk_cells is not None:  # force many small chunks (incl. chunks with no valid query)
        monkeypatch.setattr(metrics, "_CHUNK_CELLS", chunk_cells)
    rng = np.random.default_rng(1234)
    for case in range(6):
        num_q, num_g = int(rng.integers(5, 40)), int(rng.integers(3, 30))
        # small integer distances (some negative) -> many ties; few identities -> duplicates
        # in the gallery and queries without any match
        dist = rng.integers(-2, 4, size=(num_q, num_g)).astype(dtype)
        q_pids = rng.integers(0, 8, num_q)
        g_pids = rng.integers(0, 6, num_g)
        exclude = rng.random((num_q, num_g)) < 0.3 if case % 2 else None
        for dedup in (True, False):
            ref = _loop_reference(dist, q_pids, g_pids, exclude, 10, dedup)
            out = rank_metrics(dist, q_pids, g_pids, _cams(num_q), _cams(num_g),
                               max_rank=10, exclude=exclude, dedup=dedup)
            np.testing.assert_allclose(out["cmc"], ref[0], rtol=0, atol=1e-12)
            assert out["mAP"] == pytest.approx(ref[1], abs=1e-12)
            assert out["mINP"] == pytest.approx(ref[2], abs=1e-12)
            assert out["num_valid"] == ref[3]
            assert np.all(np.diff(out["cmc"]) >= 0) and 0 <= out["cmc"][0] <= out["cmc"][-1] <= 1


def test_float32_keys_match_float64_ranking():
    # continuous distances of both signs: float32 key path == stable argsort of the same values
    rng = np.random.default_rng(7)
    dist32 = rng.standard_normal((50, 40)).astype(np.float32)
    dist32[:, ::7] = dist32[:, 1:2]          # plus exact ties
    q_pids, g_pids = rng.integers(0, 5, 50), rng.integers(0, 5, 40)
    for dedup in (True, False):
        a = rank_metrics(dist32, q_pids, g_pids, _cams(50), _cams(40), dedup=dedup)
        b = rank_metrics(dist32.astype(np.float64), q_pids, g_pids, _cams(50), _cams(40),
                         dedup=dedup)
        np.testing.assert_array_equal(a["cmc"], b["cmc"])
        assert a["mAP"] == pytest.approx(b["mAP"], abs=1e-15) and a["mINP"] == b["mINP"]


def test_negative_zero_ties_with_zero():
    # +0.0 == -0.0, so g0 (+0.0, wrong id) and g1 (-0.0, right id) tie and g0 ranks first;
    # g2 (-1.0) is nearest.  Ranked ids: 3 (g2), 8 (g0), 5 (g1)  -> first positive at 2:
    # AP = 1/3, INP = 1/3, plain CMC = [0, 0, 1]
    for dtype in (np.float16, np.float32, np.float64):
        dist = np.array([[0.0, -0.0, -1.0]], dtype=dtype)
        out = rank_metrics(dist, [5], [8, 5, 3], [1], _cams(3), max_rank=3, dedup=False)
        np.testing.assert_array_equal(out["cmc"], [0, 0, 1])
        assert out["mAP"] == pytest.approx(1 / 3)


def test_nan_rejected():
    with pytest.raises(ValueError, match="NaN"):
        rank_metrics(np.array([[0.0, np.nan]]), [1], [1, 2], [1], _cams(2))


def test_mean_std():
    trials = [
        {"cmc": np.array([0.2, 0.6]), "mAP": 0.3, "mINP": 0.1, "num_valid": 5},
        {"cmc": np.array([0.4, 0.8]), "mAP": 0.5, "mINP": 0.3, "num_valid": 5},
    ]
    # means: cmc [0.3, 0.7], mAP 0.4, mINP 0.2 ; population std: 0.1 everywhere
    out = mean_std(trials)
    np.testing.assert_allclose(out["cmc"], [0.3, 0.7])
    np.testing.assert_allclose(out["cmc_std"], [0.1, 0.1])
    assert out["mAP"] == pytest.approx(0.4) and out["mAP_std"] == pytest.approx(0.1)
    assert out["mINP"] == pytest.approx(0.2) and out["mINP_std"] == pytest.approx(0.1)
    assert out["trials"] == 2
    with pytest.raises(ValueError):
        mean_std([])
