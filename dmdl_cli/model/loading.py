"""Turning checkpoints into networks: :func:`load_model` is the only loader (evaluate, cluster,
export, ``dmdl_cli.embed`` and stage 2's start all use it), and :func:`resolve_model` builds the
network of the ``--checkpoint`` of evaluate, cluster and export.

A checkpoint carries the resolved recipe it was trained with (``meta["recipe"]``): its network
is built from that model section (arch, gem_p, last_stride) and input size, never from the
recipe of the command that loads it, which must agree (``check=True``).

``--checkpoint`` is resolved once by the command runner (``dmdl_cli.stages.resolve_checkpoint``:
without one, the newest stage result, stage 2 before stage 1, final before last): ``imagenet``
builds the untrained backbone of the recipe (ImageNet weights when the recipe asks for them,
otherwise a seeded random initialisation, labelled so); anything else is a path. A checkpoint
of another backbone is refused naming both.
"""
from __future__ import annotations

import hashlib
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from dmdl_cli.console import log
from dmdl_cli.errors import DmdlError
from dmdl_cli.model.backbone import ReIDNet, build_model
from dmdl_cli.recipe import Recipe, recipe_from_dict
from dmdl_cli.stages import UNTRAINED, result_stage
from dmdl_cli.workspace import Workspace, load_checkpoint, read_checkpoint_bytes



@dataclass
class LoadedModel:
    model: ReIDNet
    name: str  # short name used in output file names: stage2-final, imagenet, random-init, ...
    sha256: str  # of the checkpoint file (or of the initial weights)
    description: str  # one line for logs and tables
    meta: dict[str, Any]
    path: Path | None = None  # the checkpoint file (None for an untrained network)


def build_from_recipe(recipe: Recipe, *, pretrained: bool = True) -> ReIDNet:
    """The recipe's network; ``pretrained=False`` skips the ImageNet weights (a checkpoint follows)."""
    return build_model(
        recipe.model.arch,
        pretrained=recipe.model.pretrained if pretrained else None,
        gem_p=recipe.model.gem_p,
        last_stride=recipe.model.last_stride,
    )


def initial_model(recipe: Recipe) -> ReIDNet:
    """The untrained network, seeded by ``train.seed`` so that a random init is reproducible."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.train.seed)
        return build_from_recipe(recipe)


def state_sha256(model: torch.nn.Module) -> str:
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return hashlib.sha256(buffer.getvalue()).hexdigest()


def checkpoint_name(ws: Workspace, path: Path) -> str:
    spec = result_stage(ws, path)
    return f"{spec.folder}-{Path(path).stem}" if spec is not None else Path(path).stem


@dataclass(frozen=True)
class NetworkSpec:
    """What builds a checkpoint's network: its model section and the input size it was trained at."""

    arch: str
    gem_p: float
    last_stride: int
    input_size: tuple[int, int]  # (height, width)
    resize: str = "bilinear"  # the filter its training images were resized with (data.resize)


def checkpoint_spec(meta: Mapping[str, Any], path: Path | str, recipe: Recipe | None) -> NetworkSpec:
    """The network a checkpoint holds, read from the resolved recipe it carries
    (``meta["recipe"]``). A checkpoint of an older dmdl carries only ``arch`` and
    ``input_size``: the rest comes from ``recipe`` (the defaults without one), with a note."""
    saved = meta.get("recipe")
    if isinstance(saved, Mapping) and isinstance(saved.get("model"), Mapping) \
            and isinstance(saved.get("data"), Mapping):
        # checked as a recipe file is: a missing or mistyped key is one line naming it
        model, data = saved["model"], saved["data"]
        fields = {"model": {k: model.get(k) for k in ("arch", "gem_p", "last_stride")},
                  "data": {k: data.get(k) for k in ("height", "width")}}
        if "resize" in data:  # a checkpoint of an older dmdl: bilinear, the filter it knew
            fields["data"]["resize"] = data["resize"]
        network = recipe_from_dict(fields, f"checkpoint {path} meta.recipe", check_schedule=False)
        return NetworkSpec(network.model.arch, network.model.gem_p, network.model.last_stride,
                           (network.data.height, network.data.width), network.data.resize)
    arch = meta.get("arch") or (recipe.model.arch if recipe is not None else None)
    size = meta.get("input_size") or (
        [recipe.data.height, recipe.data.width] if recipe is not None else None)
    if arch is None or not size:
        raise DmdlError(f"checkpoint {path} does not say its backbone and input size "
                        "(meta.arch, meta.input_size): pass the recipe it was trained with")
    fallback = recipe if recipe is not None else Recipe()
    where = "the recipe" if recipe is not None else "the recipe defaults"
    log(f"note: checkpoint {path} does not carry its recipe (an older dmdl): gem_p "
        f"{fallback.model.gem_p}, last_stride {fallback.model.last_stride} and the resize filter "
        f"{fallback.data.resize} come from {where}")
    return NetworkSpec(str(arch), float(fallback.model.gem_p), int(fallback.model.last_stride),
                       (int(size[0]), int(size[1])), fallback.data.resize)


def check_compatible(spec: NetworkSpec, recipe: Recipe, path: Path | str) -> None:
    """Refuse a recipe that describes another network than the checkpoint holds."""
    if spec.arch != recipe.model.arch:
        raise DmdlError(
            f"checkpoint {path} holds a {spec.arch} backbone but the recipe asks for "
            f"{recipe.model.arch}: pass --set model.arch={spec.arch} or another checkpoint"
        )
    if list(spec.input_size) != [recipe.data.height, recipe.data.width]:
        raise DmdlError(
            f"checkpoint {path} was trained at {spec.input_size[0]}x{spec.input_size[1]} but the "
            f"recipe uses {recipe.data.height}x{recipe.data.width}: use the checkpoint's recipe"
        )
    for key in ("gem_p", "last_stride"):
        made, asked = getattr(spec, key), getattr(recipe.model, key)
        if made != asked:
            raise DmdlError(f"checkpoint {path} was trained with model.{key} {made} but the recipe "
                            f"asks for {asked}: pass --set model.{key}={made} or another checkpoint")


def load_model(source: str | os.PathLike | Mapping[str, Any], recipe: Recipe | None = None, *,
               path: Path | str | None = None, check: bool = False,
               what: str = "checkpoint") -> tuple[ReIDNet, NetworkSpec]:
    """The network of a dmdl checkpoint (a file, or its already loaded ``{"model", "meta"}``),
    built from the checkpoint's own model section (:func:`checkpoint_spec`); the only way dmdl
    turns a checkpoint into a network. ``recipe``: the fallback for older checkpoints; with
    ``check`` it must also describe the same network (:func:`check_compatible`). ``path``
    names an already loaded state in messages."""
    if isinstance(source, Mapping):
        state, path = source, path if path is not None else "(in memory)"
    else:
        path = Path(source)
        state = load_checkpoint(path, what=what)
    spec = checkpoint_spec(state["meta"], path, recipe)
    if check and recipe is not None:
        check_compatible(spec, recipe, path)
    model = build_model(spec.arch, pretrained=None, gem_p=spec.gem_p, last_stride=spec.last_stride,
                        gem_learnable="pool.p" in state["model"])
    try:
        model.load_state_dict(state["model"])
    except (RuntimeError, TypeError, ValueError, AttributeError) as err:
        raise DmdlError(f"{what} {path} does not fit the {spec.arch} network: "
                        f"{str(err).splitlines()[0]}") from None
    return model, spec


def resolve_model(ws: Workspace, recipe: Recipe, checkpoint: str | os.PathLike | None) -> LoadedModel:
    """The network of a resolved ``--checkpoint`` (module docstring): ``imagenet``, a path, or
    None when nothing is trained yet (refused, saying what to run first)."""
    if checkpoint == UNTRAINED:
        model = initial_model(recipe)
        random_init = recipe.model.pretrained is None
        return LoadedModel(
            model,
            name="random-init" if random_init else "imagenet",
            sha256=state_sha256(model),
            description=(f"untrained {recipe.model.arch}, randomly initialised: the recipe's "
                         f"model.pretrained is null, so --checkpoint imagenet has no ImageNet "
                         f"weights to load" if random_init
                         else f"untrained {recipe.model.arch}: {model.init_description}"),
            meta={"arch": recipe.model.arch, "stage": "untrained"},
        )
    if checkpoint is None:
        raise DmdlError(
            f"no checkpoint in {ws.root}: run `dmdl pretrain-single --workspace {ws.root}` first, "
            "or pass --checkpoint imagenet to use the untrained network"
        )
    path = Path(checkpoint)
    # read the bytes once, hash them and load them from memory: a trainer replacing the file
    # meanwhile cannot make results be filed under the hash of bytes that were not evaluated
    data = read_checkpoint_bytes(path)
    sha256 = hashlib.sha256(data).hexdigest()
    state = load_checkpoint(path, data=data)
    del data
    model, _ = load_model(state, recipe, path=path, check=True)
    meta = state["meta"]
    return LoadedModel(model, checkpoint_name(ws, path), sha256, describe_checkpoint(path, meta), meta,
                       Path(path))


def describe_checkpoint(path: Path, meta: dict[str, Any]) -> str:
    """One line for people: epochs are numbered from 1 (the meta stores the 0-based index)."""
    epoch = meta.get("epoch")
    shown = f"epoch {epoch + 1}" if isinstance(epoch, int) else "epoch ?"
    if isinstance(epoch, int) and not meta.get("complete", True):
        shown += f" step {meta.get('step', '?')}"
    return f"{path} ({meta.get('stage', '?')}, {shown})"
