"""Sparse k-reciprocal Jaccard distance, k-NN and re-ranking against dense references.

The dense references below follow the published algorithms step by step with N x N matrices
(ClusterContrast's ``compute_jaccard_distance`` for pseudo-labelling, Zhong et al.'s
``re_ranking`` for re-ranking), so the sparse code is checked entry by entry.
"""
from __future__ import annotations

import logging

import numpy as np
import pytest
import scipy.sparse as sp

from dmdl_cli.clustering.jaccard import jaccard_distance, kreciprocal_encoding
from dmdl_cli.clustering.neighbors import knn
from dmdl_cli.clustering.rerank import rerank_distance
from conftest import clustered_features as clustered
from dmdl_cli.errors import DmdlError




# ----------------------------------------------------------------------------- dense references
def _recip(rank: np.ndarray, i: int, k: int) -> np.ndarray:
    fwd = rank[i, : k + 1]
    back = rank[fwd, : k + 1]
    return fwd[np.where(back == i)[0]]


def dense_encoding(x: np.ndarray, rank: np.ndarray, k1: int, k2: int) -> np.ndarray:
    n = x.shape[0]
    half = int(np.around(k1 / 2))
    rec = [_recip(rank, i, k1) for i in range(n)]
    rec_half = [_recip(rank, i, half) for i in range(n)]
    v = np.zeros((n, n), dtype=np.float32)
    for i in range(n):
        exp_set = rec[i]
        for c in rec[i]:
            cand = rec_half[c]
            if len(np.intersect1d(cand, rec[i])) > 2 / 3 * len(cand):
                exp_set = np.append(exp_set, cand)
        exp_set = np.unique(exp_set)
        dist = 2 - 2 * (x[i : i + 1] @ x[exp_set].T)
        w = np.exp(-dist)
        v[i, exp_set] = (w / w.sum()).ravel()
    if k2 != 1:
        v = np.stack([v[rank[i, :k2]].mean(axis=0) for i in range(n)])
    return v


def dense_jaccard_rows(v: np.ndarray, rows: np.ndarray) -> np.ndarray:
    n = v.shape[0]
    inv = [np.where(v[:, j] != 0)[0] for j in range(n)]
    out = np.zeros((len(rows), n), dtype=np.float32)
    for r, i in enumerate(rows):
        temp_min = np.zeros(n, dtype=np.float32)
        for j in np.where(v[i] != 0)[0]:
            temp_min[inv[j]] += np.minimum(v[i, j], v[inv[j], j])
        out[r] = 1 - temp_min / (2 - temp_min)
    out[out < 0] = 0
    return out


def dense_jaccard(x: np.ndarray, rank: np.ndarray, k1: int, k2: int) -> np.ndarray:
    v = dense_encoding(x, rank, k1, k2)
    return dense_jaccard_rows(v, np.arange(x.shape[0]))


def stored_mask(mat: sp.csr_matrix) -> np.ndarray:
    coo = mat.tocoo()
    mask = np.zeros(mat.shape, dtype=bool)
    mask[coo.row, coo.col] = True
    return mask


# ---------------------------------------------------------------------------------------- k-NN
def test_exact_knn_matches_brute_force_and_self_first():
    x, _ = clustered(200, seed=1)
    sims, idx = knn(x, 15)
    assert sims.dtype == np.float32 and idx.dtype == np.int64 and idx.shape == (200, 15)
    assert np.array_equal(idx[:, 0], np.arange(200))
    full = x @ x.T
    order = np.argsort(-full, axis=1, kind="stable")[:, :15]
    for i in range(200):
        assert set(order[i]) == set(idx[i])
    np.testing.assert_allclose(sims, np.take_along_axis(full, idx, axis=1), atol=1e-5)
    assert np.all(np.diff(sims[:, 1:], axis=1) <= 1e-6)


def test_knn_self_first_with_duplicate_rows():
    x, _ = clustered(60, seed=2)
    x[10] = x[11] = x[12] = x[30]  # four identical rows: ties at similarity 1
    _, idx = knn(x, 8)
    assert np.array_equal(idx[:, 0], np.arange(60))
    for r in (10, 11, 12, 30):
        assert {10, 11, 12, 30} <= set(idx[r, :4].tolist())
        assert len(set(idx[r].tolist())) == 8


@pytest.mark.parametrize("method", ["ivf", "hnsw"])
def test_approximate_knn_valid_and_accurate(method):
    n = 800
    x, _ = clustered(n, d=16, n_ids=40, seed=3)
    sims, idx = knn(x, 10, method=method, nprobe=8)
    assert idx.shape == (n, 10) and (idx >= 0).all()
    assert np.array_equal(idx[:, 0], np.arange(n))
    _, exact = knn(x, 10)
    recall = np.mean([len(np.intersect1d(idx[i], exact[i])) / 10 for i in range(n)])
    assert recall > 0.9
    np.testing.assert_allclose(sims, np.einsum("id,ikd->ik", x, x[idx]), atol=1e-5)


def test_ivf_rows_with_too_few_candidates_are_searched_exactly():
    x, _ = clustered(300, d=16, seed=6)
    sims, idx = knn(x, 20, method="ivf", nlist=30, nprobe=1)  # cells of ~10 rows < k
    assert (idx >= 0).all() and np.isfinite(sims).all()
    assert np.array_equal(idx[:, 0], np.arange(300))
    assert all(len(set(r)) == 20 for r in idx.tolist())


def test_use_gpu_true_without_gpu_raises():
    from dmdl_cli.clustering.neighbors import gpu_available

    if gpu_available(None):
        pytest.skip("a GPU is available here")
    x, _ = clustered(20, seed=7)
    with pytest.raises(DmdlError, match="GPU"):
        knn(x, 5, use_gpu=True)


def test_a_search_leaves_the_thread_count_of_torch_as_it_was(monkeypatch):
    """faiss searches on OMP_NUM_THREADS threads, but where torch was imported first (as here)
    its omp_set_num_threads is torch's: a search left torch on faiss's count, undoing a
    caller's torch.set_num_threads (an in-process training run then changed its bits)."""
    import torch

    from dmdl_cli.clustering.neighbors import nearest_rows

    x, _ = clustered(300, d=16, seed=8)
    before = torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    torch.set_num_threads(1)
    try:
        for method in ("exact", "ivf", "hnsw"):
            knn(x, 10, method=method, nlist=10, nprobe=2)
            assert torch.get_num_threads() == 1, method
        nearest_rows(x[:5], x)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_knn_clamps_k_to_n():
    x, _ = clustered(7, seed=4)
    sims, idx = knn(x, 50)
    assert idx.shape == (7, 7)
    assert np.array_equal(idx[:, 0], np.arange(7))
    assert all(sorted(r) == list(range(7)) for r in idx.tolist())


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_features_raise(bad):
    x, _ = clustered(50, seed=5)
    x[7, 3] = bad
    with pytest.raises(DmdlError, match="NaN or Inf"):
        knn(x, 5)
    with pytest.raises(DmdlError, match="NaN or Inf"):
        jaccard_distance(x, k1=10)
    with pytest.raises(DmdlError, match="NaN or Inf"):
        rerank_distance(x[:10], x[10:])


def test_bad_shapes_raise():
    with pytest.raises(DmdlError):
        knn(np.zeros((0, 8), np.float32), 3)
    with pytest.raises(DmdlError):
        knn(np.zeros(8, np.float32), 3)
    with pytest.raises(DmdlError):
        knn(np.ones((5, 3), np.int64), 3)


# ------------------------------------------------------------------------------------- Jaccard
@pytest.mark.parametrize("n,k1,k2", [(300, 20, 6), (300, 20, 1), (400, 30, 6), (250, 25, 6)])
def test_sparse_jaccard_equals_dense(n, k1, k2):
    x, _ = clustered(n, seed=n + k1 + k2)
    _, rank = knn(x, k1)
    dense = dense_jaccard(x, rank, k1, k2)
    sparse, info = jaccard_distance(x, k1=k1, k2=k2, return_info=True)
    assert isinstance(sparse, sp.csr_matrix) and sparse.shape == (n, n)
    assert sparse.dtype == np.float32 and sparse.has_sorted_indices
    mask = stored_mask(sparse)
    # stored entries equal the dense values; everything not stored is exactly 1 in the dense one
    np.testing.assert_allclose(sparse.toarray()[mask], dense[mask], rtol=0, atol=2e-6)
    assert (dense[~mask] == 1.0).all()
    assert (~mask).sum() > 0  # the test does exercise non-overlapping pairs
    # explicit zero diagonal, symmetric
    assert mask.diagonal().all() and (sparse.diagonal() == 0).all()
    assert (sparse != sparse.T).nnz == 0
    assert info["k1"] == k1 and info["k2"] == k2 and not info["warnings"]


def test_duplicate_rows_give_explicit_zero_distances():
    x, _ = clustered(200, seed=15)
    x[[20, 21, 22, 23]] = x[5]  # five identical rows
    _, rank = knn(x, 20)
    dense = dense_jaccard(x, rank, 20, 6)
    sparse = jaccard_distance(x, k1=20, k2=6)
    mask = stored_mask(sparse)
    np.testing.assert_allclose(sparse.toarray()[mask], dense[mask], atol=2e-6)
    assert (dense[~mask] == 1.0).all()
    twins = np.ix_([5, 20, 21, 22, 23], [5, 20, 21, 22, 23])
    assert mask[twins].all()  # stored although 0: explicit zeros
    assert (dense[twins] < 1e-6).all()
    assert np.count_nonzero(sparse.data == 0) >= 25


def test_encoding_equals_dense_encoding():
    x, _ = clustered(300, seed=11)
    sims, rank = knn(x, 20)
    dense = dense_encoding(x, rank, 20, 6)
    for s in (None, sims):  # recomputed dot products, and similarities reused from the search
        v = kreciprocal_encoding(x, rank, k1=20, k2=6, sims=s)
        np.testing.assert_allclose(v.toarray(), dense, rtol=0, atol=1e-7)
        assert np.array_equal(v.toarray() != 0, dense != 0)
        np.testing.assert_allclose(np.asarray(v.sum(axis=1)).ravel(), 1.0, atol=1e-5)


def test_max_distance_keeps_only_close_pairs():
    x, _ = clustered(300, seed=12)
    full = jaccard_distance(x, k1=20, k2=6)
    pruned = jaccard_distance(x, k1=20, k2=6, max_distance=0.6)
    f, p = full.toarray(), pruned.toarray()
    want = stored_mask(full) & (f <= 0.6)
    assert np.array_equal(stored_mask(pruned), want | np.eye(300, dtype=bool))
    np.testing.assert_array_equal(p[want], f[want])


def test_precomputed_neighbors_give_same_result():
    x, _ = clustered(200, seed=13)
    sims, idx = knn(x, 40)
    a = jaccard_distance(x, k1=20, k2=6)
    b = jaccard_distance(x, k1=20, k2=6, neighbors=(sims, idx))
    np.testing.assert_allclose(a.toarray(), b.toarray(), atol=1e-6)
    assert np.array_equal(stored_mask(a), stored_mask(b))


def test_k1_at_least_n_is_clamped_and_reported(caplog):
    x, _ = clustered(12, seed=14)
    with caplog.at_level(logging.WARNING):
        dist, info = jaccard_distance(x, k1=30, k2=6, return_info=True)
    assert info["k1"] == 11 and info["warnings"] and "k1=30" in info["warnings"][0]
    assert any("k1=30" in r.getMessage() for r in caplog.records)
    _, rank = knn(x, 11)
    dense = dense_jaccard(x, rank, 11, 6)
    mask = stored_mask(dist)
    np.testing.assert_allclose(dist.toarray()[mask], dense[mask], atol=2e-6)
    assert (dense[~mask] == 1.0).all()


def test_single_sample():
    dist = jaccard_distance(np.ones((1, 4), np.float32) / 2.0, k1=30)
    assert dist.shape == (1, 1) and dist.nnz == 1 and dist[0, 0] == 0


# ---------------------------------------------------------------------------------- re-ranking
def dense_rerank(q: np.ndarray, g: np.ndarray, k1: int, k2: int, lam: float) -> np.ndarray:
    x = np.concatenate((q, g))
    original = 2 - 2 * (x @ x.T)
    rank = np.argsort(original, axis=1, kind="stable")
    assert np.array_equal(rank[:, 0], np.arange(len(x)))  # no twins in the test data
    v = dense_encoding(x, rank[:, : k1 + 1], k1, k2)
    jac = dense_jaccard_rows(v, np.arange(len(q)))
    final = jac * (1 - lam) + original[: len(q)] * lam
    return final[:, len(q):]


@pytest.mark.parametrize("k1,k2,lam", [(20, 6, 0.3), (10, 1, 0.5)])
def test_rerank_equals_dense(k1, k2, lam):
    x, _ = clustered(260, seed=21)
    q, g = x[:60], x[60:]
    got = rerank_distance(q, g, k1=k1, k2=k2, lambda_value=lam)
    want = dense_rerank(q, g, k1, k2, lam)
    assert got.shape == (60, 200) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=0, atol=3e-6)
    assert (got < (1 - lam) + lam * (2 - 2 * q @ g.T) - 1e-3).any()  # Jaccard did something


def test_rerank_rejects_mismatched_dims():
    x, _ = clustered(30, seed=22)
    with pytest.raises(DmdlError, match="same checkpoint"):
        rerank_distance(x[:5], x[5:, :16])
