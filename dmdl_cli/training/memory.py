"""Cluster memory: one L2-normalised prototype per (pseudo-)cluster, updated by momentum.

Single-sample rule (ClusterContrast / the paper): ``m <- mu m + (1 - mu) f``, then renormalise.
A batch holds K images per cluster (two views each), so how several samples of one row combine
is a recipe choice, ``stageN.memory_update``:

* ``"per-sample"`` (the reference implementation): the single-sample rule applied sample by
  sample in the order given (the caller passes the reference's batch order), renormalising
  after each. Because of the renormalisation there is no closed form; the update runs in
  rounds: round r moves every row that has at least r + 1 samples with its (r + 1)-th sample,
  all such rows at once. Rounds = the largest multiplicity of a row in the batch (2K or so),
  each a vectorised step over distinct rows; it equals the plain Python loop exactly
  (``test_memory_losses``). Only ``mu^n`` of the old prototype survives n samples.
* ``"batch-mean"``: the n samples of a row make **one** update, the average of the updates
  each would make alone (before renormalisation)::

      m' = normalise( (1/n) sum_i [ mu_i m + (1 - mu_i) f_i ] )
         = normalise( mu_bar m + (1 - mu_bar) f_bar ),
      mu_bar = mean_i mu_i,   f_bar = sum_i (1 - mu_i) f_i / sum_i (1 - mu_i)

  order-invariant, equal to the single-sample rule for n = 1; a row moves by one momentum step
  per iteration whatever its number of samples.

With the confidence-weighted momentum of CAI (:func:`confidence_momentum`) a sample with
``mu_i = 1`` does not pull at all. Both rules run under ``torch.no_grad`` in float32 and are
deterministic (per-row sums are one-hot matrix products, not atomic adds).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dmdl_cli.recipe import MEMORY_UPDATES

__all__ = ["ClusterMemory", "confidence_momentum", "memory_product"]


class _MemoryProduct(torch.autograd.Function):
    """``x @ memory.T`` whose backward reads ``memory_late`` for the rows ``late``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, memory: torch.Tensor, memory_late: torch.Tensor,
                late: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(memory, memory_late, late)
        return x @ memory.T

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        memory, memory_late, late = ctx.saved_tensors
        grad_x = grad @ memory
        if bool(late.any()):
            grad_x[late] = grad[late] @ memory_late
        return grad_x, None, None, None


def memory_product(x: torch.Tensor, memory: torch.Tensor, late: torch.Tensor | None = None,
                   memory_late: torch.Tensor | None = None) -> torch.Tensor:
    """``x (B, D) @ memory.T -> (B, C)``, the memory a constant.

    With ``late`` ``(B,)`` bool and ``memory_late`` ``(C, D)``, the value is the same but the
    gradient of the rows ``late`` reads ``memory_late`` instead of ``memory``: the reference's
    memory autograd functions move memory rows inside ``backward``, so a node that runs later in
    the backward pass computes its input gradient against rows an earlier node of the same batch
    already moved (stage 2's ``memory_gradient: in-place``; ``training/cross.py``).
    """
    memory = memory.detach()
    if late is None or memory_late is None or not bool(late.any()):
        return x @ memory.T
    return _MemoryProduct.apply(x, memory, memory_late.detach(), late)



def confidence_momentum(target_y: torch.Tensor, base: float) -> torch.Tensor:
    """CAI's per-sample momentum ``mu = base / max(t(y), base)``, ``(B,)`` in ``[base, 1]``
    (``base``: the stage's momentum, 0.2 in the paper).

    ``target_y`` is the target probability t(y) of the sample's own label: a confident sample
    (``t(y) = 1``) updates with ``mu = base``; ``t(y) <= base`` leaves the memory unchanged.
    """
    target_y = target_y.detach().float()
    return base / target_y.clamp(min=base)


class ClusterMemory(nn.Module):
    """``C`` L2-normalised prototypes of dimension ``D`` (buffer ``features (C, D)``).

    ``logits(feat) = feat @ features.T / temp``; ``update(feat, labels, momentum)`` moves the
    prototypes of the labelled clusters (see the module docstring for the batch rule). ``temp``,
    ``momentum`` and ``rule`` have no defaults: they are the recipe's (``stageN.temp``,
    ``stageN.momentum``, ``stageN.memory_update``).
    The state dict holds ``features`` only; loading a state dict with a different number of
    clusters resizes the buffer (a checkpoint taken after re-clustering restores as is).
    """

    features: torch.Tensor

    def __init__(self, num_features: int, num_clusters: int, *, temp: float, momentum: float,
                 rule: str) -> None:
        super().__init__()
        if rule not in MEMORY_UPDATES:
            raise ValueError(f"rule must be one of {MEMORY_UPDATES}, got {rule!r}")
        self.num_features = int(num_features)
        self.temp = float(temp)
        self.momentum = float(momentum)
        self.rule = rule
        self.register_buffer("features", torch.zeros(num_clusters, num_features))

    @classmethod
    def from_centroids(cls, centroids, *, temp: float, momentum: float, rule: str) -> "ClusterMemory":
        """A memory whose rows are the L2-normalised ``centroids`` ``(C, D)`` (array or tensor)."""
        c = torch.as_tensor(centroids).detach().to(torch.float32)
        if c.dim() != 2:
            raise ValueError(f"centroids must be (C, D), got {tuple(c.shape)}")
        mem = cls(c.shape[1], c.shape[0], temp=temp, momentum=momentum, rule=rule)
        mem.features = F.normalize(c, dim=1).to(c.device).clone()
        return mem

    @property
    def num_clusters(self) -> int:
        return self.features.shape[0]

    def logits(self, feat: torch.Tensor, late: torch.Tensor | None = None,
               features_late: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, D) -> (B, C)``: ``feat @ features.T / temp`` (float32, autocast off); with
        ``late`` / ``features_late`` the gradient of those rows reads ``features_late``
        (:func:`memory_product`)."""
        with torch.autocast(device_type=feat.device.type, enabled=False):
            return memory_product(feat.float(), self.features, late, features_late) / self.temp

    forward = logits

    @torch.no_grad()
    def update(self, feat: torch.Tensor, labels: torch.Tensor, momentum=None) -> None:
        """Momentum update of the rows ``labels`` with the normalised features ``feat``.

        Args:
            feat: ``(B, D)`` L2-normalised features (detached internally).
            labels: ``(B,)`` cluster indices; negative labels (outliers) are ignored.
            momentum: ``None`` (the memory's ``momentum``), a float, or a ``(B,)`` tensor of
                per-sample momenta in ``[0, 1]``.
        """
        with torch.autocast(device_type=feat.device.type, enabled=False):
            f = feat.detach().float()  # (B, D)
            labels = labels.to(device=f.device, dtype=torch.long)
            if momentum is None:
                momentum = self.momentum
            mu = torch.as_tensor(momentum, dtype=torch.float32, device=f.device)
            mu = mu.expand(f.shape[0]) if mu.dim() == 0 else mu.reshape(-1)  # (B,)
            if mu.shape[0] != f.shape[0] or labels.shape != (f.shape[0],):
                raise ValueError("feat, labels and momentum must describe the same batch")
            keep = labels >= 0
            f, labels, mu = f[keep], labels[keep], mu[keep]
            if labels.numel() == 0:
                return
            if int(labels.max()) >= self.num_clusters:
                raise ValueError(f"label {int(labels.max())} >= {self.num_clusters} clusters")
            if self.rule == "per-sample":
                self._update_in_order(f, labels, mu)
                return
            rows, inverse = torch.unique(labels, return_inverse=True)  # (U,), (B',)
            onehot = F.one_hot(inverse, rows.numel()).T.to(f.dtype)  # (U, B')
            count = onehot.sum(dim=1, keepdim=True)  # (U, 1)
            mu_bar = (onehot @ mu.unsqueeze(1)) / count  # (U, 1)
            pull = (onehot @ ((1.0 - mu).unsqueeze(1) * f)) / count  # (U, D) = (1 - mu_bar) f_bar
            old = self.features[rows].float()  # (U, D)
            self.features[rows] = F.normalize(mu_bar * old + pull, dim=1).to(self.features.dtype)

    @torch.no_grad()
    def moved(self, feat: torch.Tensor, labels: torch.Tensor, momentum=None) -> torch.Tensor:
        """The rows ``(C, D)`` this memory would hold after ``update(feat, labels, momentum)``;
        the memory itself is left as it was."""
        before = self.features.clone()
        self.update(feat, labels, momentum)
        after = self.features.clone()
        self.features.copy_(before)
        return after

    def _update_in_order(self, f: torch.Tensor, labels: torch.Tensor, mu: torch.Tensor) -> None:
        """Sample-by-sample rule in the given order, in rounds over the r-th sample of each row.

        ``f (B, D)``, ``labels (B,)`` (all >= 0), ``mu (B,)``.
        """
        order = torch.argsort(labels, stable=True)  # samples grouped by row, batch order kept
        sorted_labels = labels[order]
        rows, counts = torch.unique_consecutive(sorted_labels, return_counts=True)  # (U,), (U,)
        starts = torch.cumsum(counts, 0) - counts  # (U,) first sample of each row in `order`
        for r in range(int(counts.max())):
            live = counts > r  # rows with an (r + 1)-th sample
            pick = order[starts[live] + r]  # (U_r,) that sample, one per row
            target = rows[live]
            old = self.features[target].float()  # (U_r, D)
            m = mu[pick].unsqueeze(1)
            self.features[target] = F.normalize(m * old + (1.0 - m) * f[pick], dim=1).to(
                self.features.dtype)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "features"
        if key in state_dict and state_dict[key].shape != self.features.shape:
            self.features = torch.zeros_like(state_dict[key], device=self.features.device,
                                             dtype=self.features.dtype)
            self.num_features = int(state_dict[key].shape[1])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return (f"num_clusters={self.num_clusters}, num_features={self.num_features}, "
                f"temp={self.temp}, momentum={self.momentum}, rule={self.rule}")
