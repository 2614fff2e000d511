"""``dmdl select``: choose a stage's model by the rule its recipe declared before training.

For each stage asked (``--stage stage1|stage2|both``; default the newest finished stage) it
reads the ``criteria`` records the training logged (``WS/<stage>/log.jsonl``, one per model:
epoch e = the model after e epochs, the final model included) and the rule the run declared
(the ``select:`` section of its recipe, which the log's ``start`` record holds), prints each
model's criteria and the model
the rule chooses among those that exist (kept ``epoch-NNN.pt`` with ``run.keep_epochs``, and
``final.pt``) with its reason, and writes ``WS/<stage>/selected.pt``, a pointer to it
(:mod:`dmdl_cli.selected`). Stage 2's rule may also keep the model stage 2 started from
(``select.between_stages``; :func:`dmdl_cli.selection.rule.choose_between_stages`).

The rule is the one the run declared when it started: recorded in its log's ``start`` record
(the stage's recipe file for a log that does not hold it); ``select`` takes no ``--set``. It
reads the log, the recipe file and the chosen model's bytes (for its sha256): never the index,
the image cache or a test row.
"""
from __future__ import annotations

from pathlib import Path

from rich.markup import escape

from dmdl_cli.atomic import sha256_file
from dmdl_cli.console import console, log
from dmdl_cli.context import StageContext
from dmdl_cli.errors import DmdlError
from dmdl_cli.recipe import SelectRecipe, load_recipe, recipe_from_dict
from dmdl_cli.report.logs import read_jsonl
from dmdl_cli.report.tables import criteria_table
from dmdl_cli.selected import (
    Selection,
    selected_path,
    stage_models,
    start_checkpoint,
    write_selection,
)
from dmdl_cli.selection.rule import Choice, choose_between_stages, choose_epoch, criteria_records
from dmdl_cli.stages import StageSpec, stage_spec
from dmdl_cli.training.logs import LOG_FILE


class _StageView:
    """What :func:`dmdl_cli.report.tables.criteria_table` reads of a stage."""

    def __init__(self, stage: str, criteria: list[dict], models: dict[int, str], selected: int | None):
        self.stage, self.criteria, self.models, self.selected = stage, criteria, models, selected


def select_models(ctx: StageContext, *, stages: tuple[str, ...]) -> list[Path]:
    """Choose and point to the model of each of ``stages`` (in order); returns the pointers."""
    return [select_stage(ctx, stage_spec(name)) for name in stages]


def select_stage(ctx: StageContext, spec: StageSpec) -> Path:
    """Choose the model of training stage ``spec`` and write its ``selected.pt``."""
    ws = ctx.ws
    if not spec.final(ws).is_file():
        if spec.last(ws).is_file():
            raise DmdlError(f"{spec.name} is not finished ({ws.rel(spec.last(ws))} holds a partial "
                            f"run): finish it with `dmdl {spec.command} --workspace {ws.root} "
                            "--resume`, then select")
        raise DmdlError(f"{spec.name} has not been trained in {ws.root}: run `dmdl {spec.command} "
                        f"--workspace {ws.root}` (with --set run.keep_epochs=true to choose among "
                        "its epochs), then select")
    log_path = ws.root / spec.folder / LOG_FILE
    if not log_path.is_file():
        raise DmdlError(f"{ws.rel(log_path)} is missing: select reads the criteria the training "
                        f"logged; train {spec.name} again (`dmdl {spec.command} --force`)")
    logged = read_jsonl(log_path)
    records = criteria_records(logged)
    if not records:
        raise DmdlError(f"{ws.rel(log_path)} holds no criteria records (trained by a dmdl that did "
                        f"not log them): train {spec.name} again (`dmdl {spec.command} --force "
                        "--set run.keep_epochs=true`) to choose among its epochs")
    recipe_file = spec.recipe_file(ws)
    recipe = load_recipe(recipe_file)
    rule, epochs = declared_rule(ws, log_path, logged, recipe.select), spec.section(recipe).epochs
    models = stage_models(ws.root, spec, epochs)  # {epochs trained: file}, final.pt for the last
    kept = [e for e in models if e < epochs]
    between = spec.upstream is not None and rule.between_stages != "stage2"
    if not kept and rule.criterion != "last" and not between:
        raise DmdlError(
            f"{spec.name} kept no epoch models (run.keep_epochs was false), so only its final model "
            f"exists and select.criterion {rule.criterion} has none to choose between: use "
            f"{ws.rel(spec.final(ws))} (the default checkpoint), or train again keeping them: "
            f"`dmdl {spec.command} --workspace {ws.root} --force --set run.keep_epochs=true`")
    candidates = [r for r in records if int(r["epoch"]) in models]
    choice = choose_epoch(candidates, rule, last_epoch=epochs)
    start = None
    if between:  # epoch 0: the model stage 2 started from
        start, _ = start_checkpoint(ws, spec, recipe)
        choice = choose_between_stages(records, choice, rule)
    target = start if choice.epoch == 0 else models[choice.epoch]
    _print(ctx, spec, records, models, choice, recipe_file, rule, start)
    pointer = selected_path(ws, spec)
    sha256 = sha256_file(target)
    ctx.record_input(log_path, recipe_file)
    if ctx.ledger is not None:
        ctx.ledger.add_input(target, sha256)
    write_selection(pointer, Selection(
        spec.name, ws.rel(target), sha256, int(choice.epoch), choice.criterion, choice.value,
        choice.reason, rule=dict(vars(rule)), recipe=ws.rel(recipe_file)))
    ctx.record_output(pointer)
    if ctx.ledger is not None:
        ctx.ledger.set(**{f"{spec.name}_selected": ws.rel(target)})
    log(f"wrote {escape(ws.rel(pointer))} -> {escape(ws.rel(target))}; use it with "
        f"`--checkpoint {escape(ws.rel(pointer))}` (or `--checkpoint selected`: the newest stage's)")
    return pointer


def declared_rule(ws, log_path: Path, logged: list[dict], recorded: SelectRecipe) -> SelectRecipe:
    """The rule the run declared when it started (its log's ``start`` record), else the one of
    its recipe file (``recorded``; a log of a dmdl that did not record it). ``select:`` is in no
    stage's hash, so a ``--resume`` may have rewritten the file with other values: said, not
    used."""
    start = next((r for r in logged if r.get("kind") == "start"), None)
    if start is None or not isinstance(start.get("select"), dict):
        return recorded
    declared = recipe_from_dict({"select": start["select"]}, f"{ws.rel(log_path)} start record",
                                check_schedule=False).select
    if declared != recorded:
        log(f"note: the run declared another select: rule when it started than its recipe.yaml "
            f"now holds (a --resume with other select: values); the declared one applies")
    return declared


def _print(ctx: StageContext, spec: StageSpec, records: list, models: dict, choice: Choice,
           recipe_file: Path, rule: SelectRecipe, start: Path | None) -> None:
    """The table of every model's criteria, the rule, what was not kept, the choice."""
    ws = ctx.ws
    names = {e: path.name for e, path in models.items()}
    if start is not None:
        log(f"epoch 0 is the model {spec.name} started from: {escape(ws.rel(start))}")
    view = _StageView(spec.name, [dict(r) for r in records], names, choice.epoch)
    criterion = None if rule.criterion == "last" else rule.criterion
    table = criteria_table(f"{spec.title}: label-free criteria per model (train images only)",
                           [view], compact=True, criterion=criterion)
    console.print(table.rich())
    between = f", between stages {rule.between_stages}" if spec.upstream is not None else ""
    log(f"rule declared when {spec.name} started ({escape(ws.rel(recipe_file))}): criterion "
        f"{rule.criterion}, warm-up {rule.warmup}, tolerance {rule.tolerance:g}, tie {rule.tie}, "
        f"largest cluster at most {rule.max_largest_share:.0%}{between}")
    not_kept = sorted(int(r["epoch"]) for r in records
                      if int(r["epoch"]) not in models and int(r["epoch"]) > 0)
    if not_kept:
        log(f"{len(not_kept)} model(s) not kept (run.keep_epochs), so not chosen: epochs "
            f"{', '.join(map(str, not_kept))}")
    if start is not None and all(e == max(models) for e in models):
        log(f"{spec.name} kept no epoch models: the choice is between its final model and the "
            "one it started from (select.between_stages)")
    log(f"[bold]selected[/] {spec.name}: {escape(choice.reason)}")


__all__ = ["select_models", "select_stage"]
