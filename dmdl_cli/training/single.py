"""Stage 1, ``pretrain-single``: single-modality clustering and contrastive learning.

Per epoch: cluster each modality (labels of the two modalities live in one id space, visible
clusters first: ``0..Cv-1``, infrared ``Cv..Cv+Ci-1``), one memory per modality from the
centroids, GMM confidences from ``stage1.refine_from`` when ``cbt.refine``. Per batch, for each
modality m (P clusters x K images, two views):

    L = sum_m 1/2 [CE(f_A M_m / tau, t_A) + CE(f_B M_m / tau, t_B)]
        + sigma(epoch) * triplet(BN-neck features, labels)
        + w_align * sum_m MMD(f_A, f_B)

with t_A = c onehot(y) + (1 - c) topk-softmax(f_B M_m / tau) (and symmetrically) when
refinement is on, one-hot otherwise. The triplet is batch-hard on the BN-neck features before
normalisation (the reference's): within each modality, summed over the two
(``stage1.triplet: per-modality``), or over the joint batch (``joint``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from dmdl_cli.clustering.criteria import EpochLabels
from dmdl_cli.clustering.modalities import MODALITIES, cluster_modalities, criteria_labels, describe
from dmdl_cli.console import log
from dmdl_cli.context import StageContext
from dmdl_cli.data.index import MODALITY_NAMES
from dmdl_cli.model.loading import initial_model
from dmdl_cli.recipe import reached, triplet_weight
from dmdl_cli.stages import stage_spec
from dmdl_cli.training.hooks import Hook
from dmdl_cli.training.labelling import (
    confidences,
    labelling_of_rows,
    log_criteria,
    make_memory,
    restore_memories,
    stage_batches,
    write_labels_file,
)
from dmdl_cli.training.loop import run_stage
from dmdl_cli.training.objectives import alignment, memory_contrast, stage_triplet, update_batch
from dmdl_cli.training.state import EpochState, StageLogic, TrainState


@dataclass
class Stage1Epoch(EpochState):
    """Stage 1's epoch: the cluster ids of both modalities in one space, visible first
    (``0..Cv-1``, infrared ``Cv..Cv+Ci-1``); one memory per modality, rows = its clusters."""

    offsets: dict[int, int] = field(default_factory=dict)  # first cluster id of each modality
    sizes: dict[int, int] = field(default_factory=dict)  # clusters of each modality

    def saved(self) -> dict[str, Any]:
        return {**super().saved(), "offsets": self.offsets, "sizes": self.sizes}


class SingleModalityStage(StageLogic):
    spec = stage_spec("stage1")

    def initial_model(self, ctx: StageContext, *, resuming: bool):
        model = initial_model(ctx.recipe)
        if not resuming:  # when resuming, the weights come from last.pt
            log(f"stage 1 starts from the untrained {ctx.recipe.model.arch}: {model.init_description}")
        return model, model.init_description

    def prepare_epoch(self, t: TrainState) -> Stage1Epoch:
        recipe, stage, epoch, index = t.recipe, t.stage, t.epoch, t.ctx.index
        feats = t.train_features()  # (N_train, D)
        clusters = self.cluster(t, feats, announce=True)
        labels = np.full(len(index), -1, dtype=np.int64)
        conf = np.ones(len(index), dtype=np.float32)
        offsets, sizes = {}, {}
        offset = 0
        refine = recipe.cbt.refine and reached(stage.refine_from, epoch)
        train_pos = t.train_position
        for m in MODALITIES:
            c = clusters[m]
            offsets[m], sizes[m] = offset, c.centroids.shape[0]
            labels[c.rows] = np.where(c.labels >= 0, c.labels + offset, -1)
            if refine:
                conf[c.rows] = confidences(feats[train_pos[c.rows]], c.centroids, c.labels, stage.temp)
            offset += sizes[m]
            log(f"epoch {epoch + 1} {MODALITY_NAMES[m]}: {describe(c.stats)}")
        t.log({"kind": "labels", "epoch": epoch, "step": 0,
               **{MODALITY_NAMES[m]: clusters[m].stats for m in MODALITIES},
               "refine": refine, "mean_confidence": float(conf[labels >= 0].mean()) if (labels >= 0).any() else 1.0})
        log_criteria(t, criteria_labels(clusters), feats, epoch)
        write_labels_file(t, epoch, labels, confidence=conf)
        memories = {m: make_memory(clusters[m].centroids, stage) for m in MODALITIES}
        return Stage1Epoch(epoch, labels, conf, memories, offsets=offsets, sizes=sizes)

    @staticmethod
    def cluster(t: TrainState, feats: np.ndarray, *, announce: bool):
        """Each modality's clusters of the train features ``feats`` (N, D), with the re-runs at
        eps -+ ``select.eps_delta`` of the criteria; ``announce``: the epoch's own labelling,
        with its diagnostics against true identities."""
        return cluster_modalities(t.recipe.cluster, feats, t.ctx.train_rows, t.modality,
                                  t.true_ids if announce else None, margin=t.recipe.select.eps_delta)

    def final_labelling(self, t: TrainState, feats: np.ndarray) -> EpochLabels:
        return criteria_labels(self.cluster(t, feats, announce=False))

    def saved_labelling(self, t: TrainState, saved: dict[str, Any]) -> EpochLabels:
        return labelling_of_rows(t, saved["labels"])  # each modality's clusters, offset

    def restore_epoch(self, t: TrainState, saved: dict[str, Any]) -> Stage1Epoch:
        stage, device, index = t.stage, t.runtime.device, t.ctx.index
        memories = restore_memories(saved["memories"], stage, device)
        batches = stage_batches(stage, index, t.recipe.train.seed, saved["labels"], saved["epoch"],
                                "per-modality")
        return Stage1Epoch(saved["epoch"], saved["labels"], saved["conf"], memories, batches,
                           labels_t=torch.from_numpy(saved["labels"]).to(device),
                           conf_t=torch.from_numpy(saved["conf"]).to(device),
                           offsets=saved["offsets"], sizes=saved["sizes"])

    def batch_loss(self, t: TrainState, batch: dict[str, torch.Tensor]
                   ) -> tuple[torch.Tensor, dict[str, float], Callable[[], None]]:
        recipe, stage, epoch, state = t.recipe, t.stage, t.epoch, t.epoch_state
        rows, modality = batch["rows"], batch["modality"]
        b = rows.shape[0]
        labels = state.labels_t[rows]  # (B,) global cluster ids
        conf = state.conf_t[rows]  # (B,)
        refine = recipe.cbt.refine and reached(stage.refine_from, epoch)
        bn = batch["bn"].float()  # (2B, D) BN-neck features, views A then B
        feat = F.normalize(bn, dim=1)
        fa, fb = feat[:b], feat[b:]
        offsets = state.offsets
        contrast = memory_contrast(state.memories, lambda m, sel: labels[sel] - offsets[m], fa, fb,
                                   modality, conf, stage.refine_topk, refine)
        sigma = triplet_weight(stage.triplet_ramp, epoch)
        triplet = feat.new_zeros(())
        if sigma > 0:
            triplet = stage_triplet(stage, bn, torch.cat([labels, labels]),
                                    torch.cat([modality, modality]))
        align = alignment(bn, modality, recipe) if recipe.cbt.align else feat.new_zeros(())
        loss = contrast + sigma * triplet + recipe.cbt.align_weight * align
        parts = {"contrast": contrast.item(), "triplet": triplet.item(), "align": align.item()}

        def update() -> None:
            all_feat, all_labels, all_mod = update_batch(fa, fb, labels, modality)
            for m in MODALITIES:
                sel = all_mod == m
                if bool(sel.any()):
                    state.memories[m].update(all_feat[sel], all_labels[sel] - offsets[m])

        return loss, parts, update


def pretrain_single(ctx: StageContext, *, resume: bool = False, force: bool = False,
                    deterministic: bool = False, hooks: Sequence[Hook] = ()):
    """Stage 1 in the context the command runner built (see ``run_stage``)."""
    return run_stage(ctx, SingleModalityStage(), resume=resume, force=force,
                     deterministic=deterministic, hooks=hooks)
