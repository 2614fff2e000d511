"""CBT data level: modality-specific two-view augmentation (docs/method.md section 4;
docs/augmentation.md shows both pipelines on pictures).

Every training image yields two views. ``augment.pipeline`` says in which order, and on which
number format, the operations run.

``dmdl-v1`` (the default): uint8 ``(3, H, W)`` in and out; the training loop normalises on the
device.

* visible view A: pad + random crop, horizontal flip, random erasing;
* visible view B: colour jitter, pad + crop, flip, erasing, channel exchange (all three channels
  replaced by one randomly chosen channel);
* infrared view A: pad + crop, flip, erasing, channel operation (R, G, B or gray in all three);
* infrared view B: pseudo-colour, pad + crop, flip, erasing.

Colour operations that remap intensities (jitter, pseudo-colour) act before the crop, so the
zero padding stays black; channel copies act last, after erasing, so their view stays gray.

``reference`` (the reference implementation's transforms, ``dmdl_sysu.py`` and
``ChannelAug.py``): uint8 in, float32 out, normalised with the ImageNet mean / std
(:mod:`dmdl_cli.data.normalisation`, the same function the model's ``normalize_batch`` uses):

* visible view A: pad + crop, flip, normalise, erasing;
* visible view B: pad + crop, flip, colour jitter (on the crop, so the padding is jittered
  too), normalise, erasing, channel exchange of the normalised values;
* infrared view A: pad + crop, flip, normalise, erasing, channel operation on the normalised
  values (its grayscale is ``0.2989 R + 0.5870 G + 0.1140 B`` of the normalised channels);
* infrared view B: pad + crop, flip, pseudo-colour (on the crop, so the black padding is
  coloured too), normalise, erasing.

With ``modality_specific=False`` (the baseline) both views of every image are two independent
draws of the pipeline's visible view A: no colour operation is ever applied.

The values of every operation are recipe keys (:class:`~dmdl_cli.recipe.AugmentRecipe`):
erasing fills (uniform or N(0, 1) noise, the mean colour, black), the infrared view A's
probabilities (``ir_channel_copy_p``, ``ir_gray_p``) and the pseudo-colour scheme (three
distinct formula maps, or the reference's OpenCV map per output channel: see
:mod:`dmdl_cli.data.colour_maps`).

Crop, flip, erasing and resizing use ``torchvision.transforms.v2.functional``; the colour
jitter, the grayscale and the colour-map lookups are small numpy kernels on uint8 with the
semantics of torchvision's tensor operations (checked in the tests) that run about three times
faster on one core. The reference jitters PIL images: PIL rounds after each of the four
adjustments and blends contrast with the integer-rounded mean, so its views differ from these
by about a grey level. Every random decision is drawn from the ``torch.Generator`` handed in,
never from the global RNG, so a view is a pure function of ``(image, modality, config,
generator state)`` in any process or DataLoader worker.

Randomness layout: :func:`make_views` (and :func:`make_view`, which builds one of the two) draws
two child seeds from its generator, one per view. Each view then draws one fixed-size block of
uniforms (``_NUM_UNIFORMS``) and every decision reads its own slot of that block, so enabling or
disabling one operation never shifts the random numbers of another. Only the per-pixel noise
of random erasing is drawn after the block.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from dmdl_cli.data.colour_maps import (
    _MAP_FORMULAE,  # noqa: F401 - tests check it against recipe.COLOUR_MAPS
    COLOUR_MAPS,
    colour_map_lut,
    lut_bank,
    opencv_colour_map,
    opencv_gray,
)
from dmdl_cli.data.index import INFRARED, VISIBLE
from dmdl_cli.data.normalisation import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    imagenet_mean_uint8,
    normalise_images,
)
from dmdl_cli.recipe import ERASING_ATTEMPTS_MAX, AugmentRecipe

__all__ = [
    "AugmentConfig",
    "COLOUR_MAPS",
    "VIEWS",
    "colour_map_lut",
    "make_view",
    "make_views",
    "standard_view",
    "view_dtype",
    "pseudo_colour",
    "pseudo_colour_opencv",
    "channel_exchange",
    "jitter_colour",
]

#: The two views of an image, in the order :func:`make_views` returns them.
VIEWS = ("a", "b")
# The reference's grayscale of a normalised view (ChannelAdapGray: MATLAB's rgb2gray weights).
_REFERENCE_GRAY_WEIGHTS = (0.2989, 0.5870, 0.1140)


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------
@dataclass
class AugmentConfig(AugmentRecipe):
    """The recipe's ``augment`` section plus what the run derives: every probability and
    strength is a field of :class:`~dmdl_cli.recipe.AugmentRecipe` (declared, defaulted and
    validated there), so the YAML sets each one.

    * ``modality_specific`` (from ``cbt.augment``): True = DMDL views; False = the baseline, both
      views standard.
    * ``size``: ``(H, W)`` to resize to (bicubic, antialiased) before augmenting, or None when
      the cache already holds images at network input size.

    Erasing fills (``erasing_fill``) are colours, written in the view's number format:
    ``"random"`` per-pixel uniform noise in [0, 255], ``"mean"`` the ImageNet mean colour
    (exactly 0 in a normalised view), ``"zero"`` black, ``"normal"`` per-pixel N(0, 1) noise of
    the normalised scale (timm's pixel mode; a uint8 view stores it de-normalised, rounded and
    clipped). Jitter factors are drawn in ``[max(0, 1 - s), 1 + s]``, the hue shift in
    ``[-h, h]``, applied in a random order. Infrared view A's channel operation draws one of
    R, G, B and the grayscale slot uniformly; the slot turns the view gray with probability
    ``ir_gray_p``. The ``formula-distinct`` pseudo-colour view's output channel c takes channel
    c of its own map, three distinct maps drawn per image when there are at least three
    candidates; ``opencv-per-channel`` draws one OpenCV map per output channel from that
    channel's candidates and takes channel c of its BGR output, as the reference does.
    """

    modality_specific: bool = True
    size: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.size is not None:
            self.size = (int(self.size[0]), int(self.size[1]))

    @classmethod
    def from_recipe(cls, augment: AugmentRecipe, *, modality_specific: bool,
                    size: tuple[int, int] | None = None) -> "AugmentConfig":
        """The augmentation of a recipe's ``augment`` section."""
        return cls(**dataclasses.asdict(augment), modality_specific=modality_specific, size=size)


def view_dtype(config: AugmentRecipe) -> torch.dtype:
    """The dtype of the views ``config`` produces: ``torch.uint8`` for ``dmdl-v1`` (the loop
    normalises them), ``torch.float32`` already normalised for ``reference``."""
    return torch.float32 if config.pipeline == "reference" else torch.uint8


# --------------------------------------------------------------------------------------------
# Random draws
# --------------------------------------------------------------------------------------------
# Slot layout of the per-view block of uniforms in [0, 1).
_U_FLIP = 0
_U_CROP_Y, _U_CROP_X = 1, 2
_U_ERASE = 3
_U_ERASE_POS_Y, _U_ERASE_POS_X = 4, 5
_U_ERASE_ATTEMPTS = 6  # 2 per attempt: area fraction, log aspect ratio
_U_JITTER = _U_ERASE_ATTEMPTS + 2 * ERASING_ATTEMPTS_MAX  # 26
_U_JITTER_FACTORS = _U_JITTER + 1  # 4: brightness, contrast, saturation, hue
_U_JITTER_ORDER = _U_JITTER_FACTORS + 4  # 4: argsort = order of the four jitter ops
_U_CHANNEL = _U_JITTER_ORDER + 4  # apply the channel op (exchange / copy / pseudo-colour)
# 3: the channel (slot 0) and, for infrared view A, whether the grayscale slot turns gray
# (slot 1); or the colour maps of the three output channels
_U_CHANNEL_CHOICE = _U_CHANNEL + 1
_NUM_UNIFORMS = _U_CHANNEL_CHOICE + 3


def _child_generator(generator: torch.Generator) -> torch.Generator:
    seed = int(torch.randint(0, 2**62, (1,), generator=generator).item())
    return torch.Generator().manual_seed(seed)


def _draw_uniforms(generator: torch.Generator) -> list[float]:
    return torch.rand(_NUM_UNIFORMS, generator=generator, dtype=torch.float64).tolist()


def _index(u: float, n: int) -> int:
    """Map a uniform in [0, 1) to an integer in [0, n)."""
    return min(int(u * n), n - 1)


# --------------------------------------------------------------------------------------------
# Operations: geometry (any dtype), erasing (uint8 or normalised float32), colour (uint8)
# --------------------------------------------------------------------------------------------
def _pad_crop(img: torch.Tensor, pad: int, top: int, left: int) -> torch.Tensor:
    """Zero-pad by ``pad`` on every side, then crop ``(H, W)`` at ``(top, left)`` of the padded
    image; computed as one shifted copy instead of materialising the padded image."""
    if pad == 0:
        return img
    _, h, w = img.shape
    dy, dx = top - pad, left - pad  # offset of the crop in original coordinates, in [-pad, pad]
    out = torch.zeros_like(img)
    sy0, sy1 = max(dy, 0), min(h + dy, h)
    sx0, sx1 = max(dx, 0), min(w + dx, w)
    if sy1 > sy0 and sx1 > sx0:
        out[:, sy0 - dy:sy1 - dy, sx0 - dx:sx1 - dx] = img[:, sy0:sy1, sx0:sx1]
    return out


def _geometric(img: torch.Tensor, cfg: AugmentConfig, u: Sequence[float]) -> torch.Tensor:
    span = 2 * cfg.pad + 1
    img = _pad_crop(img, cfg.pad, _index(u[_U_CROP_Y], span), _index(u[_U_CROP_X], span))
    if u[_U_FLIP] < cfg.flip_p:
        img = TF.horizontal_flip(img)
    return img


def _erasing_box(h: int, w: int, cfg: AugmentConfig,
                 u: Sequence[float]) -> tuple[int, int, int, int] | None:
    """``(top, left, height, width)`` of the box to erase, or None when no attempt fits."""
    area = h * w
    lo, hi = cfg.erasing_scale
    log_r0, log_r1 = math.log(cfg.erasing_ratio[0]), math.log(cfg.erasing_ratio[1])
    for attempt in range(cfg.erasing_attempts):
        ua = u[_U_ERASE_ATTEMPTS + 2 * attempt]
        ur = u[_U_ERASE_ATTEMPTS + 2 * attempt + 1]
        target = area * (lo + (hi - lo) * ua)
        aspect = math.exp(log_r0 + (log_r1 - log_r0) * ur)
        eh = int(round(math.sqrt(target * aspect)))
        ew = int(round(math.sqrt(target / aspect)))
        if 0 < eh < h and 0 < ew < w:
            top = _index(u[_U_ERASE_POS_Y], h - eh + 1)
            left = _index(u[_U_ERASE_POS_X], w - ew + 1)
            return top, left, eh, ew
    return None


def _erasing_fill(fill: str, dtype: torch.dtype, eh: int, ew: int,
                  generator: torch.Generator) -> torch.Tensor:
    """The erased box's content, ``(3, eh, ew)`` or ``(3, 1, 1)``, as uint8 colours or, for a
    float32 view, their normalised values."""
    normalised = dtype == torch.float32
    if fill == "normal":
        noise = torch.randn((3, eh, ew), generator=generator, dtype=torch.float32)
        if normalised:
            return noise
        mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(3, 1, 1)
        std = torch.tensor(IMAGENET_STD, dtype=torch.float32).view(3, 1, 1)
        return ((noise * std + mean) * 255.0).round_().clamp_(0.0, 255.0).to(torch.uint8)
    if fill == "mean" and normalised:
        return torch.zeros((3, 1, 1), dtype=torch.float32)  # the mean colour, exactly
    if fill == "random":
        colour = torch.randint(0, 256, (3, eh, ew), generator=generator, dtype=torch.uint8)
    elif fill == "mean":
        colour = torch.tensor(imagenet_mean_uint8(), dtype=torch.uint8).view(3, 1, 1)
    else:
        colour = torch.zeros((3, 1, 1), dtype=torch.uint8)
    return normalise_images(colour) if normalised else colour


def _erase(img: torch.Tensor, cfg: AugmentConfig, u: Sequence[float],
           generator: torch.Generator, *, inplace: bool = False) -> torch.Tensor:
    """Random erasing of one box (probability ``erasing_p``) of a uint8 or a normalised float32
    ``(3, H, W)``; writes into ``img`` with ``inplace``, else returns a new tensor when applied."""
    if not u[_U_ERASE] < cfg.erasing_p:
        return img
    box = _erasing_box(img.shape[1], img.shape[2], cfg, u)
    if box is None:
        return img
    i, j, eh, ew = box
    value = _erasing_fill(cfg.erasing_fill, img.dtype, eh, ew, generator)
    return TF.erase(img, i, j, eh, ew, value, inplace=inplace)


def _luma_f32(x: np.ndarray) -> np.ndarray:
    """Grayscale of float32 ``(3, H, W)`` in [0, 255]: float32 ``(H, W)`` (ITU-R 601 weights)."""
    return np.float32(0.299) * x[0] + np.float32(0.587) * x[1] + np.float32(0.114) * x[2]


def _hue_f32(x: np.ndarray, shift: float) -> np.ndarray:
    """Rotate the HSV hue of float32 ``(3, H, W)`` in [0, 255] by ``shift`` turns, in place.

    HSV value (max) and chroma (max - min) are kept; the channels are rebuilt from the shifted
    hue ``h`` in sextants [0, 6): R = |h - 3| - 1, G = 2 - |h - 2|, B = 2 - |h - 4|, clipped to
    [0, 1], times chroma, plus min.
    """
    r, g, b = x
    mx = x.max(axis=0)
    mn = x.min(axis=0)
    chroma = mx - mn
    safe = np.where(chroma > 0, chroma, np.float32(1.0))
    is_r, is_g = mx == r, mx == g
    num = np.where(is_r, g - b, np.where(is_g, b - r, r - g))
    off = np.where(is_r, np.float32(0.0), np.where(is_g, np.float32(2.0), np.float32(4.0)))
    h = num / safe + off + np.float32(6.0 * shift)  # in [-4, 9)
    h -= np.float32(6.0) * np.floor(h * np.float32(1.0 / 6.0))  # mod 6 (np.mod is ~30x slower)
    np.abs(h - np.float32(3.0), out=x[0])
    x[0] -= np.float32(1.0)
    np.abs(h - np.float32(2.0), out=x[1])
    np.subtract(np.float32(2.0), x[1], out=x[1])
    np.abs(h - np.float32(4.0), out=x[2])
    np.subtract(np.float32(2.0), x[2], out=x[2])
    np.clip(x, 0.0, 1.0, out=x)
    x *= chroma
    x += mn
    return x


def _adjust_hue(img: torch.Tensor, shift: float) -> torch.Tensor:
    """HSV hue shift of uint8 ``(3, H, W)`` by ``shift`` turns in ``[-0.5, 0.5]``.

    The operation of torchvision's ``adjust_hue`` (within one grey level of rounding), computed
    in numpy in about a quarter of its time on one core.
    """
    x = _hue_f32(img.numpy().astype(np.float32), shift)
    return torch.from_numpy(np.rint(x).astype(np.uint8))


def jitter_colour(img: torch.Tensor, brightness: float, contrast: float, saturation: float,
                  hue: float, order: Sequence[int] = (0, 1, 2, 3)) -> torch.Tensor:
    """Colour jitter with explicit factors, applied in ``order`` (0 brightness, 1 contrast,
    2 saturation, 3 hue); uint8 ``(3, H, W)`` -> uint8 ``(3, H, W)``.

    The operations of torchvision's ``adjust_brightness`` / ``adjust_contrast`` /
    ``adjust_saturation`` / ``adjust_hue`` (blend with black, with the mean gray level, with the
    grayscale image; HSV hue shift), each clamped to [0, 255], but chained in float32 with one
    rounding at the end instead of one per step; about three times faster on one core than
    the four torchvision calls. A factor of 1 (shift 0 for hue) skips its operation.
    """
    x = img.numpy().astype(np.float32)  # (3, H, W) in [0, 255]
    for k in order:
        if k == 0 and brightness != 1.0:
            x *= np.float32(brightness)
        elif k == 1 and contrast != 1.0:
            mean = np.float32(_luma_f32(x).mean())
            x *= np.float32(contrast)
            x += np.float32((1.0 - contrast) * mean)
        elif k == 2 and saturation != 1.0:
            gray = _luma_f32(x)
            x *= np.float32(saturation)
            x += np.float32(1.0 - saturation) * gray
        elif k == 3 and hue != 0.0:
            _hue_f32(x, hue)
        np.clip(x, 0.0, 255.0, out=x)
    return torch.from_numpy(np.rint(x).astype(np.uint8))


def _colour_jitter(img: torch.Tensor, cfg: AugmentConfig, u: Sequence[float]) -> torch.Tensor:
    """ColorJitter(brightness, contrast, saturation, hue) with probability ``jitter_p``: factors
    uniform in ``[max(0, 1 - s), 1 + s]``, hue shift uniform in ``[-h, h]``, random order."""
    if not u[_U_JITTER] < cfg.jitter_p:
        return img

    def factor(strength: float, uu: float) -> float:
        lo = max(0.0, 1.0 - strength)
        return lo + (1.0 + strength - lo) * uu

    f = u[_U_JITTER_FACTORS:_U_JITTER_FACTORS + 4]
    order = sorted(range(4), key=lambda k: u[_U_JITTER_ORDER + k])
    return jitter_colour(
        img,
        brightness=factor(cfg.jitter_brightness, f[0]) if cfg.jitter_brightness > 0 else 1.0,
        contrast=factor(cfg.jitter_contrast, f[1]) if cfg.jitter_contrast > 0 else 1.0,
        saturation=factor(cfg.jitter_saturation, f[2]) if cfg.jitter_saturation > 0 else 1.0,
        hue=cfg.jitter_hue * (2.0 * f[3] - 1.0),
        order=order,
    )


def _luma(img: torch.Tensor) -> np.ndarray:
    """Grayscale intensity of uint8 ``(3, H, W)``: uint8 ``(H, W)``, ITU-R 601 weights in 8-bit
    fixed point (77, 150, 29) / 256, rounded."""
    a = img.numpy().astype(np.uint16)
    return ((a[0] * 77 + a[1] * 150 + a[2] * 29 + 128) >> 8).astype(np.uint8)


def channel_exchange(img: torch.Tensor, channel: int) -> torch.Tensor:
    """All three channels replaced by channel ``channel`` (0 R, 1 G, 2 B), or by the grayscale
    image when ``channel == 3``; ``(3, H, W)`` -> a new ``(3, H, W)`` of the same dtype.

    The grayscale of a uint8 image is ITU-R 601 in 8-bit fixed point (:func:`_luma`); that of a
    normalised float32 view is the reference's ``0.2989 R + 0.5870 G + 0.1140 B`` of the
    normalised values.
    """
    if channel == 3:
        if img.dtype == torch.uint8:
            gray = torch.from_numpy(_luma(img))
        else:
            wr, wg, wb = _REFERENCE_GRAY_WEIGHTS
            gray = wr * img[0] + wg * img[1] + wb * img[2]  # (H, W), as ChannelAdapGray computes it
        return gray.expand(3, -1, -1).clone()
    if channel not in (0, 1, 2):
        raise ValueError(f"channel must be 0, 1, 2 or 3 (grayscale), got {channel}")
    return img[channel:channel + 1].expand(3, -1, -1).clone()


def _visible_exchange(img: torch.Tensor, cfg: AugmentConfig, u: Sequence[float]) -> torch.Tensor:
    """Visible view B's channel exchange: R, G or B into all three (``channel_exchange_p``)."""
    if u[_U_CHANNEL] < cfg.channel_exchange_p:
        return channel_exchange(img, _index(u[_U_CHANNEL_CHOICE], 3))
    return img


def _infrared_channel_op(img: torch.Tensor, cfg: AugmentConfig,
                         u: Sequence[float]) -> torch.Tensor:
    """Infrared view A's channel operation: with probability ``ir_channel_copy_p`` one of R, G,
    B (copied into all three) or the grayscale slot, uniformly; the slot turns the view gray
    with probability ``ir_gray_p`` and leaves it unchanged otherwise."""
    if not u[_U_CHANNEL] < cfg.ir_channel_copy_p:
        return img
    k = _index(u[_U_CHANNEL_CHOICE], 4)
    if k == 3 and not u[_U_CHANNEL_CHOICE + 1] < cfg.ir_gray_p:
        return img
    return channel_exchange(img, k)


def pseudo_colour(img: torch.Tensor, maps: Sequence[str]) -> torch.Tensor:
    """False colours: output channel c = channel c of colour map ``maps[c]`` looked up at the
    grayscale intensity of ``img``. ``img`` uint8 (3, H, W) -> uint8 (3, H, W)."""
    if len(maps) != 3:
        raise ValueError("pseudo_colour needs one colour map per output channel (3 names)")
    bank = lut_bank(tuple(maps))  # (3 maps, 3 channels, 256)
    gray = _luma(img)  # (H, W) uint8 = LUT index
    out = np.empty((3,) + gray.shape, dtype=np.uint8)
    for c in range(3):
        np.take(bank[c, c], gray, out=out[c])  # channel c of map c
    return torch.from_numpy(out)


def _pick_maps(cfg: AugmentConfig, u: Sequence[float]) -> tuple[str, str, str]:
    """Three formula maps, distinct when there are at least three candidates."""
    pool = list(cfg.ir_pseudo_colour_maps)
    distinct = len(pool) >= 3
    chosen = []
    for c in range(3):
        k = _index(u[_U_CHANNEL_CHOICE + c], len(pool))
        chosen.append(pool.pop(k) if distinct else pool[k])
    return chosen[0], chosen[1], chosen[2]


def pseudo_colour_opencv(img: torch.Tensor, maps: Sequence[str]) -> torch.Tensor:
    """The reference's false colours (``PseudoColor_new``): output channel c = channel c of
    ``cv2.applyColorMap(img, maps[c])``'s BGR output, with OpenCV's own gray conversion of the
    RGB array read as BGR (:func:`~dmdl_cli.data.colour_maps.opencv_gray`).
    ``img`` uint8 (3, H, W) -> uint8 (3, H, W); ``maps``: three names of OPENCV_COLOUR_MAPS."""
    if len(maps) != 3:
        raise ValueError("pseudo_colour_opencv needs one colour map per output channel (3 names)")
    gray = opencv_gray(img.numpy())  # (H, W) uint8 = LUT index
    out = np.empty((3,) + gray.shape, dtype=np.uint8)
    for c in range(3):
        np.take(np.ascontiguousarray(opencv_colour_map(maps[c])[:, c]), gray, out=out[c])
    return torch.from_numpy(out)


def _pseudo_colour_view(img: torch.Tensor, cfg: AugmentConfig,
                        u: Sequence[float]) -> torch.Tensor:
    """Infrared view B's false colours in the recipe's scheme."""
    if cfg.ir_pseudo_colour_scheme == "opencv-per-channel":
        pools = (cfg.ir_opencv_maps_red, cfg.ir_opencv_maps_green, cfg.ir_opencv_maps_blue)
        names = [pool[_index(u[_U_CHANNEL_CHOICE + c], len(pool))] for c, pool in enumerate(pools)]
        return pseudo_colour_opencv(img, names)
    return pseudo_colour(img, _pick_maps(cfg, u))


# --------------------------------------------------------------------------------------------
# Views
# --------------------------------------------------------------------------------------------
def _check_image(image: torch.Tensor) -> None:
    if not isinstance(image, torch.Tensor) or image.dtype != torch.uint8 or image.ndim != 3 \
            or image.shape[0] != 3:
        raise ValueError("augmentation expects a uint8 tensor of shape (3, H, W)")


def _prepare(image: torch.Tensor, cfg: AugmentConfig) -> torch.Tensor:
    _check_image(image)
    if cfg.size is not None and tuple(image.shape[1:]) != cfg.size:
        image = TF.resize(image, list(cfg.size), interpolation=InterpolationMode.BICUBIC,
                          antialias=True)
    return image


def _fresh(view: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    """``view`` as a tensor of its own: a view that no operation touched is the input itself."""
    return view.clone() if view is image else view


def _standard(img: torch.Tensor, cfg: AugmentConfig, u: Sequence[float],
              generator: torch.Generator) -> torch.Tensor:
    return _erase(_geometric(img, cfg, u), cfg, u, generator)


def _view_dmdl_v1(img: torch.Tensor, modality: int, which: str, cfg: AugmentConfig,
                  u: Sequence[float], generator: torch.Generator) -> torch.Tensor:
    """One uint8 view of the ``dmdl-v1`` pipeline."""
    if not cfg.modality_specific or (modality == VISIBLE and which == "a"):
        return _standard(img, cfg, u, generator)
    if modality == VISIBLE:
        return _visible_exchange(_standard(_colour_jitter(img, cfg, u), cfg, u, generator), cfg, u)
    if which == "a":
        return _infrared_channel_op(_standard(img, cfg, u, generator), cfg, u)
    if u[_U_CHANNEL] < cfg.ir_pseudo_colour_p:
        img = _pseudo_colour_view(img, cfg, u)
    return _standard(img, cfg, u, generator)


def _view_reference(img: torch.Tensor, modality: int, which: str, cfg: AugmentConfig,
                    u: Sequence[float], generator: torch.Generator) -> torch.Tensor:
    """One normalised float32 view of the ``reference`` pipeline."""
    specific = cfg.modality_specific
    out = _geometric(img, cfg, u)  # uint8: pad + crop, flip
    if specific and which == "b":
        if modality == VISIBLE:
            out = _colour_jitter(out, cfg, u)
        elif u[_U_CHANNEL] < cfg.ir_pseudo_colour_p:
            out = _pseudo_colour_view(out, cfg, u)
    view = _erase(normalise_images(out), cfg, u, generator, inplace=True)  # float32 (3, H, W)
    if specific and modality == VISIBLE and which == "b":
        view = _visible_exchange(view, cfg, u)
    elif specific and modality == INFRARED and which == "a":
        view = _infrared_channel_op(view, cfg, u)
    return view


def _view(img: torch.Tensor, modality: int, which: str, cfg: AugmentConfig,
          generator: torch.Generator) -> torch.Tensor:
    """One view (``which`` = "a" or "b") of a prepared image, drawn from ``generator``."""
    if modality not in (VISIBLE, INFRARED):
        raise ValueError(f"modality must be {VISIBLE} (visible) or {INFRARED} (infrared), "
                         f"got {modality}")
    u = _draw_uniforms(generator)
    build = _view_reference if cfg.pipeline == "reference" else _view_dmdl_v1
    return build(img, modality, which, cfg, u, generator)


def _view_generators(generator: torch.Generator) -> dict[str, torch.Generator]:
    """One child generator per view, both seeds drawn in order whichever view is built."""
    return {which: _child_generator(generator) for which in VIEWS}


def make_view(image: torch.Tensor, modality: int, config: AugmentConfig,
              generator: torch.Generator, which: str) -> torch.Tensor:
    """View ``which`` ("a" or "b") of one image: exactly the view :func:`make_views` returns in
    that place for the same generator state (both child seeds are drawn either way).

    ``image``: uint8 ``(3, H, W)`` RGB (not modified). ``modality``: 0 visible, 1 infrared.
    Returns ``(3, H', W')`` with ``(H', W') = config.size`` or the input size, of
    :func:`view_dtype`: uint8 (``dmdl-v1``) or normalised float32 (``reference``).
    """
    if which not in VIEWS:
        raise ValueError(f"which must be one of {', '.join(VIEWS)}, got {which!r}")
    img = _prepare(image, config)
    generators = _view_generators(generator)
    return _fresh(_view(img, int(modality), which, config, generators[which]), image)


def make_views(image: torch.Tensor, modality: int, config: AugmentConfig,
               generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The two training views of one image, ``(view_a, view_b)``: each as :func:`make_view`
    returns it. All randomness comes from ``generator`` (two child seeds, one per view)."""
    img = _prepare(image, config)
    generators = _view_generators(generator)
    view_a, view_b = (_fresh(_view(img, int(modality), which, config, generators[which]), image)
                      for which in VIEWS)
    return view_a, view_b


def standard_view(image: torch.Tensor, config: AugmentConfig,
                  generator: torch.Generator) -> torch.Tensor:
    """One standard (baseline) view: the pipeline's visible view A (pad + random crop, flip,
    random erasing; no colour op). ``image`` uint8 ``(3, H, W)`` -> ``(3, H', W')`` of
    :func:`view_dtype`; randomness from ``generator`` (one child seed)."""
    img = _prepare(image, config)
    return _fresh(_view(img, VISIBLE, "a", config, _child_generator(generator)), image)
