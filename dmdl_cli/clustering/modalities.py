"""Pseudo-labelling of each modality on its own: Jaccard distance + DBSCAN per modality with
the recipe's ``cluster.*`` values. Used by both training stages at every epoch and by the
``cluster`` command.

Features are aligned with ``rows`` (index rows of the images being clustered); the result keeps
each modality's index rows, local cluster ids (``-1`` outlier) and L2-normalised centroids.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from dmdl_cli.clustering.pseudo_labels import centroids, cluster_features, cluster_stats
from dmdl_cli.console import log
from dmdl_cli.data.index import INFRARED, MODALITY_NAMES, VISIBLE
from dmdl_cli.recipe import ClusterRecipe

MODALITIES = (VISIBLE, INFRARED)


@dataclass
class ModalityClusters:
    """Clusters of one modality: local labels of its images and their centroids."""

    rows: np.ndarray  # (N_m,) index rows of this modality's images
    labels: np.ndarray  # (N_m,) int64 local cluster ids, -1 outlier
    centroids: np.ndarray  # (C_m, D) L2-normalised
    stats: dict[str, Any]


def cluster_modalities(cfg: ClusterRecipe, feats: np.ndarray, rows: np.ndarray, modality: np.ndarray,
                       true_ids: np.ndarray | None = None, k1: dict[int, int] | None = None
                       ) -> dict[int, ModalityClusters]:
    """Cluster each modality of ``feats (N, D)``; ``rows``, ``modality`` and ``true_ids`` are
    ``(N,)`` and aligned with ``feats``. ``true_ids`` only feed the ARI/NMI/purity diagnostics
    (never a label). ``k1`` overrides ``cfg.k1`` per modality (stage 2's
    ``stage2.k1_adopting``)."""
    k1 = k1 or {}
    out: dict[int, ModalityClusters] = {}
    for m in MODALITIES:
        sel = np.flatnonzero(modality == m)
        if len(sel) == 0:
            out[m] = ModalityClusters(sel, np.zeros(0, np.int64), np.zeros((0, feats.shape[1]), np.float32), {})
            continue
        start = time.perf_counter()
        labels, info = cluster_features(feats[sel], k1=k1.get(m, cfg.k1), k2=cfg.k2, eps=cfg.eps,
                                        min_samples=cfg.min_samples, knn_method=cfg.knn,
                                        return_info=True)
        truth = true_ids[sel] if true_ids is not None else None
        stats = cluster_stats(labels, truth)  # with truth: ARI/NMI/purity, diagnostics only
        stats["seconds"] = round(time.perf_counter() - start, 2)
        for warning in info.get("warnings", []):
            log(f"  [yellow]{MODALITY_NAMES[m]}: {warning}[/]")
        out[m] = ModalityClusters(rows[sel], labels.astype(np.int64), centroids(feats[sel], labels), stats)
    return out


def describe(stats: dict[str, Any]) -> str:
    """One log line for a modality's clustering statistics."""
    text = (f"{stats.get('clusters', 0)} clusters, {stats.get('outliers', 0)} outliers, "
            f"largest {stats.get('largest', 0)}, {stats.get('seconds', 0):.1f} s")
    if "ari" in stats:
        text += (f"; diagnostics vs true ids (never used to train): ARI {stats['ari']:.3f} "
                 f"NMI {stats['nmi']:.3f}")
    return text
