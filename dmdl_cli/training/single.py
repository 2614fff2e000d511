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

from dmdl_cli.console import log
from dmdl_cli.data.index import MODALITY_NAMES, VISIBLE
from dmdl_cli.data.sampling import epoch_batches
from dmdl_cli.model.loading import initial_model
from dmdl_cli.recipe import Recipe, StageRecipe, reached, triplet_weight
from dmdl_cli.training.labelling import (
    MODALITIES,
    cluster_modalities,
    confidences,
    describe,
    make_memory,
    restore_memory,
    write_labels_file,
)
from dmdl_cli.training.loop import (
    EpochState,
    StageLogic,
    TrainContext,
    batch_slots,
    gather_cat,
    run_stage,
)
from dmdl_cli.training.losses import (
    batch_hard_triplet,
    contrastive_loss,
    mmd_multi_kernel,
    modality_triplet,
)
from dmdl_cli.training.refine import refined_targets
from dmdl_cli.workspace import Workspace


def view_targets(local: torch.Tensor, conf: torch.Tensor, logits_a: torch.Tensor,
                 logits_b: torch.Tensor, topk: int, refine: bool):
    """Targets of view A and view B: refined soft targets (each from the other view) or hard."""
    if not refine:
        return local, local
    return (refined_targets(local, conf, logits_b, topk),
            refined_targets(local, conf, logits_a, topk))


def memory_contrast(memories: dict, local_labels: Callable[[int, torch.Tensor], torch.Tensor],
                    fa: torch.Tensor, fb: torch.Tensor, modality: torch.Tensor, conf: torch.Tensor,
                    topk: int, refine: bool) -> torch.Tensor:
    """Sum over modalities m of 1/2 [CE(f_A M_m / tau, t_A) + CE(f_B M_m / tau, t_B)].

    ``local_labels(m, sel)`` gives the memory-m rows of the batch samples selected by ``sel``.
    """
    total = fa.new_zeros(())
    for m in MODALITIES:
        sel = modality == m
        if not bool(sel.any()):
            continue
        mem = memories[m]
        local = local_labels(m, sel)
        la, lb = mem.logits(fa[sel]), mem.logits(fb[sel])
        ta, tb = view_targets(local, conf[sel], la, lb, topk, refine)
        total = total + 0.5 * (contrastive_loss(la, ta) + contrastive_loss(lb, tb))
    return total


def alignment(fa: torch.Tensor, fb: torch.Tensor, modality: torch.Tensor, recipe: Recipe) -> torch.Tensor:
    """CBT feature level: multi-kernel MMD between view A and view B, per modality."""
    total = fa.new_zeros(())
    for m in MODALITIES:
        sel = modality == m
        if int(sel.sum()) > 1:
            total = total + mmd_multi_kernel(fa[sel].float(), fb[sel].float(),
                                             num_kernels=recipe.cbt.mmd_kernels,
                                             kernel_mul=recipe.cbt.mmd_kernel_mul)
    return total


def stage_triplet(stage: StageRecipe, feat: torch.Tensor, labels: torch.Tensor,
                  modality: torch.Tensor) -> torch.Tensor:
    """The stage's triplet term on ``feat (2B, D)`` (views A then B) with ``labels`` and
    ``modality`` ``(2B,)``: per modality (summed, or a batch mean with ``loss_reduction: mean``)
    or one batch-hard over the joint batch."""
    if stage.triplet == "per-modality":
        return modality_triplet(feat, labels, modality, stage.triplet_margin, stage.loss_reduction)
    return batch_hard_triplet(feat, labels, stage.triplet_margin)


def sample_order(modality: torch.Tensor, view: torch.Tensor, slots: torch.Tensor,
                 first: int = VISIBLE) -> torch.Tensor:
    """Permutation putting two-view samples in the reference's memory-update order.

    ``modality``, ``view`` (0 = A, 1 = B) and ``slots`` (position in the global batch), all
    ``(N,)``. Order: modality ``first`` before the other; within a modality view A before view
    B (the reference concatenates a modality's two views), then batch position.
    """
    size = int(slots.max()) + 1 if slots.numel() else 1
    key = (modality != first).long() * 2 * size + view.long() * size + slots.long()
    return torch.argsort(key, stable=True)


def gathered_batch(runtime, fa: torch.Tensor, fb: torch.Tensor, labels: torch.Tensor,
                   modality: torch.Tensor, *extra: torch.Tensor, first: int = VISIBLE
                   ) -> list[torch.Tensor]:
    """Every rank's two-view samples, in :func:`sample_order` (the same on one or many ranks):
    ``[feat (2B, D), labels (2B,), modality (2B,), *extra]``; ``fa``, ``fb`` ``(b, D)``,
    ``labels``, ``modality`` ``(b,)`` and each ``extra`` ``(2b, ...)`` (views A then B)."""
    b = labels.shape[0]
    slots = batch_slots(b, runtime)
    view = torch.cat([torch.zeros(b, dtype=torch.long), torch.ones(b, dtype=torch.long)])
    parts = [torch.cat([fa, fb]).detach(), torch.cat([labels, labels]),
             torch.cat([modality, modality]), *extra, torch.cat([slots, slots]), view.to(slots.device)]
    parts = [gather_cat(p, runtime) for p in parts]
    order = sample_order(parts[2], parts[-1], parts[-2], first)
    return [p[order] for p in parts[:-2]]


class SingleModalityStage(StageLogic):
    name = "stage1"
    labels_prefix = "stage1"

    def initial_model(self, recipe: Recipe, ws: Workspace):
        model = initial_model(recipe)
        if not self.resuming:  # when resuming, the weights come from last.pt
            log(f"stage 1 starts from the untrained {recipe.model.arch}: {model.init_description}")
        return model, model.init_description

    def prepare_epoch(self, ctx: TrainContext, epoch: int) -> EpochState:
        recipe, stage = ctx.recipe, ctx.stage
        feats = ctx.train_features()  # (N_train, D)
        clusters = cluster_modalities(ctx, feats)
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
        write_labels_file(ctx, self.labels_prefix, epoch, labels, confidence=conf)
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
