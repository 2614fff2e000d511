"""A tiny inference API: L2-normalised embeddings of images for a dmdl checkpoint.

>>> import dmdl_cli
>>> feats = dmdl_cli.embed(["query.jpg", "gallery1.png", "gallery2.png"],
...                        "runs/sysu/stage2/final.pt")          # doctest: +SKIP
>>> feats.shape, feats.dtype                                      # doctest: +SKIP
((3, 2048), dtype('float32'))
>>> scores = feats[1:] @ feats[0]        # cosine similarity to the query   # doctest: +SKIP

Images go through exactly what the workspace image cache and ``dmdl evaluate`` do: decode,
convert to RGB (grey infrared images become three equal channels), resize (with the filter of
the checkpoint's ``data.resize``, as its image cache was) to the
checkpoint's input size, ``(x / 255 - mean) / std`` with the ImageNet statistics
(:func:`~dmdl_cli.model.backbone.normalize_batch`), the eval-mode network, and (``flip=True``)
the mean with the embedding of the mirrored image, L2-normalised.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from dmdl_cli.data.cache import open_image, resize_image, to_rgb
from dmdl_cli.errors import DmdlError
from dmdl_cli.model.backbone import ReIDNet, normalize_batch
from dmdl_cli.model.loading import NetworkSpec, load_model
from dmdl_cli.recipe import Recipe, load_recipe

__all__ = ["embed", "load_embedder"]

ImageLike = Union[str, os.PathLike, Image.Image]

# One loaded network is kept between calls: {key: (model, its NetworkSpec)}.
_LOADED: dict[tuple, tuple[ReIDNet, NetworkSpec]] = {}


def load_embedder(checkpoint: str | os.PathLike, *, recipe: Recipe | str | os.PathLike | None = None,
                  device: str | torch.device | None = None) -> tuple[ReIDNet, tuple[int, int]]:
    """``(eval-mode network on device, (height, width))`` of a dmdl checkpoint file, built by
    :func:`~dmdl_cli.model.loading.load_model` from the checkpoint's own recipe.

    The network is kept in memory, so repeated :func:`embed` calls do not reload it (a changed
    file is reloaded).
    """
    model, spec = _embedder(checkpoint, recipe, device)
    return model, spec.input_size


def _embedder(checkpoint: str | os.PathLike, recipe: Recipe | str | os.PathLike | None,
              device: str | torch.device | None) -> tuple[ReIDNet, NetworkSpec]:
    """The network of :func:`load_embedder` and its :class:`NetworkSpec` (input size, the
    resize filter of its training images), loaded once."""
    path = Path(checkpoint).expanduser().resolve()
    if not path.is_file():
        raise DmdlError(f"checkpoint {path} does not exist: pass the path of a dmdl checkpoint "
                        "(e.g. WS/stage2/final.pt)")
    dev = torch.device(device) if device is not None else torch.device(
        "cuda" if torch.cuda.is_available() else "cpu")
    stat = path.stat()
    key = (str(path), stat.st_mtime_ns, stat.st_size, str(dev),
           recipe.hash() if isinstance(recipe, Recipe) else str(recipe))
    if key not in _LOADED:
        if recipe is not None and not isinstance(recipe, Recipe):
            recipe = load_recipe(str(recipe))
        model, spec = load_model(path, recipe, check=recipe is not None)
        model.to(dev).eval()
        _LOADED.clear()
        _LOADED[key] = (model, spec)
    return _LOADED[key]


def _to_array(image: ImageLike, height: int, width: int, resize: str = "bilinear") -> np.ndarray:
    """``(height, width, 3)`` uint8 RGB, decoded and resized like the workspace image cache
    (filter ``resize``: the checkpoint's ``data.resize``)."""
    if isinstance(image, Image.Image):
        return resize_image(to_rgb(image), height, width, resize)
    path = Path(image)
    try:
        with open_image(path) as img:
            return _to_array(img, height, width, resize)
    except FileNotFoundError:
        raise DmdlError(f"image {path} does not exist") from None
    except Exception as err:  # noqa: BLE001 - any decoder failure names the file
        raise DmdlError(f"{path}: cannot decode image ({err or type(err).__name__})") from None


def embed(
    images: Sequence[ImageLike] | ImageLike,
    checkpoint: str | os.PathLike,
    *,
    recipe: Recipe | str | os.PathLike | None = None,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    flip: bool = True,
) -> np.ndarray:
    """L2-normalised embeddings ``(N, D)`` float32 of ``images`` for a dmdl checkpoint.

    ``images``: PIL images and/or image paths (one image alone is accepted too).
    ``checkpoint``: path of a dmdl checkpoint (``WS/stage2/final.pt``); the recipe it carries
    gives the network (backbone, ``gem_p``, ``last_stride``) and the input size. ``recipe`` (a
    Recipe or a YAML path) is needed only for a checkpoint of an older dmdl that does not carry
    its recipe (without it, ``gem_p`` and ``last_stride`` are the recipe defaults, with a note);
    when given, it must describe the same network. ``device``: default CUDA when present, else
    CPU; fp32 either way. ``flip``: average with the horizontally mirrored image (as
    ``dmdl evaluate`` does). Rows of the result are unit vectors, so ``a @ b.T`` is the cosine
    similarity.

    Example::

        import dmdl_cli
        q = dmdl_cli.embed(["probe_ir.jpg"], "ws/stage2/final.pt")         # (1, D)
        g = dmdl_cli.embed(sorted(Path("gallery").glob("*.jpg")), "ws/stage2/final.pt")
        ranking = np.argsort(-(g @ q[0]))                                  # best match first
    """
    if isinstance(images, (str, os.PathLike, Image.Image)):
        images = [images]
    images = list(images)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    model, spec = _embedder(checkpoint, recipe, device)
    (height, width), resize = spec.input_size, spec.resize  # as its training images were
    dev = next(model.parameters()).device
    out: list[torch.Tensor] = []
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            chunk = images[start:start + batch_size]
            arrays = np.stack([_to_array(im, height, width, resize) for im in chunk])  # (B, H, W, 3) uint8
            x = normalize_batch(torch.from_numpy(arrays).permute(0, 3, 1, 2).to(dev))  # (B, 3, H, W)
            emb = model(x).float()  # (B, D) unit rows
            if flip:
                emb = emb + model(torch.flip(x, dims=[3])).float()
            out.append(F.normalize(emb, dim=1).cpu())
    if not out:
        return np.zeros((0, model.feat_dim), dtype=np.float32)
    return torch.cat(out).numpy().astype(np.float32, copy=False)
