"""The re-identification network shared by both modalities.

One ResNet trunk (torchvision's implementation, so ImageNet state dicts load by key) with

* last stride 1 (layer4 keeps the layer3 resolution: an 18 x 9 map for a 288 x 144 input),
* optional non-local blocks (``resnet50_agw``): 2 after the last two bottlenecks of layer2 and
  3 after the last three bottlenecks of layer3, as in AGW. Each block is a residual
  dot-product non-local operation whose output BatchNorm is zero-initialised, so at
  initialisation the block is exactly the identity and ImageNet weights keep their meaning;
* GeM pooling ``(mean_hw x^p)^(1/p)`` (p = 3, fixed by default, learnable on request);
* a BatchNorm1d neck whose bias is frozen at 0 (BNNeck).

``forward`` returns ``(pool_feat, bn_feat)`` in training mode (triplet on the former or the
latter, contrastive on the L2-normalised latter, at the caller's choice) and the L2-normalised
``bn_feat`` in eval mode: that is the embedding used for clustering, evaluation and export.

Input images are float ``(B, 3, H, W)`` already normalised with :func:`normalize_batch`, the one
preprocessing shared by training, feature extraction and export.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from dmdl_cli.data.normalisation import IMAGENET_MEAN, IMAGENET_STD, normalise_images
from dmdl_cli.errors import DmdlError
from dmdl_cli.model.weights import (
    TORCHVISION_MODEL,
    imagenet_files,
    imagenet_release,
    imagenet_weight_candidates,
    missing_weights_message,
)
from dmdl_cli.recipe import ARCHS

__all__ = [
    "ARCHS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "GeM",
    "NonLocalBlock",
    "ReIDNet",
    "build_model",
    "model_signature",
    "normalize_batch",
]

# arch -> (output dim, {layer: number of non-local blocks}); the torchvision constructor and its
# ImageNet files are in dmdl_cli/model/weights.py (TORCHVISION_MODEL, IMAGENET_WEIGHTS)
_ARCH_SPECS: dict[str, tuple[int, dict[str, int]]] = {
    "resnet50_agw": (2048, {"layer2": 2, "layer3": 3}),
    "resnet50": (2048, {}),
    "resnet18": (512, {}),
}


# --------------------------------------------------------------------------------------------
# preprocessing
# --------------------------------------------------------------------------------------------
def normalize_batch(images: torch.Tensor) -> torch.Tensor:
    """uint8 images ``(B, 3, H, W)`` -> float32 ``(B, 3, H, W)``: ``(x / 255 - mean) / std``.

    ``mean`` / ``std`` are :data:`IMAGENET_MEAN` / :data:`IMAGENET_STD` (RGB order), declared
    with the arithmetic in ``dmdl_cli/data/normalisation.py`` (the augmentation's ``reference``
    pipeline normalises there, in the data loader). The result lives on the input's device; the
    memory format (e.g. channels_last) is preserved.
    """
    if images.dtype != torch.uint8:
        raise TypeError(f"normalize_batch expects uint8 images, got {images.dtype}")
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"normalize_batch expects (B, 3, H, W), got {tuple(images.shape)}")
    return normalise_images(images)


# --------------------------------------------------------------------------------------------
# building blocks
# --------------------------------------------------------------------------------------------
class GeM(nn.Module):
    """Generalised-mean pooling: ``(B, C, H, W) -> (B, C)``, ``(mean_hw clamp(x, eps)^p)^(1/p)``.

    p = 1 is average pooling, p -> inf max pooling. Computed in float32 whatever the autocast
    state (x^3 of fp16 activations overflows easily).
    """

    def __init__(self, p: float = 3.0, *, learnable: bool = False, eps: float = 1e-6) -> None:
        super().__init__()
        if learnable:
            self.p = nn.Parameter(torch.tensor(float(p)))
        else:
            self.register_buffer("p", torch.tensor(float(p)), persistent=False)
        self.learnable = learnable
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):
            p = self.p.to(torch.float32)
            x = x.to(torch.float32).clamp(min=self.eps).pow(p)
            return x.mean(dim=(2, 3)).pow(1.0 / p)  # (B, C)

    def extra_repr(self) -> str:
        return f"p={float(self.p):g}, learnable={self.learnable}"


class NonLocalBlock(nn.Module):
    """Residual non-local block (dot-product form), ``(B, C, H, W) -> (B, C, H, W)``.

    ``z = x + BN(W g(x) f)`` with ``f_ij = theta(x_i) . phi(x_j) / N`` (N = H W positions),
    theta / phi / g 1x1 convolutions to ``C // reduction`` channels and W a 1x1 convolution
    back to C followed by a BatchNorm whose weight and bias start at 0: at initialisation the
    block is exactly the identity.
    """

    def __init__(self, channels: int, reduction: int = 2) -> None:
        super().__init__()
        inter = max(channels // reduction, 1)
        self.g = nn.Conv2d(channels, inter, kernel_size=1)
        self.theta = nn.Conv2d(channels, inter, kernel_size=1)
        self.phi = nn.Conv2d(channels, inter, kernel_size=1)
        self.W = nn.Sequential(nn.Conv2d(inter, channels, kernel_size=1), nn.BatchNorm2d(channels))
        nn.init.zeros_(self.W[1].weight)
        nn.init.zeros_(self.W[1].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        n = h * w
        g = self.g(x).flatten(2).transpose(1, 2)  # (B, N, C')
        theta = self.theta(x).flatten(2).transpose(1, 2)  # (B, N, C')
        phi = self.phi(x).flatten(2)  # (B, C', N)
        f = torch.bmm(theta / n, phi)  # (B, N, N); 1/N applied first: no fp16 overflow
        y = torch.bmm(f, g)  # (B, N, C')
        y = y.transpose(1, 2).reshape(b, -1, h, w)  # (B, C', H, W)
        return x + self.W(y)


# --------------------------------------------------------------------------------------------
# network
# --------------------------------------------------------------------------------------------
class ReIDNet(nn.Module):
    """Shared two-modality re-id network.

    Attributes: ``arch`` (one of :data:`ARCHS`), ``feat_dim`` (embedding size D),
    ``init_description`` (one human-readable line saying where the weights came from).

    ``forward(x)``, ``x`` float ``(B, 3, H, W)`` normalised (:func:`normalize_batch`):

    * training mode -> ``(pool_feat (B, D), bn_feat (B, D))``: GeM output and BNNeck output;
    * eval mode -> ``F.normalize(bn_feat)`` ``(B, D)``: the L2-normalised embedding.
    """

    def __init__(
        self,
        arch: str,
        trunk: torchvision.models.ResNet,
        feat_dim: int,
        non_local: Mapping[str, int],
        *,
        gem_p: float = 3.0,
        gem_learnable: bool = False,
    ) -> None:
        super().__init__()
        self.arch = arch
        self.feat_dim = feat_dim
        self.init_description = "random initialisation (the recipe sets model.pretrained: null)"
        # The trunk keeps torchvision's module names (conv1, bn1, layer1..layer4) so that an
        # ImageNet state dict loads into ``self.backbone`` key for key.
        self.backbone = trunk
        # Non-local blocks live beside the trunk: {layer name: blocks}, and the block indices of
        # that layer after which they run (the last k blocks).
        self.non_local = nn.ModuleDict()
        self._nl_after: dict[str, tuple[int, ...]] = {}
        for layer_name, k in non_local.items():
            if k <= 0:
                continue
            layer: nn.Sequential = getattr(trunk, layer_name)
            if k > len(layer):
                raise ValueError(f"{layer_name} has {len(layer)} blocks, cannot add {k} non-local")
            channels = _block_out_channels(layer[-1])
            self.non_local[layer_name] = nn.ModuleList(NonLocalBlock(channels) for _ in range(k))
            self._nl_after[layer_name] = tuple(range(len(layer) - k, len(layer)))
        self.pool = GeM(gem_p, learnable=gem_learnable)
        self.neck = nn.BatchNorm1d(feat_dim)
        nn.init.ones_(self.neck.weight)
        nn.init.zeros_(self.neck.bias)
        self.neck.bias.requires_grad_(False)

    def _layer(self, name: str, x: torch.Tensor) -> torch.Tensor:
        layer: nn.Sequential = getattr(self.backbone, name)
        after = self._nl_after.get(name, ())
        j = 0
        for i, block in enumerate(layer):
            x = block(x)
            if i in after:
                x = self.non_local[name][j](x)
                j += 1
        return x

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W) -> (B, D, H/16, W/16)`` (last stride 1) layer4 activations."""
        t = self.backbone
        x = t.maxpool(t.relu(t.bn1(t.conv1(x))))
        for name in ("layer1", "layer2", "layer3", "layer4"):
            x = self._layer(name, x)
        return x

    def forward(self, x: torch.Tensor):
        pool_feat = self.pool(self.feature_map(x))  # (B, D) float32
        bn_feat = self.neck(pool_feat)  # (B, D)
        if self.training:
            return pool_feat, bn_feat
        return F.normalize(bn_feat, dim=1)


def _block_out_channels(block: nn.Module) -> int:
    last_bn = block.bn3 if hasattr(block, "bn3") else block.bn2
    return last_bn.num_features


def _set_last_stride(trunk: torchvision.models.ResNet, stride: int) -> None:
    """Set the stride of layer4's first block (its strided conv and its downsample conv)."""
    first = trunk.layer4[0]
    conv = first.conv2 if hasattr(first, "conv3") else first.conv1  # Bottleneck v1.5 / Basic
    conv.stride = (stride, stride)
    if first.downsample is not None:
        first.downsample[0].stride = (stride, stride)


# --------------------------------------------------------------------------------------------
# pretrained weights
# --------------------------------------------------------------------------------------------
def _resolve_pretrained(arch: str, pretrained: str | os.PathLike) -> Path:
    """The file ``model.pretrained`` names (:mod:`dmdl_cli.model.weights`: where ImageNet files
    are looked for); a missing one is one error line saying where to put it."""
    release = imagenet_release(pretrained)
    if release is not None:
        if imagenet_files(arch, release) is None:
            raise DmdlError(f"torchvision has no ImageNet {release.upper()} weights for "
                            f"{TORCHVISION_MODEL[arch]}; set model.pretrained to imagenet (V1), a "
                            f"local .pth file or null")
        hub = Path(torch.hub.get_dir()) / "checkpoints"  # honours torch.hub.set_dir()
        for path in imagenet_weight_candidates(arch, release, hub):
            if path.is_file():
                return path
        raise DmdlError(missing_weights_message(arch, pretrained, hub))
    path = Path(pretrained).expanduser()
    if not path.is_file():
        raise DmdlError(
            f"pretrained weights file not found: {path}; set model.pretrained to an existing "
            f"local .pth file, 'imagenet' (torchvision's V1 file), 'imagenet-v2' or null for "
            f"random initialisation"
        )
    return path


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is a user-fixable problem
        raise DmdlError(
            f"cannot read pretrained weights {path}: {type(exc).__name__}: {exc}".splitlines()[0]
            + "; set model.pretrained to a torchvision ResNet state dict (.pth)"
        ) from None
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model"):
            if key in obj and isinstance(obj[key], Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise DmdlError(
            f"pretrained weights {path} do not hold a state dict of tensors; set "
            f"model.pretrained to a torchvision ResNet state dict (.pth)"
        )
    out = {}
    for k, v in obj.items():
        k = k[len("module.") :] if k.startswith("module.") else k
        out[k] = v
    return out


def _load_backbone_weights(model: ReIDNet, path: Path) -> None:
    """Strictly load a torchvision ResNet state dict into ``model.backbone`` (fc.* ignored)."""
    state = {k: v for k, v in _read_state_dict(path).items() if not k.startswith("fc.")}
    own = model.backbone.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    bad_shape = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or bad_shape:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected),
                            ("wrong shape", bad_shape)):
            if keys:
                shown = ", ".join(keys[:5]) + (f", ... ({len(keys)} in all)" if len(keys) > 5 else "")
                parts.append(f"{label} keys: {shown}")
        raise DmdlError(
            f"pretrained weights {path} do not match the {model.arch} backbone ("
            + "; ".join(parts)
            + f"); set model.pretrained to a torchvision {TORCHVISION_MODEL[model.arch]} state dict"
        )
    model.backbone.load_state_dict(state, strict=True)


# --------------------------------------------------------------------------------------------
# public constructors
# --------------------------------------------------------------------------------------------
def build_model(
    arch: str,
    *,
    pretrained: str | os.PathLike | None = None,
    gem_p: float = 3.0,
    gem_learnable: bool = False,
    last_stride: int = 1,
) -> ReIDNet:
    """Build the shared re-id network.

    ``arch``: ``resnet50_agw`` (AGW: non-local 2 + 3, D = 2048), ``resnet50`` (D = 2048) or
    ``resnet18`` (D = 512); all use GeM pooling (``gem_p``), a BNNeck and ``last_stride``.

    ``pretrained``: ``None`` (random initialisation), ``"imagenet"`` (torchvision's
    IMAGENET1K_V1 file, ``"imagenet-v2"`` its IMAGENET1K_V2 file: looked for in
    ``$DMDL_WEIGHTS_DIR`` then ``torch.hub.get_dir()/checkpoints/``; never downloaded) or a path
    to a local .pth state dict of the torchvision trunk. Loaded with ``weights_only=True``.
    Backbone keys are checked strictly (``fc.*`` ignored); a missing or mismatching file raises
    :class:`~dmdl_cli.errors.DmdlError`. ``model.init_description`` names the file loaded.
    """
    if arch not in _ARCH_SPECS:
        raise DmdlError(f"unknown model.arch {arch!r}; choose one of {', '.join(ARCHS)}")
    tv_name, (feat_dim, non_local) = TORCHVISION_MODEL[arch], _ARCH_SPECS[arch]
    # Resolve the weights file before building anything, so a missing file fails fast.
    path = None if pretrained is None else _resolve_pretrained(arch, pretrained)
    trunk = getattr(torchvision.models, tv_name)(weights=None)
    del trunk.fc, trunk.avgpool  # replaced by GeM + BNNeck
    _set_last_stride(trunk, last_stride)
    model = ReIDNet(arch, trunk, feat_dim, non_local, gem_p=gem_p, gem_learnable=gem_learnable)
    if path is not None:
        _load_backbone_weights(model, path)
        release = imagenet_release(pretrained)
        what = f"ImageNet {release.upper()} weights" if release else "pretrained backbone weights"
        model.init_description = (
            f"{what} from {path} (non-local blocks and head freshly initialised)"
        )
    return model


def model_signature(model: ReIDNet) -> dict:
    """``{"arch", "feat_dim", "num_params"}``: what a checkpoint must match to be loaded."""
    return {
        "arch": model.arch,
        "feat_dim": int(model.feat_dim),
        "num_params": int(sum(p.numel() for p in model.parameters())),
    }
