"""What the training loop needs under DDP (``torchrun``) besides the forward of
``training/forward.py``: pseudo labels are computed on rank 0 and broadcast; logged scalars are
averaged over ranks; features are gathered from every rank. On one process each function is
the identity."""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from dmdl_cli.runtime import Runtime


def broadcast_object(obj: Any, runtime: Runtime) -> Any:
    """Rank 0's ``obj`` on every rank (pseudo labels are computed once, on rank 0)."""
    if not runtime.distributed:
        return obj
    holder = [obj if runtime.is_main else None]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


class _GatherRows(torch.autograd.Function):
    """All ranks' rows, concatenated in rank order (sizes may differ); the backward sums the
    gradient over ranks and returns this rank's rows."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, sizes: tuple[int, ...], rank: int) -> torch.Tensor:
        ctx.sizes, ctx.rank = sizes, rank
        width = max(sizes)
        padded = x.new_zeros((width, *x.shape[1:]))
        padded[:x.shape[0]] = x
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded.contiguous())
        return torch.cat([p[:n] for p, n in zip(parts, sizes)])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        start = sum(ctx.sizes[:ctx.rank])
        return grad[start:start + ctx.sizes[ctx.rank]], None, None


def gather_rows(local: torch.Tensor, sizes: tuple[int, ...], runtime: Runtime) -> torch.Tensor:
    """Every rank's rows ``(sizes[r], ...)`` concatenated in rank order, with gradient: the
    backward sums the gradient over ranks (every rank computes the same loss of the gathered
    rows; DDP then divides by the number of ranks)."""
    return _GatherRows.apply(local, tuple(sizes), runtime.rank)


def mean_over_ranks(value: torch.Tensor, runtime: Runtime) -> float:
    """A scalar averaged over ranks (under DDP each rank sees its share of the global batch)."""
    if runtime.distributed:
        value = value.clone()
        dist.all_reduce(value)
        value /= runtime.world_size
    return float(value.item())
