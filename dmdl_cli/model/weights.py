"""Where the ImageNet weights of ``model.pretrained: imagenet`` come from (torch-free).

``imagenet`` is torchvision's IMAGENET1K_V1 file of the backbone's torchvision model (what
AGW / PGM-style code and the DMDL reference initialise from), ``imagenet-v2`` its IMAGENET1K_V2
file (a newer training recipe, loaded only when named). Nothing is downloaded: the file is looked
for in ``$DMDL_WEIGHTS_DIR`` (when set), then in torch's hub cache
(``$TORCH_HOME/hub/checkpoints``, ``$TORCH_HOME`` defaulting to ``$XDG_CACHE_HOME/torch`` or
``~/.cache/torch``), under the name torchvision downloads it as, or an older name of the same
weights.

This module imports no torch, so that ``prepare-data`` can say at once that a recipe's file is
missing (stage 1 would stop on it later); :mod:`dmdl_cli.model.backbone` loads the file.
"""
from __future__ import annotations

import os
from pathlib import Path

#: The torchvision model whose ImageNet weights each ``model.arch`` starts from.
TORCHVISION_MODEL = {"resnet50_agw": "resnet50", "resnet50": "resnet50", "resnet18": "resnet18"}

#: (torchvision model, release) -> (the URL torchvision's weights enum records, e.g.
#: ``ResNet50_Weights.IMAGENET1K_V1.url``; older file names of the same weights). The file name
#: is the URL's last part; tests/test_backbone.py checks the URLs against torchvision's enum.
#: resnet18 has V1 only.
IMAGENET_WEIGHTS: dict[tuple[str, str], tuple[str, tuple[str, ...]]] = {
    ("resnet50", "v1"): ("https://download.pytorch.org/models/resnet50-0676ba61.pth",
                         ("resnet50-19c8e357.pth",)),
    ("resnet50", "v2"): ("https://download.pytorch.org/models/resnet50-11ad3fa6.pth", ()),
    ("resnet18", "v1"): ("https://download.pytorch.org/models/resnet18-f37072fd.pth",
                         ("resnet18-5c106cde.pth",)),
}
#: ``model.pretrained`` values that name an ImageNet release (anything else is a file path).
IMAGENET_RELEASES = {"imagenet": "v1", "imagenet-v1": "v1", "imagenet-v2": "v2"}
#: A folder searched for the files above before the torch hub cache.
WEIGHTS_DIR_ENV = "DMDL_WEIGHTS_DIR"


def imagenet_release(pretrained: object) -> str | None:
    """``"v1"`` / ``"v2"`` when ``model.pretrained`` names an ImageNet release, else None."""
    return IMAGENET_RELEASES.get(str(pretrained).lower()) if pretrained is not None else None


def imagenet_files(arch: str, release: str) -> tuple[str, ...] | None:
    """The file names of ``arch``'s ImageNet ``release``, torchvision's own first; None when
    torchvision has no such weights."""
    entry = IMAGENET_WEIGHTS.get((TORCHVISION_MODEL[arch], release))
    if entry is None:
        return None
    url, older = entry
    return (url.rsplit("/", 1)[-1], *older)


def imagenet_url(arch: str, release: str) -> str | None:
    """Where torchvision serves ``arch``'s ImageNet ``release`` file."""
    entry = IMAGENET_WEIGHTS.get((TORCHVISION_MODEL[arch], release))
    return entry[0] if entry else None


def hub_checkpoints_dir() -> Path:
    """``torch.hub.get_dir()/checkpoints`` computed as torch does, without importing torch:
    ``$TORCH_HOME/hub``, ``$TORCH_HOME`` defaulting to ``$XDG_CACHE_HOME/torch`` (``~/.cache``)."""
    cache = os.getenv("XDG_CACHE_HOME", os.path.join("~", ".cache"))
    torch_home = os.path.expanduser(os.getenv("TORCH_HOME", os.path.join(cache, "torch")))
    return Path(torch_home) / "hub" / "checkpoints"


def imagenet_weight_candidates(arch: str, release: str = "v1", hub: Path | None = None) -> list[Path]:
    """Where ``arch``'s ImageNet ``release`` weights are looked for, in order:
    ``$DMDL_WEIGHTS_DIR/<file>`` (when the variable is set), then the hub cache's
    ``checkpoints/<file>`` (``hub``: that folder as torch gives it; default
    :func:`hub_checkpoints_dir`); each folder under every name of the file. [] when torchvision
    has no such weights."""
    names = imagenet_files(arch, release) or ()
    dirs = [hub or hub_checkpoints_dir()]
    if os.environ.get(WEIGHTS_DIR_ENV):
        dirs.insert(0, Path(os.environ[WEIGHTS_DIR_ENV]).expanduser())
    return [folder / name for folder in dirs for name in names]


def missing_weights_message(arch: str, pretrained: object, hub: Path | None = None) -> str | None:
    """Why ``model.pretrained`` cannot be loaded on this machine, with where to put the file, or
    None when it can (or when the recipe asks for no weights). ``hub``: as for
    :func:`imagenet_weight_candidates`."""
    if pretrained is None:
        return None
    release = imagenet_release(pretrained)
    if release is None:
        path = Path(str(pretrained)).expanduser()
        if path.is_file():
            return None
        return (f"model.pretrained file {path} not found: put the state dict there, or set "
                f"model.pretrained to 'imagenet' or null")
    files = imagenet_files(arch, release)
    if files is None:
        return (f"torchvision has no ImageNet {release.upper()} weights for "
                f"{TORCHVISION_MODEL[arch]}; set model.pretrained to imagenet (V1), a local .pth "
                f"file or null")
    if any(path.is_file() for path in imagenet_weight_candidates(arch, release, hub)):
        return None
    return (f"ImageNet {release.upper()} weights for {arch} not found: put torchvision's file "
            f"at {(hub or hub_checkpoints_dir()) / files[0]} (or in ${WEIGHTS_DIR_ENV}; dmdl "
            f"downloads nothing; torchvision serves it at {imagenet_url(arch, release)}), or set "
            f"model.pretrained to a local .pth file, or to null for random initialisation")
