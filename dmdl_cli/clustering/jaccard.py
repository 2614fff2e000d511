"""Sparse, exact k-reciprocal Jaccard distance (the ClusterContrast / Zhong et al. 2017 encoding).

The algorithm, for L2-normalised features x (N, D) and their k-NN lists ``rank`` (self first):

1. k-reciprocal sets. ``F_k(i) = rank[i, :k+1]`` truncated to the columns searched, and
   ``R_k(i) = {j in F_k(i) : i in F_k(j)}``. Pseudo-labelling searches ``k1`` columns (the
   ClusterContrast convention: the forward list is the row itself plus k1 - 1 others);
   re-ranking searches ``k1 + 1`` (Zhong et al.: the row plus k1 others). ``R`` uses k = k1,
   ``R_half`` uses k = round(k1 / 2) (numpy rounding).
2. Expansion. ``E(i) = R(i)`` united with every ``R_half(c)``, c in R(i), that shares more than
   2/3 of its members with R(i).
3. Encoding. ``V[i, j] = exp(-d2(i, j)) / sum_{j' in E(i)} exp(-d2(i, j'))`` for j in E(i),
   with ``d2 = 2 - 2 <x_i, x_j>`` (squared Euclidean distance of unit vectors).
4. Local query expansion (k2 > 1). ``V_qe[i] = mean(V[rank[i, :k2]])``.
5. Jaccard. ``s = sum_j min(V_qe[i, j], V_qe[o, j])``; ``d(i, o) = 1 - s / (2 - s)`` (every row of
   V_qe sums to 1, so ``2 - s`` is the sum of maxima), negatives clamped to 0.

Everything is O(N k) memory: V and V_qe are CSR matrices with O(k) entries a row, and step 5
enumerates, column by column of V_qe, only the row pairs that share the column (the reference
does the same enumeration through an inverted index, one Python loop iteration per row). The
pair sums are grouped with a sparse product ``ones(rows x triples) @ mins(triples x N)``, which
scipy evaluates with a dense accumulator in O(triples), without sorting.

Output convention of :func:`jaccard_distance` (a symmetric ``csr_matrix`` (N, N) float32 with
sorted indices):

- a stored entry (i, o) is a pair whose encodings overlap; its value is the Jaccard distance,
  which may be exactly 0 (identical encodings) and is then an *explicit* zero;
- **the diagonal is always stored, as explicit 0.0**;
- a pair that is not stored has no overlap: its distance is exactly 1 (the dense algorithm's
  value for such pairs);
- so explicit zeros carry meaning: never call ``eliminate_zeros()`` on the result. sklearn's
  ``DBSCAN(metric="precomputed")`` and ``NearestNeighbors`` treat stored entries as the only
  candidate neighbours, which is right for any eps < 1.

With ``max_distance`` set, stored entries are further restricted to distances <= max_distance
(the diagonal is always kept): DBSCAN with eps <= max_distance gives the same clusters and
memory stays at the size of the eps-neighbourhoods.
"""
from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import scipy.sparse as sp

from dmdl_cli.clustering.neighbors import KnnMethod, check_features, knn
from dmdl_cli.errors import DmdlError

log = logging.getLogger(__name__)

# Work bounds (memory of the chunked steps, not results): triples per chunk of step 5 and
# gathered feature rows per chunk of step 3. About 40 bytes a triple.
_TRIPLES_PER_CHUNK = 1 << 22
_GATHER_BYTES = 1 << 26


def half_k(k1: int) -> int:
    """k of the half-size reciprocal sets: ``round(k1 / 2)`` with numpy (banker's) rounding."""
    return int(np.around(k1 / 2))


def _ones_pattern(idx: np.ndarray, n_cols: int, n: int, dtype=np.int32) -> sp.csr_matrix:
    """(N, N) CSR with ones at (i, idx[i, :n_cols]), sorted indices."""
    cols = np.sort(idx[:, :n_cols], axis=1).astype(np.int32, copy=False)
    m = cols.shape[1]
    indptr = np.arange(0, n * m + 1, m, dtype=np.int64)
    mat = sp.csr_matrix((np.ones(n * m, dtype=dtype), cols.ravel(), indptr), shape=(n, n))
    mat.has_sorted_indices = True
    return mat


def reciprocal_sets(idx: np.ndarray, k: int) -> sp.csr_matrix:
    """R_k as an (N, N) CSR 0/1 int32 matrix: j in R_k(i) iff j in F_k(i) and i in F_k(j).

    ``F_k(i) = idx[i, :k+1]``, as many of those columns as ``idx`` has. Symmetric.
    """
    n = idx.shape[0]
    fwd = _ones_pattern(idx, min(k + 1, idx.shape[1]), n)
    rec = fwd.multiply(fwd.T.tocsr()).tocsr()
    rec.sort_indices()
    return rec


def _rows_by_budget(weights: np.ndarray, budget: int) -> list[tuple[int, int]]:
    """Split rows 0..len(weights) into consecutive ranges of about ``budget`` total weight."""
    n = len(weights)
    if n == 0:
        return []
    cum = np.cumsum(weights, dtype=np.int64)
    bounds = [0]
    while bounds[-1] < n:
        start = bounds[-1]
        base = cum[start - 1] if start > 0 else 0
        end = int(np.searchsorted(cum, base + budget, side="right"))
        bounds.append(min(n, max(end, start + 1)))
    return list(zip(bounds[:-1], bounds[1:]))


def _row_ids(indptr: np.ndarray, r0: int, r1: int) -> np.ndarray:
    return np.repeat(np.arange(r0, r1, dtype=np.int64), np.diff(indptr[r0:r1 + 1]))


def _expanded_sets(rec: sp.csr_matrix, rec_half: sp.csr_matrix) -> sp.csr_matrix:
    """E(i) = R(i) + every R_half(c), c in R(i), with |R_half(c) & R(i)| > 2/3 |R_half(c)|."""
    n = rec.shape[0]
    half_size = np.diff(rec_half.indptr)
    # Work of the products below is about nnz(R rows) * mean |R_half|.
    weights = np.diff(rec.indptr) * max(1, int(half_size.mean()) if n else 1)
    parts = []
    for r0, r1 in _rows_by_budget(weights, _TRIPLES_PER_CHUNK):
        rc = rec[r0:r1]
        # (rc @ R_half)[i, c] = |R(i) & R_half(c)| (R_half is symmetric); keep c in R(i).
        counts = (rc @ rec_half).multiply(rc).tocsr()
        counts.sort_indices()
        keep = counts.data > (2.0 / 3.0) * half_size[counts.indices]
        rows = _row_ids(counts.indptr.astype(np.int64), 0, r1 - r0)
        row_keep = np.bincount(rows[keep], minlength=r1 - r0)
        sel = sp.csr_matrix(
            (np.ones(int(keep.sum()), dtype=np.int32), counts.indices[keep],
             np.concatenate(([0], np.cumsum(row_keep))).astype(np.int64)),
            shape=(r1 - r0, n))
        ex = (rc + sel @ rec_half).tocsr()
        ex.sort_indices()
        parts.append(ex)
    out = sp.vstack(parts, format="csr") if len(parts) > 1 else parts[0]
    out.sort_indices()
    return out


def _pair_dots(x: np.ndarray, pattern: sp.csr_matrix, sims: np.ndarray | None,
               idx: np.ndarray | None) -> np.ndarray:
    """<x_i, x_j> for every stored (i, j) of ``pattern`` (float32, in entry order).

    Pairs found in the k-NN lists (as (i, j) or (j, i)) take the similarity the search returned;
    the rest are computed from the features, in chunks.
    """
    n, d = x.shape
    indptr = pattern.indptr.astype(np.int64)
    rows = _row_ids(indptr, 0, n)
    cols = pattern.indices.astype(np.int64)
    dots = np.empty(pattern.nnz, dtype=np.float32)
    todo = np.ones(pattern.nnz, dtype=bool)
    if sims is not None and idx is not None and idx.size:
        order = np.argsort(idx, axis=1, kind="stable")
        knn_keys = (np.arange(n, dtype=np.int64)[:, None] * n
                    + np.take_along_axis(idx, order, axis=1)).ravel()  # sorted: CSR order
        knn_sims = np.take_along_axis(sims, order, axis=1).ravel()
        del order
        for a, b in ((rows, cols), (cols, rows)):
            sel = np.flatnonzero(todo)
            keys = a[sel] * n + b[sel]
            pos = np.minimum(np.searchsorted(knn_keys, keys), knn_keys.size - 1)
            hit = knn_keys[pos] == keys
            dots[sel[hit]] = knn_sims[pos[hit]]
            todo[sel[hit]] = False
        del knn_keys, knn_sims
    rest = np.flatnonzero(todo)
    per_chunk = max(1, _GATHER_BYTES // (8 * d))
    for c0 in range(0, rest.size, per_chunk):
        sel = rest[c0:c0 + per_chunk]
        dots[sel] = np.einsum("ij,ij->i", x[rows[sel]], x[cols[sel]])
    return dots


def _gaussian_weights(x: np.ndarray, pattern: sp.csr_matrix, sims: np.ndarray | None = None,
                      idx: np.ndarray | None = None) -> sp.csr_matrix:
    """V: on the pattern, exp(-(2 - 2 <x_i, x_j>)) normalised to sum 1 per row (float32)."""
    n = x.shape[0]
    indptr = pattern.indptr.astype(np.int64)
    dots = _pair_dots(x, pattern, sims, idx)
    w = np.exp(-(np.float32(2.0) - np.float32(2.0) * dots))
    del dots
    sums = np.add.reduceat(w, indptr[:-1]).astype(np.float32)  # every row holds itself: no empty row
    w /= np.repeat(sums, np.diff(indptr))
    v = sp.csr_matrix((w, pattern.indices, indptr), shape=(n, n))
    v.has_sorted_indices = True
    return v


def kreciprocal_encoding(
    features: np.ndarray, idx: np.ndarray, *, k1: int, k2: int,
    sims: np.ndarray | None = None,
) -> sp.csr_matrix:
    """Steps 1-4: the (query-expanded) k-reciprocal encoding V_qe, CSR (N, N) float32.

    features: (N, D) float32 L2-normalised; idx: (N, m) int64 k-NN lists with the row itself in
    column 0 (from :func:`dmdl_cli.clustering.neighbors.knn`); sims: (N, m) their similarities
    (optional: reused for the weights instead of recomputing those dot products). Forward lists
    use ``idx[:, :k1+1]`` (as many columns as there are) and ``idx[:, :round(k1/2)+1]``; query
    expansion uses ``idx[:, :k2]``. Rows sum to 1.
    """
    x = np.ascontiguousarray(features, dtype=np.float32)
    n = x.shape[0]
    idx = np.asarray(idx, dtype=np.int64)
    if idx.ndim != 2 or idx.shape[0] != n or not np.array_equal(idx[:, 0], np.arange(n)):
        raise ValueError("idx must be (N, m) with one row per feature row, the row itself first")
    if sims is not None and np.shape(sims) != idx.shape:
        raise ValueError(f"sims shape {np.shape(sims)} differs from idx shape {idx.shape}")
    rec = reciprocal_sets(idx, k1)
    rec_half = reciprocal_sets(idx, half_k(k1))
    v = _gaussian_weights(x, _expanded_sets(rec, rec_half), sims, idx)
    del rec, rec_half
    k2 = min(int(k2), idx.shape[1])
    if k2 > 1:
        qe = _ones_pattern(idx, k2, n, dtype=np.float32)
        v = (qe @ v).tocsr()
        v.data /= np.float32(k2)
        v.sort_indices()
    return v


class _Columns:
    """V_qe by columns (its transpose in CSR) and where each entry of V_qe sits in it."""

    def __init__(self, v: sp.csr_matrix) -> None:
        n = v.shape[0]
        ids = sp.csr_matrix((np.arange(1, v.nnz + 1, dtype=np.int64), v.indices, v.indptr),
                            shape=v.shape).tocsc()  # counting sort: rows ascend in each column
        order = ids.data - 1  # entry ids of V in column-major order
        self.indptr = ids.indptr.astype(np.int64)
        self.rows = ids.indices.astype(np.int32)
        self.vals = v.data[order]
        self.where = np.empty(v.nnz, dtype=np.int64)  # position of V entry e in the columns
        self.where[order] = np.arange(v.nnz, dtype=np.int64)
        self.n = n


def _min_sums(v: sp.csr_matrix, cols: _Columns, r0: int, r1: int,
              start: np.ndarray | None = None) -> sp.csr_matrix:
    """For rows r0..r1 of V: s[i, o] = sum over entries (i, j) of min(V[i, j], V[o, j]), where o
    runs over column j of V from position ``start[e]`` (per entry e of V) to the column's end;
    ``start=None``: from just after row i itself, i.e. the rows o > i (upper triangle).

    Returns CSR (r1 - r0, N) float32, unsorted indices, no duplicates.
    """
    s, e = v.indptr[r0], v.indptr[r1]
    jj = v.indices[s:e]
    a = v.data[s:e]
    first = cols.where[s:e] + 1 if start is None else start[s:e]
    cnt = np.maximum(cols.indptr[jj + 1] - first, 0)
    total = int(cnt.sum())
    if total == 0:
        return sp.csr_matrix((r1 - r0, cols.n), dtype=np.float32)
    offs = np.cumsum(cnt) - cnt
    pos = np.repeat(first - offs, cnt)
    pos += np.arange(total, dtype=np.int64)
    other = cols.rows[pos]
    mins = np.minimum(np.repeat(a, cnt), cols.vals[pos])
    del pos
    # Group the triples (entry -> other row) by (row, other): ones(rows x entries) @ mins.
    trip = sp.csr_matrix((mins, other, np.concatenate(([0], np.cumsum(cnt)))),
                         shape=(e - s, cols.n))
    sel = sp.csr_matrix((np.ones(e - s, dtype=np.float32), np.arange(e - s, dtype=np.int64),
                         (v.indptr[r0:r1 + 1] - s).astype(np.int64)), shape=(r1 - r0, e - s))
    return (sel @ trip).tocsr()


def _distance_from_sums(sums: np.ndarray) -> np.ndarray:
    dist = np.float32(1.0) - sums / (np.float32(2.0) - sums)
    np.maximum(dist, np.float32(0.0), out=dist)
    return dist


def jaccard_from_encoding(v: sp.csr_matrix, *, max_distance: float | None = None,
                          info: dict | None = None) -> sp.csr_matrix:
    """Step 5 on an encoding from :func:`kreciprocal_encoding`: symmetric CSR (N, N) float32.

    See the module docstring for the storage convention (explicit 0 diagonal, non-stored = 1).
    """
    n = v.shape[0]
    cols = _Columns(v)
    # Upper triangle: from entry (i, j), only rows o > i of column j (positions after i's).
    cnt = cols.indptr[v.indices + 1] - (cols.where + 1)
    row_work = np.add.reduceat(cnt, v.indptr[:-1]) if v.nnz else np.zeros(n, np.int64)
    rows_out, cols_out, vals_out = [], [], []
    n_pairs = 0
    n_triples = int(cnt.sum())
    del cnt
    for r0, r1 in _rows_by_budget(row_work + 1, _TRIPLES_PER_CHUNK):
        m = _min_sums(v, cols, r0, r1)
        if m.nnz == 0:
            continue
        n_pairs += m.nnz
        dist = _distance_from_sums(m.data)
        rows = _row_ids(m.indptr.astype(np.int64), 0, r1 - r0) + r0
        if max_distance is not None:
            keep = dist <= max_distance
            dist, rows, other = dist[keep], rows[keep], m.indices[keep]
        else:
            other = m.indices
        rows_out.append(rows.astype(np.int32))
        cols_out.append(other.astype(np.int32))
        vals_out.append(dist)
    iu = np.concatenate(rows_out) if rows_out else np.zeros(0, np.int32)
    ou = np.concatenate(cols_out) if cols_out else np.zeros(0, np.int32)
    du = np.concatenate(vals_out) if vals_out else np.zeros(0, np.float32)
    del rows_out, cols_out, vals_out
    out = _symmetric_csr(iu, ou, du, n)
    if info is not None:
        info.update(triples=2 * n_triples, overlapping_pairs=2 * n_pairs, stored=out.nnz,
                    encoding_nnz=v.nnz)
    return out


def _symmetric_csr(iu: np.ndarray, ou: np.ndarray, du: np.ndarray, n: int) -> sp.csr_matrix:
    """CSR (n, n) with (iu, ou) and (ou, iu) = du and an explicit 0 diagonal; sorted indices.

    ``iu`` ascends. Built by index arithmetic (O(nnz), explicit zeros kept: scipy's sparse
    addition would drop them).
    """
    up_cnt = np.bincount(iu, minlength=n)
    up_ptr = np.concatenate(([0], np.cumsum(up_cnt)))
    low = sp.csr_matrix((du, ou, up_ptr), shape=(n, n)).T.tocsr()  # the mirrored half
    low_cnt = np.diff(low.indptr)
    indptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(up_cnt + low_cnt + 1, out=indptr[1:])
    indices = np.empty(indptr[-1], dtype=np.int32)
    data = np.empty(indptr[-1], dtype=np.float32)
    dest = indptr[:-1][iu] + (np.arange(iu.size) - up_ptr[:-1][iu])
    indices[dest], data[dest] = ou, du
    low_rows = _row_ids(low.indptr.astype(np.int64), 0, n)
    dest = (indptr[:-1] + up_cnt)[low_rows] + (np.arange(low.nnz) - low.indptr[:-1][low_rows])
    indices[dest], data[dest] = low.indices, low.data
    dest = indptr[1:] - 1
    indices[dest], data[dest] = np.arange(n, dtype=np.int32), np.float32(0.0)
    out = sp.csr_matrix((data, indices, indptr), shape=(n, n))
    out.sort_indices()
    return out


def jaccard_distance(
    features: np.ndarray,
    *,
    k1: int = 30,
    k2: int = 6,
    knn_method: KnnMethod = "exact",
    use_gpu: bool | None = None,
    max_distance: float | None = None,
    knn_options: dict[str, Any] | None = None,
    neighbors: tuple[np.ndarray, np.ndarray] | None = None,
    return_info: bool = False,
):
    """k-reciprocal Jaccard distance of L2-normalised features as a sparse symmetric matrix.

    features: (N, D) float32, L2-normalised rows. k1: reciprocal-neighbour size (k-NN searched
    with k1 columns, the row itself included, as in ClusterContrast); clamped to N - 1 with a
    logged warning (``info["warnings"]``). k2: query-expansion size (1 = none; at most k1).
    knn_method / use_gpu / knn_options: passed to :func:`dmdl_cli.clustering.neighbors.knn`.
    neighbors: precomputed ``(sims, idx)`` from ``knn(features, k1)`` (at least k1 columns, the
    row itself first) to skip the search; the knn arguments are then ignored.
    max_distance: keep only entries <= this (diagonal always kept); None keeps every
    overlapping pair.

    Returns ``csr_matrix`` (N, N) float32 (see the module docstring for what is stored), or
    ``(matrix, info)`` with ``return_info``: effective k1/k2, sizes and per-step seconds.
    """
    x = check_features(features)
    n = x.shape[0]
    info: dict[str, Any] = {"n": n, "k1": int(k1), "k2": int(k2), "warnings": []}
    if int(k1) < 1 or int(k2) < 1:
        raise DmdlError(f"jaccard_distance: k1 and k2 must be >= 1, got k1={k1}, k2={k2}")
    if max_distance is not None and not np.isfinite(max_distance):
        raise DmdlError(f"jaccard_distance: max_distance must be finite, got {max_distance}")
    k1_eff = min(int(k1), max(n - 1, 1))
    if k1_eff != int(k1):
        msg = f"k1={k1} >= N={n} samples: using k1={k1_eff}"
        info["warnings"].append(msg)
        log.warning("jaccard_distance: %s", msg)
    k2_eff = min(int(k2), k1_eff)
    if k2_eff != int(k2):
        msg = f"k2={k2} > k1={k1_eff}: using k2={k2_eff}"
        info["warnings"].append(msg)
        log.warning("jaccard_distance: %s", msg)
    info.update(k1=k1_eff, k2=k2_eff)

    t0 = time.perf_counter()
    if neighbors is None:
        sims, idx = knn(x, k1_eff, method=knn_method, use_gpu=use_gpu, **(knn_options or {}))
    else:
        sims, idx = (np.asarray(a) for a in neighbors)
        if idx.ndim != 2 or idx.shape[0] != n or idx.shape[1] < k1_eff:
            raise ValueError(f"neighbors: idx of shape {idx.shape} has fewer than k1={k1_eff} "
                             f"columns or not N={n} rows")
        sims, idx = sims[:, :k1_eff], idx[:, :k1_eff]
    t1 = time.perf_counter()
    v = kreciprocal_encoding(x, idx, k1=k1_eff, k2=k2_eff, sims=sims)
    del idx, sims
    t2 = time.perf_counter()
    dist = jaccard_from_encoding(v, max_distance=max_distance, info=info)
    t3 = time.perf_counter()
    info.update(seconds_knn=t1 - t0, seconds_encoding=t2 - t1, seconds_jaccard=t3 - t2)
    return (dist, info) if return_info else dist


__all__ = ["half_k", "jaccard_distance", "jaccard_from_encoding", "kreciprocal_encoding",
           "reciprocal_sets"]
