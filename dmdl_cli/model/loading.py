"""Which network a command evaluates, clusters with or exports: resolve ``--checkpoint``.

``None`` takes the newest stage result (stage 2 before stage 1, final before last);
``imagenet`` builds the untrained backbone of the recipe (ImageNet weights when the recipe asks
for them, otherwise a seeded random initialisation, labelled so); anything else is a path.
A checkpoint of another backbone is refused naming both.
"""
from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dmdl_cli.errors import DmdlError
from dmdl_cli.model.backbone import ReIDNet, build_model
from dmdl_cli.recipe import Recipe
from dmdl_cli.workspace import Workspace, load_checkpoint, read_checkpoint_bytes

STAGE_RESULTS = ("stage2/final.pt", "stage2/last.pt", "stage1/final.pt", "stage1/last.pt")


@dataclass
class LoadedModel:
    model: ReIDNet
    name: str  # short name used in output file names: stage2-final, imagenet, random-init, ...
    sha256: str  # of the checkpoint file (or of the initial weights)
    description: str  # one line for logs and tables
    meta: dict[str, Any]


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


def default_checkpoint(ws: Workspace) -> Path | None:
    for rel in STAGE_RESULTS:
        if (ws.root / rel).is_file():
            return ws.root / rel
    return None


def checkpoint_name(ws: Workspace, path: Path) -> str:
    path = Path(path).resolve()
    if path.parent.parent == ws.root and path.parent.name in ("stage1", "stage2"):
        return f"{path.parent.name}-{path.stem}"
    return path.stem


def check_compatible(meta: dict[str, Any], recipe: Recipe, path: Path) -> None:
    arch = meta.get("arch")
    if arch != recipe.model.arch:
        raise DmdlError(
            f"checkpoint {path} holds a {arch} backbone but the recipe asks for "
            f"{recipe.model.arch}: pass --set model.arch={arch} or another checkpoint"
        )
    size = meta.get("input_size")
    if size and list(size) != [recipe.data.height, recipe.data.width]:
        raise DmdlError(
            f"checkpoint {path} was trained at {size[0]}x{size[1]} but the recipe uses "
            f"{recipe.data.height}x{recipe.data.width}: use the checkpoint's recipe"
        )


def load_model(ws: Workspace, recipe: Recipe, checkpoint: str | None) -> LoadedModel:
    if checkpoint == "imagenet":
        model = initial_model(recipe)
        random_init = recipe.model.pretrained is None
        return LoadedModel(
            model,
            name="random-init" if random_init else "imagenet",
            sha256=state_sha256(model),
            description=f"untrained {recipe.model.arch}: {model.init_description}",
            meta={"arch": recipe.model.arch, "stage": "untrained"},
        )
    path = Path(checkpoint) if checkpoint else default_checkpoint(ws)
    if path is None:
        raise DmdlError(
            f"no checkpoint in {ws.root}: run `dmdl pretrain-single --workspace {ws.root}` first, "
            "or pass --checkpoint imagenet to evaluate the untrained backbone"
        )
    # read the bytes once, hash them and load them from memory: a trainer replacing the file
    # meanwhile cannot make results be filed under the hash of bytes that were not evaluated
    data = read_checkpoint_bytes(path)
    sha256 = hashlib.sha256(data).hexdigest()
    state = load_checkpoint(path, data=data)
    del data
    meta = state["meta"]
    check_compatible(meta, recipe, path)
    model = build_from_recipe(recipe, pretrained=False)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as err:
        raise DmdlError(f"checkpoint {path} does not fit the {recipe.model.arch} network: "
                        f"{str(err).splitlines()[0]}") from None
    return LoadedModel(model, checkpoint_name(ws, path), sha256, describe_checkpoint(path, meta), meta)


def describe_checkpoint(path: Path, meta: dict[str, Any]) -> str:
    """One line for people: epochs are numbered from 1 (the meta stores the 0-based index)."""
    epoch = meta.get("epoch")
    shown = f"epoch {epoch + 1}" if isinstance(epoch, int) else "epoch ?"
    if isinstance(epoch, int) and not meta.get("complete", True):
        shown += f" step {meta.get('step', '?')}"
    return f"{path} ({meta.get('stage', '?')}, {shown})"
