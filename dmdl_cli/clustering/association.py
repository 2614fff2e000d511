"""Cross-modality association of per-modality clusters into one identity space (stage 2).

After each epoch's clustering, an association method gives every clustered sample of both
modalities a unified identity label (docs/method.md section 2). A method reads one
:class:`AssociationInput` (the epoch; per modality the samples' cluster labels and features,
the cluster centroids and sizes) and returns an :class:`Association` (per modality, the unified
id of each sample). It also says which modality, if any, adopts the other's ids at an epoch
(:func:`adopter`): stage 2 clusters that modality with ``stage2.k1_adopting`` and lets its
samples also move the other modality's memory (``stage2.cross_memory_update``).

* ``"nearest-alternating"`` (DMDL): on even epochs the visible modality adopts: every visible
  cluster takes the id of its most similar IR cluster (by centroid cosine similarity; the
  unified id space is the IR clusters; each IR cluster keeps its own id); on odd epochs the
  infrared modality adopts: every IR cluster takes the id of its most similar visible cluster.
  Many-to-one: several clusters of one modality may join the same cluster of the other.
* ``"hungarian"`` (PGM-style baselines): one-to-one ``scipy.optimize.linear_sum_assignment``
  maximising the total centroid similarity; matched pairs share an id, unmatched clusters (the
  surplus of the larger modality) keep ids of their own. No modality adopts the other's ids.
* ``"cluster-sample-alternating"`` (the reference's RegDB stage 2): the adopting modality
  alternates as in nearest-alternating; of every ``association.sample_cycle`` epochs the first
  ``association.cluster_epochs`` link clusters as nearest-alternating does, and on the others
  the association is sample-level: every sample of the adopting modality, outliers included,
  takes the label of its most similar sample of the other modality (-1 when that one is an
  outlier), whatever cluster it was in. The unified ids are the other modality's clusters.

Unified ids are always renumbered to ``0..num_ids-1``; an id may have members in one modality
only. With no clusters in one modality, every cluster of the other keeps its own id. Ties in
similarity go to the lowest cluster index.

A new method is a function ``(AssociationInput, AssociationRecipe) -> Association`` and an adopter
``(epoch) -> modality | None`` in :data:`_METHODS`, and its name in ``ASSOCIATION_METHODS``
(``dmdl_cli/recipe.py``). It may map whole clusters (:func:`_from_cluster_maps`) or label each
sample on its own.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
from scipy.optimize import linear_sum_assignment

from dmdl_cli.clustering.neighbors import nearest_rows
from dmdl_cli.data.index import INFRARED, VISIBLE
from dmdl_cli.recipe import ASSOCIATION_METHODS, AssociationRecipe

__all__ = [
    "ASSOCIATION_METHODS",
    "ModalitySamples",
    "AssociationInput",
    "Association",
    "adopter",
    "associate",
    "centroid_similarity",
    "association_accuracy",
    "association_chance",
]


@dataclass(frozen=True)
class ModalitySamples:
    """One modality's clustered samples, as an association method reads them."""

    labels: np.ndarray  # (N_m,) int64 cluster id of each sample, -1 outlier
    features: np.ndarray  # (N_m, D) float32 L2-normalised features, aligned with labels
    centroids: np.ndarray  # (C_m, D) L2-normalised centroid of each cluster

    @property
    def sizes(self) -> np.ndarray:
        """``(C_m,)`` int64 number of samples of each cluster."""
        labels = np.asarray(self.labels)
        return np.bincount(labels[labels >= 0], minlength=len(self.centroids)).astype(np.int64)


@dataclass(frozen=True)
class AssociationInput:
    """Everything an association method may read: the 0-based epoch and, per modality
    (``VISIBLE``, ``INFRARED``), its clustered samples."""

    epoch: int
    samples: dict[int, ModalitySamples]


@dataclass(frozen=True)
class Association:
    """The unified identity labels of every sample of both modalities.

    ``labels[m]`` ``(N_m,)`` int64, aligned with ``AssociationInput.samples[m].labels``, values
    in ``[0, num_ids)`` or -1 (an outlier stays one).
    """

    labels: dict[int, np.ndarray]
    num_ids: int


@dataclass(frozen=True)
class _Method:
    # (input, the recipe's association section) -> the unified labels
    associate: Callable[[AssociationInput, AssociationRecipe], Association]
    adopter: Callable[[int], int | None]  # epoch -> the modality adopting the other's ids


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


def _map_labels(labels: np.ndarray, table: np.ndarray, name: str) -> np.ndarray:
    """Cluster ids ``labels (N,)`` (-1 outliers) -> ``table[labels] (N,)`` int64, -1 kept."""
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


def _from_cluster_maps(inp: AssociationInput, vis_raw: np.ndarray, ir_raw: np.ndarray) -> Association:
    """The association of a method that maps whole clusters: each modality's cluster ids to
    raw ids (any int64, ``(Cv,)`` and ``(Ci,)``), renumbered to ``0..num_ids-1`` keeping
    their order; every sample takes the id of its cluster."""
    uniq, inverse = np.unique(np.concatenate([vis_raw, ir_raw]), return_inverse=True)
    inverse = inverse.astype(np.int64).reshape(-1)
    tables = {VISIBLE: inverse[:vis_raw.size], INFRARED: inverse[vis_raw.size:]}
    labels = {m: _map_labels(inp.samples[m].labels, tables[m], f"{name} labels")
              for m, name in ((VISIBLE, "visible"), (INFRARED, "infrared"))}
    return Association(labels, int(uniq.size))


def _similarity(inp: AssociationInput) -> np.ndarray:
    """``(Cv, Ci)`` cosine similarity of the two modalities' centroids."""
    return centroid_similarity(inp.samples[VISIBLE].centroids, inp.samples[INFRARED].centroids)


def _own_ids(inp: AssociationInput, cv: int, ci: int) -> Association:
    """Nothing to link (a modality without clusters): every cluster keeps an id of its own."""
    return _from_cluster_maps(inp, np.arange(cv, dtype=np.int64), cv + np.arange(ci, dtype=np.int64))


def _alternating(epoch: int) -> int:
    """The visible modality adopts on even epochs, the infrared one on odd epochs."""
    return VISIBLE if int(epoch) % 2 == 0 else INFRARED


def _nearest_alternating(inp: AssociationInput, settings: AssociationRecipe) -> Association:
    """Every cluster of the adopting modality takes the id of its nearest cluster of the other."""
    sim = _similarity(inp)  # (Cv, Ci)
    cv, ci = sim.shape
    if cv == 0 or ci == 0:
        return _own_ids(inp, cv, ci)
    if _alternating(inp.epoch) == VISIBLE:  # visible clusters join their nearest IR cluster
        return _from_cluster_maps(inp, sim.argmax(axis=1).astype(np.int64),
                                  np.arange(ci, dtype=np.int64))
    return _from_cluster_maps(inp, np.arange(cv, dtype=np.int64),
                              sim.argmax(axis=0).astype(np.int64))


def _hungarian(inp: AssociationInput, settings: AssociationRecipe) -> Association:
    """One-to-one, maximum total similarity; matched pairs get ids 0..M-1 in visible order, then
    the unmatched visible clusters, then the unmatched IR clusters."""
    sim = _similarity(inp)  # (Cv, Ci)
    cv, ci = sim.shape
    if cv == 0 or ci == 0:
        return _own_ids(inp, cv, ci)
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
    return _from_cluster_maps(inp, vis_raw, ir_raw)


def _nearest_samples(inp: AssociationInput) -> Association:
    """Every sample of the adopting modality takes the label of its most similar sample of the
    other modality; the other modality's cluster ids are the unified ids."""
    adopting = _alternating(inp.epoch)
    other = INFRARED if adopting == VISIBLE else VISIBLE
    mine, theirs = inp.samples[adopting], inp.samples[other]
    cv, ci = len(inp.samples[VISIBLE].centroids), len(inp.samples[INFRARED].centroids)
    if cv == 0 or ci == 0:
        return _own_ids(inp, cv, ci)
    own = np.asarray(theirs.labels).astype(np.int64)
    nearest = nearest_rows(np.asarray(mine.features), np.asarray(theirs.features))  # (N_adopting,)
    return Association({other: own, adopting: own[nearest]}, len(theirs.centroids))


def _cluster_sample_alternating(inp: AssociationInput, settings: AssociationRecipe) -> Association:
    """Cluster-level (nearest-alternating) on the first ``cluster_epochs`` of every
    ``sample_cycle`` epochs, sample-level on the others."""
    if inp.epoch % settings.sample_cycle < settings.cluster_epochs:
        return _nearest_alternating(inp, settings)
    return _nearest_samples(inp)


def _no_adopter(epoch: int) -> None:
    return None


# method name (recipe association.method) -> how it associates and which modality adopts
_METHODS: dict[str, _Method] = {
    "nearest-alternating": _Method(_nearest_alternating, _alternating),
    "hungarian": _Method(_hungarian, _no_adopter),
    "cluster-sample-alternating": _Method(_cluster_sample_alternating, _alternating),
}


def _method(name: str) -> _Method:
    if name not in _METHODS:
        raise ValueError(f"method must be one of {ASSOCIATION_METHODS}, got {name!r}")
    return _METHODS[name]


def adopter(method: str, epoch: int) -> int | None:
    """The modality (``VISIBLE`` or ``INFRARED``) whose samples adopt the other modality's ids
    at the 0-based ``epoch`` under association ``method``; None when neither does
    (``hungarian``)."""
    return _method(method).adopter(epoch)


def associate(method: str, inp: AssociationInput,
              settings: AssociationRecipe | None = None) -> Association:
    """The unified identity labels association ``method`` gives the samples of ``inp``, with the
    numbers of the recipe's ``association`` section (``settings``; default: its defaults)."""
    return _method(method).associate(inp, settings or AssociationRecipe(method=method))


def _cluster_ids(labels: np.ndarray, unified: np.ndarray, num_clusters: int, num_ids: int) -> np.ndarray:
    """``(num_clusters, num_ids)`` bool: cluster c has a sample labelled with unified id u."""
    out = np.zeros((num_clusters, num_ids), dtype=bool)
    keep = (np.asarray(labels) >= 0) & (np.asarray(unified) >= 0)
    out[np.asarray(labels)[keep], np.asarray(unified)[keep]] = True
    return out


def association_chance(inp: AssociationInput, true_ids: dict[int, np.ndarray]) -> float:
    """Diagnostic: the association accuracy a random linking would score, to read
    :func:`association_accuracy` against. A random (visible cluster, IR cluster) pair agrees
    with probability ``sum over ids of f_v(id) * f_i(id)``, ``f`` being the share of a modality's
    clusters (with a member of known identity) whose majority id is ``id``. NaN when a modality
    has no such cluster. ``true_ids`` as for :func:`association_accuracy`."""
    vis, ir = inp.samples[VISIBLE], inp.samples[INFRARED]
    maj_v = _majority(vis.labels, true_ids[VISIBLE], len(vis.centroids))  # (Cv,)
    maj_i = _majority(ir.labels, true_ids[INFRARED], len(ir.centroids))  # (Ci,)
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


def association_accuracy(inp: AssociationInput, association: Association,
                         true_ids: dict[int, np.ndarray]) -> float:
    """Diagnostic (needs true ids, never used for training): share of linked cluster pairs
    whose majority true identities agree.

    ``true_ids[m]`` ``(N_m,)``: the true person id of each sample of ``inp.samples[m]`` (< 0 =
    unknown). A cluster's majority id is the most frequent true id among its members (ties: the
    smallest). The linked pairs are all (visible cluster a, IR cluster b) such that a sample of
    a and a sample of b have the same unified id; pairs with a cluster that has no member of
    known identity are left out. Returns ``agreeing pairs / linked pairs``, or NaN when no pair
    is linked.
    """
    vis, ir = inp.samples[VISIBLE], inp.samples[INFRARED]
    cv, ci = len(vis.centroids), len(ir.centroids)
    maj_v = _majority(vis.labels, true_ids[VISIBLE], cv)  # (Cv,)
    maj_i = _majority(ir.labels, true_ids[INFRARED], ci)  # (Ci,)
    ids_v = _cluster_ids(vis.labels, association.labels[VISIBLE], cv, association.num_ids)
    ids_i = _cluster_ids(ir.labels, association.labels[INFRARED], ci, association.num_ids)
    linked = (ids_v.astype(np.int64) @ ids_i.T.astype(np.int64)) > 0  # (Cv, Ci)
    linked &= (maj_v >= 0)[:, None] & (maj_i >= 0)[None, :]
    total = int(linked.sum())
    if total == 0:
        return float("nan")
    agree = int((linked & (maj_v[:, None] == maj_i[None, :])).sum())
    return agree / total
