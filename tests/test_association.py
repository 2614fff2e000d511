"""Cross-modality cluster association (dmdl_cli.clustering.association)."""
from __future__ import annotations

import numpy as np
import pytest

from dmdl_cli.clustering.association import (
    Association,
    associate,
    association_accuracy,
    association_chance,
    centroid_similarity,
    unify_labels,
    unify_rows,
)

D = 16


def normalise(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def centroids():
    """5 IR clusters; 7 visible clusters, visible cluster i is a noisy copy of IR cluster
    ``partner[i]`` (IR clusters 1 and 3 have two visible partners each)."""
    rng = np.random.default_rng(0)
    ir = normalise(rng.normal(size=(5, D)))
    partner = np.array([3, 0, 4, 1, 2, 1, 3])
    vis = normalise(ir[partner] + 0.2 * rng.normal(size=(7, D)))
    return vis, ir, partner


def check_contiguous(assoc: Association, cv: int, ci: int):
    assert assoc.vis_to_unified.shape == (cv,) and assoc.ir_to_unified.shape == (ci,)
    assert assoc.vis_to_unified.dtype == np.int64 and assoc.ir_to_unified.dtype == np.int64
    used = set(assoc.vis_to_unified.tolist()) | set(assoc.ir_to_unified.tolist())
    assert used == set(range(assoc.num_ids))


def test_similarity_is_cosine(centroids):
    vis, ir, _ = centroids
    sim = centroid_similarity(3.0 * vis, ir)  # scale does not matter
    assert sim.shape == (7, 5)
    np.testing.assert_allclose(sim, vis @ ir.T, atol=1e-12)


def test_nearest_even_epoch_visible_joins_ir(centroids):
    vis, ir, partner = centroids
    for epoch in (0, 2, 10):
        a = associate(vis, ir, method="nearest-alternating", epoch=epoch)
        check_contiguous(a, 7, 5)
        assert a.num_ids == 5
        assert np.array_equal(a.ir_to_unified, np.arange(5))  # IR clusters keep their ids
        assert np.array_equal(a.vis_to_unified, partner)  # each visible -> its nearest IR


def test_nearest_odd_epoch_ir_joins_visible(centroids):
    vis, ir, partner = centroids
    sim = vis @ ir.T
    a = associate(vis, ir, method="nearest-alternating", epoch=1)
    check_contiguous(a, 7, 5)
    assert a.num_ids == 7  # visible clusters keep their ids, 7 - 5 ids are visible-only
    assert np.array_equal(a.vis_to_unified, np.arange(7))
    assert np.array_equal(a.ir_to_unified, sim.argmax(axis=0))
    for j in range(5):  # IR j joins one of its own visible copies
        assert partner[a.ir_to_unified[j]] == j
    # alternation: odd epochs agree with each other and differ from even epochs
    b = associate(vis, ir, method="nearest-alternating", epoch=3)
    assert np.array_equal(a.ir_to_unified, b.ir_to_unified)
    even = associate(vis, ir, method="nearest-alternating", epoch=0)
    assert even.num_ids != a.num_ids


def test_hungarian_is_one_to_one(centroids):
    vis, ir, partner = centroids
    for epoch in (0, 1):  # direction-free
        a = associate(vis, ir, method="hungarian", epoch=epoch)
        check_contiguous(a, 7, 5)
        assert a.num_ids == 7 + 5 - 5
        vis_ids, ir_ids = a.vis_to_unified, a.ir_to_unified
        assert len(set(vis_ids.tolist())) == 7 and len(set(ir_ids.tolist())) == 5
        shared = a.shared_ids()
        assert shared.size == 5  # min(Cv, Ci) matched pairs
        for u in shared:
            (i,) = np.flatnonzero(vis_ids == u)
            (j,) = np.flatnonzero(ir_ids == u)
            assert partner[i] == j  # matched pairs are true partners
        # matched pairs 0..4 in visible order, then the unmatched visible clusters
        assert set(shared.tolist()) == set(range(5))


def test_hungarian_more_ir_than_visible(centroids):
    vis, ir, partner = centroids
    a = associate(ir, vis, method="hungarian", epoch=0)  # roles swapped: Cv = 5, Ci = 7
    check_contiguous(a, 5, 7)
    assert a.shared_ids().size == 5 and a.num_ids == 7
    assert np.array_equal(a.vis_to_unified, np.arange(5))
    assert set(a.ir_to_unified.tolist()) == set(range(7))


@pytest.mark.parametrize("method", ["nearest-alternating", "hungarian"])
@pytest.mark.parametrize("epoch", [0, 1])
def test_empty_modality_keeps_own_ids(centroids, method, epoch):
    vis, ir, _ = centroids
    a = associate(np.zeros((0, D)), ir, method=method, epoch=epoch)
    check_contiguous(a, 0, 5)
    assert a.num_ids == 5 and np.array_equal(a.ir_to_unified, np.arange(5))
    b = associate(vis, np.zeros((0, D)), method=method, epoch=epoch)
    check_contiguous(b, 7, 0)
    assert b.num_ids == 7 and np.array_equal(b.vis_to_unified, np.arange(7))
    c = associate(np.zeros((0, D)), np.zeros((0, D)), method=method, epoch=epoch)
    assert c.num_ids == 0 and c.vis_to_unified.size == 0 and c.ir_to_unified.size == 0
    d = associate(np.array([]), ir, method=method, epoch=epoch)  # a bare empty array too
    assert d.num_ids == 5


@pytest.mark.parametrize("method", ["nearest-alternating", "hungarian"])
def test_ids_contiguous_on_random_inputs(method):
    rng = np.random.default_rng(1)
    for trial in range(20):
        cv, ci = rng.integers(1, 12, size=2)
        a = associate(rng.normal(size=(cv, 8)), rng.normal(size=(ci, 8)), method=method,
                      epoch=trial)
        check_contiguous(a, cv, ci)


def test_bad_arguments():
    with pytest.raises(ValueError):
        associate(np.ones((2, 3)), np.ones((2, 3)), method="greedy", epoch=0)
    with pytest.raises(ValueError):
        associate(np.ones((2, 3)), np.ones((2, 4)), epoch=0)
    with pytest.raises(ValueError):
        associate(np.full((2, 3), np.nan), np.ones((2, 3)), epoch=0)


def test_unify_labels_and_rows():
    a = Association(vis_to_unified=np.array([2, 0, 2]), ir_to_unified=np.array([1, 0, 2]),
                    num_ids=3)
    vis_labels = np.array([0, -1, 2, 1, 1])
    ir_labels = np.array([-1, 2, 0])
    uv, ui = unify_labels(vis_labels, ir_labels, a)
    assert uv.tolist() == [2, -1, 2, 0, 0] and ui.tolist() == [-1, 2, 1]
    labels = np.array([0, -1, 2, 0, 1, 1])
    modality = np.array([0, 1, 1, 1, 0, 0])
    assert unify_rows(labels, modality, a).tolist() == [2, -1, 2, 1, 0, 0]
    with pytest.raises(ValueError):
        unify_labels(np.array([3]), ir_labels, a)  # no visible cluster 3


def test_association_accuracy():
    # visible clusters: 0 -> person 10, 1 -> person 11 (2 votes vs 1), 2 -> tie 12/13 -> 12
    vis_labels = np.array([0, 0, 1, 1, 1, 2, 2, -1])
    vis_true = np.array([10, 10, 11, 11, 99, 13, 12, 10])
    # IR clusters: 0 -> 10, 1 -> 12, 2 -> 11
    ir_labels = np.array([0, 0, 1, 2, -1])
    ir_true = np.array([10, 10, 12, 11, 12])
    one_to_one = Association(np.array([0, 1, 2]), np.array([0, 2, 1]), 3)  # all correct
    assert association_accuracy(vis_labels, ir_labels, vis_true, ir_true, one_to_one) == 1.0
    swapped = Association(np.array([0, 1, 2]), np.array([0, 1, 2]), 3)  # 1<->1, 2<->2 wrong
    assert association_accuracy(vis_labels, ir_labels, vis_true, ir_true,
                                swapped) == pytest.approx(1 / 3)
    many = Association(np.array([0, 0, 1]), np.array([0, 1, 2]), 3)  # links (0,0),(1,0),(2,1)
    assert association_accuracy(vis_labels, ir_labels, vis_true, ir_true,
                                many) == pytest.approx(2 / 3)
    apart = Association(np.array([0, 1, 2]), np.array([3, 4, 5]), 6)
    assert np.isnan(association_accuracy(vis_labels, ir_labels, vis_true, ir_true, apart))


def test_association_chance_is_what_a_random_linking_scores():
    # visible clusters' majority ids: 10, 11, 12; IR clusters': 10, 12, 11, 11
    vis_labels = np.array([0, 0, 1, 1, 2, 2, -1])
    vis_true = np.array([10, 10, 11, 11, 12, 12, 99])
    ir_labels = np.array([0, 1, 2, 3, 3])
    ir_true = np.array([10, 12, 11, 11, 11])
    assoc = Association(np.array([0, 1, 2]), np.array([0, 2, 1, 1]), 3)
    # a random (visible, IR) pair agrees with probability sum_id f_v(id) f_i(id)
    expected = (1 / 3) * (1 / 4) + (1 / 3) * (2 / 4) + (1 / 3) * (1 / 4)
    assert association_chance(vis_labels, ir_labels, vis_true, ir_true, assoc) == pytest.approx(expected)
    # the same by brute force over every pair of clusters
    maj_v, maj_i = np.array([10, 11, 12]), np.array([10, 12, 11, 11])
    assert (maj_v[:, None] == maj_i[None, :]).mean() == pytest.approx(expected)
    assert np.isnan(association_chance(vis_labels, ir_labels, vis_true, np.full(5, -1), assoc))
