"""Pseudo labels: DBSCAN on the sparse Jaccard distance equals DBSCAN on the dense reference."""
from __future__ import annotations

import numpy as np
import pytest
from sklearn.cluster import DBSCAN
from sklearn.metrics import adjusted_rand_score

from dmdl_cli.clustering.jaccard import jaccard_distance
from dmdl_cli.clustering.neighbors import knn
from dmdl_cli.clustering.pseudo_labels import (
    centroids,
    cluster_features,
    cluster_stats,
    renumber,
)
from conftest import clustered_features as clustered
from dmdl_cli.errors import DmdlError




def dense_reference_jaccard(x: np.ndarray, k1: int, k2: int) -> np.ndarray:
    """ClusterContrast's dense algorithm (N x N matrices), on the same k-NN lists."""
    n = x.shape[0]
    _, rank = knn(x, k1)

    def recip(i, k):
        fwd = rank[i, : k + 1]
        return fwd[np.where(rank[fwd, : k + 1] == i)[0]]

    rec = [recip(i, k1) for i in range(n)]
    rec_half = [recip(i, int(np.around(k1 / 2))) for i in range(n)]
    v = np.zeros((n, n), dtype=np.float32)
    for i in range(n):
        e = rec[i]
        for c in rec[i]:
            if len(np.intersect1d(rec_half[c], rec[i])) > 2 / 3 * len(rec_half[c]):
                e = np.append(e, rec_half[c])
        e = np.unique(e)
        w = np.exp(-(2 - 2 * (x[i] @ x[e].T)))
        v[i, e] = w / w.sum()
    if k2 != 1:
        v = np.stack([v[rank[i, :k2]].mean(axis=0) for i in range(n)])
    jac = np.zeros((n, n), dtype=np.float32)
    for i in range(n):
        temp_min = np.minimum(v[i][None, :], v).sum(axis=1)
        jac[i] = 1 - temp_min / (2 - temp_min)
    return np.maximum(jac, 0)


@pytest.mark.parametrize("seed,sigma,k2", [(0, 0.9, 6), (1, 1.1, 6), (2, 1.0, 1)])
def test_labels_equal_dense_reference(seed, sigma, k2):
    x, ids = clustered(320, sigma=sigma, seed=seed)
    dense = dense_reference_jaccard(x, 20, k2)
    want = renumber(DBSCAN(eps=0.6, min_samples=4, metric="precomputed").fit_predict(dense))
    got = cluster_features(x, k1=20, k2=k2, eps=0.6, min_samples=4)
    assert got.dtype == np.int64 and got.shape == (320,)
    np.testing.assert_array_equal(got, want)
    assert got.max() >= 3  # several clusters: the comparison means something
    # the full (unpruned) sparse matrix gives the same labels through sklearn as well
    full = jaccard_distance(x, k1=20, k2=k2)
    again = renumber(DBSCAN(eps=0.6, min_samples=4, metric="precomputed").fit_predict(full))
    np.testing.assert_array_equal(again, want)


def test_outliers_match_dense_reference():
    x, _ = clustered(300, sigma=1.6, n_ids=40, seed=5)  # noisy: many outliers
    dense = dense_reference_jaccard(x, 20, 6)
    for eps, ms in ((0.5, 4), (0.6, 8)):
        want = renumber(DBSCAN(eps=eps, min_samples=ms, metric="precomputed").fit_predict(dense))
        got = cluster_features(x, k1=20, k2=6, eps=eps, min_samples=ms)
        np.testing.assert_array_equal(got, want)
        assert (got == -1).any() and (got >= 0).any()


def test_labels_deterministic():
    x, _ = clustered(400, seed=7)
    a = cluster_features(x, k1=20)
    b = cluster_features(x.copy(), k1=20)
    np.testing.assert_array_equal(a, b)


def test_labels_first_appearance_order():
    x, _ = clustered(300, seed=8)
    lab = cluster_features(x, k1=20)
    seen = lab[lab >= 0]
    _, first = np.unique(seen, return_index=True)
    assert np.array_equal(seen[np.sort(first)], np.arange(seen.max() + 1))


def test_renumber_hand_case():
    got = renumber(np.array([7, -1, 3, 7, 0, 3, -1, 0, 12]))
    np.testing.assert_array_equal(got, [0, -1, 1, 0, 2, 1, -1, 2, 3])
    assert got.dtype == np.int64
    np.testing.assert_array_equal(renumber(np.array([-1, -1])), [-1, -1])


def test_k1_at_least_n_reported():
    x, _ = clustered(9, seed=9)
    lab, info = cluster_features(x, k1=30, min_samples=2, return_info=True)
    assert info["k1"] == 8 and info["warnings"]
    assert lab.shape == (9,)


def test_non_finite_and_bad_eps_raise():
    x, _ = clustered(40, seed=10)
    x[3, 0] = np.nan
    with pytest.raises(DmdlError):
        cluster_features(x)
    x[3, 0] = 0.0
    with pytest.raises(DmdlError, match="eps"):
        cluster_features(x, eps=1.0)


def test_cluster_stats_hand_case():
    labels = np.array([0, 0, 0, 1, 1, -1, 2, -1])
    st = cluster_stats(labels)
    assert st == {"n": 8, "clusters": 3, "outliers": 2, "largest": 3, "mean_size": 2.0}
    truth = np.array([5, 5, 6, 6, 6, 7, 8, 9])
    st = cluster_stats(labels, truth)
    # clustered samples: {5,5,6} -> 2 right, {6,6} -> 2, {8} -> 1: purity 5/6
    assert st["purity"] == pytest.approx(5 / 6)
    assert st["ari"] == pytest.approx(adjusted_rand_score(truth, [0, 0, 0, 1, 1, 3, 2, 4]))
    assert 0 < st["nmi"] < 1
    perfect = cluster_stats(np.array([1, 1, 0, 0]), np.array([3, 3, 4, 4]))
    assert perfect["ari"] == 1.0 and perfect["purity"] == 1.0
    empty = cluster_stats(np.array([-1, -1]), np.array([0, 1]))
    assert empty["clusters"] == 0 and empty["largest"] == 0 and empty["purity"] == 0.0


def test_centroids_hand_case():
    x = np.array([[1, 0], [0, 1], [1, 0], [-1, 0], [0.6, 0.8]], dtype=np.float32)
    labels = np.array([0, 0, 1, -1, 1])
    c = centroids(x, labels)
    assert c.dtype == np.float32 and c.shape == (2, 2)
    np.testing.assert_allclose(c[0], [np.sqrt(0.5), np.sqrt(0.5)], atol=1e-6)
    np.testing.assert_allclose(c[1], np.array([1.6, 0.8]) / np.hypot(1.6, 0.8), atol=1e-6)
    assert centroids(x, np.full(5, -1)).shape == (0, 2)
    with pytest.raises(ValueError):
        centroids(x, np.array([0, 0, 2, 2, -1]))  # cluster 1 has no member
