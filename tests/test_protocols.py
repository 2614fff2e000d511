"""Tests of dmdl_cli.evaluation.protocols on small synthetic test splits."""
from __future__ import annotations

import numpy as np
import pytest

from dmdl_cli.errors import DmdlError
from dmdl_cli.evaluation.metrics import rank_metrics
from dmdl_cli.evaluation.protocols import (
    Trial,
    build_trials,
    camera_exclusion,
    protocol_modes,
    sample_gallery,
)

SYSU_EXCLUDED = ((3, 2),)  # a camera-3 query never meets a camera-2 image


def _sysu_like(seed: int = 0):
    """Test rows of a small SYSU-like split: 8 ids, visible cams 1,2,4,5 and IR cams 3,6.

    Each (id, cam) pair gets 0..12 images (0 = the identity is missing from that camera).
    Rows are shuffled so that row order carries no structure.
    """
    rng = np.random.default_rng(seed)
    pids, cams, mods = [], [], []
    for pid in range(100, 108):
        for cam, mod in ((1, 0), (2, 0), (3, 1), (4, 0), (5, 0), (6, 1)):
            n = int(rng.integers(0, 13)) if cam not in (1, 3) else int(rng.integers(1, 13))
            pids += [pid] * n
            cams += [cam] * n
            mods += [mod] * n
    perm = rng.permutation(len(pids))
    return (np.array(pids, np.int64)[perm], np.array(cams, np.int64)[perm],
            np.array(mods, np.int64)[perm])


def _pairs(pids, cams, rows):
    return sorted(set(zip(pids[rows].tolist(), cams[rows].tolist())))


def test_protocol_table():
    assert protocol_modes("sysu") == ("all-search", "indoor-search")
    assert protocol_modes("synthetic") == ("all-search", "indoor-search")
    assert protocol_modes("regdb") == ("visible-to-infrared", "infrared-to-visible")
    assert protocol_modes("llcm") == ("visible-to-infrared", "infrared-to-visible")


def test_invalid_mode_and_dataset_raise():
    pids, cams, mods = _sysu_like()
    with pytest.raises(DmdlError) as err:
        build_trials("sysu", "visible-to-infrared", pids=pids, cams=cams, modality=mods)
    assert "all-search" in str(err.value) and "indoor-search" in str(err.value)
    with pytest.raises(DmdlError) as err:
        build_trials("regdb", "all-search", pids=pids, cams=cams, modality=mods)
    assert "visible-to-infrared" in str(err.value) and "infrared-to-visible" in str(err.value)
    with pytest.raises(DmdlError) as err:
        build_trials("market", "all-search", pids=pids, cams=cams, modality=mods)
    assert "sysu" in str(err.value) and "llcm" in str(err.value)
    with pytest.raises(DmdlError):
        protocol_modes("market")


@pytest.mark.parametrize("dataset", ["sysu", "synthetic"])
def test_sysu_single_shot(dataset):
    pids, cams, mods = _sysu_like()
    trials = build_trials(dataset, "all-search", pids=pids, cams=cams, modality=mods, trials=4)
    assert [t.seed for t in trials] == [0, 1, 2, 3]
    ir = np.flatnonzero(mods == 1)
    cand = np.flatnonzero(mods == 0)
    for t in trials:
        assert isinstance(t, Trial) and t.dedup is True
        assert t.query.dtype == np.int64 and t.gallery.dtype == np.int64
        np.testing.assert_array_equal(t.query, ir)                  # all IR rows, cams 3 and 6
        assert set(cams[t.query].tolist()) == {3, 6}
        g = t.gallery
        assert set(cams[g].tolist()) <= {1, 2, 4, 5} and np.all(mods[g] == 0)
        # exactly one image per (identity, camera) pair present among the candidates
        assert len(g) == len(_pairs(pids, cams, cand)) == len(set(g.tolist()))
        assert _pairs(pids, cams, g) == _pairs(pids, cams, cand)
        # ordered by (identity, camera)
        key = pids[g] * 10 + cams[g]
        assert np.all(np.diff(key) > 0)
        # exclusion: cam-3 query vs cam-2 gallery, regardless of identity
        expected = (cams[t.query][:, None] == 3) & (cams[g][None, :] == 2)
        np.testing.assert_array_equal(t.exclude, expected)
        assert t.exclude.any() and not t.exclude.all()


def test_sysu_deterministic_and_seeds_differ():
    pids, cams, mods = _sysu_like()
    a = build_trials("sysu", "all-search", pids=pids, cams=cams, modality=mods, trials=3)
    b = build_trials("sysu", "all-search", pids=pids, cams=cams, modality=mods, trials=3)
    for ta, tb in zip(a, b):
        np.testing.assert_array_equal(ta.gallery, tb.gallery)
        np.testing.assert_array_equal(ta.exclude, tb.exclude)
    assert not np.array_equal(a[0].gallery, a[1].gallery)
    assert not np.array_equal(a[1].gallery, a[2].gallery)
    # trial t is a pure function of seed t (independent of how many trials are built)
    single = build_trials("sysu", "all-search", pids=pids, cams=cams, modality=mods, trials=1)
    np.testing.assert_array_equal(single[0].gallery, a[0].gallery)


def test_sysu_indoor_and_multi_shot():
    pids, cams, mods = _sysu_like()
    indoor = build_trials("sysu", "indoor-search", pids=pids, cams=cams, modality=mods,
                          trials=2)
    cand = np.flatnonzero((mods == 0) & np.isin(cams, (1, 2)))
    for t in indoor:
        assert set(cams[t.gallery].tolist()) == {1, 2}
        assert _pairs(pids, cams, t.gallery) == _pairs(pids, cams, cand)
        np.testing.assert_array_equal(t.exclude, camera_exclusion(cams[t.query], cams[t.gallery], SYSU_EXCLUDED))

    multi = build_trials("sysu", "all-search", pids=pids, cams=cams, modality=mods, trials=2,
                         shots=10)
    for t in multi:
        g = t.gallery
        assert len(set(g.tolist())) == len(g)                      # without replacement
        for pid, cam in _pairs(pids, cams, np.flatnonzero(mods == 0)):
            available = int(np.sum((pids == pid) & (cams == cam)))
            taken = int(np.sum((pids[g] == pid) & (cams[g] == cam)))
            assert taken == min(10, available)
    assert not np.array_equal(multi[0].gallery, multi[1].gallery)


def test_sysu_exclusion_values():
    # q cams 3, 6, 3 ; g cams 2, 1, 2, 5
    out = camera_exclusion(np.array([3, 6, 3]), np.array([2, 1, 2, 5]), SYSU_EXCLUDED)
    np.testing.assert_array_equal(out, [[1, 0, 1, 0], [0, 0, 0, 0], [1, 0, 1, 0]])
    assert out.dtype == np.bool_


def test_sample_gallery_uniform_within_group():
    # one group of 4 rows, 1 shot: over 400 seeds every row is picked (roughly uniformly)
    pids = np.array([5, 5, 5, 5])
    cams = np.array([1, 1, 1, 1])
    picks = [int(sample_gallery(np.arange(4), pids, cams, shots=1,
                                rng=np.random.default_rng(s))[0]) for s in range(400)]
    counts = np.bincount(picks, minlength=4)
    assert counts.min() > 60 and counts.sum() == 400


def _regdb_like():
    # 5 ids x 3 visible + 3 thermal images, RegDB-style (one camera per modality)
    pids = np.repeat(np.arange(5), 6)
    mods = np.tile([0, 0, 0, 1, 1, 1], 5)
    cams = np.where(mods == 0, 1, 2)
    return pids, cams, mods


def test_regdb_trials():
    pids, cams, mods = _regdb_like()
    v2i = build_trials("regdb", "visible-to-infrared", pids=pids, cams=cams, modality=mods,
                       trials=10, shots=10)
    assert len(v2i) == 1
    t = v2i[0]
    np.testing.assert_array_equal(t.query, np.flatnonzero(mods == 0))
    np.testing.assert_array_equal(t.gallery, np.flatnonzero(mods == 1))
    assert t.exclude is None and t.dedup is False and t.seed is None
    (r,) = build_trials("regdb", "infrared-to-visible", pids=pids, cams=cams, modality=mods)
    np.testing.assert_array_equal(r.query, np.flatnonzero(mods == 1))
    np.testing.assert_array_equal(r.gallery, np.flatnonzero(mods == 0))
    assert (len(r.query), len(r.gallery)) == (15, 15)


def _llcm_like():
    # 4 ids; visible cams 1..3, IR cams 1, 2; 1..4 images per (id, cam, modality)
    rng = np.random.default_rng(3)
    pids, cams, mods = [], [], []
    for pid in range(4):
        for mod, cam_list in ((0, (1, 2, 3)), (1, (1, 2))):
            for cam in cam_list:
                n = int(rng.integers(1, 5))
                pids += [pid] * n
                cams += [cam] * n
                mods += [mod] * n
    return np.array(pids), np.array(cams), np.array(mods)


@pytest.mark.parametrize("mode,q_mod", [("visible-to-infrared", 0), ("infrared-to-visible", 1)])
def test_llcm_trials(mode, q_mod):
    pids, cams, mods = _llcm_like()
    trials = build_trials("llcm", mode, pids=pids, cams=cams, modality=mods, trials=3)
    assert [t.seed for t in trials] == [0, 1, 2]
    other = np.flatnonzero(mods == 1 - q_mod)
    for t in trials:
        assert t.dedup is True
        np.testing.assert_array_equal(t.query, np.flatnonzero(mods == q_mod))
        assert np.all(mods[t.gallery] == 1 - q_mod)
        assert _pairs(pids, cams, t.gallery) == _pairs(pids, cams, other)
        assert len(t.gallery) == len(_pairs(pids, cams, other))
        assert t.exclude.shape == (len(t.query), len(t.gallery))
        expected = ((pids[t.query][:, None] == pids[t.gallery][None, :])
                    & (cams[t.query][:, None] == cams[t.gallery][None, :]))
        np.testing.assert_array_equal(t.exclude, expected)
        assert t.exclude.any()
        # queries of a camera the other modality lacks (vis cam 3) exclude nothing
        if q_mod == 0:
            assert not t.exclude[cams[t.query] == 3].any()
    again = build_trials("llcm", mode, pids=pids, cams=cams, modality=mods, trials=3)
    for a, b in zip(trials, again):
        np.testing.assert_array_equal(a.gallery, b.gallery)


def test_empty_side_raises():
    pids, cams, mods = _regdb_like()
    with pytest.raises(DmdlError, match="no infrared"):
        build_trials("regdb", "visible-to-infrared", pids=pids[mods == 0],
                     cams=cams[mods == 0], modality=mods[mods == 0])
    with pytest.raises(DmdlError):
        build_trials("sysu", "all-search", pids=pids, cams=cams, modality=mods, trials=0)


def test_trial_feeds_rank_metrics():
    # identity-structured features: queries of id p sit next to their gallery of id p
    pids, cams, mods = _sysu_like()
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((200, 16))
    feats = centers[pids] + 0.1 * rng.standard_normal((len(pids), 16))
    for t in build_trials("sysu", "indoor-search", pids=pids, cams=cams, modality=mods,
                          trials=2):
        dist = ((feats[t.query][:, None, :] - feats[t.gallery][None, :, :]) ** 2).sum(-1)
        out = rank_metrics(dist, pids[t.query], pids[t.gallery], cams[t.query],
                           cams[t.gallery], exclude=t.exclude, dedup=t.dedup)
        assert out["cmc"][0] == 1.0 and out["mAP"] == pytest.approx(1.0)
        # every cam-3 query loses its cam-2 match, and the cam-1 one always exists
        assert out["num_valid"] == len(t.query)
