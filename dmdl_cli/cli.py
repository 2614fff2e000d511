"""The ``dmdl`` command line: one thin Typer command per stage.

Each command parses its options and hands the stage function its record in the table of stages
names (``dmdl_cli/stages.py``) to the command runner (``dmdl_cli/runner.py``), which opens the
workspace, resolves the checkpoint and the recipe, takes the stage's lock, records the command
in the ledger and builds the stage's context; no stage logic lives here. The training commands
are made from the table's training stages. A :class:`~dmdl_cli.errors.DmdlError` raised
anywhere is printed as one line and turned into a non-zero exit code.

Keep this module's imports torch-free (and those of ``runner.py`` and ``context.py``): options,
the workspace and the recipe are checked before torch is imported (it takes seconds), so a bad
option, key or value is answered at once, and a stage that runs no network (prepare-data, select:
``StageSpec.device``) never imports it. Stage modules are imported inside each command's body,
after the runner has resolved the recipe. ``tests/test_cli_choices.py`` checks that importing
this module imports no torch, nor does a refused option, key or value, nor a whole prepare-data
or select run.
"""
from __future__ import annotations

import functools
import importlib
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from dmdl_cli import __version__
from dmdl_cli.console import console
from dmdl_cli.errors import DmdlError, NotImplementedStage
from dmdl_cli.datasets import ALL_MODES, DATASET_NAMES, dataset_record
from dmdl_cli.recipe import CLUSTER_MODALITIES, EXPORT_FORMATS, OptionOverride
from dmdl_cli.selected import BOTH, stages_to_select
from dmdl_cli.stages import BY_COMMAND, TRAINING_STAGES, StageSpec, stage_spec

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode=None,
    help="Unsupervised visible-infrared person re-identification with DMDL. "
    "Stages pass checkpoints and pseudo labels through a workspace folder.",
)

REPO_RECIPES = Path(__file__).resolve().parent.parent / "recipes"


def _choice(default, *names: str, values, help: str):
    """A string option limited to ``values``: ``--help`` lists them as ``<a|b|c>``, and a bad
    value is one usage error naming the choices."""
    values = list(dict.fromkeys(values))

    def check(value):
        if value is not None and value not in values:
            raise typer.BadParameter(f"{value!r} is not one of {', '.join(values)}")
        return value

    return typer.Option(default, *names, help=help, callback=check, metavar=f"<{'|'.join(values)}>",
                        show_default=default not in (None, ...))


# Choice lists come from the one declaration of each (datasets.py, recipe.py).
MODES = ["all", *ALL_MODES]

# Shared option declarations -------------------------------------------------------------------
WorkspaceOpt = typer.Option(..., "--workspace", "-w", metavar="DIR", help="Workspace folder.")
RecipeOpt = typer.Option(None, "--recipe", "-r", metavar="FILE",
                         help="Recipe YAML (default: the workspace's recipe.yaml).")
OverlayOpt = typer.Option(None, "--overlay", metavar="FILE",
                          help="Overlay YAML applied on the recipe (repeatable).")
SetOpt = typer.Option(None, "--set", metavar="KEY=VALUE",
                      help="Override a recipe key, e.g. stage1.epochs=1 (repeatable).")
CheckpointOpt = typer.Option(None, "--checkpoint", metavar="PATH|imagenet|selected",
                             help="A checkpoint file, 'imagenet': the untrained network of the "
                             "recipe, or 'selected': the model `dmdl select` chose (default: the "
                             "newest of stage 2, then stage 1).")
ForceOpt = typer.Option(False, "--force", help="Overwrite what this stage wrote before.")
ResumeOpt = typer.Option(False, "--resume", help="Continue a killed or partial run from its last checkpoint.")
DeterministicOpt = typer.Option(False, "--deterministic", help="Bit-reproducible CPU run (slower).")


def command(name: str):
    """Register a command (a stage's help line comes from its record in the table of stages); a
    DmdlError inside it becomes one red line and an exit code."""

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

        spec = BY_COMMAND.get(name)
        return app.command(name, help=spec.help if spec else None)(wrapper)

    return decorate


def _stage_function(command: str):
    """The stage function of ``command`` (its record's ``module:function``), imported lazily so
    ``dmdl --help`` stays fast. A stage whose module is not in this build yet says so in one line
    and exits 2."""
    return _import(*stage_spec(command).function.split(":"))


def _import(module: str, func: str):
    """``module.func``, imported now; a module not in this build yet is one line and exit 2."""
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
    dataset: str = _choice(..., "--dataset", "-d", values=DATASET_NAMES, help="The data set."),
    workspace: Path = WorkspaceOpt,
    root: Optional[Path] = typer.Option(None, "--root", metavar="DIR", help="Raw data set folder (synthetic: where to write it, default WS/synthetic)."),
    trial: Optional[int] = typer.Option(None, "--trial", metavar="N", help="RegDB split trial 1..10 (default 1)."),
    ids: Optional[int] = typer.Option(None, "--ids", metavar="N", help="Synthetic set: number of identities (sets synthetic.ids)."),
    seed: Optional[int] = typer.Option(None, "--seed", metavar="N", help="Synthetic set: generator seed (sets synthetic.seed)."),
    recipe: Optional[Path] = typer.Option(None, "--recipe", "-r", metavar="FILE", help="Recipe YAML (default: the workspace's recipe.yaml when it has one, else the data set's: recipes/<dataset>.yaml, recipes/demo.yaml for synthetic)."),
    overlay: Optional[list[Path]] = OverlayOpt,
    set_: Optional[list[str]] = SetOpt,
    skip_bad_images: bool = typer.Option(False, "--skip-bad-images", help="Exclude unreadable images (recorded in the manifest)."),
    force: bool = ForceOpt,
) -> None:
    # the options set recipe keys (an explicit --set wins); messages name the option typed
    trial_no = 1 if trial is None else trial
    implied = [OptionOverride(f"data.dataset={dataset}", f"--dataset {dataset}"),
               OptionOverride(f"data.trial={trial_no}", "" if trial is None else f"--trial {trial}")]
    implied += [OptionOverride(f"synthetic.{key}={value}", f"--{key} {value}")
                for key, value in (("ids", ids), ("seed", seed)) if value is not None]

    def body(ctx):
        prepared = _stage_function("prepare-data")(ctx, dataset=dataset, root=root, trial=trial_no,
                                                   force=force, skip_bad_images=skip_bad_images)
        _warn_missing_weights(ctx.recipe)
        return prepared

    _run("prepare-data", workspace, recipe, overlay, [*implied, *(set_ or [])],
         default_recipe=REPO_RECIPES / dataset_record(dataset).recipe, force=force, dataset=dataset,
         body=body)
    where = _folder(workspace)
    _results(f"workspace {where} (its recipe: {where / 'recipe.yaml'})")


def _warn_missing_weights(recipe) -> None:
    """prepare-data says at once when the recipe's ImageNet file is not on this machine (stage 1
    would stop on it later)."""
    from dmdl_cli.model.weights import missing_weights_message

    message = missing_weights_message(recipe.model.arch, recipe.model.pretrained)
    if message:
        console.print(f"[yellow]warning:[/] stage 1 will stop on this until it is fixed: "
                      f"{escape(message)}", soft_wrap=True)


@command("cluster")
def cluster(
    workspace: Path = WorkspaceOpt,
    checkpoint: Optional[str] = typer.Option(None, "--checkpoint", metavar="PATH|imagenet|selected", help="A checkpoint file, 'imagenet': the untrained network of the recipe, or 'selected': the model `dmdl select` chose (default: the newest of stage 2, then stage 1, else imagenet)."),
    modality: str = _choice("both", "--modality", values=CLUSTER_MODALITIES, help="Which modality to cluster."),
    recipe: Optional[Path] = RecipeOpt,
    overlay: Optional[list[Path]] = OverlayOpt,
    set_: Optional[list[str]] = SetOpt,
    eps_sweep: Optional[str] = typer.Option(None, "--eps-sweep", metavar="START:STOP:STEP", help="Instead of labelling: DBSCAN at every eps of the grid (e.g. 0.4:0.7:0.05), each eps's robustness and the eps a label-free rule picks (docs/selection.md)."),
) -> None:
    _run("cluster", workspace, recipe, overlay, set_, checkpoint=checkpoint, modality=modality,
         eps_sweep=eps_sweep,
         body=lambda ctx: _stage_function("cluster")(ctx, modality=modality, eps_sweep=eps_sweep))
    _results(f"{_output_folder(workspace, 'cluster')} (pseudo labels and the recipe beside them)")


def _training_command(spec: StageSpec) -> None:
    """Register the command of training stage ``spec``: its record names the command, its help
    line and its stage function; the options are the same for every training stage."""

    def train(
        workspace: Path = WorkspaceOpt,
        recipe: Optional[Path] = RecipeOpt,
        overlay: Optional[list[Path]] = OverlayOpt,
        set_: Optional[list[str]] = SetOpt,
        resume: bool = ResumeOpt,
        force: bool = ForceOpt,
        deterministic: bool = DeterministicOpt,
    ) -> None:
        final = _run(spec.command, workspace, recipe, overlay, set_, resume=resume,
                     deterministic=deterministic, force=force,
                     body=lambda ctx: _stage_function(spec.command)(
                         ctx, resume=resume, force=force, deterministic=deterministic,
                         hooks=_training_hooks()))
        _results(f"{Path(final).parent} (final.pt, recipe.yaml, log.jsonl)")

    train.__name__ = train.__qualname__ = spec.command.replace("-", "_")
    command(spec.command)(train)


for _spec in TRAINING_STAGES:
    _training_command(_spec)


@command("evaluate")
def evaluate(
    workspace: Path = WorkspaceOpt,
    mode: str = _choice("all", "--mode", values=MODES, help="Protocol (all: every protocol of the data set)."),
    checkpoint: Optional[str] = CheckpointOpt,
    trials: Optional[int] = typer.Option(None, "--trials", metavar="N", help="Gallery sampling trials (default: recipe eval.trials)."),
    shots: Optional[int] = typer.Option(None, "--shots", metavar="1|10", help="1 (single-shot) or 10 (multi-shot; default: recipe eval.shots)."),
    rerank: bool = typer.Option(False, "--rerank", help="k-reciprocal re-ranking."),
    visualize: int = typer.Option(0, "--visualize", metavar="K", help="Draw the ranked lists of K queries spread over the first trial."),
    visualize_worst: int = typer.Option(0, "--visualize-worst", metavar="K", help="Draw the ranked lists of the K queries with the lowest AP."),
    recipe: Optional[Path] = RecipeOpt,
    overlay: Optional[list[Path]] = OverlayOpt,
    set_: Optional[list[str]] = SetOpt,
) -> None:
    _run("evaluate", workspace, recipe, overlay, set_, checkpoint=checkpoint, mode=mode,
         rerank=rerank,
         body=lambda ctx: _stage_function("evaluate")(
             ctx, mode=mode, trials=trials, shots=shots, rerank=rerank, visualize=visualize,
             visualize_worst=visualize_worst))
    pictures = "; ranked lists in ranks/" if visualize or visualize_worst else ""
    _results(f"{_output_folder(workspace, 'evaluate')} (one JSON per protocol{pictures})")


@command("export")
def export(
    workspace: Path = WorkspaceOpt,
    checkpoint: Optional[str] = CheckpointOpt,
    fmt: str = _choice("both", "--format", values=EXPORT_FORMATS, help="What to export."),
    opset: int = typer.Option(17, "--opset", metavar="N", help="ONNX opset."),
    dynamic_batch: bool = typer.Option(False, "--dynamic-batch", help="Export with a dynamic batch dimension (fixed export: batch 1)."),
    recipe: Optional[Path] = RecipeOpt,
    overlay: Optional[list[Path]] = OverlayOpt,
    set_: Optional[list[str]] = SetOpt,
) -> None:
    _run("export", workspace, recipe, overlay, set_, checkpoint=checkpoint, format=fmt,
         opset=opset, dynamic_batch=dynamic_batch,
         body=lambda ctx: _stage_function("export")(ctx, fmt=fmt, opset=opset,
                                                    dynamic_batch=dynamic_batch))
    _results(f"{_output_folder(workspace, 'export')}")


@command("select")
def select(
    workspace: Path = WorkspaceOpt,
    stage: Optional[str] = _choice(None, "--stage", values=[*(s.name for s in TRAINING_STAGES), BOTH], help="The stage whose model to choose (default: the newest finished stage); both: every stage, in order."),
) -> None:
    """Choose a stage's model by the label-free rule its recipe declared before training.

    Prints each model's criteria (from the training log) and the one the rule (select: of the
    stage's recipe.yaml) chooses among the kept epochs (run.keep_epochs) and the final model,
    and writes WS/<stage>/selected.pt, which --checkpoint selected follows. Reads no test image.
    """
    stages = stages_to_select(_folder(workspace), stage)
    pointers = _run("select", workspace, None, None, None, reads=stages, stages=list(stages),
                    body=lambda ctx: _stage_function("select")(ctx, stages=stages))
    _results(", ".join(str(p) for p in pointers) + " (pointers to the selected models)")


def _folder(workspace: Path) -> Path:
    """The workspace folder as the runner opened it (absolute, for the results line)."""
    return Path(workspace).expanduser().resolve()


def _output_folder(workspace: Path, command: str) -> Path:
    """The folder of the workspace that ``command``'s stage writes into."""
    return _folder(workspace) / stage_spec(command).folder


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
    # described in the docstring: Typer would print the Python type beside an argument's help
    workspaces: list[Path] = typer.Argument(..., metavar="WS", hidden=True),
    out: Optional[Path] = typer.Option(None, "--out", "-o", metavar="DIR", help="Folder for tables and figures (default: WS/report; several: report/ in their common folder)."),
) -> None:
    """Per-epoch tables, training and CMC figures; with several workspaces, a comparison.

    WS: one or more workspaces (seeds, ablation variants, RegDB trials).
    """
    _import("dmdl_cli.report.build", "report")(workspaces, out)


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
