"""The ``dmdl`` command line: one thin Typer command per stage.

Each command parses its options, opens the workspace, resolves the recipe and calls the stage
function; no training logic lives here. A :class:`~dmdl_cli.errors.DmdlError` raised anywhere is
printed as one line and turned into a non-zero exit code.
"""
from __future__ import annotations

import functools
import importlib
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from dmdl_cli import __version__
from dmdl_cli.console import console
from dmdl_cli.errors import DmdlError, NotImplementedStage

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode=None,
    help="Unsupervised visible-infrared person re-identification with DMDL. "
    "Stages pass checkpoints and pseudo labels through a workspace folder.",
)

REPO_RECIPES = Path(__file__).resolve().parent.parent / "recipes"
DEFAULT_RECIPE = {"synthetic": "demo.yaml", "sysu": "sysu.yaml", "regdb": "regdb.yaml", "llcm": "llcm.yaml"}

# Shared option declarations -------------------------------------------------------------------
WorkspaceOpt = typer.Option(..., "--workspace", "-w", help="Workspace folder.")
RecipeOpt = typer.Option(None, "--recipe", "-r", help="Recipe YAML (default: the workspace's).")
OverlayOpt = typer.Option(None, "--overlay", help="Overlay YAML applied on the recipe (repeatable).")
SetOpt = typer.Option(None, "--set", help="Override a recipe key: section.key=value (repeatable).")
ForceOpt = typer.Option(False, "--force", help="Overwrite what this stage wrote before.")
ResumeOpt = typer.Option(False, "--resume", help="Continue a killed or partial run from its last checkpoint.")
DeterministicOpt = typer.Option(False, "--deterministic", help="Bit-reproducible CPU run (slower).")


def command(name: str):
    """Register a stage command; a DmdlError inside it becomes one red line and an exit code."""

    def decorate(func):
        @functools.wraps(func)
        def wrapper(*args, **kwargs):
            try:
                return func(*args, **kwargs)
            except DmdlError as err:
                # the message is plain text: paths like "SYSU [copy]" are not markup
                console.print(f"[bold red]error:[/] {escape(str(err))}", soft_wrap=True)
                raise typer.Exit(err.exit_code) from None
            except KeyboardInterrupt:
                console.print("[yellow]interrupted[/]")
                raise typer.Exit(130) from None
            except OSError as err:  # disk full, I/O error outside an atomic write: one line
                where = f" {err.filename}" if err.filename else ""
                console.print(f"[bold red]error:[/] {escape(f'I/O error{where}: {err.strerror or err}')}",
                              soft_wrap=True)
                raise typer.Exit(1) from None

        return app.command(name)(wrapper)

    return decorate


def _stage(module: str, func: str):
    """Import a stage function lazily so ``dmdl --help`` stays fast.

    A stage whose module is not in this build yet says so in one line and exits 2.
    """
    try:
        return getattr(importlib.import_module(module), func)
    except ModuleNotFoundError as err:
        if err.name != module:
            raise
        raise NotImplementedStage(f"{module} is not built yet: this stage's issue is still open") from None


def _version(value: bool) -> None:
    if value:
        console.print(f"dmdl {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    """dmdl: DMDL for unsupervised visible-infrared person re-identification."""


@command("prepare-data")
def prepare_data(
    dataset: str = typer.Option(..., "--dataset", "-d", help="sysu, regdb, llcm or synthetic."),
    workspace: Path = WorkspaceOpt,
    root: Optional[Path] = typer.Option(None, "--root", help="Raw data set folder (synthetic: where to write it, default WS/synthetic)."),
    trial: int = typer.Option(1, "--trial", help="RegDB split trial 1..10."),
    ids: Optional[int] = typer.Option(None, "--ids", help="Synthetic set: number of identities."),
    seed: int = typer.Option(0, "--seed", help="Synthetic set: generator seed."),
    recipe: Optional[Path] = RecipeOpt,
    overlay: Optional[list[Path]] = OverlayOpt,
    set_: Optional[list[str]] = SetOpt,
    skip_bad_images: bool = typer.Option(False, "--skip-bad-images", help="Exclude unreadable images (recorded in the manifest)."),
    force: bool = ForceOpt,
) -> None:
    """Index a raw data set and build the image cache."""
    from dmdl_cli.recipe import DATASETS, load_recipe
    from dmdl_cli.workspace import Workspace

    if dataset not in DATASETS:
        raise DmdlError(f"unknown data set '{dataset}': choose one of {', '.join(DATASETS)}")
    ws = Workspace.create(workspace)
    overrides = [f"data.dataset={dataset}", f"data.trial={trial}", *(set_ or [])]
    if recipe is None and ws.recipe_path.is_file() and not force:
        recipe_obj = ws.resolve_recipe(None, [str(o) for o in overlay or []], overrides)
    else:
        base = recipe or REPO_RECIPES / DEFAULT_RECIPE[dataset]
        if not Path(base).is_file():
            raise DmdlError(f"no recipe given and the default {base} is missing: pass --recipe FILE")
        recipe_obj = load_recipe(base, overlays=[str(o) for o in overlay or []], overrides=overrides)
    run = _stage("dmdl_cli.data.prepare", "prepare_data")
    run(ws, recipe_obj, dataset=dataset, root=root, trial=trial, ids=ids, seed=seed,
        force=force, skip_bad_images=skip_bad_images)


@command("cluster")
def cluster(
    workspace: Path = WorkspaceOpt,
    checkpoint: Optional[str] = typer.Option(None, "--checkpoint", help="Checkpoint path, or 'imagenet' (default: newest of stage 2, stage 1, else imagenet)."),
    modality: str = typer.Option("both", "--modality", help="visible, infrared or both."),
    recipe: Optional[Path] = RecipeOpt,
    overlay: Optional[list[Path]] = OverlayOpt,
    set_: Optional[list[str]] = SetOpt,
) -> None:
    """Pseudo-label train images per modality."""
    ws, recipe_obj = _open(workspace, recipe, overlay, set_)
    _stage("dmdl_cli.clustering.stage", "cluster_stage")(ws, recipe_obj, checkpoint=checkpoint, modality=modality)


@command("pretrain-single")
def pretrain_single(
    workspace: Path = WorkspaceOpt,
    recipe: Optional[Path] = RecipeOpt,
    overlay: Optional[list[Path]] = OverlayOpt,
    set_: Optional[list[str]] = SetOpt,
    resume: bool = ResumeOpt,
    force: bool = ForceOpt,
    deterministic: bool = DeterministicOpt,
) -> None:
    """Stage 1: single-modality contrastive learning."""
    ws, recipe_obj = _open(workspace, recipe, overlay, set_)
    _stage("dmdl_cli.training.single", "pretrain_single")(
        ws, recipe_obj, resume=resume, force=force, deterministic=deterministic)


@command("train-cross")
def train_cross(
    workspace: Path = WorkspaceOpt,
    recipe: Optional[Path] = RecipeOpt,
    overlay: Optional[list[Path]] = OverlayOpt,
    set_: Optional[list[str]] = SetOpt,
    resume: bool = ResumeOpt,
    force: bool = ForceOpt,
    deterministic: bool = DeterministicOpt,
) -> None:
    """Stage 2: cross-modality learning with CAI and CBT."""
    ws, recipe_obj = _open(workspace, recipe, overlay, set_)
    _stage("dmdl_cli.training.cross", "train_cross")(
        ws, recipe_obj, resume=resume, force=force, deterministic=deterministic)


@command("evaluate")
def evaluate(
    workspace: Path = WorkspaceOpt,
    mode: str = typer.Option("all", "--mode", help="all-search, indoor-search, visible-to-infrared, infrared-to-visible, or all."),
    checkpoint: Optional[str] = typer.Option(None, "--checkpoint", help="Checkpoint path or 'imagenet' (default: newest of stage 2, then stage 1)."),
    trials: Optional[int] = typer.Option(None, "--trials", help="Gallery sampling trials (default: recipe eval.trials)."),
    shots: Optional[int] = typer.Option(None, "--shots", help="1 (single-shot) or 10 (multi-shot)."),
    rerank: bool = typer.Option(False, "--rerank", help="k-reciprocal re-ranking."),
    visualize: int = typer.Option(0, "--visualize", help="Write ranked-list pictures for K queries."),
    recipe: Optional[Path] = RecipeOpt,
    overlay: Optional[list[Path]] = OverlayOpt,
    set_: Optional[list[str]] = SetOpt,
) -> None:
    """Rank-k, mAP and mINP on cross-modality protocols."""
    ws, recipe_obj = _open(workspace, recipe, overlay, set_)
    _stage("dmdl_cli.evaluation.evaluate", "evaluate")(
        ws, recipe_obj, mode=mode, checkpoint=checkpoint, trials=trials, shots=shots,
        rerank=rerank, visualize=visualize)


@command("export")
def export(
    workspace: Path = WorkspaceOpt,
    checkpoint: Optional[str] = typer.Option(None, "--checkpoint", help="Checkpoint path or 'imagenet' (default: newest of stage 2, then stage 1)."),
    fmt: str = typer.Option("both", "--format", help="onnx, torchscript or both."),
    opset: int = typer.Option(17, "--opset", help="ONNX opset."),
    dynamic_batch: bool = typer.Option(False, "--dynamic-batch", help="Export with a dynamic batch dimension (fixed export: batch 1)."),
    recipe: Optional[Path] = RecipeOpt,
    set_: Optional[list[str]] = SetOpt,
) -> None:
    """Export to ONNX / TorchScript with a parity check."""
    ws, recipe_obj = _open(workspace, recipe, None, set_)
    _stage("dmdl_cli.export", "export_model")(
        ws, recipe_obj, checkpoint=checkpoint, fmt=fmt, opset=opset, dynamic_batch=dynamic_batch)


def _open(workspace: Path, recipe: Optional[Path], overlay, set_):
    from dmdl_cli.workspace import Workspace

    ws = Workspace.open(workspace)
    ws.require_dataset()
    recipe_obj = ws.resolve_recipe(
        str(recipe) if recipe else None, [str(o) for o in overlay or []], list(set_ or []))
    dataset = ws.dataset["name"]
    if recipe_obj.data.dataset != dataset:
        raise DmdlError(
            f"the recipe is for data set '{recipe_obj.data.dataset}' but workspace {ws.root} holds "
            f"'{dataset}': use the workspace's recipe or a {dataset} recipe"
        )
    return ws, recipe_obj


def main() -> None:
    """Console-script entry point (``dmdl`` and ``python -m dmdl_cli``)."""
    app(prog_name="dmdl")


if __name__ == "__main__":  # pragma: no cover
    main()
