"""Cross-modality cluster association (dmdl_cli.clustering.association)."""
from __future__ import annotations

import numpy as np
import pytest

from dmdl_cli.clustering.association import (
    ASSOCIATION_METHODS,
    Association,
    AssociationInput,
    ModalitySamples,
    _METHODS,
    adopter,
    associate,
    association_accuracy,
    association_chance,
    centroid_similarity,
)
from dmdl_cli.data.index import INFRARED, VISIBLE

D = 16


class Maps:
    """What a cluster-level association did to one sample per cluster: the cluster -> unified
    id map of each modality (``vis_to_unified (Cv,)``, ``ir_to_unified (Ci,)``)."""

    def __init__(self, assoc: Association):
        self.vis_to_unified, self.ir_to_unified = assoc.labels[VISIBLE], assoc.labels[INFRARED]
        self.num_ids = assoc.num_ids

    def shared_ids(self) -> np.ndarray:
        return np.intersect1d(self.vis_to_unified, self.ir_to_unified)


def samples(centroids: np.ndarray) -> ModalitySamples:
    """One sample per cluster, at its centroid: its unified label is its cluster's unified id."""
    centroids = np.asarray(centroids, dtype=np.float64)
    n = len(centroids) if centroids.ndim == 2 else 0
    return ModalitySamples(np.arange(n, dtype=np.int64), centroids, centroids)


def associate_centroids(vis, ir, *, method: str = "nearest-alternating", epoch: int) -> Maps:
    """Associate clusters given by their centroids; each cluster's map to unified ids."""
    inp = AssociationInput(epoch, {VISIBLE: samples(vis), INFRARED: samples(ir)})
    return Maps(associate(method, inp))


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


def check_contiguous(assoc: Maps, cv: int, ci: int):
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
        a = associate_centroids(vis, ir, method="nearest-alternating", epoch=epoch)
        check_contiguous(a, 7, 5)
        assert a.num_ids == 5
        assert np.array_equal(a.ir_to_unified, np.arange(5))  # IR clusters keep their ids
        assert np.array_equal(a.vis_to_unified, partner)  # each visible -> its nearest IR


def test_nearest_odd_epoch_ir_joins_visible(centroids):
    vis, ir, partner = centroids
    sim = vis @ ir.T
    a = associate_centroids(vis, ir, method="nearest-alternating", epoch=1)
    check_contiguous(a, 7, 5)
    assert a.num_ids == 7  # visible clusters keep their ids, 7 - 5 ids are visible-only
    assert np.array_equal(a.vis_to_unified, np.arange(7))
    assert np.array_equal(a.ir_to_unified, sim.argmax(axis=0))
    for j in range(5):  # IR j joins one of its own visible copies
        assert partner[a.ir_to_unified[j]] == j
    # alternation: odd epochs agree with each other and differ from even epochs
    b = associate_centroids(vis, ir, method="nearest-alternating", epoch=3)
    assert np.array_equal(a.ir_to_unified, b.ir_to_unified)
    even = associate_centroids(vis, ir, method="nearest-alternating", epoch=0)
    assert even.num_ids != a.num_ids


def test_hungarian_is_one_to_one(centroids):
    vis, ir, partner = centroids
    for epoch in (0, 1):  # direction-free
        a = associate_centroids(vis, ir, method="hungarian", epoch=epoch)
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
    a = associate_centroids(ir, vis, method="hungarian", epoch=0)  # roles swapped: Cv = 5, Ci = 7
    check_contiguous(a, 5, 7)
    assert a.shared_ids().size == 5 and a.num_ids == 7
    assert np.array_equal(a.vis_to_unified, np.arange(5))
    assert set(a.ir_to_unified.tolist()) == set(range(7))


@pytest.mark.parametrize("method", ["nearest-alternating", "hungarian"])
@pytest.mark.parametrize("epoch", [0, 1])
def test_empty_modality_keeps_own_ids(centroids, method, epoch):
    vis, ir, _ = centroids
    a = associate_centroids(np.zeros((0, D)), ir, method=method, epoch=epoch)
    check_contiguous(a, 0, 5)
    assert a.num_ids == 5 and np.array_equal(a.ir_to_unified, np.arange(5))
    b = associate_centroids(vis, np.zeros((0, D)), method=method, epoch=epoch)
    check_contiguous(b, 7, 0)
    assert b.num_ids == 7 and np.array_equal(b.vis_to_unified, np.arange(7))
    c = associate_centroids(np.zeros((0, D)), np.zeros((0, D)), method=method, epoch=epoch)
    assert c.num_ids == 0 and c.vis_to_unified.size == 0 and c.ir_to_unified.size == 0
    d = associate_centroids(np.array([]), ir, method=method, epoch=epoch)  # a bare empty array too
    assert d.num_ids == 5


@pytest.mark.parametrize("method", ["nearest-alternating", "hungarian"])
def test_ids_contiguous_on_random_inputs(method):
    rng = np.random.default_rng(1)
    for trial in range(20):
        cv, ci = rng.integers(1, 12, size=2)
        a = associate_centroids(rng.normal(size=(cv, 8)), rng.normal(size=(ci, 8)), method=method,
                      epoch=trial)
        check_contiguous(a, cv, ci)


def test_bad_arguments():
    with pytest.raises(ValueError):
        associate_centroids(np.ones((2, 3)), np.ones((2, 3)), method="greedy", epoch=0)
    with pytest.raises(ValueError):
        associate_centroids(np.ones((2, 3)), np.ones((2, 4)), epoch=0)
    with pytest.raises(ValueError):
        associate_centroids(np.full((2, 3), np.nan), np.ones((2, 3)), epoch=0)
    with pytest.raises(ValueError):
        adopter("greedy", 0)


def test_every_declared_method_runs_and_says_which_modality_adopts():
    assert tuple(_METHODS) == ASSOCIATION_METHODS  # the recipe's choice list is the table's
    alternating = [adopter("nearest-alternating", e) for e in range(4)]
    assert alternating == [VISIBLE, INFRARED, VISIBLE, INFRARED]
    assert [adopter("hungarian", e) for e in range(4)] == [None] * 4
    for method in ASSOCIATION_METHODS:
        assert associate_centroids(np.eye(3), np.eye(3), method=method, epoch=0).num_ids == 3


def test_every_sample_takes_its_clusters_unified_id_and_outliers_stay_outliers(centroids):
    """Several samples per cluster: the association labels samples, not only clusters."""
    vis, ir, partner = centroids
    rng = np.random.default_rng(2)
    vis_labels = np.array([0, -1, 2, 6, 6, 1, -1, 3])
    ir_labels = np.array([4, 4, -1, 0, 1, 2, 3])
    inp = AssociationInput(0, {
        VISIBLE: ModalitySamples(vis_labels, rng.normal(size=(8, D)), vis),
        INFRARED: ModalitySamples(ir_labels, rng.normal(size=(7, D)), ir)})
    assert inp.samples[VISIBLE].sizes.tolist() == [1, 1, 1, 1, 0, 0, 2]
    for epoch, method in ((0, "nearest-alternating"), (1, "nearest-alternating"), (0, "hungarian")):
        inp = AssociationInput(epoch, inp.samples)
        a = associate(method, inp)
        maps = associate_centroids(vis, ir, method=method, epoch=epoch)
        assert a.num_ids == maps.num_ids
        for m, labels, table in ((VISIBLE, vis_labels, maps.vis_to_unified),
                                 (INFRARED, ir_labels, maps.ir_to_unified)):
            assert a.labels[m].dtype == np.int64
            assert a.labels[m].tolist() == [int(table[c]) if c >= 0 else -1 for c in labels]
    bad = AssociationInput(0, {VISIBLE: ModalitySamples(np.array([7]), np.ones((1, D)), vis),
                               INFRARED: inp.samples[INFRARED]})
    with pytest.raises(ValueError, match="cluster id 7"):
        associate("hungarian", bad)  # no visible cluster 7


def _accuracy(vis_labels, ir_labels, vis_true, ir_true, vis_map, ir_map) -> float:
    """association_accuracy of a cluster-level association given by its two maps."""
    vis_labels, ir_labels = np.asarray(vis_labels), np.asarray(ir_labels)
    def zeros(labels, clusters) -> ModalitySamples:  # features and centroids are not read
        return ModalitySamples(labels, np.zeros((len(labels), 2)), np.zeros((len(clusters), 2)))

    inp = AssociationInput(0, {VISIBLE: zeros(vis_labels, vis_map), INFRARED: zeros(ir_labels, ir_map)})
    unified = {VISIBLE: np.where(vis_labels >= 0, np.asarray(vis_map)[vis_labels], -1),
               INFRARED: np.where(ir_labels >= 0, np.asarray(ir_map)[ir_labels], -1)}
    num_ids = int(max(max(vis_map), max(ir_map))) + 1
    return association_accuracy(inp, Association(unified, num_ids), {VISIBLE: vis_true, INFRARED: ir_true})


def test_association_accuracy():
    # visible clusters: 0 -> person 10, 1 -> person 11 (2 votes vs 1), 2 -> tie 12/13 -> 12
    vis_labels = np.array([0, 0, 1, 1, 1, 2, 2, -1])
    vis_true = np.array([10, 10, 11, 11, 99, 13, 12, 10])
    # IR clusters: 0 -> 10, 1 -> 12, 2 -> 11
    ir_labels = np.array([0, 0, 1, 2, -1])
    ir_true = np.array([10, 10, 12, 11, 12])
    args = (vis_labels, ir_labels, vis_true, ir_true)
    assert _accuracy(*args, [0, 1, 2], [0, 2, 1]) == 1.0  # one to one, all correct
    assert _accuracy(*args, [0, 1, 2], [0, 1, 2]) == pytest.approx(1 / 3)  # 1<->1, 2<->2 wrong
    many = ([0, 0, 1], [0, 1, 2])  # links (0,0),(1,0),(2,1)
    assert _accuracy(*args, *many) == pytest.approx(2 / 3)
    assert np.isnan(_accuracy(*args, [0, 1, 2], [3, 4, 5]))  # nothing linked


def test_association_accuracy_counts_the_pairs_a_sample_level_association_links():
    """Samples of one cluster may take different unified ids: every (visible cluster, IR
    cluster) pair that shares one is linked."""
    vis_labels, vis_true = np.array([0, 0, 1, 1]), np.array([10, 10, 11, 11])
    ir_labels, ir_true = np.array([0, 1]), np.array([10, 11])
    inp = AssociationInput(0, {VISIBLE: ModalitySamples(vis_labels, np.zeros((4, 2)), np.zeros((2, 2))),
                               INFRARED: ModalitySamples(ir_labels, np.zeros((2, 2)), np.zeros((2, 2)))})
    # visible cluster 0 splits between ids 0 and 1: links (0, 0) right, (0, 1) wrong; (1, 1) right
    split = Association({VISIBLE: np.array([0, 1, 1, 1]), INFRARED: np.array([0, 1])}, 2)
    assert association_accuracy(inp, split, {VISIBLE: vis_true, INFRARED: ir_true}) == pytest.approx(2 / 3)


def _unit(x) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_sample_level_association_takes_the_nearest_other_sample_label():
    # 4 IR samples in 2 clusters (+ an outlier); 4 visible samples, one an outlier of its own
    # clustering: each sits next to one IR sample, whatever its visible cluster
    ir_feat = _unit([[1, 0, 0], [0.9, 0.1, 0], [0, 1, 0], [0, 0, 1]])
    ir_labels = np.array([0, 0, 1, -1])
    vis_feat = _unit([[0, 0.95, 0.05], [0.05, 0, 1], [1, 0.01, 0], [0.88, 0.12, 0]])
    vis_labels = np.array([0, 0, 1, -1])  # visible clusters that the sample level ignores
    vis_cent, ir_cent = _unit([[1, 1, 0], [1, 0, 0]]), _unit([[1, 0.05, 0], [0, 1, 0]])
    samples_ = {VISIBLE: ModalitySamples(vis_labels, vis_feat, vis_cent),
                INFRARED: ModalitySamples(ir_labels, ir_feat, ir_cent)}
    even = associate("cluster-sample-alternating", AssociationInput(2, samples_))  # sample level
    # nearest IR samples: 2 (cluster 1), 3 (outlier), 0 (cluster 0), 1 (cluster 0)
    assert even.labels[VISIBLE].tolist() == [1, -1, 0, 0]  # the visible outlier is labelled too
    assert even.labels[INFRARED].tolist() == [0, 0, 1, -1] and even.num_ids == 2
    odd = associate("cluster-sample-alternating", AssociationInput(3, samples_))  # IR adopts
    # nearest visible samples of IR samples 0..3: 2, 3, 0, 1 -> visible labels 1, -1, 0, 0
    assert odd.labels[INFRARED].tolist() == [1, -1, 0, 0]
    assert odd.labels[VISIBLE].tolist() == [0, 0, 1, -1] and odd.num_ids == 2


def test_cluster_sample_alternation_follows_its_cycle():
    from dmdl_cli.recipe import AssociationRecipe

    ir_feat = _unit([[1, 0, 0], [0.9, 0.1, 0], [0, 1, 0], [0, 0, 1]])
    vis_feat = _unit([[0, 0.95, 0.05], [0.05, 0, 1], [1, 0.01, 0], [0.88, 0.12, 0]])
    samples_ = {VISIBLE: ModalitySamples(np.array([0, 0, 1, -1]), vis_feat, _unit([[1, 1, 0], [1, 0, 0]])),
                INFRARED: ModalitySamples(np.array([0, 0, 1, -1]), ir_feat, _unit([[1, 0.05, 0], [0, 1, 0]]))}
    settings = AssociationRecipe(method="cluster-sample-alternating", sample_cycle=5, cluster_epochs=2)
    # even epochs, visible adopts: both visible clusters' centroids are nearest IR cluster 0, while
    # sample by sample the visible samples take IR labels 1, -1, 0, 0
    cluster_level, sample_level = [0, 0, 0, -1], [1, -1, 0, 0]
    for epoch in range(0, 12, 2):
        got = associate("cluster-sample-alternating", AssociationInput(epoch, samples_), settings)
        want = cluster_level if epoch % 5 < 2 else sample_level
        assert got.labels[VISIBLE].tolist() == want, epoch
    assert [adopter("cluster-sample-alternating", e) for e in range(4)] == [VISIBLE, INFRARED] * 2


def test_association_chance_is_what_a_random_linking_scores():
    # visible clusters' majority ids: 10, 11, 12; IR clusters': 10, 12, 11, 11
    vis_labels, vis_true = np.array([0, 0, 1, 1, 2, 2, -1]), np.array([10, 10, 11, 11, 12, 12, 99])
    ir_labels, ir_true = np.array([0, 1, 2, 3, 3]), np.array([10, 12, 11, 11, 11])
    inp = AssociationInput(0, {VISIBLE: ModalitySamples(vis_labels, np.zeros((7, 2)), np.zeros((3, 2))),
                               INFRARED: ModalitySamples(ir_labels, np.zeros((5, 2)), np.zeros((4, 2)))})
    # a random (visible, IR) pair agrees with probability sum_id f_v(id) f_i(id)
    expected = (1 / 3) * (1 / 4) + (1 / 3) * (2 / 4) + (1 / 3) * (1 / 4)
    truth = {VISIBLE: vis_true, INFRARED: ir_true}
    assert association_chance(inp, truth) == pytest.approx(expected)
    # the same by brute force over every pair of clusters
    maj_v, maj_i = np.array([10, 11, 12]), np.array([10, 12, 11, 11])
    assert (maj_v[:, None] == maj_i[None, :]).mean() == pytest.approx(expected)
    assert np.isnan(association_chance(inp, {VISIBLE: vis_true, INFRARED: np.full(5, -1)}))
