"""Retrieval metrics for cross-modality re-identification: CMC, mAP and mINP.

All metrics are computed from a query x gallery distance matrix ``dist`` of shape ``(Q, G)``
(smaller = closer). For one query ``q``:

* **Ranked list.** Gallery indices sorted by ``dist[q]`` with a *stable* sort, so equal
  distances keep gallery order (lower gallery index first). Gallery entries with
  ``exclude[q, g] = True`` are removed from the list entirely; the remaining list is the *kept*
  list, with 0-based positions ``r = 0, 1, ...``.
* **Positives.** Kept entries whose identity equals the query identity; ``P`` = their number.
  A query with ``P = 0`` is *not valid*: it is skipped and not counted in any mean.
* **CMC.** ``k0`` = rank of the first hit. With ``dedup=False`` (plain CMC) ``k0`` is the kept
  position of the first positive. With ``dedup=True`` (the single-gallery-shot CMC of the
  SYSU-MM01 reference evaluation) the kept identities are first de-duplicated in rank order
  (only the first occurrence of each identity stays) and ``k0`` is the position of the query
  identity in that de-duplicated list, i.e. the number of *distinct* identities met before the
  first positive. ``cmc[k] = #{valid q : k0(q) <= k} / num_valid`` for ``k = 0..max_rank-1``
  (``cmc[0]`` is Rank-1).
* **AP** (no de-duplication), with ``r_1 < ... < r_P`` the kept positions of the positives::

      AP = (1 / P) * sum_{i=1..P} i / (r_i + 1)

* **INP** (inverse negative penalty, Ye et al. AGW)::

      INP = P / (r_P + 1)         # positives / 1-based position of the hardest positive

``mAP`` and ``mINP`` are the means of AP and INP over the valid queries.

Implementation (vectorised over queries, processed in row chunks to bound memory):

1. Each row of ``dist`` becomes unique ``uint64`` *order keys*, ``key[q, g] < key[q, h]`` iff
   ``g`` ranks before ``h`` in the stable order. For ``float32`` / ``float16`` distances the key
   is ``(order-preserving bits of the float) << 32 | g`` (no sort at all); other dtypes use the
   inverse permutation of a stable ``argsort``. Excluded cells get the largest key.
2. The kept position of a positive is the number of kept entries with a smaller key. When the
   queries have few positives (``P_max <= 2 log2 G``) it is counted by direct comparison, in
   ``O(Q P_max G)``; otherwise the keys are sorted, in ``O(Q G log G)``.
3. The de-duplicated first-hit rank is the number of identities having a kept entry whose key is
   below the key of the first positive (one ``reduceat`` over identity-grouped columns).
"""
from __future__ import annotations

import sys
from typing import Any

import numpy as np

__all__ = ["rank_metrics", "mean_std", "query_average_precision"]

# Upper bound on the number of (query, gallery) cells processed at once; bounds
# the temporary arrays to a few tens of MB. A memory knob, not a method parameter.
_CHUNK_CELLS = 1 << 22
# Keys compared at once in the counting path (about 2 MiB, cache-sized row blocks).
_BLOCK_CELLS = 1 << 18
# Count positions by comparison while P_max <= _COMPARE_PER_LOG2 * log2(G), else sort.
_COMPARE_PER_LOG2 = 2.0
_KEY_MAX = np.iinfo(np.uint64).max


def _as_1d(name: str, arr: Any, length: int | None = None) -> np.ndarray:
    out = np.asarray(arr)
    if out.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array, got shape {out.shape}")
    if length is not None and out.shape[0] != length:
        raise ValueError(f"{name} has length {out.shape[0]}, expected {length}")
    return out


def _order_keys(d: np.ndarray) -> np.ndarray:
    """``(C, G)`` unique ``uint64`` keys ordering each row of ``d`` stably (ties by column).

    ``float32``/``float16``: the float's bits are mapped to an unsigned integer of the same
    order (``b ^ 0x80000000`` for ``b`` >= 0, ``~b`` for negatives; ``-0.0`` first turned into
    ``+0.0``), put in the high 32 bits, and the column index in the low 32 bits. Other dtypes:
    the key is the position in a stable ``argsort`` of the row.
    """
    num_c, num_g = d.shape
    if d.dtype in (np.float32, np.float16) and num_g < 2**32:
        b = np.add(d, np.float32(0.0), dtype=np.float32).view(np.uint32)  # copy; -0.0 -> +0.0
        b ^= (np.uint32(0) - (b >> np.uint32(31))) | np.uint32(0x80000000)
        cols = np.arange(num_g, dtype=np.uint32)
        if sys.byteorder == "little":
            key = np.empty((num_c, num_g), np.uint64)
            halves = key.view(np.uint32).reshape(num_c, num_g, 2)     # (low, high) words
            halves[..., 0] = cols
            halves[..., 1] = b
        else:  # pragma: no cover - big-endian hosts
            key = (b.astype(np.uint64) << np.uint64(32)) | cols.astype(np.uint64)
        return key
    order = np.argsort(d, axis=1, kind="stable")
    key = np.empty((num_c, num_g), np.uint64)
    np.put_along_axis(key, order, np.arange(num_g, dtype=np.uint64)[None, :], axis=1)
    return key


def rank_metrics(
    dist: np.ndarray,
    q_pids: np.ndarray,
    g_pids: np.ndarray,
    q_cams: np.ndarray,
    g_cams: np.ndarray,
    *,
    max_rank: int = 20,
    exclude: np.ndarray | None = None,
    dedup: bool = True,
) -> dict[str, Any]:
    """CMC, mAP and mINP of a ranking (see the module docstring for the exact formulas).

    Args:
        dist: ``(Q, G)`` distances, smaller = closer; any real dtype, never up-cast
            (``float32`` is the fast path); NaN is rejected.
        q_pids: ``(Q,)`` query identities.
        g_pids: ``(G,)`` gallery identities.
        q_cams: ``(Q,)`` query cameras (shape-checked only; kept for API stability).
        g_cams: ``(G,)`` gallery cameras (shape-checked only).
        max_rank: length of the returned CMC curve.
        exclude: optional ``(Q, G)`` bool; ``True`` removes that gallery entry from that query's
            ranked list. This is the only way entries are excluded.
        dedup: single-gallery-shot (identity de-duplicated) CMC if ``True``, plain CMC if not.
            mAP and mINP never de-duplicate.

    Returns:
        ``{"cmc": float64 (max_rank,), "mAP": float, "mINP": float, "num_valid": int}``;
        all rates in ``[0, 1]``.

    Raises:
        ValueError: on inconsistent shapes, ``max_rank < 1``, NaN distances, or when no query
            has a valid match in its kept gallery.
    """
    dist, q_pids, g_pids, exclude = _checked(dist, q_pids, g_pids, q_cams, g_cams, max_rank, exclude)
    num_q, num_g = dist.shape
    identities = _gallery_identities(g_pids) if dedup and num_g > 0 else None
    all_ap, all_inp, all_k0 = [], [], []
    chunk = max(1, _CHUNK_CELLS // max(num_g, 1))
    for lo in range(0, num_q, chunk):
        hi = min(lo + chunk, num_q)
        part = _chunk_metrics(dist[lo:hi], q_pids[lo:hi], g_pids,
                              exclude[lo:hi] if exclude is not None else None, identities)
        if part is not None:
            all_ap.append(part[0])
            all_inp.append(part[1])
            all_k0.append(part[2])
    if not all_ap:
        raise ValueError(
            f"no valid query: none of the {num_q} queries has a matching identity in its "
            f"(non-excluded) gallery of {num_g} entries"
        )
    ap = np.concatenate(all_ap)
    inp = np.concatenate(all_inp)
    k0 = np.concatenate(all_k0)
    num_valid = int(ap.size)
    hist = np.bincount(np.minimum(k0, max_rank), minlength=max_rank + 1)[:max_rank]
    cmc = np.cumsum(hist).astype(np.float64) / num_valid
    return {
        "cmc": cmc,
        "mAP": float(ap.mean()),
        "mINP": float(inp.mean()),
        "num_valid": num_valid,
    }


def _checked(dist, q_pids, g_pids, q_cams, g_cams, max_rank: int, exclude):
    """The inputs of :func:`rank_metrics` as arrays, or ValueError naming what is wrong."""
    dist = np.asarray(dist)
    if dist.ndim != 2:
        raise ValueError(f"dist must be a 2-D (Q, G) array, got shape {dist.shape}")
    num_q, num_g = dist.shape
    q_pids = _as_1d("q_pids", q_pids, num_q)
    g_pids = _as_1d("g_pids", g_pids, num_g)
    _as_1d("q_cams", q_cams, num_q)
    _as_1d("g_cams", g_cams, num_g)
    if max_rank < 1:
        raise ValueError(f"max_rank must be >= 1, got {max_rank}")
    if not np.issubdtype(dist.dtype, np.number) or np.issubdtype(dist.dtype, np.complexfloating):
        raise ValueError(f"dist must hold real numbers, got dtype {dist.dtype}")
    if np.issubdtype(dist.dtype, np.floating) and np.isnan(dist).any():
        raise ValueError("dist contains NaN")
    if exclude is not None:
        exclude = np.asarray(exclude)
        if exclude.shape != (num_q, num_g) or exclude.dtype != np.bool_:
            raise ValueError(
                f"exclude must be a bool array of shape {(num_q, num_g)}, "
                f"got {exclude.dtype} {exclude.shape}"
            )
    return dist, q_pids, g_pids, exclude


def _gallery_identities(g_pids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Gallery columns grouped by identity, for a per-identity reduction: ``(id_perm (G,),
    id_starts (n_ids,))``."""
    _, g_label = np.unique(g_pids, return_inverse=True)
    id_perm = np.argsort(g_label, kind="stable")
    id_starts = np.flatnonzero(np.r_[True, np.diff(g_label[id_perm]) != 0])
    return id_perm, id_starts


def _chunk_metrics(dist: np.ndarray, q_pids: np.ndarray, g_pids: np.ndarray,
                   exclude: np.ndarray | None, identities: tuple[np.ndarray, np.ndarray] | None):
    """AP, INP and the CMC hit rank ``k0`` ``(V,)`` of the valid queries among a chunk of
    ``C`` rows (``dist (C, G)``); None when no query of the chunk has a positive.
    ``identities``: :func:`_gallery_identities` for the de-duplicated CMC, None for the plain."""
    match = g_pids[None, :] == q_pids[:, None]                       # (C, G) gallery order
    if exclude is not None:
        match &= ~exclude
    n_pos = np.count_nonzero(match, axis=1)                          # (C,) positives P
    valid = n_pos > 0
    if not valid.any():
        return None
    key = _order_keys(dist)                                          # (C, G) uint64
    if exclude is not None:
        key[exclude] = _KEY_MAX                                      # after every kept entry
    if not valid.all():
        match, key, n_pos = match[valid], key[valid], n_pos[valid]
    row_start = np.cumsum(n_pos) - n_pos                             # (V,) offsets into T
    rows, pos, first_key = _positive_ranks(match, key, n_pos, row_start)
    hit_idx = np.arange(rows.size) - row_start[rows] + 1             # i = 1..P within a row
    ap = np.bincount(rows, weights=hit_idx / (pos + 1.0), minlength=n_pos.size) / n_pos
    last = row_start + n_pos - 1                                     # index of r_P in T
    inp = n_pos / (pos[last] + 1.0)
    if identities is not None:
        # identities with a kept entry ranked before the first positive
        id_perm, id_starts = identities
        before = key < first_key[:, None]                            # (V, G); excluded: never
        seen = np.logical_or.reduceat(before[:, id_perm], id_starts, axis=1)  # (V, n_ids)
        k0 = np.count_nonzero(seen, axis=1)
    else:
        k0 = pos[row_start]
    return ap, inp, k0


def _positive_ranks(match: np.ndarray, key: np.ndarray, n_pos: np.ndarray, row_start: np.ndarray):
    """Where each positive lands in its row's ranking, for ``V`` rows with a positive.

    Returns ``rows, pos`` ``(T,)``: one entry per positive, rows ascending and kept positions
    ``r`` ascending inside each row; and ``first_key (V,)``: the key of each row's first
    positive. Few positives per row: count the keys below each positive (no sort); many: sort.
    """
    num_v, num_g = key.shape
    if n_pos.max() <= _COMPARE_PER_LOG2 * np.log2(max(num_g, 2)):
        rows, cols = np.nonzero(match)                               # gallery order
        pos_key = key[rows, cols]                                    # (T,)
        slot = np.arange(rows.size) - row_start[rows]
        slot_key = np.zeros((num_v, int(n_pos.max())), np.uint64)    # pad 0: counts 0
        slot_key[rows, slot] = pos_key
        counts = np.empty(slot_key.shape, np.int64)                  # (V, P_max)
        block = max(1, _BLOCK_CELLS // num_g)                        # cache-sized row blocks
        for a in range(0, num_v, block):
            key_b = key[a:a + block]
            for j in range(slot_key.shape[1]):
                counts[a:a + block, j] = np.count_nonzero(key_b < slot_key[a:a + block, j, None], axis=1)
        pos = counts[rows, slot]
        within = np.lexsort((pos, rows))
        return rows[within], pos[within], pos_key[within][row_start]
    order = np.argsort(key, axis=1)                                  # kept first, by rank
    rows, pos = np.nonzero(np.take_along_axis(match, order, axis=1))
    first_col = order[np.arange(num_v), pos[row_start]]              # (V,) gallery col of r_1
    return rows, pos, key[np.arange(num_v), first_col]


def mean_std(per_trial: list[dict]) -> dict[str, Any]:
    """Mean and (population, ``ddof=0``) standard deviation of metrics over trials.

    Args:
        per_trial: results of :func:`rank_metrics`, one per trial (same ``max_rank``).

    Returns:
        ``{"cmc": (R,) mean, "cmc_std": (R,), "mAP": float, "mAP_std": float,
        "mINP": float, "mINP_std": float, "trials": int}``.
    """
    if not per_trial:
        raise ValueError("mean_std needs at least one trial result")
    cmcs = np.stack([np.asarray(t["cmc"], dtype=np.float64) for t in per_trial])  # (T, R)
    maps = np.array([t["mAP"] for t in per_trial], dtype=np.float64)
    minps = np.array([t["mINP"] for t in per_trial], dtype=np.float64)
    return {
        "cmc": cmcs.mean(axis=0),
        "cmc_std": cmcs.std(axis=0),
        "mAP": float(maps.mean()),
        "mAP_std": float(maps.std()),
        "mINP": float(minps.mean()),
        "mINP_std": float(minps.std()),
        "trials": len(per_trial),
    }


def query_average_precision(dist: np.ndarray, q_pids: np.ndarray, g_pids: np.ndarray,
                            exclude: np.ndarray | None = None) -> np.ndarray:
    """``(Q,)`` AP of each query (the module docstring's formula), NaN for a query that is not
    valid. The mean over the valid queries is ``rank_metrics(...)["mAP"]``; this plain
    sort-based form serves the ranked-list pictures (which queries fail most)."""
    dist = np.asarray(dist)
    q_pids, g_pids = np.asarray(q_pids), np.asarray(g_pids)
    ap = np.full(dist.shape[0], np.nan)
    chunk = max(1, _CHUNK_CELLS // max(dist.shape[1], 1))
    for lo in range(0, dist.shape[0], chunk):
        hi = min(lo + chunk, dist.shape[0])
        key = _order_keys(dist[lo:hi])                                # (C, G)
        match = g_pids[None, :] == q_pids[lo:hi, None]                # (C, G)
        if exclude is not None:
            key[exclude[lo:hi]] = _KEY_MAX                            # kept entries first
            match &= ~exclude[lo:hi]
        order = np.argsort(key, axis=1)                               # (C, G) ranked lists
        hits = np.take_along_axis(match, order, axis=1)               # (C, G) by rank
        n_pos = hits.sum(axis=1)                                      # (C,)
        precision = np.cumsum(hits, axis=1) / np.arange(1, dist.shape[1] + 1)  # i / (r_i + 1)
        with np.errstate(invalid="ignore", divide="ignore"):
            ap[lo:hi] = np.where(n_pos > 0, (precision * hits).sum(axis=1) / n_pos, np.nan)
    return ap
