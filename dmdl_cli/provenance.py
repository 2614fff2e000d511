"""Which recipe a command runs with, and the recipe each result was made with.

Every stage writes its resolved recipe next to its outputs (``WS/stage1/recipe.yaml``,
``WS/stage2/recipe.yaml``, ``WS/labels/cluster-<checkpoint>.recipe.yaml``; an evaluation keeps
it inside its JSON), and the manifest ledger records the ``--recipe``, ``--overlay`` and
``--set`` a run was given. A command's recipe is resolved in four layers, later wins:

1. the base: ``--recipe FILE``, else the workspace's ``WS/recipe.yaml`` (from prepare-data);
2. without ``--recipe``: the keys an upstream result was made with, read from its recipe file
   (:func:`upstreams`): ``train-cross`` takes the stage-1 sections (its ``sections`` in ``dmdl_cli/stages.py``)
   from ``stage1/recipe.yaml``; ``--resume`` of a partial run takes the stage's own sections
   from its own ``recipe.yaml``; ``evaluate``, ``cluster`` and ``export`` take ``data.height``,
   ``data.width`` and ``model`` from the ``recipe.yaml`` beside the checkpoint they load;
3. ``--overlay`` files, in the order given;
4. ``--set`` overrides, in the order given.

So ``pretrain-single --set stage1.epochs=1`` then a plain ``train-cross`` continues from that
stage-1 model. Only an explicit ``--recipe``, ``--overlay`` or ``--set`` can then make an
upstream key differ from what the result was made with: that is a real conflict, refused with
the differing keys as ``stage1.epochs: 1 -> 50`` (made with -> asked for). The ``run:`` section
(workers, checkpoint interval, feature batch, ...) is in no stage's sections: it is never
inherited nor compared, so each command takes it from its own recipe and may change it freely.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

from dmdl_cli.atomic import atomic_write_text
from dmdl_cli.errors import DmdlError
from dmdl_cli.recipe import Recipe, load_recipe
from dmdl_cli.stages import STAGE_RECIPE, StageSpec, stage_spec

# What a checkpoint fixes for the commands that only run it (evaluate, cluster, export).
CHECKPOINT_KEYS = ("data.height", "data.width", "model")


@dataclass(frozen=True)
class Upstream:
    """A result the command builds on and the recipe file it was made with."""

    result: str  # for messages: "stage1/final.pt"
    recipe_file: Path
    keys: tuple[str, ...]  # sections ("model") or single keys ("data.height") it fixes
    remedy: str  # how to make the result again with other values


def write_recipe(path: Path, recipe: Recipe) -> Path:
    """Write ``recipe`` (complete, resolved) atomically to ``path``."""
    atomic_write_text(path, recipe.to_yaml())
    return path


def sidecar_recipe_path(output: Path) -> Path:
    """``labels/cluster-x.npz`` -> ``labels/cluster-x.recipe.yaml``."""
    return output.with_name(output.stem + ".recipe.yaml")


def _stage_upstream(ws, spec: StageSpec, result: Path) -> Upstream:
    return Upstream(ws.rel(result), spec.recipe_file(ws), spec.sections,
                    f"re-run `dmdl {spec.command} --force` with them")


def upstreams(ws, command: str, *, resume: bool = False, checkpoint: Path | str | None = None
              ) -> list[Upstream]:
    """The results ``command`` builds on whose recipe file exists, upstream first.
    ``checkpoint``: what the command loads, as resolved by ``stages.resolve_checkpoint``."""
    found: list[Upstream] = []
    spec = stage_spec(command)
    if spec.upstream is not None:
        up = stage_spec(spec.upstream)
        found.append(_stage_upstream(ws, up, up.final(ws)))
    if spec.trains and resume and spec.last(ws).is_file():
        found.append(_stage_upstream(ws, spec, spec.last(ws)))
    if spec.loads_checkpoint and isinstance(checkpoint, Path) and checkpoint.is_file():
        path = checkpoint.resolve()
        found.append(Upstream(ws.rel(path), path.parent / STAGE_RECIPE, CHECKPOINT_KEYS,
                              "evaluate a checkpoint made with them"))
    return [up for up in found if up.recipe_file.is_file()]


def _leaves(tree: Mapping[str, Any], keys: Iterable[str]) -> dict[str, Any]:
    """{"section.key": value} of the named sections and single keys of a full recipe tree."""
    out: dict[str, Any] = {}
    for key in keys:
        section, _, name = key.partition(".")
        values = tree.get(section) or {}
        if not name:
            out.update({f"{section}.{k}": v for k, v in values.items()})
        elif name in values:
            out[key] = values[name]
    return out


def _subtree(tree: Mapping[str, Any], keys: Iterable[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for dotted, value in _leaves(tree, keys).items():
        section, name = dotted.split(".", 1)
        out.setdefault(section, {})[name] = value
    return out


def _show(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


_ABSENT = "(absent)"  # a key one recipe has and the other not (one written by an older dmdl)


def differences(made: Mapping[str, Any], asked: Mapping[str, Any], keys: Iterable[str]) -> list[str]:
    """``key: made -> asked`` for every leaf under ``keys`` whose value differs."""
    keys = list(keys)
    a, b = _leaves(made, keys), _leaves(asked, keys)
    return [f"{k}: {_show(a.get(k, _ABSENT))} -> {_show(b.get(k, _ABSENT))}"
            for k in dict.fromkeys([*a, *b]) if a.get(k, _ABSENT) != b.get(k, _ABSENT)]


def _refuse_differences(result: str, diff: list[str], remedy: str) -> None:
    """The one refusal of a result made with other values than a command asks for."""
    if diff:
        raise DmdlError(
            f"{result} was made with other values than this command asks for (made with -> "
            f"asked for): {'; '.join(diff)}. Drop the --recipe/--overlay/--set that change them "
            f"to build on it, or {remedy}")


def check_made_with(ws, spec: StageSpec, path: Path, meta: Mapping[str, Any], recipe: Recipe,
                    remedy: str) -> None:
    """Refuse a checkpoint of training stage ``spec`` (its ``meta``) made with other values of
    the stage's recipe sections than ``recipe`` (their hash differs), naming the keys from the
    recipe the checkpoint carries. The one check of a checkpoint's recipe: stage 2's start,
    ``--resume``; the results a command builds on are compared by :func:`resolve_recipe`."""
    if meta.get("stage_hash") == spec.hash(recipe):
        return
    made = meta.get("recipe")
    diff = differences(made, recipe.to_dict(), spec.sections) if isinstance(made, Mapping) else []
    _refuse_differences(ws.rel(path), diff or [f"recipe hash {meta.get('recipe_hash')} -> "
                                                 f"{recipe.hash()}"], remedy)


def _origin(base: str, overlays: list[str], overrides: list[str], inherited: list) -> dict[str, Any]:
    """How a recipe was resolved, for the ledger entry of the command."""
    return {"recipe": str(Path(base).resolve()), "overlays": [str(Path(o).resolve()) for o in overlays],
            "overrides": list(overrides), "inherited": inherited}


def _prepare_recipe(ws, recipe_path: str | None, overlays: list[str], overrides: list[str], *,
                    default: str | None, force: bool) -> tuple[Recipe, dict[str, Any]]:
    """prepare-data's recipe: ``--recipe``, else the workspace's own (a re-run keeps what it was
    prepared with; not with ``--force``), else the data set's default recipe; nothing inherited."""
    if recipe_path is None and ws.recipe_path.is_file() and not force:
        base = str(ws.recipe_path)
    else:
        base = recipe_path or default
        if base is None or not Path(base).is_file():
            raise DmdlError(f"no recipe given and the default {base} is missing: pass --recipe FILE")
    recipe = load_recipe(base, overlays=overlays, overrides=overrides)
    return recipe, _origin(base, overlays, overrides, [])


def resolve_recipe(ws, command: str, recipe_path: str | None, overlays: list[str],
                   overrides: list[str], *, resume: bool = False,
                   checkpoint: Path | str | None = None, default: str | None = None,
                   force: bool = False) -> tuple[Recipe, dict[str, Any]]:
    """The recipe ``command`` runs with in workspace ``ws`` (module docstring), and how it was
    resolved (its origin, for the ledger). ``checkpoint``: what the command loads (resolved by
    ``stages.resolve_checkpoint``). ``default``, ``force``: prepare-data's base recipe
    (:func:`_prepare_recipe`); every other command runs in a prepared workspace."""
    if stage_spec(command).exclusive:
        return _prepare_recipe(ws, recipe_path, overlays, overrides, default=default, force=force)
    base = recipe_path or str(ws.recipe_path)
    if recipe_path is None and not ws.recipe_path.is_file():
        raise DmdlError(f"{ws.recipe_path} is missing: pass --recipe FILE or run `dmdl prepare-data`")
    ups = upstreams(ws, command, resume=resume, checkpoint=checkpoint)
    made = {up: load_recipe(up.recipe_file).to_dict() for up in ups}
    inherited = [] if recipe_path else [(ws.rel(up.recipe_file), _subtree(made[up], up.keys))
                                        for up in ups]
    recipe = load_recipe(base, overlays=overlays, overrides=overrides, inherited=inherited)
    dataset = ws.dataset["name"]
    if recipe.data.dataset != dataset:
        raise DmdlError(
            f"the recipe is for data set '{recipe.data.dataset}' but workspace {ws.root} holds "
            f"'{dataset}': use the workspace's recipe or a {dataset} recipe")
    asked = recipe.to_dict()
    for up in ups:
        _refuse_differences(up.result, differences(made[up], asked, up.keys), up.remedy)
    return recipe, _origin(base, overlays, overrides,
                           [{"from": source, "keys": list(up.keys)}
                            for (source, _), up in zip(inherited, ups)])
