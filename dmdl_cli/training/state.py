"""The types the training loop, its hooks and the two stages share.

- :class:`StageLogic`: what a stage supplies (its starting network, its pseudo labels and
  memories at the start of an epoch, the loss of one batch);
- :class:`EpochState`: what a stage derives at the start of an epoch (labels, confidences,
  memories, the epoch's batches), typed per stage by a subclass, saved in ``last.pt``;
- :class:`TrainState`: one object for everything a run works with, which the loop moves
  forward step by step and hooks and stages read (model, optimiser, schedule, position).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from dmdl_cli.clustering.criteria import EpochLabels
from dmdl_cli.context import StageContext
from dmdl_cli.features.extract import extract_features
from dmdl_cli.recipe import Recipe, StageRecipe
from dmdl_cli.runtime import Runtime
from dmdl_cli.stages import StageSpec
from dmdl_cli.training.commit import RunFiles
from dmdl_cli.training.forward import GroupedForward
from dmdl_cli.training.memory import ClusterMemory

Record = dict[str, Any]  # one line of the stage's log.jsonl


@dataclass
class EpochState:
    """What a stage derives at the start of an epoch; :meth:`saved` is what ``last.pt`` keeps
    (the batches and device tensors are rebuilt from it by ``StageLogic.restore_epoch``)."""

    epoch: int
    labels: np.ndarray  # (N_all,) int64 per index row, -1 = outlier or test row
    conf: np.ndarray  # (N_all,) float32 confidence of each label (1 without refinement)
    memories: dict[Any, ClusterMemory]  # per modality (and stage 2's fused one)
    batches: list = field(default_factory=list)  # [[(train position, aug seed), ...], ...]
    labels_t: torch.Tensor | None = None  # (N_all,) labels on the device (after restore)
    conf_t: torch.Tensor | None = None  # (N_all,) confidences on the device (after restore)

    def saved(self) -> dict[str, Any]:
        """The checkpoint form: arrays, numbers and memory rows (the keys of ``last.pt``)."""
        return {"epoch": self.epoch, "labels": self.labels, "conf": self.conf,
                "memories": {key: mem.features.clone() for key, mem in self.memories.items()}}


class StageLogic:
    """The stage-specific part of training; the loop (``training/loop.py``) does the rest."""

    spec: StageSpec  # the stage's record in dmdl_cli/stages.py

    def initial_model(self, ctx: StageContext, *, resuming: bool) -> tuple[torch.nn.Module, str]:
        """The network the stage starts from and one line saying where it came from (when
        ``resuming`` its weights are replaced by those of ``last.pt``)."""
        raise NotImplementedError  # pragma: no cover

    def upstream_files(self, ctx: StageContext) -> list:
        """The files of another stage the stage starts from (for the ledger): none by default."""
        return []

    def prepare_epoch(self, t: "TrainState") -> EpochState:
        """Pseudo labels and memories of epoch ``t.epoch`` (runs on the main rank only)."""
        raise NotImplementedError  # pragma: no cover

    def restore_epoch(self, t: "TrainState", saved: dict[str, Any]) -> EpochState:
        """The epoch state from its checkpoint form: memories on the device, the epoch's
        batches regenerated (the same on every rank)."""
        raise NotImplementedError  # pragma: no cover

    def batch_loss(self, t: "TrainState", batch: dict[str, torch.Tensor]
                   ) -> tuple[torch.Tensor, dict[str, float], Callable[[], None]]:
        """(loss, named parts for the log, a no-grad memory update to run after the step)."""
        raise NotImplementedError  # pragma: no cover

    def final_labelling(self, t: "TrainState", feats: np.ndarray) -> EpochLabels:
        """The labelling the stage would make of the final model's train features ``feats``
        (N, D) at the epoch after its last, for the final model's criteria record (nothing is
        trained on it)."""
        raise NotImplementedError  # pragma: no cover

    def saved_labelling(self, t: "TrainState", saved: dict[str, Any]) -> EpochLabels | None:
        """The labels of a saved epoch state (``EpochState.saved()``, from ``last.pt`` on
        resume) as the next epoch's criteria compare them; None when it does not hold them."""
        raise NotImplementedError  # pragma: no cover


def _no_log(record: Record) -> None:
    return None


@dataclass(eq=False)
class TrainState:
    """A training run: what it trains, where it is, and the epoch's labels and memories.

    ``model`` is the network itself (saved, used for features); ``ddp_model`` is what a step
    calls: ``model`` forwarded in its BatchNorm groups (``training/forward.py``:
    ``GroupedForward``), wrapped in DistributedDataParallel under ``torchrun``.
    ``epoch`` is 0-based; ``step`` counts the steps done in it (``stage.iters`` at its end).
    """

    ctx: StageContext
    logic: StageLogic
    model: torch.nn.Module
    ddp_model: torch.nn.Module | None = None
    optimizer: torch.optim.Optimizer | None = None
    scheduler: Any = None  # torch.optim.lr_scheduler.LambdaLR
    scaler: Any = None  # torch.amp.GradScaler
    dataset: Any = None  # dmdl_cli.data.train_dataset.ViewDataset
    log: Callable[[Record], None] = _no_log  # the stage's log (JsonLog, maybe with TensorBoard)
    epoch: int = 0
    step: int = 0
    epoch_state: EpochState | None = None  # None until the epoch is labelled
    resumed_at: tuple[int, int] | None = None  # (epoch, step) of the last.pt resumed from
    origin: str = ""  # where the starting weights came from (the log's start record)
    files: RunFiles = field(default_factory=lambda: RunFiles(committed=True))  # until the commit
    loss: float = math.nan  # the last step's loss, mean over ranks
    # (epoch, labels) of the last labelling, which the next epoch's criteria compare with
    # (stability); restored from last.pt on resume; main rank only
    labelled: tuple[int, EpochLabels | None] | None = None
    parts: dict[str, float] = field(default_factory=dict)  # its named parts, mean over ranks

    def __post_init__(self) -> None:
        if self.ddp_model is None:
            self.ddp_model = GroupedForward(self.model)

    @property
    def recipe(self) -> Recipe:
        return self.ctx.recipe

    @property
    def runtime(self) -> Runtime:
        return self.ctx.runtime

    @property
    def spec(self) -> StageSpec:
        return self.logic.spec

    @property
    def stage(self) -> StageRecipe:
        """The recipe section of this stage (``recipe.stage1`` or ``recipe.stage2``)."""
        return self.logic.spec.section(self.ctx.recipe)

    @functools.cached_property
    def modality(self) -> np.ndarray:
        """(N,) int8 modality of each train row (0 visible, 1 infrared)."""
        return self.ctx.index.modality[self.ctx.train_rows].astype(np.int8)

    @functools.cached_property
    def true_ids(self) -> np.ndarray | None:
        """(N,) true identities of the train rows: DIAGNOSTICS ONLY, never used to train."""
        pids = self.ctx.index.pids[self.ctx.train_rows]
        return pids if bool((pids >= 0).any()) else None

    @functools.cached_property
    def train_position(self) -> np.ndarray:
        """(N_all,) position of each index row among the train rows (-1 for test rows)."""
        pos = np.full(len(self.ctx.index), -1, dtype=np.int64)
        pos[self.ctx.train_rows] = np.arange(len(self.ctx.train_rows))
        return pos

    def train_features(self) -> np.ndarray:
        """(N, D) L2-normalised features of every train image (flip-averaged when the recipe
        says so)."""
        return extract_features(self.model, self.ctx.cache, self.ctx.train_rows, self.runtime,
                                batch_size=self.recipe.run.feature_batch,
                                flip=self.recipe.cluster.flip_average, description="train features")
