"""Loss functions of both stages. All are computed in float32 with autocast disabled."""
from __future__ import annotations

import torch

__all__ = [
    "batch_hard_triplet",
    "contrastive_loss",
    "cross_modal_triplet",
    "mmd_multi_kernel",
    "pairwise_distances",
]


def _no_autocast(t: torch.Tensor):
    return torch.autocast(device_type=t.device.type, enabled=False)


def contrastive_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cluster-contrastive cross-entropy ``mean_i [ - sum_c t_ic log softmax(logits_i)_c ]``.

    ``logits``: ``(B, C)`` = ``f . M / tau`` (see ``ClusterMemory.logits``). ``target``: either
    ``(B,)`` int cluster labels (one-hot ``t``) or ``(B, C)`` soft targets whose rows sum to 1
    (no gradient flows into them).
    """
    with _no_autocast(logits):
        log_p = torch.log_softmax(logits.float(), dim=1)  # (B, C)
        if target.dim() == 1:
            return -log_p.gather(1, target.long().unsqueeze(1)).mean()
        if target.shape != logits.shape:
            raise ValueError(f"target {tuple(target.shape)} vs logits {tuple(logits.shape)}")
        return -(target.detach().float() * log_p).sum(dim=1).mean()


def pairwise_distances(x: torch.Tensor, y: torch.Tensor | None = None, *, squared: bool = False,
                       eps: float = 1e-12) -> torch.Tensor:
    """Euclidean distances ``(N, D) x (M, D) -> (N, M)``; ``sqrt(max(d^2, eps))`` unless squared.

    The clamp keeps the square root differentiable at coincident points.
    """
    y = x if y is None else y
    d2 = (x * x).sum(1, keepdim=True) + (y * y).sum(1).unsqueeze(0) - 2.0 * x @ y.T
    d2 = d2.clamp(min=0.0)
    return d2 if squared else d2.clamp(min=eps).sqrt()


def _hard_mining_triplet(dist: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor,
                         margin: float) -> torch.Tensor:
    """``mean_a relu(max_{p in pos(a)} d_ap - min_{n in neg(a)} d_an + margin)`` over anchors
    that have at least one positive and one negative; 0 (with a graph) if there is none."""
    valid = pos.any(dim=1) & neg.any(dim=1)  # (B,)
    if not bool(valid.any()):
        return dist.sum() * 0.0
    neg_inf = torch.finfo(dist.dtype).min
    pos_inf = torch.finfo(dist.dtype).max
    hardest_pos = torch.where(pos, dist, torch.full_like(dist, neg_inf)).amax(dim=1)  # (B,)
    hardest_neg = torch.where(neg, dist, torch.full_like(dist, pos_inf)).amin(dim=1)  # (B,)
    hinge = torch.relu(hardest_pos - hardest_neg + margin)
    return hinge[valid].mean()


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
                     kernel_mul: float = 2.0) -> torch.Tensor:
    """Multi-kernel Gaussian MMD^2 (biased estimator) between ``x (B, D)`` and ``y (B', D)``.

    ``k(a, b) = sum_{i=0}^{K-1} exp(-|a - b|^2 / s_i)`` with bandwidths
    ``s_i = s * kernel_mul^(i - K // 2)`` and base ``s`` = the mean squared distance over the
    distinct pairs of the pooled set ``z = [x; y]`` (DAN convention; ``s`` carries no gradient).

    ``MMD^2 = mean k(x, x') + mean k(y, y') - 2 mean k(x, y)``, all means over every pair
    including the diagonal (biased V-statistic): 0 for identical sets, >= 0 always.
    """
    with _no_autocast(x):
        z = torch.cat([x.float(), y.float()], dim=0)  # (n, D), n = B + B'
        n, b = z.shape[0], x.shape[0]
        d2 = pairwise_distances(z, squared=True)  # (n, n)
        base = d2.detach().sum() / max(n * n - n, 1)
        base = base.clamp(min=torch.finfo(torch.float32).tiny)
        kernel = torch.zeros_like(d2)
        for i in range(num_kernels):
            kernel = kernel + torch.exp(-d2 / (base * kernel_mul ** (i - num_kernels // 2)))
        kxx = kernel[:b, :b].mean()
        kyy = kernel[b:, b:].mean()
        kxy = kernel[:b, b:].mean()
        return kxx + kyy - 2.0 * kxy
