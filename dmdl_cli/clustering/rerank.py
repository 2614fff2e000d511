"""k-reciprocal re-ranking (Zhong et al., CVPR 2017) on the sparse Jaccard machinery.

``rerank_distance(q, g)`` stacks query and gallery features (Q + G rows), encodes every row
with the k-reciprocal encoding of :mod:`dmdl_cli.clustering.jaccard` (forward lists of k1 + 1
entries, the row itself plus k1 neighbours, as in Zhong et al.; half lists round(k1/2) + 1;
query expansion over the k2 nearest rows), and returns

    final = (1 - lambda) * jaccard + lambda * original,  original = 2 - 2 <q, g>

for the Q x G block only (the squared Euclidean distance of unit vectors, the same
``original_dist`` the encoding weights use). Query-query and gallery-gallery pairs take part in
the neighbour lists and the encodings, as in the original algorithm, but no (Q+G)^2 matrix is
built: memory is O((Q+G) k) plus the (Q, G) result.

Difference from Zhong et al.'s published code: it divides each row of the distance matrix by
its maximum before the exponential weights and the final mix; here features are L2-normalised
so ``2 - 2 cos`` already lies in [0, 4] and is used as it is (the ClusterContrast convention).
"""
from __future__ import annotations

import logging

import numpy as np

from dmdl_cli.clustering.jaccard import (
    _Columns,
    _distance_from_sums,
    _min_sums,
    _row_ids,
    _rows_by_budget,
    _TRIPLES_PER_CHUNK,
    kreciprocal_encoding,
)
from dmdl_cli.clustering.neighbors import KnnMethod, check_features, knn
from dmdl_cli.errors import DmdlError

log = logging.getLogger(__name__)


def rerank_distance(
    q_feats: np.ndarray,
    g_feats: np.ndarray,
    *,
    k1: int = 20,
    k2: int = 6,
    lambda_value: float = 0.3,
    knn_method: KnnMethod = "exact",
    use_gpu: bool | None = None,
) -> np.ndarray:
    """Re-ranked distance (Q, G) float32 between L2-normalised queries (Q, D) and gallery (G, D).

    k1 >= Q + G is clamped to Q + G - 1 (logged). lambda_value in [0, 1] weighs the original
    distance against the Jaccard distance.
    """
    q = check_features(q_feats, "query features")
    g = check_features(g_feats, "gallery features")
    if q.shape[1] != g.shape[1]:
        raise DmdlError(f"query features are {q.shape[1]}-d but gallery features are "
                        f"{g.shape[1]}-d; extract both with the same checkpoint")
    if not 0.0 <= float(lambda_value) <= 1.0:
        raise DmdlError(f"re-ranking lambda must be in [0, 1], got {lambda_value}")
    if int(k1) < 1 or int(k2) < 1:
        raise DmdlError(f"re-ranking k1 and k2 must be >= 1, got k1={k1}, k2={k2}")
    nq, ng = q.shape[0], g.shape[0]
    x = np.concatenate((q, g), axis=0)  # (Q + G, D)
    n = x.shape[0]
    k1_eff = min(int(k1), n - 1)
    if k1_eff != int(k1):
        log.warning("rerank_distance: k1=%d >= %d samples: using k1=%d", k1, n, k1_eff)
    k1_eff = max(k1_eff, 1)
    sims, idx = knn(x, k1_eff + 1, method=knn_method, use_gpu=use_gpu)
    v = kreciprocal_encoding(x, idx, k1=k1_eff, k2=min(int(k2), idx.shape[1]), sims=sims)
    del sims, idx

    cols = _Columns(v)
    # Per column of V, the first position holding a gallery row (rows ascend in a column).
    col_keys = _row_ids(cols.indptr, 0, n) * n + cols.rows
    first_gallery = np.searchsorted(col_keys, np.arange(n, dtype=np.int64) * n + nq)
    start = first_gallery[v.indices]  # per entry (i, j): where gallery rows of column j begin
    del col_keys
    cnt = np.maximum(cols.indptr[v.indices + 1] - start, 0)
    row_work = np.add.reduceat(cnt, v.indptr[:-1])[:nq]
    jac = np.ones((nq, ng), dtype=np.float32)
    for r0, r1 in _rows_by_budget(row_work + 1, _TRIPLES_PER_CHUNK):
        m = _min_sums(v, cols, r0, r1, start)
        rows = _row_ids(m.indptr.astype(np.int64), 0, r1 - r0) + r0
        jac[rows, m.indices - nq] = _distance_from_sums(m.data)
    original = np.float32(2.0) - np.float32(2.0) * (q @ g.T)
    lam = np.float32(lambda_value)
    return ((np.float32(1.0) - lam) * jac + lam * original).astype(np.float32, copy=False)


__all__ = ["rerank_distance"]
