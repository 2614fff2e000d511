"""Pseudo-labelling of each modality on its own: Jaccard distance + DBSCAN per modality with
the recipe's ``cluster.*`` values. Used by both training stages at every epoch, by the
``cluster`` command and by the criteria of kept checkpoints.

Features are aligned with ``rows`` (index rows of the images being clustered); the result keeps
each modality's index rows, local cluster ids (``-1`` outlier) and L2-normalised centroids.

With a ``margin`` (the training's ``select.eps_delta``) each modality's Jaccard graph is stored
up to eps + margin instead of eps (same k-NN lists, same distances: the labels at eps are the
same, ``clustering/eps.py``) and DBSCAN is re-run on it at eps - margin and eps + margin, for
the label-free criteria of the epoch (:func:`criteria_labels`,
:func:`dmdl_cli.clustering.criteria.epoch_criteria`).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from dmdl_cli.clustering.association import AssociationInput, ModalitySamples, associate
from dmdl_cli.clustering.criteria import EpochLabels, ModalityLabels
from dmdl_cli.clustering.eps import feasible_margin, jaccard_graph, relabel_around
from dmdl_cli.clustering.pseudo_labels import (
    centroids,
    cluster_features,
    cluster_stats,
    dbscan_precomputed,
)
from dmdl_cli.console import log
from dmdl_cli.data.index import INFRARED, MODALITY_NAMES, VISIBLE
from dmdl_cli.recipe import AssociationRecipe, ClusterRecipe

MODALITIES = (VISIBLE, INFRARED)


@dataclass
class ModalityClusters:
    """Clusters of one modality: local labels of its images and their centroids; with a margin,
    the labels of the same graph at eps - margin (``tighter``) and eps + margin (``looser``)."""

    rows: np.ndarray  # (N_m,) index rows of this modality's images
    labels: np.ndarray  # (N_m,) int64 local cluster ids, -1 outlier
    centroids: np.ndarray  # (C_m, D) L2-normalised
    stats: dict[str, Any]
    tighter: np.ndarray | None = None  # (N_m,) int64 at eps - margin
    looser: np.ndarray | None = None  # (N_m,) int64 at eps + margin


def cluster_modalities(cfg: ClusterRecipe, feats: np.ndarray, rows: np.ndarray, modality: np.ndarray,
                       true_ids: np.ndarray | None = None, k1: dict[int, int] | None = None,
                       margin: float | None = None) -> dict[int, ModalityClusters]:
    """Cluster each modality of ``feats (N, D)``; ``rows``, ``modality`` and ``true_ids`` are
    ``(N,)`` and aligned with ``feats``. ``true_ids`` only feed the ARI/NMI/purity diagnostics
    (never a label). ``k1`` overrides ``cfg.k1`` per modality (stage 2's
    ``stage2.k1_adopting``). ``margin``: also the labels at eps -+ margin (module docstring);
    ignored, with a warning, when eps -+ margin leaves (0, 1)."""
    k1 = k1 or {}
    if margin is not None and not feasible_margin(cfg.eps, margin):
        log(f"  [yellow]eps robustness is not computed: cluster.eps {cfg.eps:g} -+ "
            f"select.eps_delta {margin:g} leaves (0, 1)[/]")
        margin = None
    out: dict[int, ModalityClusters] = {}
    for m in MODALITIES:
        sel = np.flatnonzero(modality == m)
        if len(sel) == 0:
            out[m] = ModalityClusters(sel, np.zeros(0, np.int64), np.zeros((0, feats.shape[1]), np.float32), {})
            continue
        start = time.perf_counter()
        tighter = looser = None
        if margin is None:
            labels, info = cluster_features(feats[sel], k1=k1.get(m, cfg.k1), k2=cfg.k2, eps=cfg.eps,
                                            min_samples=cfg.min_samples, knn_method=cfg.knn,
                                            return_info=True)
            warnings = info.get("warnings", [])
        else:
            graph = jaccard_graph(feats[sel], cfg, reach=cfg.eps + margin, k1=k1.get(m, cfg.k1))
            # DBSCAN at exactly the eps cluster_features uses (no rounding): the same labels
            labels = dbscan_precomputed(graph.distances, eps=cfg.eps, min_samples=cfg.min_samples)
            tighter, looser = relabel_around(graph, cfg.eps, margin, cfg.min_samples)
            warnings = graph.warnings
        truth = true_ids[sel] if true_ids is not None else None
        stats = cluster_stats(labels, truth)  # with truth: ARI/NMI/purity, diagnostics only
        stats["seconds"] = round(time.perf_counter() - start, 2)
        for warning in warnings:
            log(f"  [yellow]{MODALITY_NAMES[m]}: {warning}[/]")
        out[m] = ModalityClusters(rows[sel], labels.astype(np.int64), centroids(feats[sel], labels),
                                  stats, tighter, looser)
    return out


def criteria_labels(clusters: Mapping[int, ModalityClusters],
                    unified: Mapping[int, np.ndarray] | None = None) -> EpochLabels:
    """What the criteria read of one labelling: each modality's labels, centroids and re-runs at
    eps -+ margin, and (stage 2) ``unified[m]`` (N_m,), the unified ids of its images."""
    out = EpochLabels()
    for m, c in clusters.items():
        if len(c.rows):
            out.modalities[m] = ModalityLabels(c.labels, c.centroids, c.tighter, c.looser,
                                               None if unified is None else unified[m])
    return out


def epoch_labels(features: np.ndarray, modality: np.ndarray, cfg: ClusterRecipe, *, delta: float,
                 k1: Mapping[int, int] | None = None, association: AssociationRecipe | None = None,
                 epoch: int = 0) -> EpochLabels:
    """An epoch's labelling for the criteria, as the training makes it: each modality of
    ``features (N, D)`` (``modality (N,)``) clustered with its re-runs at eps -+ ``delta``
    (``k1`` overrides ``cfg.k1`` per modality); with ``association`` (stage 2: the recipe's
    section) every sample's unified id at ``epoch``."""
    clusters = cluster_modalities(cfg, features, np.arange(len(features)), np.asarray(modality),
                                  k1=dict(k1 or {}), margin=delta)
    unified = None
    present = {m: c for m, c in clusters.items() if len(c.rows)}
    if association is not None and len(present) == 2:
        inp = AssociationInput(epoch, {m: ModalitySamples(c.labels, features[c.rows], c.centroids)
                                       for m, c in present.items()})
        unified = associate(association.method, inp, association).labels
    return criteria_labels(present, unified)


def describe(stats: dict[str, Any]) -> str:
    """One log line for a modality's clustering statistics."""
    text = (f"{stats.get('clusters', 0)} clusters, {stats.get('outliers', 0)} outliers, "
            f"largest {stats.get('largest', 0)}, {stats.get('seconds', 0):.1f} s")
    if "ari" in stats:
        text += (f"; diagnostics vs true ids (never used to train): ARI {stats['ari']:.3f} "
                 f"NMI {stats['nmi']:.3f}")
    return text
