"""ImageNet normalisation of images: the one place its constants and its arithmetic live.

The network takes float images normalised per channel, ``(x / 255 - mean) / std`` in float32
(torchvision's ``ToTensor`` then ``Normalize``, as the reference implementation feeds its
network). The model's ``normalize_batch`` (``dmdl_cli/model/backbone.py``) and the augmentation's
``reference`` pipeline (``dmdl_cli/data/augment.py``, which normalises in the data loader) both
call :func:`normalise_images`, so an image normalised in either place is bitwise the same.
"""
from __future__ import annotations

import torch

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "normalise_images", "imagenet_mean_uint8"]

#: Per-channel RGB statistics of ImageNet, the ones torchvision's weights were trained with.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalise_images(images: torch.Tensor) -> torch.Tensor:
    """uint8 ``(..., 3, H, W)`` -> a new float32 ``(..., 3, H, W)``: ``(x / 255 - mean) / std``.

    The result lives on the input's device; the memory format (e.g. channels_last) is kept.
    """
    if images.dtype != torch.uint8:
        raise TypeError(f"normalise_images expects uint8 images, got {images.dtype}")
    mean, std = _statistics(images.device)
    out = images.to(torch.float32)  # a new tensor: the steps below work in place
    return out.div_(255.0).sub_(mean).div_(std)


_STATISTICS: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def _statistics(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``IMAGENET_MEAN`` and ``IMAGENET_STD`` as float32 ``(3, 1, 1)`` on ``device`` (cached)."""
    if device not in _STATISTICS:
        _STATISTICS[device] = tuple(  # type: ignore[assignment]
            torch.tensor(v, dtype=torch.float32, device=device).view(3, 1, 1)
            for v in (IMAGENET_MEAN, IMAGENET_STD))
    return _STATISTICS[device]


def imagenet_mean_uint8() -> tuple[int, int, int]:
    """The ImageNet mean colour rounded to uint8 RGB: ``(124, 116, 104)``."""
    r, g, b = (int(round(m * 255.0)) for m in IMAGENET_MEAN)
    return r, g, b
