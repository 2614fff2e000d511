"""CBT data level: modality-specific two-view augmentation (docs/method.md section 4).

Every training image yields two views. With ``AugmentConfig.modality_specific`` (DMDL):

* visible view A: pad + random crop, horizontal flip, random erasing;
* visible view B: colour jitter, pad + random crop, flip, random erasing, channel exchange
  (all three channels replaced by one randomly chosen channel);
* infrared view A: pad + random crop, flip, random erasing, random channel copy / grayscale;
* infrared view B: pseudo-colour (the IR intensity looked up in a colour map, a different map per
  output channel, chosen at random), pad + random crop, flip, random erasing.

With ``modality_specific=False`` (the baseline) both views of every image are two independent
draws of the standard pipeline (crop, flip, erasing): no colour operation is ever applied.

Images are ``uint8`` tensors ``(3, H, W)`` (RGB, channel first) in and out; normalisation to
float happens on the device in the training loop. Crop, flip, erasing and resizing use
``torchvision.transforms.v2.functional``; the colour jitter, the grayscale and the colour-map
lookup are small numpy kernels with the same semantics (checked against torchvision in the tests)
that run about three times faster on one core: the jitter dominates the cost of a visible view B.
Colour operations that remap intensities (jitter, pseudo-colour) act before the crop, so the
zero padding stays black; channel copies act last, after erasing, so their view stays gray.
Every random decision is drawn from the ``torch.Generator`` handed in, never from the global
RNG, so a view is a pure function of ``(image, modality, config, generator state)`` in any
process or DataLoader worker.

Randomness layout: :func:`make_views` draws two child seeds from its generator, one per view.
Each view then draws one fixed-size block of uniforms (``_NUM_UNIFORMS``) and every decision
reads its own slot of that block, so enabling or disabling one operation never shifts the random
numbers of another. Only the per-pixel noise of random erasing is drawn after the block.
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

from dmdl_cli.data.index import INFRARED, VISIBLE
from dmdl_cli.recipe import COLOUR_MAPS, ERASING_ATTEMPTS_MAX, AugmentRecipe

__all__ = [
    "AugmentConfig",
    "COLOUR_MAPS",
    "colour_map_lut",
    "make_views",
    "standard_view",
    "pseudo_colour",
    "channel_exchange",
    "jitter_colour",
]

# ImageNet channel means as uint8: the "mean" erasing fill.
_IMAGENET_MEAN_U8 = (124, 116, 104)


# --------------------------------------------------------------------------------------------
# Colour maps for the infrared pseudo-colour view
# --------------------------------------------------------------------------------------------
def _clip01(x: np.ndarray) -> np.ndarray:
    return np.clip(x, 0.0, 1.0)


def _map_jet(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    # Piecewise-linear blue -> cyan -> yellow -> red.
    return (_clip01(1.5 - np.abs(4 * x - 3)), _clip01(1.5 - np.abs(4 * x - 2)),
            _clip01(1.5 - np.abs(4 * x - 1)))


def _map_hot(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    # Black -> red -> yellow -> white.
    return _clip01(3 * x), _clip01(3 * x - 1), _clip01(3 * x - 2)


def _map_hsv(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    # Full hue circle at saturation = value = 1.
    return (_clip01(np.abs(6 * x - 3) - 1), _clip01(2 - np.abs(6 * x - 2)),
            _clip01(2 - np.abs(6 * x - 4)))


def _map_ocean(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    # Green-blue to white (gnuplot formulae 23, 28, 3).
    return _clip01(3 * x - 2), _clip01(np.abs((3 * x - 1) / 2)), x


def _map_rainbow(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    # Purple -> red (gnuplot formulae 33, 13, 10).
    return _clip01(np.abs(2 * x - 0.5)), np.sin(np.pi * x), np.cos(np.pi * x / 2)


def _map_gnuplot(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    # Black -> blue/purple -> yellow (gnuplot formulae 7, 5, 15).
    return np.sqrt(x), x ** 3, _clip01(np.sin(2 * np.pi * x))


def _map_cool(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return x, 1 - x, np.ones_like(x)


def _map_spring(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return np.ones_like(x), x, 1 - x


def _map_summer(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return x, 0.5 + 0.5 * x, np.full_like(x, 0.4)


def _map_winter(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return np.zeros_like(x), x, 1 - 0.5 * x


def _map_autumn(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return np.ones_like(x), x, np.zeros_like(x)


_MAP_FORMULAE = {
    "jet": _map_jet,
    "hot": _map_hot,
    "hsv": _map_hsv,
    "ocean": _map_ocean,
    "rainbow": _map_rainbow,
    "gnuplot": _map_gnuplot,
    "cool": _map_cool,
    "spring": _map_spring,
    "summer": _map_summer,
    "winter": _map_winter,
    "autumn": _map_autumn,
}
# one formula per name the recipe accepts (recipe.COLOUR_MAPS; a test checks they agree)


def colour_map_lut(name: str) -> np.ndarray:
    """The colour map ``name`` as a lookup table: ``uint8 (256, 3)``, row v = RGB of intensity v."""
    try:
        formula = _MAP_FORMULAE[name]
    except KeyError:
        raise ValueError(f"unknown colour map {name!r}; known: {', '.join(COLOUR_MAPS)}") from None
    x = np.linspace(0.0, 1.0, 256)
    rgb = np.stack([_clip01(np.asarray(c, dtype=np.float64)) for c in formula(x)], axis=1)
    return np.rint(rgb * 255.0).astype(np.uint8)  # (256, 3)


_LUT_CACHE: dict[tuple[str, ...], np.ndarray] = {}


def _lut_bank(names: tuple[str, ...]) -> np.ndarray:
    """``uint8 (M, 3, 256)``: channel c of map m at intensity v is ``bank[m, c, v]`` (cached)."""
    bank = _LUT_CACHE.get(names)
    if bank is None:
        bank = np.ascontiguousarray(np.stack([colour_map_lut(n).T for n in names]))
        _LUT_CACHE[names] = bank
    return bank


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

    Erasing fills (``erasing_fill``): ``"random"`` per-pixel uniform noise (the reference's pixel
    mode), ``"mean"`` the ImageNet mean colour, ``"zero"`` black. Jitter factors are drawn in
    ``[max(0, 1 - s), 1 + s]``, the hue shift in ``[-h, h]``, applied in a random order. IR
    view A's channel copy is one of R, G, B or the grayscale (uniform over the four). The
    pseudo-colour view's output channel c takes channel c of its own map, three distinct maps
    drawn per image when there are at least three candidates.
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
_U_CHANNEL_CHOICE = _U_CHANNEL + 1  # 3: channel choice, or the three colour-map choices
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
# Operations (uint8 (3, H, W) in and out)
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


def _erase(img: torch.Tensor, cfg: AugmentConfig, u: Sequence[float],
           generator: torch.Generator) -> torch.Tensor:
    """Random erasing of one box (probability ``erasing_p``); returns a new tensor when applied."""
    if not u[_U_ERASE] < cfg.erasing_p:
        return img
    _, h, w = img.shape
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
            i = _index(u[_U_ERASE_POS_Y], h - eh + 1)
            j = _index(u[_U_ERASE_POS_X], w - ew + 1)
            if cfg.erasing_fill == "random":
                value = torch.randint(0, 256, (3, eh, ew), generator=generator, dtype=torch.uint8)
            elif cfg.erasing_fill == "mean":
                value = torch.tensor(_IMAGENET_MEAN_U8, dtype=torch.uint8).view(3, 1, 1)
            else:
                value = torch.zeros((3, 1, 1), dtype=torch.uint8)
            return TF.erase(img, i, j, eh, ew, value, inplace=False)
    return img


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
    image when ``channel == 3``. ``uint8 (3, H, W)`` -> new ``uint8 (3, H, W)``."""
    if channel == 3:
        gray = _luma(img)
        return torch.from_numpy(np.broadcast_to(gray, (3,) + gray.shape).copy())
    if channel not in (0, 1, 2):
        raise ValueError(f"channel must be 0, 1, 2 or 3 (grayscale), got {channel}")
    return img[channel:channel + 1].expand(3, -1, -1).clone()


def pseudo_colour(img: torch.Tensor, maps: Sequence[str]) -> torch.Tensor:
    """False colours: output channel c = channel c of colour map ``maps[c]`` looked up at the
    grayscale intensity of ``img``. ``img`` uint8 (3, H, W) -> uint8 (3, H, W)."""
    if len(maps) != 3:
        raise ValueError("pseudo_colour needs one colour map per output channel (3 names)")
    bank = _lut_bank(tuple(maps))  # (3 maps, 3 channels, 256)
    gray = _luma(img)  # (H, W) uint8 = LUT index
    out = np.empty((3,) + gray.shape, dtype=np.uint8)
    for c in range(3):
        np.take(bank[c, c], gray, out=out[c])  # channel c of map c
    return torch.from_numpy(out)


def _pick_maps(cfg: AugmentConfig, u: Sequence[float]) -> tuple[str, str, str]:
    """Three colour maps, distinct when there are at least three candidates."""
    pool = list(cfg.ir_pseudo_colour_maps)
    distinct = len(pool) >= 3
    chosen = []
    for c in range(3):
        k = _index(u[_U_CHANNEL_CHOICE + c], len(pool))
        chosen.append(pool.pop(k) if distinct else pool[k])
    return chosen[0], chosen[1], chosen[2]


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


def _view(img: torch.Tensor, modality: int, which: str, cfg: AugmentConfig,
          generator: torch.Generator) -> torch.Tensor:
    """One view (``which`` = "a" or "b") of a prepared image, drawn from ``generator``."""
    u = _draw_uniforms(generator)
    if not cfg.modality_specific:
        return _standard(img, cfg, u, generator)
    if modality == VISIBLE:
        if which == "a":
            return _standard(img, cfg, u, generator)
        out = _standard(_colour_jitter(img, cfg, u), cfg, u, generator)
        if u[_U_CHANNEL] < cfg.channel_exchange_p:
            out = channel_exchange(out, _index(u[_U_CHANNEL_CHOICE], 3))
        return out
    if modality == INFRARED:
        if which == "a":
            out = _standard(img, cfg, u, generator)
            if u[_U_CHANNEL] < cfg.ir_channel_copy_p:
                out = channel_exchange(out, _index(u[_U_CHANNEL_CHOICE], 4))
            return out
        if u[_U_CHANNEL] < cfg.ir_pseudo_colour_p:
            img = pseudo_colour(img, _pick_maps(cfg, u))
        return _standard(img, cfg, u, generator)
    raise ValueError(f"modality must be {VISIBLE} (visible) or {INFRARED} (infrared), "
                     f"got {modality}")


def make_views(image: torch.Tensor, modality: int, config: AugmentConfig,
               generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The two training views of one image.

    ``image``: uint8 ``(3, H, W)`` RGB (not modified). ``modality``: 0 visible, 1 infrared.
    Returns ``(view_a, view_b)``, each uint8 ``(3, H', W')`` with ``(H', W') = config.size`` or
    the input size. All randomness comes from ``generator`` (two child seeds, one per view).
    """
    img = _prepare(image, config)
    gen_a = _child_generator(generator)
    gen_b = _child_generator(generator)
    modality = int(modality)
    view_a = _fresh(_view(img, modality, "a", config, gen_a), image)
    view_b = _fresh(_view(img, modality, "b", config, gen_b), image)
    return view_a, view_b


def standard_view(image: torch.Tensor, config: AugmentConfig,
                  generator: torch.Generator) -> torch.Tensor:
    """One standard (baseline) view: pad + random crop, flip, random erasing; no colour op.

    ``image`` uint8 ``(3, H, W)`` -> uint8 ``(3, H', W')``; randomness from ``generator``.
    """
    img = _prepare(image, config)
    gen = _child_generator(generator)
    return _fresh(_standard(img, config, _draw_uniforms(gen), gen), image)
