"""Cross-modality association of per-modality clusters into one identity space (stage 2).

After each epoch's clustering, the visible clusters ``0..Cv-1`` and the infrared clusters
``0..Ci-1`` are linked by the cosine similarity of their centroids (docs/method.md section 2):

* ``"nearest-alternating"`` (DMDL): on even epochs every visible cluster takes the id of its most
  similar IR cluster (the unified id space is the IR clusters; each IR cluster keeps its own id),
  on odd epochs every IR cluster takes the id of its most similar visible cluster. Many-to-one:
  several clusters of one modality may join the same cluster of the other.
* ``"hungarian"`` (PGM-style baselines): one-to-one ``scipy.optimize.linear_sum_assignment``
  maximising the total similarity; matched pairs share an id, unmatched clusters (the surplus
  of the larger modality) keep ids of their own.

Unified ids are always renumbered to ``0..num_ids-1``; an id may have members in one modality
only. With no clusters in one modality, every cluster of the other keeps its own id. Ties in
similarity go to the lowest cluster index.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment

from dmdl_cli.data.index import INFRARED, VISIBLE
from dmdl_cli.recipe import ASSOCIATION_METHODS

__all__ = [
    "ASSOCIATION_METHODS",
    "Association",
    "associate",
    "centroid_similarity",
    "unify_labels",
    "unify_rows",
    "association_accuracy",
    "association_chance",
]


@dataclass(frozen=True)
class Association:
    """Maps of each modality's cluster ids to unified ids.

    ``vis_to_unified (Cv,)`` and ``ir_to_unified (Ci,)`` int64, values in ``[0, num_ids)``;
    every id in ``[0, num_ids)`` is used by at least one cluster.
    """

    vis_to_unified: np.ndarray
    ir_to_unified: np.ndarray
    num_ids: int

    def shared_ids(self) -> np.ndarray:
        """Unified ids with clusters in both modalities (ascending int64)."""
        return np.intersect1d(self.vis_to_unified, self.ir_to_unified)


def _as_centroids(x: np.ndarray, other: np.ndarray, name: str) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.size == 0:
        dim = np.asarray(other).shape[-1] if np.asarray(other).ndim == 2 else 0
        return np.zeros((0, dim))
    if x.ndim != 2:
        raise ValueError(f"{name} must be (C, D), got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"{name} holds non-finite values")
    return x


def centroid_similarity(vis_centroids: np.ndarray, ir_centroids: np.ndarray) -> np.ndarray:
    """Cosine similarity ``(Cv, Ci)`` float64 of the row-normalised centroids (a zero centroid
    has similarity 0 to everything)."""
    v = _as_centroids(vis_centroids, ir_centroids, "vis_centroids")
    r = _as_centroids(ir_centroids, vis_centroids, "ir_centroids")
    if v.shape[0] and r.shape[0] and v.shape[1] != r.shape[1]:
        raise ValueError(f"centroid dimensions differ: {v.shape[1]} vs {r.shape[1]}")
    v = v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
    r = r / np.maximum(np.linalg.norm(r, axis=1, keepdims=True), 1e-12)
    return v @ r.T if v.shape[0] and r.shape[0] else np.zeros((v.shape[0], r.shape[0]))


def _renumber(vis_raw: np.ndarray, ir_raw: np.ndarray) -> Association:
    """Map raw ids (any int64) to contiguous ``0..num_ids-1``, keeping their order."""
    uniq, inverse = np.unique(np.concatenate([vis_raw, ir_raw]), return_inverse=True)
    inverse = inverse.astype(np.int64).reshape(-1)
    return Association(vis_to_unified=inverse[:vis_raw.size],
                       ir_to_unified=inverse[vis_raw.size:], num_ids=int(uniq.size))


def associate(vis_centroids: np.ndarray, ir_centroids: np.ndarray, *,
              method: str = "nearest-alternating", epoch: int) -> Association:
    """Associate visible clusters ``(Cv, D)`` with infrared clusters ``(Ci, D)``.

    ``epoch`` picks the direction of ``"nearest-alternating"`` (even: visible -> IR, odd:
    IR -> visible); ``"hungarian"`` ignores it. Centroids need not be normalised.
    """
    if method not in ASSOCIATION_METHODS:
        raise ValueError(f"method must be one of {ASSOCIATION_METHODS}, got {method!r}")
    sim = centroid_similarity(vis_centroids, ir_centroids)  # (Cv, Ci)
    cv, ci = sim.shape
    if cv == 0 or ci == 0:  # nothing to link: every cluster keeps its own id
        return _renumber(np.arange(cv, dtype=np.int64), cv + np.arange(ci, dtype=np.int64))
    if method == "nearest-alternating":
        if int(epoch) % 2 == 0:  # visible clusters join their nearest IR cluster
            return _renumber(sim.argmax(axis=1).astype(np.int64), np.arange(ci, dtype=np.int64))
        return _renumber(np.arange(cv, dtype=np.int64), sim.argmax(axis=0).astype(np.int64))
    # Hungarian: one-to-one, maximum total similarity; matched pairs get ids 0..M-1 in visible
    # order, then unmatched visible clusters, then unmatched IR clusters.
    vis_idx, ir_idx = linear_sum_assignment(sim, maximize=True)  # vis_idx ascending
    m = vis_idx.size
    vis_raw = np.full(cv, -1, dtype=np.int64)
    ir_raw = np.full(ci, -1, dtype=np.int64)
    vis_raw[vis_idx] = np.arange(m)
    ir_raw[ir_idx] = np.arange(m)
    free_v = np.flatnonzero(vis_raw < 0)
    vis_raw[free_v] = m + np.arange(free_v.size)
    free_i = np.flatnonzero(ir_raw < 0)
    ir_raw[free_i] = m + free_v.size + np.arange(free_i.size)
    return Association(vis_to_unified=vis_raw, ir_to_unified=ir_raw,
                       num_ids=int(m + free_v.size + free_i.size))


def _map_labels(labels: np.ndarray, table: np.ndarray, name: str) -> np.ndarray:
    labels = np.asarray(labels).astype(np.int64, copy=False)
    if labels.size and labels.max(initial=-1) >= table.size:
        raise ValueError(f"{name} holds cluster id {labels.max()} but the association has "
                         f"{table.size} clusters for that modality")
    if labels.size and labels.min(initial=0) < -1:
        raise ValueError(f"{name} holds ids below -1")
    out = np.full(labels.shape, -1, dtype=np.int64)
    keep = labels >= 0
    out[keep] = table[labels[keep]]
    return out


def unify_labels(vis_labels: np.ndarray, ir_labels: np.ndarray,
                 association: Association) -> tuple[np.ndarray, np.ndarray]:
    """Per-row unified labels: visible rows ``(Nv,)`` and IR rows ``(Ni,)`` of per-modality
    cluster ids (-1 outliers) -> ``(vis_unified (Nv,), ir_unified (Ni,))`` int64, -1 kept."""
    return (_map_labels(vis_labels, association.vis_to_unified, "vis_labels"),
            _map_labels(ir_labels, association.ir_to_unified, "ir_labels"))


def unify_rows(labels: np.ndarray, modality: np.ndarray, association: Association) -> np.ndarray:
    """Same as :func:`unify_labels` on one ``(N,)`` array of per-modality ids aligned with
    ``modality (N,)`` (the sampler's input convention) -> unified ``(N,)`` int64, -1 kept."""
    labels = np.asarray(labels).astype(np.int64, copy=False)
    modality = np.asarray(modality)
    if labels.shape != modality.shape:
        raise ValueError(f"labels {labels.shape} and modality {modality.shape} differ")
    out = np.full(labels.shape, -1, dtype=np.int64)
    for m, table, name in ((VISIBLE, association.vis_to_unified, "visible labels"),
                           (INFRARED, association.ir_to_unified, "infrared labels")):
        sel = modality == m
        out[sel] = _map_labels(labels[sel], table, name)
    return out


def association_chance(vis_labels: np.ndarray, ir_labels: np.ndarray,
                       vis_true: np.ndarray, ir_true: np.ndarray,
                       association: Association) -> float:
    """Diagnostic: the association accuracy a random linking would score, to read
    :func:`association_accuracy` against. A random (visible cluster, IR cluster) pair agrees
    with probability ``sum over ids of f_v(id) * f_i(id)``, ``f`` being the share of a modality's
    clusters (with a member of known identity) whose majority id is ``id``. NaN when a modality
    has no such cluster. Arguments as for :func:`association_accuracy`."""
    maj_v = _majority(vis_labels, vis_true, association.vis_to_unified.size)  # (Cv,)
    maj_i = _majority(ir_labels, ir_true, association.ir_to_unified.size)  # (Ci,)
    maj_v, maj_i = maj_v[maj_v >= 0], maj_i[maj_i >= 0]
    if maj_v.size == 0 or maj_i.size == 0:
        return float("nan")
    ids, counts_v = np.unique(maj_v, return_counts=True)
    counts_i = np.array([(maj_i == i).sum() for i in ids])
    return float((counts_v * counts_i).sum() / (maj_v.size * maj_i.size))


def _majority(labels: np.ndarray, true_ids: np.ndarray, num_clusters: int) -> np.ndarray:
    """``(num_clusters,)`` majority true id of each cluster's members (ties: smallest id;
    -1 for a cluster without labelled members). Rows with label -1 or true id < 0 are ignored."""
    labels = np.asarray(labels).astype(np.int64, copy=False)
    true_ids = np.asarray(true_ids).astype(np.int64, copy=False)
    if labels.shape != true_ids.shape:
        raise ValueError(f"labels {labels.shape} and true ids {true_ids.shape} differ")
    keep = (labels >= 0) & (true_ids >= 0)
    out = np.full(num_clusters, -1, dtype=np.int64)
    if not keep.any():
        return out
    pairs, counts = np.unique(np.stack([labels[keep], true_ids[keep]], axis=1), axis=0,
                              return_counts=True)
    order = np.lexsort((pairs[:, 1], -counts, pairs[:, 0]))  # cluster, most votes, smallest id
    pairs = pairs[order]
    first = np.concatenate(([True], pairs[1:, 0] != pairs[:-1, 0]))
    out[pairs[first, 0]] = pairs[first, 1]
    return out


def association_accuracy(vis_labels: np.ndarray, ir_labels: np.ndarray,
                         vis_true: np.ndarray, ir_true: np.ndarray,
                         association: Association) -> float:
    """Diagnostic (needs true ids, never used for training): share of linked cluster pairs
    whose majority true identities agree.

    ``vis_labels (Nv,)`` / ``ir_labels (Ni,)``: per-modality cluster ids of the rows (-1
    outliers); ``vis_true (Nv,)`` / ``ir_true (Ni,)``: their true person ids (< 0 = unknown).
    A cluster's majority id is the most frequent true id among its members (ties: the smallest).
    The linked pairs are all (visible cluster a, IR cluster b) with the same unified id; pairs
    with a cluster that has no member of known identity are left out. Returns
    ``agreeing pairs / linked pairs``, or NaN when no pair is linked.
    """
    maj_v = _majority(vis_labels, vis_true, association.vis_to_unified.size)  # (Cv,)
    maj_i = _majority(ir_labels, ir_true, association.ir_to_unified.size)  # (Ci,)
    linked = association.vis_to_unified[:, None] == association.ir_to_unified[None, :]
    linked &= (maj_v >= 0)[:, None] & (maj_i >= 0)[None, :]  # (Cv, Ci)
    total = int(linked.sum())
    if total == 0:
        return float("nan")
    agree = int((linked & (maj_v[:, None] == maj_i[None, :])).sum())
    return agree / total
