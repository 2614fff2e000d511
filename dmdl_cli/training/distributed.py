"""What the training loop needs under DDP (``torchrun``): every rank draws the same global
batches and takes its slice; pseudo labels are computed on rank 0 and broadcast; memory updates
gather every rank's samples back into global batch order. On one process each function is the
identity."""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from dmdl_cli.runtime import Runtime


def rank_slice(batch: list, rank: int, world: int) -> list:
    """This rank's share of a global batch (every rank draws the same global batches)."""
    return batch[rank::world]


def batch_slots(n: int, runtime: Runtime) -> torch.Tensor:
    """``(n,)`` position in the global batch of each of this rank's ``n`` samples (the inverse
    of :func:`rank_slice`), so that gathered samples can be put back in batch order."""
    return torch.arange(n, device=runtime.device) * runtime.world_size + runtime.rank


def broadcast_object(obj: Any, runtime: Runtime) -> Any:
    """Rank 0's ``obj`` on every rank (pseudo labels are computed once, on rank 0)."""
    if not runtime.distributed:
        return obj
    holder = [obj if runtime.is_main else None]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def gather_cat(tensor: torch.Tensor, runtime: Runtime) -> torch.Tensor:
    """Concatenate a per-rank tensor over ranks (memory updates see the whole global batch)."""
    if not runtime.distributed:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(runtime.world_size)]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def mean_over_ranks(value: torch.Tensor, runtime: Runtime) -> float:
    """A scalar averaged over ranks (under DDP each rank sees its share of the global batch)."""
    if runtime.distributed:
        value = value.clone()
        dist.all_reduce(value)
        value /= runtime.world_size
    return float(value.item())
