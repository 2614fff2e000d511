"""The ``dmdl`` command line: one thin Typer command per stage.

Each command parses its options and hands the stage function to the command runner
(``dmdl_cli/runner.py``), which opens the workspace, resolves the recipe, takes the stage's lock,
records the command in the ledger and builds the stage's context; no stage logic lives here. A :class:`~dmdl_cli.errors.DmdlError` raised anywhere is
printed as one line and turned into a non-zero exit code.
"""
from __future__ import annotations

import enum
import functools
import importlib
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from dmdl_cli import __version__
from dmdl_cli.console import console
from dmdl_cli.errors import DmdlError, NotImplementedStage
from dmdl_cli.evaluation.protocols import PROTOCOLS
from dmdl_cli.recipe import CLUSTER_MODALITIES, DATASETS, EXPORT_FORMATS

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode=None,
    help="Unsupervised visible-infrared person re-identification with DMDL. "
    "Stages pass checkpoints and pseudo labels through a workspace folder.",
)

REPO_RECIPES = Path(__file__).resolve().parent.parent / "recipes"
DEFAULT_RECIPE = {"synthetic": "demo.yaml", "sysu": "sysu.yaml", "regdb": "regdb.yaml", "llcm": "llcm.yaml"}


def _choices(name: str, values) -> type[enum.Enum]:
    """A Typer choice type over ``values`` (``--help`` lists them; a bad value is a usage error)."""
    return enum.Enum(name, [(v, v) for v in dict.fromkeys(values)], type=str)


# Choice types, built from the one declaration of each list (recipe.py, protocols.py).
Dataset = _choices("Dataset", DATASETS)
Mode = _choices("Mode", ["all", *(m for modes in PROTOCOLS.values() for m in modes)])
ExportFormat = _choices("ExportFormat", EXPORT_FORMATS)
Modality = _choices("Modality", CLUSTER_MODALITIES)

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
    dataset: Dataset = typer.Option(..., "--dataset", "-d", help="The data set."),
    workspace: Path = WorkspaceOpt,
    root: Optional[Path] = typer.Option(None, "--root", help="Raw data set folder (synthetic: where to write it, default WS/synthetic)."),
    trial: int = typer.Option(1, "--trial", help="RegDB split trial 1..10."),
    ids: Optional[int] = typer.Option(None, "--ids", help="Synthetic set: number of identities (sets synthetic.ids)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Synthetic set: generator seed (sets synthetic.seed)."),
    recipe: Optional[Path] = RecipeOpt,
    overlay: Optional[list[Path]] = OverlayOpt,
    set_: Optional[list[str]] = SetOpt,
    skip_bad_images: bool = typer.Option(False, "--skip-bad-images", help="Exclude unreadable images (recorded in the manifest)."),
    force: bool = ForceOpt,
) -> None:
    """Index a raw data set and build the image cache."""
    dataset = dataset.value
    prepare = _stage("dmdl_cli.data.prepare", "prepare_data")
    # --ids / --seed are short for --set synthetic.ids= / synthetic.seed= (an explicit --set wins)
    shorthands = [f"synthetic.{key}={value}" for key, value in (("ids", ids), ("seed", seed))
                  if value is not None]
    _run("prepare-data", workspace, recipe, overlay,
         [f"data.dataset={dataset}", f"data.trial={trial}", *shorthands, *(set_ or [])],
         default_recipe=REPO_RECIPES / DEFAULT_RECIPE[dataset], force=force, dataset=dataset,
         body=lambda ctx: prepare(ctx.ws, ctx.recipe, ctx.run, dataset=dataset, root=root,
                                  trial=trial, force=force, skip_bad_images=skip_bad_images))
    where = _folder(workspace)
    _results(f"workspace {where} (its recipe: {where / 'recipe.yaml'})")


@command("cluster")
def cluster(
    workspace: Path = WorkspaceOpt,
    checkpoint: Optional[str] = typer.Option(None, "--checkpoint", help="Checkpoint path, or 'imagenet' (default: newest of stage 2, stage 1, else imagenet)."),
    modality: Modality = typer.Option("both", "--modality", help="Which modality to cluster."),
    recipe: Optional[Path] = RecipeOpt,
    overlay: Optional[list[Path]] = OverlayOpt,
    set_: Optional[list[str]] = SetOpt,
    eps_sweep: Optional[str] = typer.Option(None, "--eps-sweep", metavar="START:STOP:STEP", help="Instead of labelling: DBSCAN at every eps of the grid (e.g. 0.4:0.7:0.05), each eps's robustness and the eps a label-free rule picks (docs/selection.md)."),
) -> None:
    """Pseudo-label train images per modality."""
    stage = _stage("dmdl_cli.clustering.stage", "cluster_stage")
    _run("cluster", workspace, recipe, overlay, set_, checkpoint=checkpoint, modality=modality.value,
         eps_sweep=eps_sweep,
         body=lambda ctx: stage(ctx, checkpoint=checkpoint, modality=modality.value, eps_sweep=eps_sweep))
    _results(f"{_folder(workspace) / 'labels'} (pseudo labels and the recipe beside them)")


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
    stage = _stage("dmdl_cli.training.single", "pretrain_single")
    final = _run("pretrain-single", workspace, recipe, overlay, set_, resume=resume,
                 deterministic=deterministic, force=force,
                 body=lambda ctx: stage(ctx, resume=resume, force=force, deterministic=deterministic,
                                        hooks=_training_hooks()))
    _results(f"{Path(final).parent} (final.pt, recipe.yaml, log.jsonl)")


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
    stage = _stage("dmdl_cli.training.cross", "train_cross")
    final = _run("train-cross", workspace, recipe, overlay, set_, resume=resume,
                 deterministic=deterministic, force=force,
                 body=lambda ctx: stage(ctx, resume=resume, force=force, deterministic=deterministic,
                                        hooks=_training_hooks()))
    _results(f"{Path(final).parent} (final.pt, recipe.yaml, log.jsonl)")


@command("evaluate")
def evaluate(
    workspace: Path = WorkspaceOpt,
    mode: Mode = typer.Option("all", "--mode", help="Protocol (all: every protocol of the data set)."),
    checkpoint: Optional[str] = typer.Option(None, "--checkpoint", help="Checkpoint path or 'imagenet' (default: newest of stage 2, then stage 1)."),
    trials: Optional[int] = typer.Option(None, "--trials", help="Gallery sampling trials (default: recipe eval.trials)."),
    shots: Optional[int] = typer.Option(None, "--shots", help="1 (single-shot) or 10 (multi-shot)."),
    rerank: bool = typer.Option(False, "--rerank", help="k-reciprocal re-ranking."),
    visualize: int = typer.Option(0, "--visualize", help="Draw the ranked lists of K queries spread over the first trial."),
    visualize_worst: int = typer.Option(0, "--visualize-worst", help="Draw the ranked lists of the K queries with the lowest AP."),
    recipe: Optional[Path] = RecipeOpt,
    overlay: Optional[list[Path]] = OverlayOpt,
    set_: Optional[list[str]] = SetOpt,
) -> None:
    """Rank-k, mAP and mINP on cross-modality protocols."""
    stage = _stage("dmdl_cli.evaluation.evaluate", "evaluate")
    _run("evaluate", workspace, recipe, overlay, set_, checkpoint=checkpoint, mode=mode.value,
         rerank=rerank,
         body=lambda ctx: stage(ctx, mode=mode.value, checkpoint=checkpoint, trials=trials,
                                shots=shots, rerank=rerank, visualize=visualize,
                                visualize_worst=visualize_worst))
    pictures = "; ranked lists in ranks/" if visualize or visualize_worst else ""
    _results(f"{_folder(workspace) / 'eval'} (one JSON per protocol{pictures})")


@command("export")
def export(
    workspace: Path = WorkspaceOpt,
    checkpoint: Optional[str] = typer.Option(None, "--checkpoint", help="Checkpoint path or 'imagenet' (default: newest of stage 2, then stage 1)."),
    fmt: ExportFormat = typer.Option("both", "--format", help="What to export."),
    opset: int = typer.Option(17, "--opset", help="ONNX opset."),
    dynamic_batch: bool = typer.Option(False, "--dynamic-batch", help="Export with a dynamic batch dimension (fixed export: batch 1)."),
    recipe: Optional[Path] = RecipeOpt,
    overlay: Optional[list[Path]] = OverlayOpt,
    set_: Optional[list[str]] = SetOpt,
) -> None:
    """Export to ONNX / TorchScript with a parity check."""
    stage = _stage("dmdl_cli.export", "export_model")
    _run("export", workspace, recipe, overlay, set_, checkpoint=checkpoint, format=fmt.value,
         opset=opset, dynamic_batch=dynamic_batch,
         body=lambda ctx: stage(ctx, checkpoint=checkpoint, fmt=fmt.value, opset=opset,
                                dynamic_batch=dynamic_batch))
    _results(f"{_folder(workspace) / 'export'}")


def _folder(workspace: Path) -> Path:
    """The workspace folder as the runner opened it (absolute, for the results line)."""
    return Path(workspace).expanduser().resolve()


def _training_hooks() -> list:
    """Hooks the training stages run besides their standard ones: test-set monitoring
    (``run.eval_every``; an evaluation concern, so it comes from the layer above training)."""
    from dmdl_cli.evaluation.monitor import MonitorHook

    return [MonitorHook()]


def _results(where: str) -> None:
    """The closing line of a command: where its results are."""
    console.print(f"[bold green]results:[/] {escape(where)}", soft_wrap=True)


@command("report")
def report(
    workspaces: list[Path] = typer.Argument(..., help="One or more workspaces (seeds, ablation variants, RegDB trials)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Folder for tables and figures (default: WS/report; several: report/ in their common folder)."),
) -> None:
    """Per-epoch tables, training and CMC figures; with several workspaces, a comparison."""
    _stage("dmdl_cli.report.build", "report")(workspaces, out)


def _run(command: str, workspace: Path, recipe: Optional[Path], overlay, set_, **options):
    """Run a stage command through the command runner (dmdl_cli/runner.py): ``recipe``,
    ``overlay`` and ``set_`` as parsed, everything else passed on."""
    from dmdl_cli.runner import run_command

    return run_command(command, workspace, recipe=recipe, overlays=overlay or (),
                       overrides=set_ or (), **options)


def main() -> None:
    """Console-script entry point (``dmdl`` and ``python -m dmdl_cli``)."""
    app(prog_name="dmdl")


if __name__ == "__main__":  # pragma: no cover
    main()
