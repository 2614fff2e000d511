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
from dmdl_cli.stages import STAGE_RECIPE, StageSpec, default_checkpoint, stage

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


def _checkpoint_path(ws, checkpoint: str | None) -> Path | None:
    if checkpoint == "imagenet":
        return None
    if checkpoint is None:  # the default checkpoint: the newest stage result
        return default_checkpoint(ws)
    return Path(checkpoint).expanduser().resolve()


def upstreams(ws, command: str, *, resume: bool = False, checkpoint: str | None = None
              ) -> list[Upstream]:
    """The results ``command`` builds on whose recipe file exists, upstream first."""
    found: list[Upstream] = []
    spec = stage(command)
    if spec.upstream is not None:
        up = stage(spec.upstream)
        found.append(_stage_upstream(ws, up, up.final(ws)))
    if spec.trains and resume and spec.last(ws).is_file():
        found.append(_stage_upstream(ws, spec, spec.last(ws)))
    if command in ("evaluate", "cluster", "export"):
        path = _checkpoint_path(ws, checkpoint)
        if path is not None and path.is_file():
            found.append(Upstream(ws.rel(path), path.parent / STAGE_RECIPE, CHECKPOINT_KEYS,
                                  "evaluate a checkpoint made with them"))
    return [up for up in found if up.recipe_file.is_file()]


def _leaves(tree: Mapping[str, Any], keys: Iterable[str]) -> dict[str, Any]:
    """{"section.key": value} of the named sections and single keys of a full recipe tree."""
    out: dict[str, Any] = {}
    for key in keys:
        section, _, name = key.partition(".")
        if name:
            out[key] = tree[section][name]
        else:
            out.update({f"{section}.{k}": v for k, v in tree[section].items()})
    return out


def _subtree(tree: Mapping[str, Any], keys: Iterable[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for dotted, value in _leaves(tree, keys).items():
        section, name = dotted.split(".", 1)
        out.setdefault(section, {})[name] = value
    return out


def _show(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def differences(made: Mapping[str, Any], asked: Mapping[str, Any], keys: Iterable[str]) -> list[str]:
    """``key: made -> asked`` for every leaf under ``keys`` whose value differs."""
    a, b = _leaves(made, keys), _leaves(asked, keys)
    return [f"{k}: {_show(a[k])} -> {_show(b[k])}" for k in a if a[k] != b[k]]


def _origin(base: str, overlays: list[str], overrides: list[str], inherited: list) -> dict[str, Any]:
    """How a recipe was resolved, for the ledger entry of the command."""
    return {"recipe": str(Path(base).resolve()), "overlays": [str(Path(o).resolve()) for o in overlays],
            "overrides": list(overrides), "inherited": inherited}


def _prepare_recipe(ws, recipe_path: str | None, overlays: list[str], overrides: list[str], *,
                    default: str | None, force: bool) -> Recipe:
    """prepare-data's recipe: ``--recipe``, else the workspace's own (a re-run keeps what it was
    prepared with; not with ``--force``), else the data set's default recipe; nothing inherited."""
    if recipe_path is None and ws.recipe_path.is_file() and not force:
        base = str(ws.recipe_path)
    else:
        base = recipe_path or default
        if base is None or not Path(base).is_file():
            raise DmdlError(f"no recipe given and the default {base} is missing: pass --recipe FILE")
    recipe = load_recipe(base, overlays=overlays, overrides=overrides)
    ws.recipe_origin = _origin(base, overlays, overrides, [])
    return recipe


def resolve_recipe(ws, command: str, recipe_path: str | None, overlays: list[str],
                   overrides: list[str], *, resume: bool = False, checkpoint: str | None = None,
                   default: str | None = None, force: bool = False) -> Recipe:
    """The recipe ``command`` runs with in workspace ``ws`` (module docstring); records its
    origin on ``ws`` for the ledger. ``default``, ``force``: prepare-data's base recipe
    (:func:`_prepare_recipe`); every other command runs in a prepared workspace."""
    if stage(command).exclusive:
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
        diff = differences(made[up], asked, up.keys)
        if diff:
            raise DmdlError(
                f"{up.result} was made with other values than this command asks for "
                f"(made with -> asked for): {'; '.join(diff)}. Drop the --recipe/--overlay/--set "
                f"that change them to build on it, or {up.remedy}")
    ws.recipe_origin = _origin(base, overlays, overrides,
                               [{"from": source, "keys": list(up.keys)}
                                for (source, _), up in zip(inherited, ups)])
    return recipe
