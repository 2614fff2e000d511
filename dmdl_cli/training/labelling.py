"""Per-epoch label helpers shared by both stages: GMM confidences, memories from centroids,
label files, the epoch's label-free criteria record (the clustering itself is
:mod:`dmdl_cli.clustering.modalities`, the criteria :mod:`dmdl_cli.clustering.criteria`).

All label arrays here are aligned with the INDEX rows (length N_all, test rows -1), the layout of
the ``WS/labels/*.npz`` files; features are aligned with the train rows.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from dmdl_cli.clustering.criteria import EpochLabels, ModalityLabels, epoch_criteria
from dmdl_cli.clustering.modalities import MODALITIES
from dmdl_cli.data.index import IndexTable
from dmdl_cli.data.sampling import epoch_batches
from dmdl_cli.recipe import CONFIDENCE_GMMS
from dmdl_cli.training.memory import ClusterMemory
from dmdl_cli.training.refine import global_gmm_confidence, gmm_confidence, sample_losses
from dmdl_cli.workspace import save_labels


def confidences(feats: np.ndarray, cents: np.ndarray, labels: np.ndarray, temp: float,
                gmm: str = "per-cluster") -> np.ndarray:
    """CBT label refinement: the 2-component GMM confidence of each sample, (N,): one mixture
    per cluster on losses min-max rescaled within each cluster (``gmm="per-cluster"``), or one
    over all samples on losses rescaled together (``"global"``, ``stage2.confidence_gmm``)."""
    if gmm not in CONFIDENCE_GMMS:
        raise ValueError(f"gmm must be one of {CONFIDENCE_GMMS}, got {gmm!r}")
    if len(labels) == 0 or cents.shape[0] == 0:
        return np.ones(len(labels), dtype=np.float32)
    losses = sample_losses(torch.from_numpy(feats), torch.from_numpy(cents),
                           torch.from_numpy(labels), temp, per_cluster_minmax=gmm == "per-cluster")
    if gmm == "global":
        return global_gmm_confidence(losses.numpy(), labels)
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


def restore_memories(saved: dict[Any, torch.Tensor], stage, device: torch.device
                     ) -> dict[Any, ClusterMemory]:
    """Every memory of a saved epoch state (:func:`restore_memory`), on ``device``."""
    return {key: restore_memory(features, stage).to(device) for key, features in saved.items()}


def stage_batches(stage, index: IndexTable, seed: int, labels: np.ndarray, epoch: int,
                  mode: str) -> list:
    """The epoch's batches (``data/sampling.py:epoch_batches``) with the stage's batch shape,
    iterations and camera-aware sampling, and in ``mode="cross-modality"`` (stage 2 only) its
    ``cross_sampler``; ``labels`` (N_all,) per index row."""
    cross = stage.cross_sampler if mode == "cross-modality" else "shared"
    return epoch_batches(labels, modality=index.modality, num_instances=stage.instances,
                         clusters_per_batch=stage.clusters_per_batch, iters=stage.iters,
                         seed=seed, epoch=epoch, mode=mode,
                         cameras=index.cams if stage.camera_aware_sampling else None,
                         cross_sampler=cross)


def write_labels_file(t, epoch: int, labels_all: np.ndarray, **arrays: Any) -> None:
    """``WS/labels/<prefix>-eNNN.npz`` of the run ``t`` (a ``TrainState``): labels aligned with
    index rows, plus provenance; under its pending name until the run commits
    (``training/commit.py``)."""
    ctx, spec = t.ctx, t.spec
    save_labels(t.files.path(spec.labels_file(ctx.ws, epoch)), labels_all, epoch=epoch + 1,
                stage=spec.labels_prefix, recipe_hash=ctx.recipe.hash(),
                cache_sha256=ctx.cache.sha256,  # the image cache the features came from
                stage_hash=spec.hash(ctx.recipe), **arrays)


def log_criteria(t, now: EpochLabels, feats: np.ndarray, epoch: int) -> None:
    """The ``criteria`` record of the labelling ``now`` (made from the train features ``feats``
    (N, D) of the model trained ``epoch`` epochs in its stage), compared with the run's previous
    labelling (``t.labelled``; none at the first epoch, or after a resume from a ``last.pt``
    that does not hold it: stability is then null and ``previous_epoch`` says so). Keeps the
    labels (not the re-runs) for the next epoch's comparison."""
    previous = t.labelled[1] if t.labelled is not None else None
    record = epoch_criteria(now, previous, feats, epoch=epoch,
                            rank_samples=t.recipe.select.rank_samples, seed=t.recipe.train.seed)
    record["previous_epoch"] = t.labelled[0] if previous is not None else None
    t.log(record)
    t.labelled = (epoch, EpochLabels({m: ModalityLabels(c.labels, c.centroids, unified=c.unified)
                                      for m, c in now.modalities.items()}))


def labelling_of_rows(t, clusters: np.ndarray, unified: np.ndarray | None = None) -> EpochLabels:
    """An epoch's labels as the criteria compare them, from arrays aligned with the index rows
    (as an epoch state saves them): each modality's cluster ids (``clusters`` (N_all,), any
    numbering) and stage 2's unified ids (``unified`` (N_all,)), restricted to its train rows."""
    out = EpochLabels()
    rows, modality = t.ctx.train_rows, t.modality
    for m in MODALITIES:
        mine = rows[modality == m]
        if len(mine):
            out.modalities[m] = ModalityLabels(
                np.asarray(clusters)[mine].astype(np.int64), np.zeros((0, 0), np.float32),
                unified=None if unified is None else np.asarray(unified)[mine].astype(np.int64))
    return out
