"""Loss terms and targets both training stages build their batch loss from: the memory
contrast with (refined) targets of each view, the CBT feature alignment, the stage's triplet,
and the reference's per-sample memory-update order of a two-view batch.

Batches hold two views of B images: features ``fa``, ``fb`` ``(B, D)`` L2-normalised, or
``feat (2B, D)`` with view A rows first; ``modality`` is ``(B,)`` or ``(2B,)`` accordingly.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from dmdl_cli.clustering.modalities import MODALITIES
from dmdl_cli.data.index import VISIBLE
from dmdl_cli.recipe import Recipe, StageRecipe
from dmdl_cli.training.losses import (
    batch_hard_triplet,
    contrastive_loss,
    mmd_multi_kernel,
    modality_triplet,
)
from dmdl_cli.training.refine import refined_targets


def view_targets(local: torch.Tensor, conf: torch.Tensor, logits_a: torch.Tensor,
                 logits_b: torch.Tensor, topk: int, refine: bool):
    """Targets of view A and view B: refined soft targets (each from the other view) or hard."""
    if not refine:
        return local, local
    return (refined_targets(local, conf, logits_b, topk),
            refined_targets(local, conf, logits_a, topk))


def memory_contrast(memories: dict, local_labels: Callable[[int, torch.Tensor], torch.Tensor],
                    fa: torch.Tensor, fb: torch.Tensor, modality: torch.Tensor, conf: torch.Tensor,
                    topk: int, refine: bool,
                    logits: Callable[[int, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None
                    ) -> torch.Tensor:
    """Sum over modalities m of 1/2 [CE(f_A M_m / tau, t_A) + CE(f_B M_m / tau, t_B)].

    ``local_labels(m, sel)`` gives the memory-m rows of the batch samples selected by ``sel``;
    ``logits(m, sel)``, when given, their logits ``(f_A M_m / tau, f_B M_m / tau)`` computed by
    the caller (stage 2's in-place memory gradient), else ``memories[m].logits``.
    """
    total = fa.new_zeros(())
    for m in MODALITIES:
        sel = modality == m
        if not bool(sel.any()):
            continue
        local = local_labels(m, sel)
        if logits is None:
            la, lb = memories[m].logits(fa[sel]), memories[m].logits(fb[sel])
        else:
            la, lb = logits(m, sel)
        ta, tb = view_targets(local, conf[sel], la, lb, topk, refine)
        total = total + 0.5 * (contrastive_loss(la, ta) + contrastive_loss(lb, tb))
    return total


def alignment(bn: torch.Tensor, modality: torch.Tensor, recipe: Recipe) -> torch.Tensor:
    """CBT feature level: multi-kernel MMD between view A and view B of each modality, summed
    over the modalities. ``bn (2B, D)``: the BN-neck features, view A rows then view B;
    ``modality (B,)``. ``cbt.mmd``: ``unbiased-bn-neck`` (the reference's ``DAN_new``) is the
    U-statistic on ``bn`` as it is; ``biased-normalised`` the V-statistic on the L2-normalised
    features (:func:`~dmdl_cli.training.losses.mmd_multi_kernel`)."""
    feat = bn.float()
    if recipe.cbt.mmd == "biased-normalised":
        feat = F.normalize(feat, dim=1)
    b = modality.shape[0]
    fa, fb = feat[:b], feat[b:]  # (B, D) each
    total = feat.new_zeros(())
    for m in MODALITIES:
        sel = modality == m
        if int(sel.sum()) > 1:
            total = total + mmd_multi_kernel(fa[sel], fb[sel], num_kernels=recipe.cbt.mmd_kernels,
                                             kernel_mul=recipe.cbt.mmd_kernel_mul,
                                             unbiased=recipe.cbt.mmd == "unbiased-bn-neck")
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


def update_batch(fa: torch.Tensor, fb: torch.Tensor, labels: torch.Tensor, modality: torch.Tensor,
                 *extra: torch.Tensor, first: int = VISIBLE) -> list[torch.Tensor]:
    """The global batch's two-view samples in :func:`sample_order` (the reference's memory
    update order): ``[feat (2B, D) detached, labels (2B,), modality (2B,), *extra]``; ``fa``,
    ``fb`` ``(B, D)``, ``labels``, ``modality`` ``(B,)`` and each ``extra`` ``(2B, ...)`` (views
    A then B). Every process holds the whole global batch (``training/forward.py``), so every
    process moves its memories identically."""
    b = labels.shape[0]
    slots = torch.arange(b, device=labels.device)
    view = torch.cat([torch.zeros(b, dtype=torch.long), torch.ones(b, dtype=torch.long)]).to(labels.device)
    parts = [torch.cat([fa, fb]).detach(), torch.cat([labels, labels]),
             torch.cat([modality, modality]), *extra]
    order = sample_order(parts[2], view, torch.cat([slots, slots]), first)
    return [p[order] for p in parts]
