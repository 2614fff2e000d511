"""``WS/<stage>/selected.pt``: the model ``dmdl select`` chose for a stage, as a small pointer.

The file is a JSON pointer, not a copy of the model: it names the checkpoint it chose (relative
to the workspace, e.g. ``stage1/epoch-003.pt``) with that file's sha256, the epoch, the rule's
criterion, its value and the reason (docs/selection.md). Whatever follows it loads the named
file itself, so an evaluation of ``--checkpoint selected`` is filed under the name of the model
it evaluated (``all-search-stage1-epoch-003.json``), and no second copy of a model takes disk.
A pointer whose model has changed since (the stage was trained again) is refused in one line
naming the command that chooses again; a new training run of a stage removes its pointer when it
commits (``training/hooks.py``).

Followed by ``--checkpoint selected`` of evaluate, cluster and export (the newest stage's
pointer, stage 2 before stage 1), by a ``--checkpoint`` path to a pointer, and by ``train-cross``
with ``stage2.start_from: selected`` (stage 1's pointer). Torch-free: the command runner follows
a pointer before the recipe is resolved.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dmdl_cli.atomic import atomic_write_json, sha256_file
from dmdl_cli.errors import DmdlError
from dmdl_cli.recipe import Recipe
from dmdl_cli.stages import FINAL, TRAINING_STAGES, StageSpec, stage_spec

if TYPE_CHECKING:  # type hints only
    from dmdl_cli.workspace import Workspace

SELECTED = "selected.pt"  # the pointer's name in a training stage's folder
SELECTED_CHECKPOINT = "selected"  # the --checkpoint value that follows the newest pointer
FORMAT = "dmdl-selected-1"  # the pointer's "format" field
BOTH = "both"  # dmdl select --stage both: every training stage, in order


@dataclass(frozen=True)
class Selection:
    """What a pointer holds: the chosen model and why."""

    stage: str  # the stage it was chosen for (its folder holds the pointer)
    checkpoint: str  # the chosen model file, relative to the workspace root
    sha256: str  # of that file when it was chosen
    epoch: int  # epochs that model had trained in `stage` (0: the model the stage started from)
    criterion: str  # the rule's criterion (or "last")
    value: float | None  # its value at that epoch (None for "last")
    reason: str  # the rule's one-line reason
    rule: dict[str, Any] = field(default_factory=dict)  # the select: section it followed
    recipe: str = ""  # the recipe file the rule was read from, relative to the workspace root

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, **asdict(self)}


def selected_path(ws: "Workspace", spec: StageSpec) -> Path:
    """``WS/<stage folder>/selected.pt``."""
    return spec.path(ws, SELECTED)


def write_selection(path: Path, selection: Selection) -> None:
    """Write a pointer atomically (a reader sees the previous one or this one)."""
    atomic_write_json(path, selection.to_dict())


def is_pointer(path: Path) -> bool:
    """Whether ``path`` is a pointer file (JSON) rather than a checkpoint (a zip archive)."""
    try:
        with open(path, "rb") as handle:
            return handle.read(64).lstrip()[:1] == b"{"
    except OSError:
        return False


def read_selection(path: Path) -> Selection:
    """The pointer in ``path``; one error line when it is not one."""
    again = "choose again with `dmdl select`"
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DmdlError(f"{path} does not exist: {again}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DmdlError(f"{path} is not a pointer written by `dmdl select` ({type(err).__name__}): "
                        f"{again}") from None
    names = [f for f in Selection.__dataclass_fields__]
    if not isinstance(data, dict) or data.get("format") != FORMAT or \
            not all(k in data for k in names if k not in ("rule", "recipe")):
        raise DmdlError(f"{path} is not a pointer written by `dmdl select` (format {FORMAT}): "
                        f"{again}")
    try:
        return Selection(**{k: data[k] for k in names if k in data})
    except TypeError as err:
        raise DmdlError(f"{path} is damaged ({err}): {again}") from None


def follow(ws: "Workspace", pointer: Path) -> tuple[Path, Selection]:
    """The model file a pointer names, checked to be the file that was chosen (its sha256);
    refused in one line when it is missing or changed."""
    selection = read_selection(pointer)
    target = (ws.root / selection.checkpoint).resolve()
    again = (f"choose again with `dmdl select --workspace {ws.root} --stage {selection.stage}`")
    if not target.is_file():
        raise DmdlError(f"{ws.rel(pointer)} names {selection.checkpoint}, which no longer exists: "
                        f"{again}")
    if sha256_file(target) != selection.sha256:
        raise DmdlError(f"{ws.rel(pointer)} names {selection.checkpoint}, which has changed since "
                        f"`dmdl select` chose it (the stage was trained again): {again}")
    return target, selection


def newest_pointer(ws: "Workspace") -> Path | None:
    """The pointer ``--checkpoint selected`` follows: stage 2's, else stage 1's (None: none)."""
    return next((p for p in (selected_path(ws, s) for s in reversed(TRAINING_STAGES)) if p.is_file()),
                None)


def follow_checkpoint(ws: "Workspace", given: str | None) -> tuple[Path, Path, Selection] | None:
    """``(model file, pointer, selection)`` when a ``--checkpoint`` value names a pointer
    (``selected``, or the path of a pointer file); None for anything else."""
    if given is None:
        return None
    if given == SELECTED_CHECKPOINT:
        pointer = newest_pointer(ws)
        if pointer is None:
            raise DmdlError(f"--checkpoint selected: no model was selected in {ws.root}: run "
                            f"`dmdl select --workspace {ws.root}` first (it needs "
                            "run.keep_epochs: true in training; docs/selection.md)")
    else:
        pointer = Path(given).expanduser()
        if not (pointer.is_file() and is_pointer(pointer)):
            return None
    target, selection = follow(ws, pointer)
    return target, pointer, selection


def epoch_file(epoch: int) -> str:
    """``epoch-NNN.pt``: a kept model after NNN epochs of its stage (``run.keep_epochs``)."""
    return f"epoch-{epoch:03d}.pt"


def stage_models(root: Path, spec: StageSpec, epochs: int) -> dict[int, Path]:
    """``{epochs trained: model file}`` of a finished training stage of ``epochs`` epochs in the
    workspace folder ``root``: the kept ``epoch-NNN.pt`` before the last epoch, and ``final.pt``
    for the last (the model the final criteria record describes; ``epoch-NNN.pt`` of the last
    epoch holds the same weights but for BatchNorm re-estimation, ``train.bn_recalibration``)."""
    folder = Path(root) / spec.folder
    out = {e: folder / epoch_file(e) for e in range(1, epochs) if (folder / epoch_file(e)).is_file()}
    if (folder / FINAL).is_file():
        out[epochs] = folder / FINAL
    return out


def stages_to_select(root: Path, asked: str | None) -> tuple[str, ...]:
    """The training stages ``dmdl select --stage asked`` chooses for, in order: ``both``: every
    one; a stage name: that one; None: the newest stage with a ``final.pt`` (stage 1 when none
    has one: the command then says what to run first)."""
    names = tuple(spec.name for spec in TRAINING_STAGES)
    if asked == BOTH:
        return names
    if asked is not None:
        return (stage_spec(asked).name,)
    finished = [s.name for s in TRAINING_STAGES if (Path(root) / s.folder / FINAL).is_file()]
    return (finished[-1] if finished else names[0],)


def start_checkpoint(ws: "Workspace", spec: StageSpec, recipe: Recipe) -> tuple[Path, Path | None]:
    """The model a stage with an upstream stage starts from, and the pointer followed to it:
    the upstream ``final.pt`` (pointer None), or with ``start_from: selected`` the model the
    upstream stage's pointer names (refused in one line naming ``dmdl select`` without one)."""
    upstream = stage_spec(spec.upstream)
    if getattr(spec.section(recipe), "start_from", "final") != "selected":
        return upstream.final(ws), None
    pointer = selected_path(ws, upstream)
    if not pointer.is_file():
        raise DmdlError(f"{spec.name}.start_from is selected but {ws.rel(pointer)} is missing: run "
                        f"`dmdl select --workspace {ws.root} --stage {upstream.name}` first, or "
                        f"--set {spec.name}.start_from=final")
    target, _ = follow(ws, pointer)
    return target, pointer


__all__ = ["BOTH", "FORMAT", "SELECTED", "SELECTED_CHECKPOINT", "Selection", "epoch_file", "follow",
           "follow_checkpoint", "is_pointer", "newest_pointer", "read_selection", "selected_path",
           "stage_models", "stages_to_select", "start_checkpoint", "write_selection"]
