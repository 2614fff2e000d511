"""How a training step forwards its global batch: the BatchNorm groups, each process's share,
and the features put back in the global batch's order on every process.

A step's global batch holds ``B`` keys ``(row, aug seed)`` (P clusters x K images of each
modality, visible keys first; ``data/sampling.py``) and two views of each: ``2B`` images, the
*items*. Item ``v * B + j`` is view ``v`` (0 = A, 1 = B) of key ``j``; that is also the order of
the features every stage receives, ``(2B, D)``: view A of every key, then view B.

BatchNorm groups (``train.bn_groups``):

* ``joint``: a process normalises everything it forwards at once: on one process the whole
  batch; under DDP rank r takes keys r, r + W, ... (both views) and normalises its share, so the
  statistics depend on the number of processes.
* ``reference``: the reference implementation trains under ``nn.DataParallel`` over S GPUs
  (``train.bn_slices``). Its network takes the visible images ``[view A; view B]`` and the
  infrared images ``[view A; view B]`` as two tensors; DataParallel cuts each into S consecutive
  chunks (``torch.chunk``: ``ceil(n / S)`` images each, the last one shorter) and GPU g forwards
  visible chunk g with infrared chunk g. Every BatchNorm therefore normalises one such *group*,
  and only GPU 0's replica keeps its running statistics (DataParallel's replica 0 shares the
  module's buffers; the others are discarded). Here the groups are defined on the global batch
  and forwarded one after the other; only group 0 updates the running statistics. Under DDP each
  rank forwards whole groups (G groups over W ranks needs G % W == 0), so one process, 2 ranks or
  4 ranks compute the same step.

Under DDP every rank then gathers the features of all ranks (:func:`global_features`, with
gradient) and computes the loss of the whole global batch, as one process would: memory updates,
MMD, triplet mining and the in-place memory gradient see every sample. The gather's backward sums
the gradient over ranks and DDP divides by W, so the parameters receive the gradient of the one
global loss.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch
from torch import nn

from dmdl_cli.data.index import INFRARED, VISIBLE
from dmdl_cli.errors import DmdlError
from dmdl_cli.runtime import Runtime
from dmdl_cli.training.distributed import gather_rows

__all__ = ["ForwardPlan", "forward_plan", "GroupedForward", "frozen_running_stats",
           "global_features"]


@dataclass(frozen=True)
class ForwardPlan:
    """Who forwards which images of one global batch of ``num_keys`` keys (``2 * num_keys``
    items), and in which BatchNorm groups.

    ``items[r]``: the global item indices rank r forwards, in its forward order; ``groups[r]``:
    the sizes of its consecutive BatchNorm groups; ``stats[r]``: per group, whether it updates
    the running statistics.
    """

    num_keys: int
    items: tuple[np.ndarray, ...]
    groups: tuple[tuple[int, ...], ...]
    stats: tuple[tuple[bool, ...], ...]

    def keys(self, rank: int) -> np.ndarray:
        """``(n_r,)`` key slot of each item rank ``rank`` forwards."""
        return self.items[rank] % self.num_keys

    def views(self, rank: int) -> np.ndarray:
        """``(n_r,)`` view (0 = A, 1 = B) of each item rank ``rank`` forwards."""
        return self.items[rank] // self.num_keys


def _chunks(seq: np.ndarray, slices: int) -> list[np.ndarray]:
    """``torch.chunk`` of ``seq`` into ``slices``: consecutive pieces of ``ceil(n / slices)``
    (fewer pieces when that size covers ``seq`` sooner)."""
    size = -(-len(seq) // slices)
    return [seq[i:i + size] for i in range(0, len(seq), size)]


def forward_plan(modality: np.ndarray, *, mode: str, slices: int, world: int = 1) -> ForwardPlan:
    """The forward plan of a global batch whose keys have ``modality (B,)`` (0 visible,
    1 infrared), for ``train.bn_groups`` ``mode`` over ``world`` processes."""
    modality = np.asarray(modality)
    b = len(modality)
    if mode == "joint":
        keys = [np.arange(b)[r::world] for r in range(world)]
        items = tuple(np.concatenate([k, b + k]) for k in keys)
        return ForwardPlan(b, items, tuple((len(i),) for i in items),
                           tuple((True,) for _ in items))
    if mode != "reference":
        raise ValueError(f"unknown BatchNorm grouping {mode!r}")
    chunks = []
    for m in (VISIBLE, INFRARED):
        keys = np.flatnonzero(modality == m)
        chunks.append(_chunks(np.concatenate([keys, b + keys]), slices))  # [view A; view B]
    if len(chunks[0]) != len(chunks[1]):
        raise ValueError(f"BatchNorm slices need as many visible as infrared keys "
                         f"({int((modality == VISIBLE).sum())} and {int((modality == INFRARED).sum())})")
    groups = [np.concatenate([v, i]) for v, i in zip(*chunks)]  # group g: visible g, infrared g
    if len(groups) % world:
        raise DmdlError(
            f"train.bn_groups=reference cuts each batch into {len(groups)} BatchNorm groups "
            f"(train.bn_slices={slices}), which {world} processes cannot share as whole groups: "
            f"run on a number of processes that divides {len(groups)}, or set train.bn_slices "
            "to a multiple of it")
    per = len(groups) // world
    mine = [groups[r * per:(r + 1) * per] for r in range(world)]
    return ForwardPlan(
        b, tuple(np.concatenate(g) for g in mine), tuple(tuple(len(x) for x in g) for g in mine),
        tuple(tuple(r == 0 and i == 0 for i in range(per)) for r in range(world)))


@contextlib.contextmanager
def frozen_running_stats(model: nn.Module, frozen: bool = True) -> Iterator[None]:
    """While active, BatchNorm layers in training mode normalise with the batch's statistics
    but leave their running statistics (and batch counters) unchanged."""
    layers = [m for m in model.modules()
              if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not frozen:
        yield
        return
    for layer in layers:
        layer.track_running_stats = False  # forward then passes no running buffers to batch_norm
    try:
        yield
    finally:
        for layer in layers:
            layer.track_running_stats = True


class GroupedForward(nn.Module):
    """The network forwarded group by group: each BatchNorm normalises one group at a time.

    ``forward(images (n, 3, H, W), groups, stats)`` -> the network's outputs for all ``n``
    images in input order; ``groups`` are consecutive group sizes summing to n, ``stats`` says
    per group whether BatchNorm running statistics move. One call per step, so DDP wraps it as
    one module.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor, groups: Sequence[int], stats: Sequence[bool]):
        if len(groups) == 1 and stats[0]:
            return self.model(images)
        outputs = []
        for part, keep in zip(images.split(list(groups)), stats):
            with frozen_running_stats(self.model, frozen=not keep):
                outputs.append(self.model(part))
        return tuple(torch.cat(parts) for parts in zip(*outputs))


def global_features(local: torch.Tensor, plan: ForwardPlan, runtime: Runtime) -> torch.Tensor:
    """``local (n_r, D)``, this rank's outputs in its forward order -> ``(2B, D)`` features of
    the whole global batch in item order (view A of every key, then view B), with gradient."""
    if runtime.distributed:
        sizes = tuple(len(i) for i in plan.items)
        rows = gather_rows(local, sizes, runtime)
        order = np.concatenate(plan.items)
    else:
        rows, order = local, plan.items[0]
    if len(order) != 2 * plan.num_keys:
        raise ValueError(f"the plan covers {len(order)} of {2 * plan.num_keys} items")
    if np.array_equal(order, np.arange(len(order))):
        return rows
    inverse = torch.from_numpy(np.argsort(order, kind="stable")).to(rows.device)
    return rows.index_select(0, inverse)
