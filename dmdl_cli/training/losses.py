"""Loss functions of both stages. All are computed in float32 with autocast disabled."""
from __future__ import annotations

import torch

__all__ = [
    "batch_hard_triplet",
    "modality_triplet",
    "reduce_over_modalities",
    "sample_cross_entropy",
    "contrastive_loss",
    "cross_modal_triplet",
    "mmd_multi_kernel",
    "pairwise_distances",
]


def _no_autocast(x: torch.Tensor):
    return torch.autocast(device_type=x.device.type, enabled=False)


def contrastive_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cluster-contrastive cross-entropy ``mean_i [ - sum_c t_ic log softmax(logits_i)_c ]``.

    ``logits``: ``(B, C)`` = ``f . M / tau`` (see ``ClusterMemory.logits``). ``target``: either
    ``(B,)`` int cluster labels (one-hot ``t``) or ``(B, C)`` soft targets whose rows sum to 1
    (no gradient flows into them).
    """
    return sample_cross_entropy(logits, target).mean()


def sample_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample ``- sum_c t_c log softmax(logits)_c``, ``(B,)``; ``target`` as in
    :func:`contrastive_loss` (``(B,)`` labels or ``(B, C)`` soft targets, no gradient)."""
    with _no_autocast(logits):
        log_p = torch.log_softmax(logits.float(), dim=1)  # (B, C)
        if target.dim() == 1:
            return -log_p.gather(1, target.long().unsqueeze(1)).squeeze(1)
        if target.shape != logits.shape:
            raise ValueError(f"target {tuple(target.shape)} vs logits {tuple(logits.shape)}")
        return -(target.detach().float() * log_p).sum(dim=1)


def reduce_over_modalities(values: torch.Tensor, modality: torch.Tensor, how: str,
                           valid: torch.Tensor | None = None) -> torch.Tensor:
    """Reduce per-sample ``values (N,)`` of a batch holding both modalities to one term.

    ``"sum-modalities"``: ``sum_m mean_{i: modality_i = m} values_i`` (the reference: each term
    is the sum of the two modalities' batch means); ``"mean"``: the mean over the whole batch.
    Samples with ``valid`` False are left out; a modality without valid samples adds 0.
    """
    keep = torch.ones_like(values, dtype=torch.bool) if valid is None else valid
    if how == "mean":
        return values[keep].mean() if bool(keep.any()) else values.sum() * 0.0
    if how != "sum-modalities":
        raise ValueError(f"unknown reduction {how!r}")
    total = values.sum() * 0.0
    for m in torch.unique(modality).tolist():
        sel = keep & (modality == m)
        if bool(sel.any()):
            total = total + values[sel].mean()
    return total


def pairwise_distances(x: torch.Tensor, y: torch.Tensor | None = None, *, squared: bool = False,
                       eps: float = 1e-12) -> torch.Tensor:
    """Euclidean distances ``(N, D) x (M, D) -> (N, M)``; ``sqrt(max(d^2, eps))`` unless squared.

    The clamp keeps the square root differentiable at coincident points.
    """
    y = x if y is None else y
    d2 = (x * x).sum(1, keepdim=True) + (y * y).sum(1).unsqueeze(0) - 2.0 * x @ y.T
    d2 = d2.clamp(min=0.0)
    return d2 if squared else d2.clamp(min=eps).sqrt()


def _triplet_hinges(dist: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor,
                    margin: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per anchor ``relu(max_{p in pos(a)} d_ap - min_{n in neg(a)} d_an + margin)`` ``(B,)``
    and whether the anchor has at least one positive and one negative ``(B,)``."""
    valid = pos.any(dim=1) & neg.any(dim=1)  # (B,)
    neg_inf = torch.finfo(dist.dtype).min
    pos_inf = torch.finfo(dist.dtype).max
    hardest_pos = torch.where(pos, dist, torch.full_like(dist, neg_inf)).amax(dim=1)  # (B,)
    hardest_neg = torch.where(neg, dist, torch.full_like(dist, pos_inf)).amin(dim=1)  # (B,)
    hinge = torch.relu(hardest_pos - hardest_neg + margin)
    return torch.where(valid, hinge, torch.zeros_like(hinge)), valid


def _hard_mining_triplet(dist: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor,
                         margin: float) -> torch.Tensor:
    """Mean hinge over anchors that have at least one positive and one negative; 0 (with a
    graph) if there is none."""
    hinge, valid = _triplet_hinges(dist, pos, neg, margin)
    if not bool(valid.any()):
        return dist.sum() * 0.0
    return hinge[valid].mean()


def modality_triplet(feat: torch.Tensor, labels: torch.Tensor, modality: torch.Tensor,
                     margin: float = 0.3, reduction: str = "sum-modalities") -> torch.Tensor:
    """Batch-hard triplet within each modality (the reference's per-modality triplets).

    Positives and negatives of an anchor are images of its own modality only, so a visible and
    an infrared image never meet in one triplet. The per-anchor hinges are reduced by
    :func:`reduce_over_modalities` (``sum-modalities``: the visible triplet plus the infrared
    one). ``feat (B, D)``, ``labels`` and ``modality`` ``(B,)``.
    """
    with _no_autocast(feat):
        f = feat.float()
        dist = pairwise_distances(f)  # (B, B)
        same = labels.view(-1, 1) == labels.view(1, -1)
        same_mod = modality.view(-1, 1) == modality.view(1, -1)
        eye = torch.eye(len(labels), dtype=torch.bool, device=f.device)
        hinge, valid = _triplet_hinges(dist, same & same_mod & ~eye, ~same & same_mod, margin)
        return reduce_over_modalities(hinge, modality, reduction, valid)


def batch_hard_triplet(feat: torch.Tensor, labels: torch.Tensor, margin: float = 0.3
                       ) -> torch.Tensor:
    """Batch-hard triplet loss (hinge, not soft-margin), Euclidean distances.

    ``L = mean_a max(0, max_{p: y_p = y_a, p != a} d(a, p) - min_{n: y_n != y_a} d(a, n) + margin)``
    over anchors with at least one other sample of their label and one of another label
    (anchors without a positive are skipped). ``feat`` ``(B, D)``, ``labels`` ``(B,)``.
    """
    with _no_autocast(feat):
        f = feat.float()
        dist = pairwise_distances(f)  # (B, B)
        same = labels.view(-1, 1) == labels.view(1, -1)
        eye = torch.eye(len(labels), dtype=torch.bool, device=f.device)
        return _hard_mining_triplet(dist, same & ~eye, ~same, margin)


def cross_modal_triplet(feat: torch.Tensor, labels: torch.Tensor, modality: torch.Tensor,
                        margin: float = 0.3) -> torch.Tensor:
    """Batch-hard triplet whose positives come from the other modality.

    ``L = mean_a max(0, max_{p: y_p = y_a, m_p != m_a} d(a, p) - min_{n: y_n != y_a} d(a, n)
    + margin)``; negatives may be of either modality; anchors without a cross-modal positive
    are skipped. ``feat`` ``(B, D)``, ``labels`` and ``modality`` ``(B,)``.
    """
    with _no_autocast(feat):
        f = feat.float()
        dist = pairwise_distances(f)  # (B, B)
        same = labels.view(-1, 1) == labels.view(1, -1)
        other_mod = modality.view(-1, 1) != modality.view(1, -1)
        return _hard_mining_triplet(dist, same & other_mod, ~same, margin)


def mmd_multi_kernel(x: torch.Tensor, y: torch.Tensor, *, num_kernels: int = 5,
                     kernel_mul: float = 2.0, unbiased: bool = False) -> torch.Tensor:
    """Multi-kernel Gaussian MMD^2 between ``x (B, D)`` and ``y (B', D)``.

    ``k(a, b) = sum_{i=0}^{K-1} exp(-|a - b|^2 / s_i)`` (summed over the K kernels, not
    averaged) with bandwidths ``s_i = s * kernel_mul^(i - K // 2)`` and base ``s`` = the mean
    squared distance over the distinct pairs of the pooled set ``z = [x; y]`` (DAN convention;
    ``s`` carries no gradient).

    ``unbiased=False``: the V-statistic ``mean k(x, x') + mean k(y, y') - 2 mean k(x, y)``, all
    means over every pair including the diagonal: 0 for identical sets, >= 0 always, biased
    upward. ``unbiased=True``: the U-statistic of the reference's ``DAN_new``: the within-set
    means leave the diagonal out (``sum_{i != j} k(x_i, x_j) / (B (B - 1))``, likewise for
    ``y``), the cross term is ``2 sum k(x_i, y_j) / (B B')``; its expectation is 0 when x and y
    come from one distribution (it can be negative); needs ``B, B' >= 2``.
    """
    if unbiased and min(x.shape[0], y.shape[0]) < 2:
        raise ValueError(f"the unbiased MMD needs >= 2 samples per set, got {x.shape[0]} and "
                         f"{y.shape[0]}")
    with _no_autocast(x):
        z = torch.cat([x.float(), y.float()], dim=0)  # (n, D), n = B + B'
        n, b = z.shape[0], x.shape[0]
        d2 = pairwise_distances(z, squared=True)  # (n, n)
        base = d2.detach().sum() / max(n * n - n, 1)
        base = base.clamp(min=torch.finfo(torch.float32).tiny)
        kernel = torch.zeros_like(d2)
        for i in range(num_kernels):
            kernel = kernel + torch.exp(-d2 / (base * kernel_mul ** (i - num_kernels // 2)))
        kxx, kyy, kxy = kernel[:b, :b], kernel[b:, b:], kernel[:b, b:]
        if not unbiased:
            return kxx.mean() + kyy.mean() - 2.0 * kxy.mean()
        c = n - b
        within = ((kxx.sum() - kxx.diagonal().sum()) / (b * (b - 1))
                  + (kyy.sum() - kyy.diagonal().sum()) / (c * (c - 1)))
        return within - 2.0 * kxy.sum() / (b * c)
