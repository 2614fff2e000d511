"""The table of stages: one record per command, and the only place stage names, commands,
workspace folders, label prefixes, stage functions and compatibility sections are written.

Everything that needs a stage's path or name reads it here: the CLI (which function a command
runs; the training commands are made from the training records), the training loop (where
``last.pt`` and ``final.pt`` go), the model loader (the newest result), provenance (which recipe
file an upstream result was made with), the command runner (what to lock, which checkpoint a
command loads) and the report. Adding a stage starts with adding a record below.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from dmdl_cli.recipe import Recipe

if TYPE_CHECKING:  # type hints only: the workspace layer sits beside this one
    from dmdl_cli.workspace import Workspace

LAST, FINAL = "last.pt", "final.pt"
STAGE_RECIPE = "recipe.yaml"  # the resolved recipe a stage's results were made with
LABELS = "labels"  # the folder of every pseudo-label file (the cluster command owns it)
UNTRAINED = "imagenet"  # the --checkpoint value naming the recipe's untrained backbone


@dataclass(frozen=True)
class StageSpec:
    """One stage of the pipeline.

    ``folder``: the workspace folder the stage owns (also the name of its lock). ``function``:
    the stage function as ``module:function``, a function of ``(StageContext, its options)``
    imported when the command runs. ``help``: the command's one line in ``--help``.
    ``sections``: the recipe sections its result depends on (a checkpoint is compatible with a
    recipe when their hash agrees); ``()`` for commands that make no model. ``upstream``: the
    stage whose ``final.pt`` it starts from. ``trains``: it writes ``last.pt``/``final.pt`` and
    can be resumed. ``loads_checkpoint``: it runs the network ``--checkpoint`` names (the newest
    stage result by default; with ``untrained_default`` the untrained backbone when nothing is
    trained yet). ``device`` (derived: it trains or loads a checkpoint): it runs a network, so the
    command runner selects the runtime (device, AMP, DDP rank) and imports torch for it; a stage
    without one (prepare-data, select) runs in one process and never imports torch. ``exclusive``: it rewrites what every other
    stage reads (the data), so it runs alone in the workspace. ``concurrent``: several runs of
    it may share the workspace (each writes files named after the checkpoint it reads,
    atomically: ``evaluate`` of ten epoch models at once), so its lock is held shared.
    """

    name: str
    command: str
    title: str  # for people: "stage 1 (pretrain-single)"
    folder: str
    function: str
    help: str
    labels_prefix: str | None = None
    sections: tuple[str, ...] = ()
    upstream: str | None = None
    trains: bool = False
    loads_checkpoint: bool = False
    untrained_default: bool = False
    exclusive: bool = False
    concurrent: bool = False

    @property
    def device(self) -> bool:
        """It runs a network: it trains, or runs the checkpoint ``--checkpoint`` names."""
        return self.trains or self.loads_checkpoint

    def path(self, ws: "Workspace", name: str) -> Path:
        """``WS/<folder>/<name>``."""
        return ws.root / self.folder / name

    def last(self, ws: "Workspace") -> Path:
        return self.path(ws, LAST)

    def final(self, ws: "Workspace") -> Path:
        return self.path(ws, FINAL)

    def recipe_file(self, ws: "Workspace") -> Path:
        return self.path(ws, STAGE_RECIPE)

    def labels_file(self, ws: "Workspace", epoch: int) -> Path:
        """``WS/labels/<prefix>-eNNN.npz`` of the 0-based ``epoch`` (files count from 1)."""
        return ws.root / LABELS / f"{self.labels_prefix}-e{epoch + 1:03d}.npz"

    def section(self, recipe: Recipe):
        """The training stage's own recipe section (``recipe.stage1``: named like the stage)."""
        return getattr(recipe, self.name)

    def hash(self, recipe: Recipe) -> str:
        """The hash of the recipe sections this stage's result depends on."""
        return recipe.hash(self.sections)


# The recipe sections whose values determine each training stage's result: a checkpoint is
# compatible with a recipe when these hash equal (an overlay that only touches stage 2 keeps
# stage 1 valid). `synthetic` goes with `data`: it changes the images of the synthetic set. No
# hash covers `run` (how a run executes) nor `eval` (how a result is measured).
STAGE1_SECTIONS = ("data", "synthetic", "model", "cluster", "stage1", "train", "augment", "cbt")
STAGE2_SECTIONS = (*STAGE1_SECTIONS, "stage2", "cai", "association")

STAGES: dict[str, StageSpec] = {spec.name: spec for spec in (
    StageSpec("prepare", "prepare-data", "prepare-data", "data", "dmdl_cli.data.prepare:prepare_data",
              "Index a raw data set and build the image cache.", exclusive=True),
    StageSpec("stage1", "pretrain-single", "stage 1 (pretrain-single)", "stage1",
              "dmdl_cli.training.single:pretrain_single",
              "Stage 1: single-modality contrastive learning.",
              labels_prefix="stage1", sections=STAGE1_SECTIONS, trains=True),
    StageSpec("stage2", "train-cross", "stage 2 (train-cross)", "stage2",
              "dmdl_cli.training.cross:train_cross",
              "Stage 2: cross-modality learning with CAI and CBT.",
              labels_prefix="cross", sections=STAGE2_SECTIONS, upstream="stage1", trains=True),
    StageSpec("cluster", "cluster", "cluster", LABELS, "dmdl_cli.clustering.stage:cluster_stage",
              "Pseudo-label train images per modality.", loads_checkpoint=True,
              untrained_default=True, concurrent=True),
    StageSpec("evaluate", "evaluate", "evaluate", "eval", "dmdl_cli.evaluation.evaluate:evaluate",
              "Rank-k, mAP and mINP on cross-modality protocols.", loads_checkpoint=True,
              concurrent=True),
    StageSpec("export", "export", "export", "export", "dmdl_cli.export:export_model",
              "Export to ONNX / TorchScript with a parity check.", loads_checkpoint=True),
    # select writes only the training stages' selected.pt (holding their locks shared: the
    # runner's `reads`); its own folder is never made, its lock is shared (several may run); it
    # reads the logged criteria, no model: no device
    StageSpec("select", "select", "select", "select", "dmdl_cli.selection.command:select_models",
              "Choose a checkpoint by the recipe's label-free rule.",
              concurrent=True),
)}
TRAINING_STAGES: tuple[StageSpec, ...] = tuple(s for s in STAGES.values() if s.trains)
BY_COMMAND: dict[str, StageSpec] = {spec.command: spec for spec in STAGES.values()}


def stage_spec(name: str) -> StageSpec:
    """The record of stage ``name`` (``stage1``) or command (``pretrain-single``)."""
    spec = STAGES.get(name) or BY_COMMAND.get(name)
    if spec is None:
        raise KeyError(f"no stage or command named {name!r}")
    return spec


def stage_hash(recipe: Recipe, name: str) -> str:
    """The hash of the recipe sections stage ``name``'s result depends on."""
    return stage_spec(name).hash(recipe)


def stage_results(ws: "Workspace") -> list[Path]:
    """The model files of the training stages, newest stage first, ``final.pt`` before
    ``last.pt``: the default checkpoint of evaluate, cluster and export is the first that
    exists."""
    return [p for spec in reversed(TRAINING_STAGES) for p in (spec.final(ws), spec.last(ws))]


def default_checkpoint(ws: "Workspace") -> Path | None:
    """The checkpoint evaluate, cluster and export take without ``--checkpoint``: the first of
    :func:`stage_results` that exists (None before any training)."""
    return next((path for path in stage_results(ws) if path.is_file()), None)


def result_stage(ws: "Workspace", path: Path) -> StageSpec | None:
    """The training stage whose folder of ``ws`` holds ``path`` (None for a file elsewhere)."""
    path = Path(path).resolve()
    for spec in TRAINING_STAGES:
        if path.parent == (ws.root / spec.folder).resolve():
            return spec
    return None


def resolve_checkpoint(ws: "Workspace", spec: StageSpec, given: str | None) -> Path | str | None:
    """What ``--checkpoint`` names for stage ``spec``, resolved once (the command runner hands it
    to provenance and to the stage through ``StageContext.checkpoint``): :data:`UNTRAINED`, a
    checkpoint path, or None when nothing is trained yet and the stage has no untrained default
    (loading then says what to run first)."""
    if given == UNTRAINED:
        return UNTRAINED
    if given is not None:
        return Path(given).expanduser()
    found = default_checkpoint(ws)
    return UNTRAINED if found is None and spec.untrained_default else found
