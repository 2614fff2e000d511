"""Label-free criteria of an epoch's pseudo labels, computed from the unlabelled train data only.

Each criterion is a number per epoch that a user without test labels can watch, and that a
selection rule fixed before training (``select:`` in the recipe, ``dmdl_cli/selection``) may
choose a checkpoint by. docs/selection.md explains them; in short (N images of a modality, C
clusters, D feature dimensions; "up" = higher is better, "alarm" = watched, not optimised):

=====================  =========================================================  =====  =========
criterion              what it is                                                 good   cost
=====================  =========================================================  =====  =========
``label_ari``          ARI between this epoch's and the previous epoch's labels   up     O(N)
                       of a modality, every outlier its own singleton
``label_nmi``          the same with NMI                                          up     O(N)
``unified_ari``        ARI of the unified (cross-modality) labels of both         up     O(N)
                       modalities between the two epochs (stage 2)
``pairs_kept``         share of the previous epoch's linked cross-modality       up     O(N)
                       sample pairs (a visible and an infrared image with the
                       same unified id) that are still linked (stage 2)
``eps_robustness``     mean over all images of min(independence, compactness)    up     2 DBSCAN
                       of its cluster under eps + delta and eps - delta (0 for
                       an outlier): SpCL's reliability, O(N) per pair of labelings
``independence``       mean over clustered images of |C(i) & C+(i)| /            up     (same)
                       |C(i) | C+(i)|, C+ the cluster at eps + delta
``compactness``        the same against C-, the cluster at eps - delta            up     (same)
``mutual_nn``          share of cluster centroids that are mutual nearest        up     O(Cv Ci D)
                       neighbours across the modalities (pairs / min(Cv, Ci))
``matching_cost``      mean cosine distance of the one-to-one Hungarian          down   O(C^3)
                       matching of the two modalities' centroids
``association_cost``   mean cosine distance of the cluster pairs the             down   O(N + Cv Ci)
                       association linked (a sample of each with one unified
                       id; stage 2)
``effective_rank``     RankMe: exp of the entropy of the normalised singular     up /   O(m^2 D)
                       values of the train features (m sampled rows)            alarm
``largest_share``      largest cluster's share of a modality's images            alarm  O(N)
``outlier_share``      share of a modality's images left out as outliers         alarm  O(N)
``clusters``           clusters of a modality                                    alarm  O(N)
=====================  =========================================================  =====  =========

All label comparisons go through sparse contingency counts (pairs of labels that occur
together, found by one sort: O(N log N), written O(N) above), never a dense N x N mask.
Labels are ``(N,)`` int64 arrays of one modality's train images, aligned between epochs (the
same images in the same order), ``-1`` = outlier; outliers are compared as singletons (each
outlier a cluster of its own), so a labeling and a copy with its cluster ids permuted score
exactly alike.

The functions here are pure (arrays in, floats out); :func:`epoch_criteria` assembles one
epoch's record in the form the training log holds (``kind: criteria``, docs/selection.md).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np
import scipy.sparse as sp

from dmdl_cli.clustering.association import centroid_similarity
from dmdl_cli.clustering.pseudo_labels import outliers_as_singletons
from dmdl_cli.data.index import INFRARED, MODALITY_NAMES, VISIBLE

# Criteria a rule can choose by, with their direction: +1 higher is better, -1 lower is better.
# The choice list of the recipe (dmdl_cli/recipe.py: SELECT_CRITERIA) adds "last".
DIRECTIONS: dict[str, int] = {
    "eps_robustness": +1,
    "label_ari": +1,
    "label_nmi": +1,
    "unified_ari": +1,
    "pairs_kept": +1,
    "mutual_nn": +1,
    "matching_cost": -1,
    "association_cost": -1,
    "effective_rank": +1,
}


# ---------------------------------------------------------------------------------------------
# label comparisons


def _check_pair(labels: np.ndarray, other: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(labels).astype(np.int64, copy=False).ravel()
    b = np.asarray(other).astype(np.int64, copy=False).ravel()
    if a.shape != b.shape:
        raise ValueError(f"labelings of {a.size} and {b.size} images: they must describe the "
                         "same images in the same order")
    return a, b


def joint_counts(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sparse contingency of two non-negative labelings ``a``, ``b`` (N,) of the same images.

    Returns ``(pair_of_sample (N,), count (P,))``: the index of each image's (a, b) pair among
    the P distinct pairs, and how many images share each pair. O(N log N) (one sort).
    """
    key = a * (int(b.max(initial=0)) + 1) + b
    _, pair, count = np.unique(key, return_inverse=True, return_counts=True)
    return pair.reshape(-1), count


def label_agreement(labels: np.ndarray, previous: np.ndarray) -> dict[str, float]:
    """ARI and NMI between two labelings (N,) of the same images, outliers as singletons.

    Keys ``label_ari``, ``label_nmi``: 1 for identical partitions (whatever the ids), about 0
    for unrelated ones. NaN for an empty labeling.
    """
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    a, b = _check_pair(labels, previous)
    if a.size == 0:
        return {"label_ari": float("nan"), "label_nmi": float("nan")}
    a, b = outliers_as_singletons(a), outliers_as_singletons(b)
    return {"label_ari": float(adjusted_rand_score(b, a)),
            "label_nmi": float(normalized_mutual_info_score(b, a))}


def membership_overlap(labels: np.ndarray, other: np.ndarray) -> np.ndarray:
    """Per image i: ``|C(i) & C'(i)| / |C(i) | C'(i)|``, (N,) float64 in (0, 1].

    C(i) is the set of images sharing i's label in ``labels``, C'(i) in ``other``; outliers are
    singletons. 1 means i's cluster has exactly the same members in both labelings.
    """
    a, b = _check_pair(labels, other)
    if a.size == 0:
        return np.zeros(0)
    a, b = outliers_as_singletons(a), outliers_as_singletons(b)
    pair, count = joint_counts(a, b)
    both = count[pair].astype(np.float64)
    size_a = np.bincount(a)[a]
    size_b = np.bincount(b)[b]
    return both / (size_a + size_b - both)


def eps_robustness(labels: np.ndarray, tighter: np.ndarray, looser: np.ndarray) -> dict[str, float]:
    """SpCL's cluster reliability of labels at eps, from the labels at eps - delta (``tighter``)
    and eps + delta (``looser``) of the same images, all (N,).

    Per clustered image i: independence ``|C(i) & C+(i)| / |C(i) | C+(i)|`` (its cluster does
    not merge with others when eps grows) and compactness ``|C(i) & C-(i)| / |C(i) | C-(i)|``
    (it does not fall apart when eps shrinks). Keys:

    - ``eps_robustness``: mean over ALL images of min(independence, compactness), an outlier
      counting 0, i.e. the share of images in a cluster that keeps its members, softened (up);
    - ``independence``, ``compactness``: their means over the clustered images (NaN if none);
    - ``eps_kept_share``: share of all images whose cluster keeps exactly its members both ways.
    """
    lab = np.asarray(labels).astype(np.int64, copy=False).ravel()
    indep = membership_overlap(lab, looser)
    comp = membership_overlap(lab, tighter)
    clustered = lab >= 0
    n = lab.size
    if n == 0:
        return {"eps_robustness": float("nan"), "independence": float("nan"),
                "compactness": float("nan"), "eps_kept_share": float("nan")}
    reliable = np.where(clustered, np.minimum(indep, comp), 0.0)
    some = bool(clustered.any())
    return {
        "eps_robustness": float(reliable.mean()),
        "independence": float(indep[clustered].mean()) if some else float("nan"),
        "compactness": float(comp[clustered].mean()) if some else float("nan"),
        "eps_kept_share": float(np.count_nonzero(reliable == 1.0) / n),
    }


def linked_pairs(vis_unified: np.ndarray, ir_unified: np.ndarray) -> int:
    """Cross-modality pairs (a visible image, an infrared image) with the same unified id."""
    v = np.asarray(vis_unified).astype(np.int64, copy=False)
    r = np.asarray(ir_unified).astype(np.int64, copy=False)
    v, r = v[v >= 0], r[r >= 0]
    if v.size == 0 or r.size == 0:
        return 0
    top = int(max(v.max(), r.max())) + 1
    return int(np.dot(np.bincount(v, minlength=top), np.bincount(r, minlength=top)))


def pair_stability(vis_unified: np.ndarray, ir_unified: np.ndarray,
                   prev_vis_unified: np.ndarray, prev_ir_unified: np.ndarray) -> dict[str, float]:
    """How many of the previous epoch's linked cross-modality pairs are still linked.

    Inputs: the unified labels (stage 2's identity space; -1 outlier) of the visible (Nv,) and
    infrared (Ni,) images at this and the previous epoch. A linked pair is a visible and an
    infrared image with the same unified id; a pair is kept when it is linked at both epochs.
    Counted from the joint (now, previous) label counts of each modality, O(N): for every pair
    of ids (u, u'), ``visible images with (u, u') x infrared images with (u, u')``. Depends on
    the samples only, not on how clusters are numbered. Keys:

    - ``pairs_kept``: kept / linked at the previous epoch (up; NaN when none was linked);
    - ``pairs_jaccard``: kept / linked at either epoch (up);
    - ``linked_pairs``: linked pairs now.
    """
    v, pv = _check_pair(vis_unified, prev_vis_unified)
    r, pr = _check_pair(ir_unified, prev_ir_unified)
    now, before = linked_pairs(v, r), linked_pairs(pv, pr)
    kept = 0
    keep_v, keep_r = (v >= 0) & (pv >= 0), (r >= 0) & (pr >= 0)
    if keep_v.any() and keep_r.any():
        width = int(max(pv.max(), pr.max())) + 1
        key_v = v[keep_v] * width + pv[keep_v]  # (now, previous) id pair of each image
        key_r = r[keep_r] * width + pr[keep_r]
        kv, cv = np.unique(key_v, return_counts=True)
        kr, cr = np.unique(key_r, return_counts=True)
        _, iv, ir = np.intersect1d(kv, kr, assume_unique=True, return_indices=True)
        kept = int(np.dot(cv[iv], cr[ir]))
    either = now + before - kept
    return {"pairs_kept": kept / before if before else float("nan"),
            "pairs_jaccard": kept / either if either else float("nan"),
            "linked_pairs": now}


# ---------------------------------------------------------------------------------------------
# cross-modality consistency of the clusters


def linked_clusters(vis_labels: np.ndarray, vis_unified: np.ndarray, ir_labels: np.ndarray,
                    ir_unified: np.ndarray, num_vis: int, num_ir: int) -> np.ndarray:
    """``(Cv, Ci)`` bool: visible cluster a and infrared cluster b are linked when a sample of a
    and a sample of b have the same unified id (stage 2's association, whatever the method).

    Labels ``(N_m,)`` per modality: cluster ids (``num_vis`` / ``num_ir`` clusters) and unified
    ids, -1 outliers. Sparse (cluster, unified id) incidences, O(N + links).
    """
    def incidence(labels, unified, clusters, ids):
        lab = np.asarray(labels).astype(np.int64, copy=False)
        uni = np.asarray(unified).astype(np.int64, copy=False)
        keep = (lab >= 0) & (uni >= 0)
        return sp.csr_matrix((np.ones(int(keep.sum())), (lab[keep], uni[keep])),
                             shape=(clusters, ids))

    ids = int(max(np.max(vis_unified, initial=-1), np.max(ir_unified, initial=-1))) + 1
    link = incidence(vis_labels, vis_unified, num_vis, ids) @ incidence(ir_labels, ir_unified,
                                                                         num_ir, ids).T
    return link.toarray() > 0


def cross_modality(vis_centroids: np.ndarray, ir_centroids: np.ndarray,
                   linked: np.ndarray | None = None) -> dict[str, float]:
    """Consistency of the two modalities' clusters, from their centroids (Cv, D) and (Ci, D).

    - ``mutual_nn``: visible-infrared centroid pairs that are each other's nearest neighbour
      (cosine), divided by min(Cv, Ci) (up: one cluster per person in each modality, aligned);
    - ``matching_cost``: mean cosine distance (1 - similarity) of the one-to-one matching of
      maximal total similarity (Hungarian, scipy), defined in both stages (down);
    - ``association_cost`` (with ``linked``, the ``(Cv, Ci)`` cluster pairs stage 2's
      association linked, :func:`linked_clusters`): their mean cosine distance (down).
    NaN when a modality has no cluster (or nothing is linked).
    """
    from scipy.optimize import linear_sum_assignment

    sim = centroid_similarity(vis_centroids, ir_centroids)  # (Cv, Ci)
    out: dict[str, float] = {"mutual_nn": float("nan"), "matching_cost": float("nan")}
    if linked is not None:
        out["association_cost"] = float("nan")
    cv, ci = sim.shape
    if cv == 0 or ci == 0:
        return out
    vis_nn = sim.argmax(axis=1)  # (Cv,) nearest IR centroid of each visible one
    ir_nn = sim.argmax(axis=0)  # (Ci,)
    out["mutual_nn"] = float(np.count_nonzero(ir_nn[vis_nn] == np.arange(cv)) / min(cv, ci))
    rows, cols = linear_sum_assignment(sim, maximize=True)
    out["matching_cost"] = float(np.mean(1.0 - sim[rows, cols]))
    if linked is not None and linked.any():
        out["association_cost"] = float(np.mean(1.0 - sim[linked]))
    return out


# ---------------------------------------------------------------------------------------------
# collapse alarms


def effective_rank(features: np.ndarray, *, samples: int = 1024, seed: int = 0) -> float:
    """RankMe effective rank of features (N, D): ``exp(-sum p_k log p_k)``, ``p = s / sum(s)``
    over the singular values s, on ``samples`` rows drawn without replacement (all when
    N <= samples; the draw depends on ``seed`` only, so epochs compare on the same rows).

    1 for features that all point one way (a collapse), up to min(m, D) for isotropic ones.
    Singular values come from the eigenvalues of the smaller Gram matrix, O(m^2 D + m^3).
    """
    x = np.asarray(features)
    if x.ndim != 2 or x.shape[0] == 0:
        return float("nan")
    if x.shape[0] > samples:  # draw the rows before any copy of the (N, D) matrix
        rows = np.sort(np.random.default_rng(seed).choice(x.shape[0], samples, replace=False))
        x = x[rows]
    x = x.astype(np.float64, copy=False)  # (m, D)
    gram = x @ x.T if x.shape[0] <= x.shape[1] else x.T @ x
    sv = np.sqrt(np.clip(np.linalg.eigvalsh(gram), 0.0, None))
    total = sv.sum()
    if total <= 0:
        return float("nan")
    p = sv[sv > 0] / total
    return float(np.exp(-np.sum(p * np.log(p))))


def label_alarms(labels: np.ndarray) -> dict[str, float]:
    """``clusters``, ``largest_share`` and ``outlier_share`` of labels (N,) (shares of N)."""
    lab = np.asarray(labels).astype(np.int64, copy=False).ravel()
    n = lab.size
    sizes = np.bincount(lab[lab >= 0]) if (lab >= 0).any() else np.zeros(0, np.int64)
    sizes = sizes[sizes > 0]
    return {"clusters": int(sizes.size),
            "largest_share": float(sizes.max() / n) if sizes.size else 0.0,
            "outlier_share": float(np.count_nonzero(lab < 0) / n) if n else float("nan")}


# ---------------------------------------------------------------------------------------------
# one epoch's record


@dataclass
class ModalityLabels:
    """One modality's labelling at one epoch, aligned with its train images (N_m,).

    ``labels`` at the recipe's eps; ``tighter`` / ``looser`` from DBSCAN on the same Jaccard
    graph at eps - delta / eps + delta (:func:`dmdl_cli.clustering.eps.relabel_around`), None
    when not computed; ``unified``: stage 2's unified ids of the same images (None in stage 1).
    """

    labels: np.ndarray
    centroids: np.ndarray  # (C_m, D) L2-normalised
    tighter: np.ndarray | None = None
    looser: np.ndarray | None = None
    unified: np.ndarray | None = None


@dataclass
class EpochLabels:
    """What the criteria read of one epoch: per modality (``VISIBLE``, ``INFRARED``) its
    :class:`ModalityLabels` (with stage 2's unified ids in ``unified``)."""

    modalities: dict[int, ModalityLabels] = field(default_factory=dict)


def _mean(values: list[float]) -> float:
    finite = [v for v in values if np.isfinite(v)]
    return float(np.mean(finite)) if finite else float("nan")


def epoch_criteria(now: EpochLabels, previous: EpochLabels | None, features: np.ndarray, *,
                   epoch: int, rank_samples: int = 1024, seed: int = 0) -> dict[str, Any]:
    """Every criterion of one epoch's labelling as one log record (``kind: criteria``); a
    criterion not defined this epoch (no previous epoch, no cluster) is None.

    ``now`` / ``previous``: this and the previous epoch's labels (``previous=None`` at the first
    epoch: the stability criteria are NaN); ``features``: the train features (N, D) the labels
    were made from (for the effective rank); ``epoch``: the number of epochs the model that
    made these features has trained in its stage (its checkpoint is ``epoch-NNN.pt`` with NNN
    = epoch; 0 = the model the stage started from).

    The record holds per modality (``visible``, ``infrared``) the per-modality criteria and at
    the top level the combined values a rule chooses by: the mean over the two modalities of
    ``label_ari``, ``label_nmi``, ``eps_robustness``, ``independence``, ``compactness``;
    ``largest_share`` and ``outlier_share`` as their maximum over the modalities (the worse
    one), ``clusters`` summed; the cross-modality criteria and ``effective_rank`` once.
    """
    record: dict[str, Any] = {"kind": "criteria", "epoch": int(epoch), "step": 0}
    per_modality: dict[int, dict[str, float]] = {}
    for m, cur in sorted(now.modalities.items()):
        values: dict[str, float] = dict(label_alarms(cur.labels))
        prev = previous.modalities.get(m) if previous is not None else None
        values.update(label_agreement(cur.labels, prev.labels) if prev is not None
                      else {"label_ari": float("nan"), "label_nmi": float("nan")})
        if cur.tighter is not None and cur.looser is not None:
            values.update(eps_robustness(cur.labels, cur.tighter, cur.looser))
        per_modality[m] = values
        record[MODALITY_NAMES[m]] = values
    for key in ("label_ari", "label_nmi", "eps_robustness", "independence", "compactness"):
        found = [v[key] for v in per_modality.values() if key in v]
        if found:
            record[key] = _mean(found)
    if per_modality:
        record["largest_share"] = max(v["largest_share"] for v in per_modality.values())
        record["outlier_share"] = max(v["outlier_share"] for v in per_modality.values())
        record["clusters"] = sum(v["clusters"] for v in per_modality.values())
    vis, ir = now.modalities.get(VISIBLE), now.modalities.get(INFRARED)
    if vis is not None and ir is not None:
        linked = None
        if vis.unified is not None and ir.unified is not None:
            linked = linked_clusters(vis.labels, vis.unified, ir.labels, ir.unified,
                                     len(vis.centroids), len(ir.centroids))
        record.update(cross_modality(vis.centroids, ir.centroids, linked))
        if vis.unified is not None and ir.unified is not None:
            record.update(_unified_stability(vis, ir, previous))
    record["effective_rank"] = effective_rank(features, samples=rank_samples, seed=seed)
    return json_ready(record)


def json_ready(value: Any) -> Any:
    """``value`` (nested dicts and lists) with NaN (a criterion not defined) as None: strict
    JSON."""
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_ready(v) for v in value]
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


def _unified_stability(vis: ModalityLabels, ir: ModalityLabels,
                       previous: EpochLabels | None) -> dict[str, float]:
    """``pairs_kept``, ``pairs_jaccard``, ``linked_pairs`` and ``unified_ari`` (NaN without a
    previous epoch with unified labels in both modalities)."""
    pvis = previous.modalities.get(VISIBLE) if previous is not None else None
    pir = previous.modalities.get(INFRARED) if previous is not None else None
    if pvis is None or pir is None or pvis.unified is None or pir.unified is None:
        return {"pairs_kept": float("nan"), "pairs_jaccard": float("nan"),
                "linked_pairs": linked_pairs(vis.unified, ir.unified), "unified_ari": float("nan")}
    out: dict[str, float] = dict(pair_stability(vis.unified, ir.unified, pvis.unified, pir.unified))
    out["unified_ari"] = label_agreement(np.concatenate([vis.unified, ir.unified]),
                                         np.concatenate([pvis.unified, pir.unified]))["label_ari"]
    return out


def criterion_value(record: Mapping[str, Any], name: str) -> float:
    """A criterion of a record as a float (NaN when the record lacks it)."""
    value = record.get(name)
    try:
        return float(value) if value is not None else float("nan")
    except (TypeError, ValueError):
        return float("nan")


__all__ = ["DIRECTIONS", "EpochLabels", "ModalityLabels", "criterion_value", "cross_modality",
           "effective_rank", "epoch_criteria", "eps_robustness", "joint_counts", "json_ready",
           "label_agreement", "linked_clusters",
           "label_alarms", "linked_pairs", "membership_overlap", "pair_stability"]
