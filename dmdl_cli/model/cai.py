"""CAI — Causality-inspired Adjustment Intervention (model-level debiasing, stage 2).

The modality ``m`` (0 = visible, 1 = infrared) confounds image and pseudo label. Instead of the
likelihood ``P(y | x)`` CAI trains the backdoor-adjusted prediction

    P(y | do(x)) = sum_m P(y | x, m) P(m)

* ``P(y | x, m)``: softmax of ``f(x) . M_m / temp`` over the rows of modality m's memory, mapped
  into the unified identity space through ``memory_ids[m]`` (the unified id of each row): an
  id that modality m lacks gets probability 0, and when several rows of modality m carry the
  same unified id (many-to-one association) their probabilities add;
* ``P(m)``: the share of pseudo-labelled training images of modality m this epoch
  (:func:`modality_prior`);
* ``L_CAI = - sum_y t(y) log P(y | do(x))`` with ``t`` the (refined) target (:func:`cai_loss`).

Everything is evaluated in log space in float32 (autocast disabled):

    log P(y | do(x)) = logsumexp_{(m, r): id_m(r) = y} [ log_softmax_m(f . M_m / temp)_r + log P(m) ]

with the log-sum-exp taken per unified id (shifted by its own maximum, so no id underflows).
Ids with no row in any modality (or only in modalities with P(m) = 0) have probability exactly
0; their log probability is set to ``log(eps)`` so that a zero target there contributes 0 and
nothing is NaN.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

__all__ = ["cai_log_prob", "cai_log_prob_from_logits", "cai_loss", "modality_prior"]


def cai_log_prob(
    feat: torch.Tensor,
    memories: Sequence[torch.Tensor],
    memory_ids: Sequence[torch.Tensor],
    prior: torch.Tensor,
    num_ids: int,
    temp: float = 0.05,
    *,
    eps: float = 1e-12,
) -> torch.Tensor:
    """``log P(y | do(x))`` for every unified id, ``(B, num_ids)``.

    Args:
        feat: ``(B, D)`` L2-normalised features (gradients flow through it).
        memories: per modality m, ``(C_m, D)`` L2-normalised memory rows (treated as constants).
        memory_ids: per modality m, ``(C_m,)`` int64 unified id of each memory row, in
            ``[0, num_ids)``.
        prior: ``(M,)`` modality prior ``P(m)``, summing to 1.
        num_ids: size of the unified identity space.
        temp: softmax temperature tau.
        eps: probability floor used only for ids that no modality can predict.
    """
    if len(memories) != len(memory_ids):
        raise ValueError(f"{len(memories)} memories and {len(memory_ids)} id maps must agree")
    with torch.autocast(device_type=feat.device.type, enabled=False):
        feat32 = feat.float()
        logits = [feat32 @ mem.detach().float().T / temp for mem in memories]  # (B, C_m) each
    return cai_log_prob_from_logits(logits, memory_ids, prior, num_ids, eps=eps)


def cai_log_prob_from_logits(
    logits: Sequence[torch.Tensor],
    memory_ids: Sequence[torch.Tensor],
    prior: torch.Tensor,
    num_ids: int,
    *,
    eps: float = 1e-12,
) -> torch.Tensor:
    """``log P(y | do(x))`` ``(B, num_ids)`` from each modality's memory logits
    ``f(x) . M_m / temp`` ``(B, C_m)`` (gradients flow through them): :func:`cai_log_prob`
    for callers that compute the logits themselves (stage 2's in-place memory gradient)."""
    if len(logits) != len(memory_ids) or len(logits) != prior.numel():
        raise ValueError(
            f"{len(logits)} memories, {len(memory_ids)} id maps and a prior of "
            f"{prior.numel()} modalities must agree"
        )
    device = logits[0].device
    with torch.autocast(device_type=device.type, enabled=False):
        log_prior = torch.log(prior.to(device=device, dtype=torch.float32))
        parts, ids = [], []
        for z, mid, lp in zip(logits, memory_ids, log_prior):
            if z.shape[1] == 0:
                continue
            if mid.shape != (z.shape[1],):
                raise ValueError(f"logits over {z.shape[1]} memory rows with ids {tuple(mid.shape)}")
            parts.append(torch.log_softmax(z.float(), dim=1) + lp)  # log P(r | x, m) + log P(m)
            ids.append(mid.to(device=device, dtype=torch.long))
        if not parts:
            raise ValueError("cai_log_prob needs at least one non-empty memory")
        a = torch.cat(parts, dim=1)  # (B, R) with R = sum_m C_m
        row_ids = torch.cat(ids)  # (R,)
        if int(row_ids.min()) < 0 or int(row_ids.max()) >= num_ids:
            raise ValueError(f"memory ids must lie in [0, {num_ids})")
        b = a.shape[0]
        index = row_ids.unsqueeze(0).expand(b, -1)  # (B, R)
        # Per-id maximum (a constant shift: logsumexp is exact for any shift, so detach it).
        shift = torch.full((b, num_ids), -math.inf, device=a.device, dtype=a.dtype)
        shift = shift.scatter_reduce(1, index, a.detach(), reduce="amax", include_self=True)
        present = torch.isfinite(shift)  # (B, num_ids) ids some modality can predict
        shift = torch.where(present, shift, torch.zeros_like(shift))
        summed = torch.zeros((b, num_ids), device=a.device, dtype=a.dtype)
        summed = summed.scatter_add(1, index, torch.exp(a - shift.gather(1, index)))  # (B, num_ids)
        # For present ids ``summed >= 1`` (the maximal term is exp(0)); absent ids get the floor.
        log_p = shift + torch.log(torch.where(present, summed, torch.ones_like(summed)))
        return torch.where(present, log_p, torch.full_like(log_p, math.log(eps)))


def cai_loss(log_prob: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``L_CAI = mean_batch [ - sum_y t(y) log P(y | do(x)) ]``.

    Args:
        log_prob: ``(B, num_ids)`` from :func:`cai_log_prob`.
        target: ``(B, num_ids)`` soft targets, rows summing to 1 (no gradient).
    """
    if log_prob.shape != target.shape:
        raise ValueError(f"log_prob {tuple(log_prob.shape)} vs target {tuple(target.shape)}")
    return -(target.detach().float() * log_prob.float()).sum(dim=1).mean()


def modality_prior(labels, modality, num_modalities: int = 2) -> torch.Tensor:
    """``P(m) = #{i : label_i >= 0, modality_i = m} / #{i : label_i >= 0}``, ``(M,)`` float32.

    ``labels``: ``(N,)`` pseudo labels (-1 = outlier, not counted); ``modality``: ``(N,)`` ints
    in ``[0, num_modalities)``. Accepts numpy arrays or tensors; returns a CPU tensor.
    """
    labels = np.asarray(torch.as_tensor(labels).cpu())
    modality = np.asarray(torch.as_tensor(modality).cpu())
    if labels.shape != modality.shape:
        raise ValueError(f"labels {labels.shape} vs modality {modality.shape}")
    keep = labels >= 0
    if not keep.any():
        raise ValueError("modality_prior: no pseudo-labelled sample")
    counts = np.bincount(modality[keep].astype(np.int64), minlength=num_modalities)
    if counts.size > num_modalities:
        raise ValueError(f"modality ids must lie in [0, {num_modalities})")
    return torch.as_tensor(counts / counts.sum(), dtype=torch.float32)
