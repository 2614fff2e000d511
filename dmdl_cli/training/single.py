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

from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from dmdl_cli.clustering.modalities import MODALITIES, cluster_modalities, describe
from dmdl_cli.console import log
from dmdl_cli.data.index import MODALITY_NAMES
from dmdl_cli.data.sampling import epoch_batches
from dmdl_cli.model.loading import initial_model
from dmdl_cli.recipe import Recipe, reached, triplet_weight
from dmdl_cli.stages import stage
from dmdl_cli.training.labelling import confidences, make_memory, restore_memory, write_labels_file
from dmdl_cli.training.loop import EpochState, StageLogic, TrainContext, run_stage
from dmdl_cli.training.objectives import alignment, gathered_batch, memory_contrast, stage_triplet
from dmdl_cli.workspace import Workspace


class SingleModalityStage(StageLogic):
    spec = stage("stage1")

    def initial_model(self, recipe: Recipe, ws: Workspace):
        model = initial_model(recipe)
        if not self.resuming:  # when resuming, the weights come from last.pt
            log(f"stage 1 starts from the untrained {recipe.model.arch}: {model.init_description}")
        return model, model.init_description

    def prepare_epoch(self, ctx: TrainContext, epoch: int) -> EpochState:
        recipe, stage = ctx.recipe, ctx.stage
        feats = ctx.train_features()  # (N_train, D)
        clusters = cluster_modalities(recipe.cluster, feats, ctx.train_rows, ctx.modality, ctx.true_ids)
        n_all = len(ctx.index)
        labels = np.full(n_all, -1, dtype=np.int64)
        conf = np.ones(n_all, dtype=np.float32)
        offsets, sizes = {}, {}
        offset = 0
        refine = recipe.cbt.refine and reached(stage.refine_from, epoch)
        train_pos = ctx.train_position
        for m in MODALITIES:
            c = clusters[m]
            offsets[m], sizes[m] = offset, c.centroids.shape[0]
            labels[c.rows] = np.where(c.labels >= 0, c.labels + offset, -1)
            if refine:
                conf[c.rows] = confidences(feats[train_pos[c.rows]], c.centroids, c.labels, stage.temp)
            offset += sizes[m]
            log(f"epoch {epoch + 1} {MODALITY_NAMES[m]}: {describe(c.stats)}")
        ctx.log({"kind": "labels", "epoch": epoch, "step": 0,
                 **{MODALITY_NAMES[m]: clusters[m].stats for m in MODALITIES},
                 "refine": refine, "mean_confidence": float(conf[labels >= 0].mean()) if (labels >= 0).any() else 1.0})
        write_labels_file(ctx, self.spec, epoch, labels, confidence=conf)
        return EpochState(
            labels=labels,
            extra={"epoch": epoch, "conf": conf, "offsets": offsets, "sizes": sizes},
            memories={m: make_memory(clusters[m].centroids, stage) for m in MODALITIES},
        )

    def save_epoch(self, state: EpochState) -> dict[str, Any]:
        return {"epoch": state.extra["epoch"], "labels": state.labels, "conf": state.extra["conf"],
                "offsets": state.extra["offsets"], "sizes": state.extra["sizes"],
                "memories": {m: mem.features.clone() for m, mem in state.memories.items()}}

    def restore_epoch(self, ctx: TrainContext, saved: dict[str, Any]) -> EpochState:
        stage = ctx.stage
        memories = {m: restore_memory(feats, stage) for m, feats in saved["memories"].items()}
        for mem in memories.values():
            mem.to(ctx.runtime.device)
        batches = epoch_batches(saved["labels"], modality=ctx.index.modality, num_instances=stage.instances,
                                clusters_per_batch=stage.clusters_per_batch, iters=stage.iters,
                                seed=ctx.recipe.train.seed, epoch=saved["epoch"],
                                mode="per-modality",
                                cameras=ctx.index.cams if stage.camera_aware_sampling else None)
        return EpochState(labels=saved["labels"], batches=batches,
                          extra={"epoch": saved["epoch"], "conf": saved["conf"], "offsets": saved["offsets"], "sizes": saved["sizes"],
                                 "labels_t": torch.from_numpy(saved["labels"]).to(ctx.runtime.device),
                                 "conf_t": torch.from_numpy(saved["conf"]).to(ctx.runtime.device)},
                          memories=memories)

    def batch_loss(self, ctx: TrainContext, state: EpochState, epoch: int,
                   batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float], Callable[[], None]]:
        recipe, stage, runtime = ctx.recipe, ctx.stage, ctx.runtime
        rows, modality = batch["rows"], batch["modality"]
        b = rows.shape[0]
        labels = state.extra["labels_t"][rows]  # (B,) global cluster ids
        conf = state.extra["conf_t"][rows]  # (B,)
        refine = recipe.cbt.refine and reached(stage.refine_from, epoch)
        with runtime.autocast():
            _, bn = ctx.model(batch["images"])  # (2B, D) BN-neck features
        feat = F.normalize(bn.float(), dim=1)
        fa, fb = feat[:b], feat[b:]
        offsets = state.extra["offsets"]
        contrast = memory_contrast(state.memories, lambda m, sel: labels[sel] - offsets[m], fa, fb,
                                   modality, conf, stage.refine_topk, refine)
        sigma = triplet_weight(stage.triplet_ramp, epoch)
        triplet = feat.new_zeros(())
        if sigma > 0:
            triplet = stage_triplet(stage, bn.float(), torch.cat([labels, labels]),
                                    torch.cat([modality, modality]))
        align = alignment(fa, fb, modality, recipe) if recipe.cbt.align else feat.new_zeros(())
        loss = contrast + sigma * triplet + recipe.cbt.align_weight * align
        parts = {"contrast": contrast.item(), "triplet": triplet.item(), "align": align.item()}

        def update() -> None:
            all_feat, all_labels, all_mod = gathered_batch(runtime, fa, fb, labels, modality)
            for m in MODALITIES:
                sel = all_mod == m
                if bool(sel.any()):
                    state.memories[m].update(all_feat[sel], all_labels[sel] - state.extra["offsets"][m])

        return loss, parts, update


def pretrain_single(ws: Workspace, recipe: Recipe, *, resume: bool = False, force: bool = False,
                    deterministic: bool = False):
    return run_stage(ws, recipe, SingleModalityStage(), resume=resume, force=force,
                     deterministic=deterministic)
