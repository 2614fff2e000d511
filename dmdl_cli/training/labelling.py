"""Per-epoch pseudo-labelling shared by both stages: cluster each modality, refine, record.

All label arrays here are aligned with the INDEX rows (length N_all, test rows -1), the layout of
the ``WS/labels/*.npz`` files; features are aligned with the train rows.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from dmdl_cli.clustering.pseudo_labels import centroids, cluster_features, cluster_stats
from dmdl_cli.console import log
from dmdl_cli.data.index import INFRARED, MODALITY_NAMES, VISIBLE
from dmdl_cli.training.memory import ClusterMemory
from dmdl_cli.training.refine import gmm_confidence, sample_losses
from dmdl_cli.workspace import save_labels

MODALITIES = (VISIBLE, INFRARED)


@dataclass
class ModalityClusters:
    """Clusters of one modality: local labels of its train rows and their centroids."""

    rows: np.ndarray  # (N_m,) index rows of this modality's train images
    labels: np.ndarray  # (N_m,) int64 local cluster ids, -1 outlier
    centroids: np.ndarray  # (C_m, D) L2-normalised
    stats: dict[str, Any]


def cluster_modalities(ctx, feats: np.ndarray, k1: dict[int, int] | None = None
                       ) -> dict[int, ModalityClusters]:
    """Jaccard + DBSCAN per modality with the recipe's ``cluster.*`` values.

    ``feats`` (N_train, D) are aligned with ``ctx.train_rows``; ``k1`` overrides
    ``cluster.k1`` per modality (stage 2's ``cluster.k1_adopting``).
    """
    cfg = ctx.recipe.cluster
    k1 = k1 or {}
    out: dict[int, ModalityClusters] = {}
    for m in MODALITIES:
        sel = np.flatnonzero(ctx.modality == m)
        if len(sel) == 0:
            out[m] = ModalityClusters(sel, np.zeros(0, np.int64), np.zeros((0, feats.shape[1]), np.float32), {})
            continue
        start = time.perf_counter()
        labels, info = cluster_features(feats[sel], k1=k1.get(m, cfg.k1), k2=cfg.k2, eps=cfg.eps,
                                        min_samples=cfg.min_samples, knn_method=cfg.knn,
                                        return_info=True)
        truth = ctx.true_ids[sel] if ctx.true_ids is not None else None
        stats = cluster_stats(labels, truth)  # with truth: ARI/NMI/purity, diagnostics only
        stats["seconds"] = round(time.perf_counter() - start, 2)
        for warning in info.get("warnings", []):
            log(f"  [yellow]{MODALITY_NAMES[m]}: {warning}[/]")
        out[m] = ModalityClusters(ctx.train_rows[sel], labels.astype(np.int64),
                                  centroids(feats[sel], labels), stats)
    return out


def describe(stats: dict[str, Any]) -> str:
    text = (f"{stats.get('clusters', 0)} clusters, {stats.get('outliers', 0)} outliers, "
            f"largest {stats.get('largest', 0)}, {stats.get('seconds', 0):.1f} s")
    if "ari" in stats:
        text += (f"; diagnostics vs true ids (never used to train): ARI {stats['ari']:.3f} "
                 f"NMI {stats['nmi']:.3f}")
    return text


def confidences(feats: np.ndarray, cents: np.ndarray, labels: np.ndarray, temp: float) -> np.ndarray:
    """CBT label refinement: per-cluster 2-component GMM confidence of each sample, (N,)."""
    if len(labels) == 0 or cents.shape[0] == 0:
        return np.ones(len(labels), dtype=np.float32)
    losses = sample_losses(torch.from_numpy(feats), torch.from_numpy(cents),
                           torch.from_numpy(labels), temp)
    return np.asarray(gmm_confidence(losses.numpy(), labels), dtype=np.float32)


def make_memory(cents: np.ndarray, stage) -> ClusterMemory:
    """A memory initialised from cluster centroids (C, D) (rows are L2-normalised)."""
    return ClusterMemory.from_centroids(torch.from_numpy(np.ascontiguousarray(cents)),
                                        temp=stage.temp, momentum=stage.momentum,
                                        rule=stage.memory_update)


def restore_memory(features: torch.Tensor, stage) -> ClusterMemory:
    """A memory holding exactly the saved rows ``features`` (C, D): no renormalisation, so a
    resumed run continues from bit-identical prototypes."""
    mem = ClusterMemory(features.shape[1], features.shape[0], temp=stage.temp, momentum=stage.momentum,
                        rule=stage.memory_update)
    mem.features.copy_(features)
    return mem


def write_labels_file(ctx, prefix: str, epoch: int, labels_all: np.ndarray, **arrays: Any) -> None:
    """``WS/labels/<prefix>-eNNN.npz``: labels aligned with index rows, plus provenance."""
    from dmdl_cli.recipe import stage_hash

    path = ctx.ws.dir("labels") / f"{prefix}-e{epoch + 1:03d}.npz"
    save_labels(path, labels_all, epoch=epoch + 1, stage=prefix, recipe_hash=ctx.recipe.hash(),
                stage_hash=stage_hash(ctx.recipe, "stage1" if prefix == "stage1" else "stage2"),
                **arrays)
