"""A diagnostic of CAI: how much of ``P(y | do(x))`` at the target id comes from the sample's own
modality.

CAI predicts ``P(y | do(x)) = sum_m P(y | x, m) P(m)`` (:mod:`dmdl_cli.model.cai`). For a sample
of modality ``m_i`` with pseudo label ``y_i`` the own-modality share is

    s_i = P(y_i | x_i, m_i) P(m_i) / P(y_i | do(x_i))

1 means the other modality's memory contributes nothing to the target's probability, so CAI's
loss can be satisfied within the sample's own modality (no cross-modal pull); 0.5 with a
balanced prior means both modalities predict the target equally. Samples whose target id has
no memory row in any modality (probability 0) are left out. Nothing here trains anything: it
reads features, memories and labels of a finished run.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

__all__ = ["own_modality_share"]


def _per_modality_target_prob(feats: torch.Tensor, memory: torch.Tensor, ids: torch.Tensor,
                              labels: torch.Tensor, temp: float) -> torch.Tensor:
    """``P(y_i | x_i, m)`` for one modality's memory: ``(N,)``, 0 where m has no row of y_i."""
    if memory.shape[0] == 0:
        return torch.zeros(len(labels), dtype=torch.float64)
    prob = torch.softmax(feats @ memory.T / temp, dim=1)  # (N, C_m)
    hit = ids.view(1, -1) == labels.view(-1, 1)  # (N, C_m) rows carrying the target id
    return (prob * hit).sum(dim=1)


def own_modality_share(
    features: np.ndarray | torch.Tensor,
    memories: Sequence[np.ndarray | torch.Tensor],
    memory_ids: Sequence[np.ndarray | torch.Tensor],
    prior: np.ndarray | torch.Tensor,
    labels: np.ndarray | torch.Tensor,
    modality: np.ndarray | torch.Tensor,
    temp: float = 0.05,
) -> dict:
    """Own-modality share of ``P(y | do(x))`` at the target id, averaged over samples.

    Args:
        features: ``(N, D)`` L2-normalised features of the training samples.
        memories: per modality m, ``(C_m, D)`` L2-normalised memory rows.
        memory_ids: per modality m, ``(C_m,)`` unified id of each row.
        prior: ``(M,)`` ``P(m)``.
        labels: ``(N,)`` unified pseudo labels (-1 = outlier, left out).
        modality: ``(N,)`` modality of each sample, in ``[0, M)``.
        temp: the softmax temperature of CAI.

    Returns ``{"share": mean s_i, "share_per_modality": [mean s_i of modality m, ...],
    "target_prob": mean P(y_i | do(x_i)), "own_row": share of samples whose own modality has a
    memory row of their target id, "samples": number of samples averaged}`` (NaN where no sample).
    """
    feats = torch.as_tensor(np.asarray(features), dtype=torch.float64)
    lab = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    mod = torch.as_tensor(np.asarray(modality), dtype=torch.long)
    p_m = torch.as_tensor(np.asarray(prior), dtype=torch.float64)
    if not (len(memories) == len(memory_ids) == p_m.numel()):
        raise ValueError(f"{len(memories)} memories, {len(memory_ids)} id maps and a prior of "
                         f"{p_m.numel()} modalities must agree")
    if feats.shape[0] != lab.shape[0] or lab.shape != mod.shape:
        raise ValueError(f"features {tuple(feats.shape)}, labels {tuple(lab.shape)} and modality "
                         f"{tuple(mod.shape)} must agree")
    terms = torch.stack([  # (M, N): P(y_i | x_i, m) P(m)
        _per_modality_target_prob(feats, torch.as_tensor(np.asarray(mem), dtype=torch.float64),
                                  torch.as_tensor(np.asarray(ids), dtype=torch.long), lab, temp) * p_m[m]
        for m, (mem, ids) in enumerate(zip(memories, memory_ids))
    ])
    total = terms.sum(dim=0)  # (N,) P(y_i | do(x_i))
    own = terms.gather(0, mod.clamp(min=0).view(1, -1)).squeeze(0)  # (N,)
    keep = (lab >= 0) & (total > 0)
    share = torch.where(keep, own / total.clamp(min=1e-300), torch.zeros_like(total))
    own_row = torch.stack([
        (torch.as_tensor(np.asarray(ids), dtype=torch.long).view(1, -1) == lab.view(-1, 1)).any(dim=1)
        for ids in memory_ids
    ]).gather(0, mod.clamp(min=0).view(1, -1)).squeeze(0)

    def mean(values: torch.Tensor, mask: torch.Tensor) -> float:
        return float(values[mask].mean()) if bool(mask.any()) else float("nan")

    return {
        "share": mean(share, keep),
        "share_per_modality": [mean(share, keep & (mod == m)) for m in range(p_m.numel())],
        "target_prob": mean(total, keep),
        "own_row": mean(own_row.double(), keep),
        "samples": int(keep.sum()),
    }
