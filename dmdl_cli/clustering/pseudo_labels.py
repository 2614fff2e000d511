"""Pseudo labels: DBSCAN on the sparse k-reciprocal Jaccard distance, plus cluster diagnostics.

:func:`cluster_features` gives the labels the reference pipeline gets from its dense Jaccard
matrix and ``sklearn.cluster.DBSCAN(metric="precomputed")``. The sparse matrix is handed to
the same sklearn DBSCAN: sklearn takes the stored entries of a sparse precomputed matrix as the
only candidate neighbours (a point always counts as its own neighbour; our diagonal is stored
as an explicit 0 anyway). Pairs we do not store have distance exactly 1 in the dense
algorithm, so for any ``eps < 1`` both see the same eps-neighbourhoods, and DBSCAN's result
depends on nothing else (the visiting order is the row order in both). Only entries
``<= eps`` are kept while the distance is computed, so memory stays at the size of the
eps-neighbourhoods.

Labels are renumbered 0..C-1 in order of first appearance (row order); -1 = outlier.
"""
from __future__ import annotations

import time
from typing import Any

import numpy as np

from dmdl_cli.clustering.jaccard import jaccard_distance
from dmdl_cli.clustering.neighbors import KnnMethod, check_features
from dmdl_cli.errors import DmdlError


def renumber(labels: np.ndarray) -> np.ndarray:
    """Labels renumbered 0..C-1 in order of first appearance; negatives become -1. int64."""
    lab = np.asarray(labels).astype(np.int64, copy=False).ravel()
    out = np.full(lab.shape, -1, dtype=np.int64)
    valid = lab >= 0
    if not valid.any():
        return out
    uniq, first, inverse = np.unique(lab[valid], return_index=True, return_inverse=True)
    rank = np.empty(len(uniq), dtype=np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(len(uniq), dtype=np.int64)
    out[valid] = rank[inverse.ravel()]
    return out


def dbscan_precomputed(dist, *, eps: float, min_samples: int) -> np.ndarray:
    """sklearn DBSCAN on a precomputed (sparse or dense) distance; labels renumbered."""
    from sklearn.cluster import DBSCAN

    raw = DBSCAN(eps=float(eps), min_samples=int(min_samples), metric="precomputed",
                 n_jobs=1).fit_predict(dist)
    return renumber(raw)


def cluster_features(
    features: np.ndarray,
    *,
    k1: int = 30,
    k2: int = 6,
    eps: float = 0.6,
    min_samples: int = 4,
    knn_method: KnnMethod = "exact",
    use_gpu: bool | None = None,
    knn_options: dict[str, Any] | None = None,
    neighbors: tuple[np.ndarray, np.ndarray] | None = None,
    return_info: bool = False,
):
    """Pseudo labels (N,) int64 of L2-normalised features (N, D); -1 = outlier.

    k1, k2: k-reciprocal Jaccard parameters (see :func:`dmdl_cli.clustering.jaccard.
    jaccard_distance`; k1 >= N is clamped to N - 1 and reported in ``info["warnings"]``).
    eps, min_samples: DBSCAN parameters (eps must be in (0, 1): pairs without overlapping
    encodings are at distance 1 and are not stored). ``knn_method``, ``use_gpu``,
    ``knn_options``, ``neighbors``: the k-NN search, as in ``jaccard_distance``. ``return_info`` adds a dict with the
    Jaccard sizes and timings and :func:`cluster_stats` of the result.
    """
    if not 0.0 < float(eps) < 1.0:
        raise DmdlError(f"DBSCAN eps must be in (0, 1) for the Jaccard distance, got {eps}; "
                        "fix the clustering eps of the recipe")
    if int(min_samples) < 1:
        raise DmdlError(f"DBSCAN min_samples must be >= 1, got {min_samples}")
    x = check_features(features)
    t0 = time.perf_counter()
    dist, info = jaccard_distance(x, k1=k1, k2=k2, knn_method=knn_method, use_gpu=use_gpu,
                                  max_distance=float(eps), knn_options=knn_options,
                                  neighbors=neighbors, return_info=True)
    t1 = time.perf_counter()
    labels = dbscan_precomputed(dist, eps=eps, min_samples=min_samples)
    t2 = time.perf_counter()
    del dist
    info.update(seconds_distance=t1 - t0, seconds_dbscan=t2 - t1, seconds_total=t2 - t0,
                eps=float(eps), min_samples=int(min_samples), knn_method=knn_method)
    info.update(cluster_stats(labels))
    return (labels, info) if return_info else labels


def cluster_stats(labels: np.ndarray, true_ids: np.ndarray | None = None) -> dict[str, Any]:
    """Diagnostics of pseudo labels (N,) (-1 = outlier).

    Keys: ``n``, ``clusters``, ``outliers``, ``largest`` (members of the biggest cluster, 0 when
    none), ``mean_size`` (mean members per cluster, 0.0 when none). With ``true_ids`` (N,):
    ``ari`` and ``nmi`` (sklearn, every outlier counted as its own singleton cluster) and
    ``purity`` (over clustered samples: share whose true id is the majority id of its cluster;
    0.0 when nothing is clustered).
    """
    lab = np.asarray(labels).astype(np.int64, copy=False).ravel()
    n = int(lab.size)
    clustered = lab[lab >= 0]
    if clustered.size:
        _, sizes = np.unique(clustered, return_counts=True)
    else:
        sizes = np.zeros(0, dtype=np.int64)
    out: dict[str, Any] = {
        "n": n,
        "clusters": int(sizes.size),
        "outliers": int(n - clustered.size),
        "largest": int(sizes.max()) if sizes.size else 0,
        "mean_size": float(sizes.mean()) if sizes.size else 0.0,
    }
    if true_ids is None:
        return out
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    truth = np.asarray(true_ids).ravel()
    if truth.shape[0] != n:
        raise ValueError(f"true_ids has {truth.shape[0]} entries for {n} labels")
    singleton = outliers_as_singletons(lab)
    out["ari"] = float(adjusted_rand_score(truth, singleton))
    out["nmi"] = float(normalized_mutual_info_score(truth, singleton))
    if clustered.size:
        from sklearn.metrics.cluster import contingency_matrix

        table = contingency_matrix(clustered, truth[lab >= 0], sparse=True)  # (C, T) sparse
        out["purity"] = float(table.max(axis=1).toarray().sum() / clustered.size)
    else:
        out["purity"] = 0.0
    return out


def outliers_as_singletons(labels: np.ndarray) -> np.ndarray:
    """Labels (N,) int64 with every outlier (-1) given an id of its own, above the clusters'."""
    out = np.asarray(labels).astype(np.int64, copy=True).ravel()
    out_mask = out < 0
    base = out.max() + 1 if (~out_mask).any() else 0
    out[out_mask] = base + np.arange(int(out_mask.sum()), dtype=np.int64)
    return out


def centroids(features: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Cluster centres (C, D) float32, L2-normalised, for labels 0..C-1 (-1 ignored).

    Row c is the normalised mean of the features labelled c, C = labels.max() + 1. A label in
    0..C-1 with no member, or whose mean is the zero vector, raises ValueError.
    """
    x = check_features(features)
    lab = np.asarray(labels).astype(np.int64, copy=False).ravel()
    if lab.shape[0] != x.shape[0]:
        raise ValueError(f"{lab.shape[0]} labels for {x.shape[0]} feature rows")
    keep = lab >= 0
    c = int(lab.max()) + 1 if keep.any() else 0
    if c == 0:
        return np.zeros((0, x.shape[1]), dtype=np.float32)
    counts = np.bincount(lab[keep], minlength=c)
    if (counts == 0).any():
        raise ValueError(f"labels skip cluster id(s) {np.flatnonzero(counts == 0)[:5].tolist()}; "
                         "renumber them 0..C-1 first")
    members = np.flatnonzero(keep)
    members = members[np.argsort(lab[members], kind="stable")]  # grouped by label, row order
    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
    sums = np.add.reduceat(x[members], starts, axis=0, dtype=np.float64)  # (C, D)
    norms = np.linalg.norm(sums, axis=1, keepdims=True)
    if (norms == 0).any():
        raise ValueError("a cluster's features sum to the zero vector: no direction to normalise")
    return (sums / norms).astype(np.float32)


__all__ = ["centroids", "cluster_features", "cluster_stats", "dbscan_precomputed",
           "outliers_as_singletons", "renumber"]
