"""The command runner: what every stage command does before and after its stage function.

:func:`run_command` opens the workspace (prepare-data creates it), finishes or undoes what a
killed ``prepare-data --force`` left (``data/swap.py``), resolves the checkpoint a command loads
(:func:`dmdl_cli.stages.resolve_checkpoint`; a pointer of ``dmdl select`` is followed to the
model it names, :mod:`dmdl_cli.selected`) and the recipe (:mod:`dmdl_cli.provenance`: inherited
keys, and a refusal naming every key that differs from what an upstream result was made with),
selects the runtime of a stage that runs a network (``StageSpec.device``), takes the locks of
the command's stage (:meth:`Workspace.locked`), opens its ledger entry, builds the
:class:`StageContext` once and calls the stage function with it. Under ``torchrun`` only rank 0
locks and writes the ledger, so the runtime (which knows the rank) is selected first. ``dmdl
report`` only reads and does not come through here.

Torch is imported only once the workspace and the recipe have been checked, and only for a stage
that runs a network: the modules imported at the top of this file (and of ``cli.py``) must not
import torch, so that a bad option, key or value is answered in a fraction of a second
(``tests/test_cli_choices.py`` checks it). The runtime (:mod:`dmdl_cli.runtime`, which needs
torch) is imported and selected inside :func:`run_command` for a stage whose record says it
runs a network (``StageSpec.device``: it trains or loads a checkpoint); the others
(prepare-data, select) run with ``ctx.runtime = None`` and import no torch at all.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence, TypeVar

from rich.markup import escape

from dmdl_cli.console import log
from dmdl_cli.context import StageContext
from dmdl_cli.data.swap import settle_interrupted_swap
from dmdl_cli.errors import DmdlError
from dmdl_cli.provenance import resolve_recipe
from dmdl_cli.recipe import Recipe, schedule_warning
from dmdl_cli.selected import follow_checkpoint
from dmdl_cli.stages import StageSpec, resolve_checkpoint, stage_spec
from dmdl_cli.workspace import LOCK_FILE, Workspace

if TYPE_CHECKING:  # imports torch: loaded in run_command, for a stage with a device
    from dmdl_cli.runtime import Runtime

Result = TypeVar("Result")


def run_command(
    command: str,
    workspace: str | Path,
    *,
    body: Callable[[StageContext], Result],
    recipe: str | Path | None = None,
    overlays: Sequence[str | Path] = (),
    overrides: Sequence[str] = (),
    default_recipe: str | Path | None = None,
    force: bool = False,
    resume: bool = False,
    checkpoint: str | None = None,
    deterministic: bool = False,
    reads: Sequence[str] = (),
    **ledger_info: Any,
) -> Result:
    """Run ``body`` (a stage function of a :class:`StageContext`) as command ``command``.

    ``recipe``, ``overlays``, ``overrides``, ``resume``: what the recipe is resolved from
    (``default_recipe`` and ``force``: prepare-data's base recipe). ``checkpoint``: the
    ``--checkpoint`` of a stage that loads one, resolved here once (``selected`` and pointer
    files are followed: ``dmdl_cli/selected.py``). ``reads``: training stages whose results the
    command reads and points into (``select``): their locks are held shared while it runs.
    ``ledger_info``: extra fields of the ledger entry's ``info``.
    """
    spec = stage_spec(command)
    if resume and force:
        raise DmdlError(f"--resume and --force ask for opposite things: pass --resume to continue "
                        f"the partial run, or --force to start {spec.title} again")
    ws = Workspace.create(workspace) if spec.exclusive else Workspace.open(workspace)
    settle_interrupted_swap(ws, command)  # a killed prepare-data --force: finished or undone
    if not spec.exclusive:
        ws.require_dataset()
    chosen = None
    if spec.loads_checkpoint:
        followed = follow_checkpoint(ws, checkpoint)  # --checkpoint selected, or a pointer file
        if followed is None:
            chosen = resolve_checkpoint(ws, spec, checkpoint)
        else:
            chosen, pointer, selection = followed
            log(f"--checkpoint {escape(str(checkpoint))}: {escape(ws.rel(pointer))} names "
                f"{escape(selection.checkpoint)} ({escape(selection.reason)})")
            ledger_info = {**ledger_info, "selected": ws.rel(pointer)}
    recipe_obj, origin = resolve_recipe(
        ws, command, str(recipe) if recipe else None, [str(o) for o in overlays], list(overrides),
        resume=resume, checkpoint=chosen, force=force,
        default=str(default_recipe) if default_recipe else None)
    runtime = _runtime(spec, recipe_obj, deterministic)
    is_main = runtime is None or runtime.is_main  # a stage without a device runs in one process
    if is_main:
        _warn_schedule(spec, recipe_obj)
    with contextlib.ExitStack() as stack:
        if spec.exclusive:
            stack.enter_context(_undone_if_refused(ws))
        ledger = None
        if is_main:
            stack.enter_context(ws.locked(spec, reads=reads))
            ledger = stack.enter_context(ws.stage_run(
                command, recipe_obj, origin=origin, **_info(spec, ledger_info, resume)))
        ctx = StageContext(ws, recipe_obj, spec, runtime, ledger, checkpoint=chosen)
        try:
            return body(ctx)
        finally:
            ctx.record_reads()  # what the command read of the image cache, in its entry


def _runtime(spec: StageSpec, recipe: Recipe, deterministic: bool) -> Runtime | None:
    """The device, AMP and DDP rank of a stage that runs a network (``spec.device``); None for
    one that does not, which then never imports torch."""
    if not spec.device:
        return None
    from dmdl_cli.runtime import select_runtime  # torch: only now that the recipe is valid

    return select_runtime(recipe, deterministic=deterministic)


def _warn_schedule(spec: StageSpec, recipe: Recipe) -> None:
    """One line naming the epoch thresholds the schedule never reaches: every stage's at
    prepare-data (where the workspace's recipe is set), the stage's own in a training command."""
    if spec.exclusive or spec.trains:
        warning = schedule_warning(recipe, None if spec.exclusive else [spec.name])
        if warning:
            log(f"[yellow]warning:[/] {escape(warning)}")


def _info(spec: StageSpec, info: dict[str, Any], resume: bool) -> dict[str, Any]:
    """The ledger entry's ``info``: the command's own fields; whether a training stage resumes.
    (The checkpoint a command loads is named by :meth:`StageContext.model`.)"""
    return {**info, "resume": resume} if spec.trains else dict(info)


@contextlib.contextmanager
def _undone_if_refused(ws: Workspace) -> Iterator[None]:
    """A command that fails in a workspace it would create leaves the file system as it was:
    the folders it made and the lock file go when nothing else was written."""
    created = _missing_folders(ws.root)
    lock = ws.root / LOCK_FILE
    lock_existed = lock.exists()
    try:
        yield
    except BaseException:
        with contextlib.suppress(OSError):
            held = lock.is_file() and lock.read_text().strip()  # a pid: another process holds it
            if not ws.manifest_path.exists() and not held \
                    and all(p.name == LOCK_FILE for p in ws.root.iterdir()):
                if not lock_existed:
                    lock.unlink(missing_ok=True)
                for folder in created:
                    folder.rmdir()
        raise


def _missing_folders(path: Path) -> list[Path]:
    """``path`` and its ancestors that do not exist yet, innermost first."""
    out = []
    while not path.exists() and path.parent != path:
        out.append(path)
        path = path.parent
    return out
