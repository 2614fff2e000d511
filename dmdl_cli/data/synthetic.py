"""The embedded synthetic visible-infrared person data set.

Figures of people, each identity with a fixed body shape, garment colours, garment textures,
garment materials and carried object, rendered by visible cameras (RGB) and infrared cameras
(single-channel intensity replicated into three channels). Everything is drawn from a seed,
deterministically: the same seed gives the same bytes. The generator needs numpy and PIL only and
writes the default set (90 identities, 2,700 images) in a few seconds.

The set carries the difficulty DMDL exists for. The cues that survive the change of modality
(body shape, garment texture, garment material, carried object) vary little between identities
compared with the per-image nuisance (pose, scale, noise), while the visible-only cues (garment
colour, the colour cast of each visible camera) are strong. A model trained within the visible
modality therefore learns colour, which is of no use on infrared images; the cross-modal cues are
learnable but must be sought. Every strength is a key of the recipe's ``synthetic:`` section
(:class:`~dmdl_cli.recipe.SyntheticRecipe`, also named :data:`SyntheticConfig` here).

Rendering is analytic: each body part is a signed-distance shape in figure coordinates (unit =
figure height), turned into an anti-aliased coverage mask and composited back to front. See
``docs/synthetic.md`` for the generative model, the defaults and the split sizes.

Layouts written by :func:`generate`:

* ``sysu``: ``cam{c}/{pid:04d}/{n:04d}.jpg`` for visible cams 1, 2, 4, 5 and IR cams 3, 6, plus
  ``exp/train_id.txt``, ``val_id.txt``, ``test_id.txt`` (one comma-separated line each);
* ``regdb``: ``Visible/{pid:04d}/{n:04d}.jpg`` (camera 1), ``Thermal/{pid:04d}/{n:04d}.jpg``
  (camera 2) and ``idx/{train,test}_{visible,thermal}_{t}.txt`` for trials 1..10, each a random
  half/half split of the identities (lines ``relative/path pid``);
* ``llcm``: ``{train,test}_{vis,nir}/cam{k}/{pid:04d}/{n:04d}.jpg`` (visible cams 1-4, NIR cams
  1, 2, 4; one camera number is one place for both modalities) and
  ``idx/{train,test}_{vis,nir}.txt`` (lines ``relative/path pid``).

Each layout also gets ``synthetic.json`` (seed, configuration, counts). The tree is built in a
temporary folder next to ``root`` and renamed into place when complete, so a killed run never
leaves a partial data set behind.
"""
from __future__ import annotations

import functools
import json
import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image

from dmdl_cli.atomic import dir_mode
from dmdl_cli.data.index import INFRARED, VISIBLE
from dmdl_cli.errors import DmdlError
from dmdl_cli.recipe import SyntheticRecipe

__all__ = [
    "SyntheticConfig",
    "Identity",
    "Camera",
    "LAYOUTS",
    "SYSU_CAMERAS",
    "REGDB_CAMERAS",
    "LLCM_VIS_CAMS",
    "LLCM_NIR_CAMS",
    "DEFAULT_IMAGES_PER_CAM",
    "REGDB_TRIALS",
    "make_identity",
    "make_camera",
    "render_image",
    "split_ids",
    "generate",
]

LAYOUTS = ("sysu", "regdb", "llcm")
# camera number -> modality (SYSU-MM01: visible 1, 2, 4, 5; infrared 3, 6)
SYSU_CAMERAS: dict[int, int] = {1: VISIBLE, 2: VISIBLE, 3: INFRARED, 4: VISIBLE, 5: VISIBLE, 6: INFRARED}
REGDB_CAMERAS: dict[int, int] = {1: VISIBLE, 2: INFRARED}
LLCM_VIS_CAMS = (1, 2, 3, 4)
LLCM_NIR_CAMS = (1, 2, 4)
REGDB_TRIALS = 10
DEFAULT_IMAGES_PER_CAM = 5

# stream tags: separate random streams for identities, cameras, images and splits
_TAG_ID, _TAG_CAM, _TAG_SCENE, _TAG_IMG, _TAG_SPLIT, _TAG_TRIAL = 101, 202, 303, 404, 505, 606


# The generator's settings are the recipe's `synthetic:` section (declared, defaulted and
# validated in dmdl_cli/recipe.py); this name is kept for code that builds them directly.
SyntheticConfig = SyntheticRecipe


# ----------------------------------------------------------------------------------------------
# identities and cameras
# ----------------------------------------------------------------------------------------------

PATTERNS = ("plain", "stripes", "checks")
OBJECTS = ("none", "bag_left", "bag_right", "backpack")


@dataclass(frozen=True)
class Pattern:
    """A garment pattern: ``kind`` in :data:`PATTERNS`, ``period`` (figure units), ``angle``
    (radians, 0 = vertical stripes)."""

    kind: str = "plain"
    period: float = 0.05
    angle: float = 0.0


@dataclass(frozen=True, eq=False)
class Identity:
    """Everything fixed about one person (figure units: fraction of the figure height)."""

    pid: int
    height: float           # figure height factor (1 = average)
    head: float             # head radius (vertical)
    shoulder: float         # half-width at the shoulders
    hip: float              # half-width at the hips
    leg: float              # leg length
    upper_rgb: np.ndarray   # (3,) visible colour of the upper garment
    lower_rgb: np.ndarray   # (3,)
    skin_rgb: np.ndarray    # (3,)
    hair_rgb: np.ndarray    # (3,)
    upper_pattern: Pattern
    lower_pattern: Pattern
    upper_material: float   # thermal brightness of the upper garment (IR intensity)
    lower_material: float
    heat: float             # body heat offset (skin and garments in IR)
    obj: str                # one of OBJECTS
    obj_size: tuple[float, float]  # (half-width, half-height)
    obj_rgb: np.ndarray
    obj_material: float


def _luminance(rgb: np.ndarray) -> float:
    return float(rgb @ np.array([0.299, 0.587, 0.114]))


def make_identity(pid: int, seed: int, cfg: SyntheticConfig) -> Identity:
    """Draw identity ``pid`` of the data set with ``seed`` (independent of every other draw)."""
    rng = np.random.default_rng([seed, pid, _TAG_ID])
    s = cfg.shape_spread

    def prop(base: float) -> float:
        return base * (1.0 + s * float(np.clip(rng.standard_normal(), -2.5, 2.5)))

    height, head, shoulder, hip, leg = prop(1.0), prop(0.065), prop(0.125), prop(0.095), prop(0.46)

    def material() -> float:
        return 0.5 + cfg.material_spread * (float(rng.uniform()) - 0.5)

    def garment_colour(mat: float) -> np.ndarray:
        rgb = 0.5 + cfg.colour_spread * (rng.uniform(size=3) - 0.5)
        # the visible luminance is pulled towards the IR brightness (coupling > 0, reflected
        # near-infrared light) or towards its inverse (coupling < 0, thermal emission)
        rel = (mat - 0.5) / max(cfg.material_spread, 1e-6)  # in [-0.5, 0.5]
        target = 0.5 + 0.7 * rel * np.sign(cfg.material_coupling)
        rgb = rgb + abs(cfg.material_coupling) * (target - _luminance(rgb))
        return np.clip(rgb, 0.03, 0.97)

    def pattern(prob: float) -> Pattern:
        if rng.uniform() >= prob:
            rng.uniform(size=3)  # keep the stream aligned whatever the outcome
            return Pattern()
        kind_u, period_u, angle_u = rng.uniform(size=3)
        kind = "stripes" if kind_u < 0.65 else "checks"
        period = 0.045 + 0.045 * period_u
        angle = np.pi * angle_u if kind == "stripes" else (np.pi / 4) * (angle_u < 0.5)
        return Pattern(kind, float(period), float(angle))

    upper_material, lower_material = material(), material()
    upper_rgb, lower_rgb = garment_colour(upper_material), garment_colour(lower_material)
    tone = rng.uniform()
    skin_rgb = np.array([0.95, 0.78, 0.65]) * (0.45 + 0.55 * tone)
    hair_rgb = rng.uniform(0.05, 0.45) * np.array([1.0, 0.85, 0.7]) + rng.uniform(0, 0.1, size=3)
    upper_pattern = pattern(cfg.texture_prob)
    lower_pattern = pattern(cfg.texture_prob / 2)
    heat = 0.06 * float(rng.uniform(-1, 1))
    obj_u, w_u, h_u = rng.uniform(size=3)
    if obj_u >= cfg.object_prob:
        obj = "none"
    else:
        obj = OBJECTS[1 + min(2, int(3 * obj_u / max(cfg.object_prob, 1e-9)))]
    obj_size = (0.045 + 0.04 * float(w_u), 0.05 + 0.05 * float(h_u))
    obj_rgb = np.clip(rng.uniform(0.05, 0.8, size=3), 0, 1)
    obj_material = 0.35 + 0.25 * float(rng.uniform())
    return Identity(
        pid=pid, height=height, head=head, shoulder=shoulder, hip=hip, leg=leg,
        upper_rgb=upper_rgb, lower_rgb=lower_rgb, skin_rgb=skin_rgb, hair_rgb=hair_rgb,
        upper_pattern=upper_pattern, lower_pattern=lower_pattern,
        upper_material=upper_material, lower_material=lower_material, heat=heat,
        obj=obj, obj_size=obj_size, obj_rgb=obj_rgb, obj_material=obj_material,
    )


@dataclass(frozen=True, eq=False)
class Camera:
    """One camera: its modality and its look (colour cast, light, background)."""

    cam: int
    modality: int
    gain: np.ndarray        # (3,) per-channel gain (visible); ones for infrared
    brightness: float       # global gain
    horizon: float          # floor/wall boundary, fraction of the image height
    wall: np.ndarray        # (3,) visible wall colour; IR: wall intensity in [0]
    floor: np.ndarray       # (3,)
    panel_period: float     # background panel period (pixels)
    panel_contrast: float
    warm_spot: tuple[float, float, float]  # (x, y, strength): a warm object in IR backgrounds
    figure_scale: float     # camera distance: mean figure size
    noise: float            # per-pixel noise sd
    background: np.ndarray  # (H, W, 3) visible, (H, W) infrared, values in [0, 1]


def make_camera(cam: int, modality: int, seed: int, cfg: SyntheticConfig) -> Camera:
    """Draw camera ``cam`` of ``modality``. The place (horizon, panels) depends on the camera
    number only, so the visible and infrared cameras with one number (LLCM) share a scene."""
    place = np.random.default_rng([seed, cam, _TAG_SCENE])
    horizon = float(place.uniform(0.55, 0.8))
    panel_period = float(place.uniform(6, 16))
    panel_contrast = float(place.uniform(0.03, 0.12))
    figure_scale = float(place.uniform(0.8, 0.9))
    warm_spot = (float(place.uniform(0, 1)), float(place.uniform(0.1, 0.6)), float(place.uniform(0, 0.25)))
    rng = np.random.default_rng([seed, cam, modality, _TAG_CAM])
    if modality == VISIBLE:
        gain = 1.0 + cfg.cast_strength * rng.uniform(-1, 1, size=3)
        brightness = float(rng.uniform(0.85, 1.1))
        wall = rng.uniform(0.25, 0.85, size=3)
        floor = rng.uniform(0.15, 0.6, size=3)
        noise = cfg.pixel_noise
    else:
        gain = np.ones(3)
        brightness = float(rng.uniform(0.9, 1.1))
        wall = np.full(3, rng.uniform(0.12, 0.3))
        floor = np.full(3, rng.uniform(0.1, 0.3))
        noise = cfg.ir_noise
    H, W = cfg.height, cfg.width
    ys, xs = np.mgrid[0:H, 0:W].astype(np.float64) + 0.5
    wall_mask = ys < horizon * H
    panels = panel_contrast * np.sign(np.sin(2 * np.pi * xs / panel_period))
    floor_shade = 1.0 - 0.3 * (ys / H - horizon)
    background = np.where(wall_mask[..., None], wall * (1 + panels)[..., None],
                          floor * floor_shade[..., None])
    if modality == INFRARED:
        wx, wy, ws = warm_spot
        background = background[..., 0] + ws * np.exp(
            -(((xs / W - wx) / 0.15) ** 2 + ((ys / H - wy) / 0.1) ** 2))
    return Camera(cam=cam, modality=modality, gain=gain, brightness=brightness, horizon=horizon,
                  wall=wall, floor=floor, panel_period=panel_period, panel_contrast=panel_contrast,
                  warm_spot=warm_spot, figure_scale=figure_scale, noise=noise,
                  background=background)


# ----------------------------------------------------------------------------------------------
# rendering
# ----------------------------------------------------------------------------------------------

def _coverage(sdf: np.ndarray, px: float) -> np.ndarray:
    """Anti-aliased coverage of the inside (sdf < 0) of a shape; ``px`` = pixel size."""
    return np.clip(0.5 - sdf / px, 0.0, 1.0)


def _capsule(u, v, a, b, r):
    """Signed distance to a segment a-b thickened by r."""
    pu, pv = u - a[0], v - a[1]
    bu, bv = b[0] - a[0], b[1] - a[1]
    h = np.clip((pu * bu + pv * bv) / (bu * bu + bv * bv + 1e-12), 0.0, 1.0)
    return np.hypot(pu - bu * h, pv - bv * h) - r


def _ellipse(u, v, cu, cv, ru, rv):
    return (np.hypot((u - cu) / ru, (v - cv) / rv) - 1.0) * min(ru, rv)


def _trapezoid(u, v, cu, v0, v1, hw0, hw1):
    """Vertical trapezoid from v0 (half-width hw0) to v1 (half-width hw1)."""
    t = np.clip((v - v0) / (v1 - v0), 0.0, 1.0)
    dx = np.abs(u - cu) - (hw0 + (hw1 - hw0) * t)
    dy = np.maximum(v0 - v, v - v1)
    return np.maximum(dx, dy)


def _pattern(p: Pattern, u, v, phase: float) -> np.ndarray:
    """Pattern field in [-1, 1] (soft square waves) in garment coordinates."""
    if p.kind == "plain":
        return np.zeros_like(u)
    c, s = np.cos(p.angle), np.sin(p.angle)
    a = 2 * np.pi * (c * u + s * v) / p.period + phase
    wave = np.clip(2.5 * np.sin(a), -1.0, 1.0)
    if p.kind == "checks":
        b = 2 * np.pi * (-s * u + c * v) / p.period + phase
        wave = wave * np.clip(2.5 * np.sin(b), -1.0, 1.0)
    return wave


def _blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """Separable gaussian blur of a 2-D array (edges replicated)."""
    if sigma <= 0:
        return img
    r = max(1, int(np.ceil(2.5 * sigma)))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k /= k.sum()
    pad = np.pad(img, r, mode="edge")
    tmp = sum(k[i] * pad[:, i:i + img.shape[1]] for i in range(2 * r + 1))
    return sum(k[i] * tmp[i:i + img.shape[0]] for i in range(2 * r + 1))


@functools.lru_cache(maxsize=8)
def _pixel_grid(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (ys, xs), each (H, W) float64, read-only."""
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64) + 0.5
    ys.flags.writeable = False
    xs.flags.writeable = False
    return ys, xs


@dataclass(frozen=True)
class _ImageDraws:
    """Every per-image random draw, in the order drawn (the same whatever the modality)."""

    pose: np.ndarray    # (10,) in [-1, 1]: scale, feet height, centre, shear, limbs (4), stride
    flip: bool
    phases: np.ndarray  # (2,) pattern phases of the upper and lower garment
    light: float        # global brightness gain
    tint: np.ndarray    # (3, 3) colour noise of the upper garment, lower garment, object
    occl: np.ndarray    # (4,) occlusion: whether, which kind, its size, its side and shade


def _draw_image(rng: np.random.Generator, cfg: SyntheticConfig) -> _ImageDraws:
    pose = rng.uniform(-1, 1, size=10)
    flip = rng.uniform() < cfg.flip_prob
    phases = rng.uniform(0, 2 * np.pi, size=2)
    light = 1.0 + cfg.illum_jitter * rng.uniform(-1, 1)
    tint = cfg.colour_noise * rng.standard_normal(size=(3, 3))  # upper, lower, object
    occl = rng.uniform(size=4)
    return _ImageDraws(pose, flip, phases, light, tint, occl)


@dataclass
class _Canvas:
    """An image being painted: its pixels and the figure coordinates of each pixel.

    ``u`` (horizontal, sheared) and ``v`` (0 at the top of the head, 1 at the feet) are (H, W)
    in figure units; shapes are composited back to front with anti-aliased coverage.
    """

    out: np.ndarray  # (H, W, 3) visible, (H, W) infrared, values in [0, 1]
    u: np.ndarray    # (H, W)
    v: np.ndarray    # (H, W)
    top_y: float     # pixel row of v = 0
    fig_h: float     # figure height in pixels
    cx: float        # pixel column of u = 0
    shear: float
    ir: bool
    heat: float      # the identity's body heat offset (infrared)

    def window(self, u0: float, u1: float, v0: float, v1: float) -> tuple[slice, slice]:
        """Pixel window holding the figure-coordinate box [u0, u1] x [v0, v1] (+1 px)."""
        H, W = self.u.shape
        top_y, fig_h, cx, shear = self.top_y, self.fig_h, self.cx, self.shear
        ya, yb = top_y + v0 * fig_h, top_y + v1 * fig_h
        xs_ = [cx + (uu - shear * (vv - 0.5)) * fig_h for uu in (u0, u1) for vv in (v0, v1)]
        r0, r1 = max(0, int(ya) - 1), min(H, int(np.ceil(yb)) + 2)
        c0, c1 = max(0, int(min(xs_)) - 1), min(W, int(np.ceil(max(xs_))) + 2)
        return slice(r0, max(r0, r1)), slice(c0, max(c0, c1))

    def paint(self, box: tuple[float, float, float, float], sdf, value) -> None:
        """Composite ``value`` over the shape ``sdf(u, v)`` inside the figure box ``box``."""
        win = self.window(*box)
        cov = _coverage(sdf(self.u[win], self.v[win]), 1.0 / self.fig_h)
        val = value[win] if isinstance(value, np.ndarray) and value.ndim >= 2 else value
        if self.ir:
            self.out[win] = self.out[win] * (1 - cov) + val * cov
        else:
            self.out[win] = self.out[win] * (1 - cov)[..., None] + val * cov[..., None]

    def garment(self, rgb, material, modulation):
        """A garment's value: its thermal brightness (infrared) or colour, times ``modulation``."""
        if self.ir:
            return (material + self.heat) * modulation
        return np.clip(rgb, 0, 1)[None, None, :] * np.asarray(modulation)[..., None]

    def skin(self, ident: Identity):
        return (0.88 + self.heat) if self.ir else ident.skin_rgb


def _capsule_box(a, b, r):
    return (min(a[0], b[0]) - r, max(a[0], b[0]) + r, min(a[1], b[1]) - r, max(a[1], b[1]) + r)


def _shoulder_v(ident: Identity) -> float:
    return 2 * ident.head + 0.03


def _hip_v(ident: Identity) -> float:
    return 1.0 - ident.leg


def _canvas(ident: Identity, camera: Camera, d: _ImageDraws, cfg: SyntheticConfig) -> _Canvas:
    """Place the figure: its size, position and lean in this image, on the camera's background."""
    H, W = cfg.height, cfg.width
    ys, xs = _pixel_grid(H, W)
    pose = d.pose
    fig_h = H * camera.figure_scale * ident.height * (1.0 + cfg.scale_jitter * pose[0])
    feet_y = H * 0.5 + fig_h * 0.5 + cfg.shift_jitter * W * 0.5 * pose[1]
    top_y = feet_y - fig_h
    cx = W * 0.5 + cfg.shift_jitter * W * pose[2]
    shear = cfg.shear_jitter * pose[3]
    v = (ys - top_y) / fig_h
    u = (xs - cx) / fig_h + shear * (v - 0.5)
    return _Canvas(out=camera.background.copy(), u=u, v=v, top_y=top_y, fig_h=fig_h, cx=cx,
                   shear=shear, ir=camera.modality == INFRARED, heat=ident.heat)


def _paint_legs(c: _Canvas, ident: Identity, d: _ImageDraws, cfg: SyntheticConfig) -> None:
    """Legs in the lower garment, and shoes."""
    hp, hip_v = ident.hip, _hip_v(ident)
    stride = cfg.limb_jitter * d.pose[8]
    lower_mod = 1.0 + cfg.texture_contrast * _pattern(ident.lower_pattern, c.u, c.v, d.phases[1])
    lower_val = c.garment(ident.lower_rgb + d.tint[1], ident.lower_material, lower_mod)
    leg_r = 0.045 * hp / 0.095
    for side in (-1, 1):
        hip_pt = (side * hp * 0.5, hip_v)
        foot = (side * (hp * 0.5 + 0.01) + side * stride, 0.975)
        c.paint(_capsule_box(hip_pt, foot, leg_r),
                lambda uu, vv: _capsule(uu, vv, hip_pt, foot, leg_r), lower_val)
        fu = foot[0] + 0.012 * side
        c.paint((fu - 0.04, fu + 0.04, 0.967, 1.003),
                lambda uu, vv: _ellipse(uu, vv, fu, 0.985, 0.04, 0.018),
                0.35 if c.ir else np.array([0.12, 0.1, 0.1]))


def _paint_torso(c: _Canvas, ident: Identity, d: _ImageDraws, cfg: SyntheticConfig):
    """The upper garment's torso; returns its value (the sleeves wear it too)."""
    sh, hp, shoulder_v, hip_v = ident.shoulder, ident.hip, _shoulder_v(ident), _hip_v(ident)
    shade = 1.0 - 0.25 * np.clip(np.abs(c.u) / (sh + 1e-6), 0, 1) ** 2
    upper_mod = shade * (1.0 + cfg.texture_contrast * _pattern(ident.upper_pattern, c.u, c.v, d.phases[0]))
    upper_val = c.garment(ident.upper_rgb + d.tint[0], ident.upper_material, upper_mod)
    c.paint((-sh, sh, shoulder_v - 0.01, hip_v + 0.04),
            lambda uu, vv: np.minimum(_trapezoid(uu, vv, 0.0, shoulder_v, hip_v + 0.04, sh, hp),
                                      _ellipse(uu, vv, 0.0, shoulder_v + 0.02, sh, 0.03)),
            upper_val)
    return upper_val


def _paint_head(c: _Canvas, ident: Identity) -> None:
    """Neck, head and hair."""
    head_r, shoulder_v = ident.head, _shoulder_v(ident)
    skin = c.skin(ident)
    hair = (0.62 + ident.heat) if c.ir else ident.hair_rgb
    neck_a, neck_b = (0.0, 1.6 * head_r), (0.0, shoulder_v)
    c.paint(_capsule_box(neck_a, neck_b, 0.025),
            lambda uu, vv: _capsule(uu, vv, neck_a, neck_b, 0.025), skin)
    head_box = (-head_r, head_r, -0.01, 2 * head_r + 0.01)
    c.paint(head_box, lambda uu, vv: _ellipse(uu, vv, 0.0, head_r, 0.8 * head_r, head_r), skin)
    c.paint(head_box,
            lambda uu, vv: np.maximum(_ellipse(uu, vv, 0.0, 0.9 * head_r, 0.85 * head_r, 0.95 * head_r),
                                      vv - 0.9 * head_r),
            hair)


def _paint_object(c: _Canvas, ident: Identity, d: _ImageDraws, swing: np.ndarray) -> None:
    """The carried object: a backpack with straps, or a bag on a shoulder strap."""
    sh, shoulder_v, hip_v = ident.shoulder, _shoulder_v(ident), _hip_v(ident)
    obj_val = (ident.obj_material if c.ir else np.clip(ident.obj_rgb + d.tint[2], 0, 1))
    ow, oh = ident.obj_size
    if ident.obj == "backpack":
        p0, p1 = shoulder_v + 0.02, shoulder_v + 0.02 + 2 * oh + 0.05
        c.paint((-ow - 0.04, ow + 0.04, p0, p1),
                lambda uu, vv: _trapezoid(uu, vv, 0.0, p0, p1, ow + 0.03, ow + 0.04), obj_val)
        for side in (-1, 1):  # straps
            sa, sb = (side * (ow + 0.03), shoulder_v + 0.02), (side * sh * 0.9, shoulder_v + 0.01)
            c.paint(_capsule_box(sa, sb, 0.008), lambda uu, vv: _capsule(uu, vv, sa, sb, 0.008), obj_val)
    elif ident.obj in ("bag_left", "bag_right"):
        side = -1 if ident.obj == "bag_left" else 1
        bag_u = side * (sh + ow + 0.01)
        bag_v = hip_v + 0.02 + 0.3 * abs(swing[0])
        sa, sb = (-side * sh * 0.7, shoulder_v), (bag_u, bag_v - oh)
        c.paint(_capsule_box(sa, sb, 0.007), lambda uu, vv: _capsule(uu, vv, sa, sb, 0.007), obj_val)
        c.paint((bag_u - ow, bag_u + ow, bag_v - oh, bag_v + oh),
                lambda uu, vv: _trapezoid(uu, vv, bag_u, bag_v - oh, bag_v + oh, ow, ow), obj_val)


def _paint_arms(c: _Canvas, ident: Identity, upper_val, swing: np.ndarray) -> None:
    """Sleeves (in the upper garment) and hands, in front of everything else."""
    sh, shoulder_v, hip_v = ident.shoulder, _shoulder_v(ident), _hip_v(ident)
    skin = c.skin(ident)
    arm_r = 0.03 * sh / 0.125
    for i, side in enumerate((-1, 1)):
        shoulder_pt = (side * (sh - arm_r), shoulder_v + 0.025)
        hand = (side * (sh + 0.02) + swing[2 * i], hip_v + 0.03 + 0.5 * swing[2 * i + 1])
        c.paint(_capsule_box(shoulder_pt, hand, arm_r),
                lambda uu, vv: _capsule(uu, vv, shoulder_pt, hand, arm_r), upper_val)
        hu, hv = hand[0], hand[1] + 0.03
        c.paint((hu - 0.024, hu + 0.024, hv - 0.028, hv + 0.028),
                lambda uu, vv: _ellipse(uu, vv, hu, hv, 0.024, 0.028), skin)


def _occlude(out: np.ndarray, occl: np.ndarray, ir: bool, cfg: SyntheticConfig) -> None:
    """A partial occlusion, with probability ``occlusion_prob``: an obstacle or a post."""
    if occl[0] < cfg.occlusion_prob:
        H, W = out.shape[:2]
        if occl[1] < 0.6:  # an obstacle at the bottom
            win = (slice(int(H * (1.0 - (0.15 + 0.2 * occl[2]))), H), slice(0, W))
        else:  # a post at one side
            edge = int(W * (0.2 + 0.2 * occl[2]))
            win = (slice(0, H), slice(0, edge) if occl[3] < 0.5 else slice(W - edge, W))
        out[win] = (0.2 + 0.2 * occl[3]) if ir else np.array([0.3, 0.28, 0.25]) * (0.6 + occl[3])


def _camera_response(out: np.ndarray, camera: Camera, d: _ImageDraws, rng: np.random.Generator,
                     cfg: SyntheticConfig) -> np.ndarray:
    """Blur (infrared), gains, light, sensor noise and the flip; (H, W, 3) uint8."""
    if camera.modality == INFRARED:
        out = _blur(out, cfg.ir_blur) * camera.brightness * d.light
        out = out + camera.noise * rng.standard_normal(size=out.shape)
        out = np.repeat(out[..., None], 3, axis=2)
    else:
        out = out * (camera.gain * camera.brightness * d.light)[None, None, :]
        out = out + camera.noise * rng.standard_normal(size=out.shape)
    if d.flip:
        out = out[:, ::-1]
    return (np.clip(out, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def render_image(ident: Identity, camera: Camera, rng: np.random.Generator,
                 cfg: SyntheticConfig) -> np.ndarray:
    """Render one image of ``ident`` by ``camera``; returns (H, W, 3) uint8.

    ``rng`` supplies every per-image draw (pose, flip, light, noise, occlusion).
    """
    d = _draw_image(rng, cfg)
    c = _canvas(ident, camera, d, cfg)
    swing = cfg.limb_jitter * d.pose[4:8]
    _paint_legs(c, ident, d, cfg)
    upper_val = _paint_torso(c, ident, d, cfg)
    _paint_head(c, ident)
    _paint_object(c, ident, d, swing)
    _paint_arms(c, ident, upper_val, swing)
    _occlude(c.out, d.occl, c.ir, cfg)
    return _camera_response(c.out, camera, d, rng, cfg)


# ----------------------------------------------------------------------------------------------
# splits and layouts
# ----------------------------------------------------------------------------------------------

def _normalise_ids(ids: int | tuple[int, int, int]) -> tuple[int, int, int]:
    if isinstance(ids, (int, np.integer)):
        n = int(ids)
        if n < 3:
            raise DmdlError(f"synthetic ids = {n}: at least 3 identities are needed (train, val, test)")
        test = max(1, round(n / 3))
        val = max(1, round(n / 9))
        return n - test - val, val, test
    try:
        train, val, test = (int(x) for x in ids)
    except (TypeError, ValueError):
        raise DmdlError(f"synthetic ids = {ids!r}: give a count or (train, val, test) counts") from None
    if train < 1 or test < 1 or val < 0:
        raise DmdlError(f"synthetic ids = {ids!r}: train and test need >= 1 identity, val >= 0")
    return train, val, test


def split_ids(ids: int | tuple[int, int, int], seed: int, first_pid: int = 1) -> dict[str, list[int]]:
    """Person ids ``first_pid..first_pid + N - 1`` shuffled by ``seed`` into sorted ``train`` /
    ``val`` / ``test`` lists."""
    n_train, n_val, n_test = _normalise_ids(ids)
    n = n_train + n_val + n_test
    perm = np.random.default_rng([seed, _TAG_SPLIT]).permutation(n) + first_pid
    return {
        "train": sorted(perm[:n_train].tolist()),
        "val": sorted(perm[n_train:n_train + n_val].tolist()),
        "test": sorted(perm[n_train + n_val:].tolist()),
    }


@dataclass(frozen=True)
class _Job:
    relpath: str
    pid: int
    cam: int
    modality: int
    n: int


def _jobs(layout: str, splits: dict[str, list[int]], images_per_cam: int) -> Iterator[_Job]:
    all_ids = sorted(splits["train"] + splits["val"] + splits["test"])
    if layout == "sysu":
        for cam, mod in SYSU_CAMERAS.items():
            for pid in all_ids:
                for n in range(1, images_per_cam + 1):
                    yield _Job(f"cam{cam}/{pid:04d}/{n:04d}.jpg", pid, cam, mod, n)
    elif layout == "regdb":
        for (cam, mod), folder in zip(REGDB_CAMERAS.items(), ("Visible", "Thermal")):
            for pid in all_ids:
                for n in range(1, images_per_cam + 1):
                    yield _Job(f"{folder}/{pid:04d}/{n:04d}.jpg", pid, cam, mod, n)
    elif layout == "llcm":
        test = set(splits["test"])
        for mod, tag, cams in ((VISIBLE, "vis", LLCM_VIS_CAMS), (INFRARED, "nir", LLCM_NIR_CAMS)):
            for cam in cams:
                for pid in all_ids:
                    part = "test" if pid in test else "train"
                    for n in range(1, images_per_cam + 1):
                        yield _Job(f"{part}_{tag}/cam{cam}/{pid:04d}/{n:04d}.jpg", pid, cam, mod, n)
    else:  # pragma: no cover - validated by generate
        raise ValueError(layout)


def _index_files(layout: str, splits: dict[str, list[int]], jobs: list[_Job], seed: int) -> dict[str, str]:
    """Relative path -> text of the id / index files of ``layout``."""
    files: dict[str, str] = {}
    if layout == "sysu":
        for name in ("train", "val", "test"):
            files[f"exp/{name}_id.txt"] = ",".join(str(p) for p in splits[name]) + "\n"
    elif layout == "regdb":
        all_ids = np.array(sorted(splits["train"] + splits["val"] + splits["test"]))
        half = len(all_ids) // 2
        for t in range(1, REGDB_TRIALS + 1):
            perm = np.random.default_rng([seed, t, _TAG_TRIAL]).permutation(all_ids)
            part = {"train": set(perm[:half].tolist()), "test": set(perm[half:].tolist())}
            for split in ("train", "test"):
                for mod, name in ((VISIBLE, "visible"), (INFRARED, "thermal")):
                    lines = [f"{j.relpath} {j.pid}" for j in jobs
                             if j.modality == mod and j.pid in part[split]]
                    files[f"idx/{split}_{name}_{t}.txt"] = "\n".join(lines) + "\n"
    elif layout == "llcm":
        for split in ("train", "test"):
            for tag in ("vis", "nir"):
                prefix = f"{split}_{tag}/"
                lines = [f"{j.relpath} {j.pid}" for j in jobs if j.relpath.startswith(prefix)]
                files[f"idx/{split}_{tag}.txt"] = "\n".join(lines) + "\n"
    return files


def _encode_jpeg(img: np.ndarray, quality: int) -> bytes:
    buf = BytesIO()
    Image.fromarray(img, mode="RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def generate(
    root: str | os.PathLike[str],
    *,
    ids: int | tuple[int, int, int] | None = None,
    seed: int | None = None,
    images_per_cam: int = DEFAULT_IMAGES_PER_CAM,
    layout: str = "sysu",
    config: SyntheticConfig | None = None,
    overwrite: bool = False,
    workers: int | None = None,
    first_pid: int = 1,
) -> dict:
    """Write the synthetic data set under ``root`` in ``layout`` and return a summary.

    ``config``: the recipe's ``synthetic:`` section (default: its defaults). ``ids`` and
    ``seed`` default to ``config.ids`` and ``config.seed``.
    ``ids``: ``(train, val, test)`` identity counts, or a total ``N`` (test = N/3, val = N/9,
    rounded, train = the rest). Person ids are ``first_pid..first_pid + N - 1``, shuffled into
    the splits by ``seed``. An identity's looks are drawn from ``(seed, pid)``, so two sets whose
    id ranges do not overlap hold different people whatever their seeds, and the same
    ``(seed, pid)`` is the same person in any set (a source set for pretraining takes another
    seed and a disjoint range: another domain and other people).
    ``images_per_cam``: images of every identity by every camera of the layout.
    ``overwrite``: replace an existing non-empty ``root`` (otherwise a :class:`DmdlError`).
    ``workers``: rendering threads (default: up to 4, bounded by the CPU count).

    The summary holds the layout, seed, identity and image counts per split and modality, the
    cameras and the generator settings (all also in ``root/synthetic.json``), plus ``root`` and
    the ``seconds`` taken.
    Same arguments, same bytes.
    """
    start = time.perf_counter()
    cfg = config or SyntheticConfig()
    ids = cfg.ids if ids is None else ids
    seed = cfg.seed if seed is None else seed
    _check_request(layout, images_per_cam, ids, first_pid)
    root = _empty_root(root, overwrite)
    splits = split_ids(ids, seed, first_pid)
    jobs = list(_jobs(layout, splits, images_per_cam))

    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.", suffix=".tmp", dir=root.parent))
    os.chmod(tmp, dir_mode())  # mkdtemp makes it 0700; the set is renamed into place as it is
    try:
        _render_all(tmp, jobs, seed, cfg, workers)
        for rel, text in _index_files(layout, splits, jobs, seed).items():
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp / rel).write_text(text, encoding="utf-8")
        summary = _summary(layout, seed, first_pid, images_per_cam, splits, jobs, cfg)
        (tmp / "synthetic.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        _publish(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    summary["root"] = str(root)
    summary["seconds"] = round(time.perf_counter() - start, 3)
    return summary


def _check_request(layout: str, images_per_cam: int, ids: int | tuple[int, int, int],
                   first_pid: int) -> None:
    if layout not in LAYOUTS:
        raise DmdlError(f"synthetic layout {layout!r} is unknown; use one of {', '.join(LAYOUTS)}")
    if images_per_cam < 1:
        raise DmdlError(f"synthetic images_per_cam = {images_per_cam}; set it >= 1")
    if not 1 <= first_pid or first_pid + sum(_normalise_ids(ids)) - 1 > 9999:
        raise DmdlError(f"synthetic first_pid = {first_pid}: person ids must stay in 1..9999 "
                        "(4-digit folder names)")
    if layout == "regdb" and sum(_normalise_ids(ids)) < 2:
        raise DmdlError("synthetic RegDB layout needs >= 2 identities")


def _empty_root(root: str | os.PathLike[str], overwrite: bool) -> Path:
    """``root`` as an absolute path, refused when it holds something and ``overwrite`` is off."""
    root = Path(root).absolute()
    if root.exists() and not root.is_dir():
        raise DmdlError(f"{root}: exists and is not a folder; choose another data root")
    if root.is_dir() and any(root.iterdir()) and not overwrite:
        raise DmdlError(f"{root}: folder exists and is not empty; remove it or pass --force")
    return root


def _render_all(tmp: Path, jobs: list[_Job], seed: int, cfg: SyntheticConfig,
                workers: int | None) -> None:
    """Render and write every image of ``jobs`` under ``tmp`` (threads: the order of writing
    changes no byte, each image has its own random stream)."""
    idents = {pid: make_identity(pid, seed, cfg) for pid in sorted({j.pid for j in jobs})}
    cams = {(j.cam, j.modality) for j in jobs}
    cameras = {key: make_camera(key[0], key[1], seed, cfg) for key in sorted(cams)}
    for folder in sorted({str(Path(j.relpath).parent) for j in jobs}):
        (tmp / folder).mkdir(parents=True, exist_ok=True)

    def work(job: _Job) -> None:
        rng = np.random.default_rng([seed, job.pid, job.cam, job.modality, job.n, _TAG_IMG])
        img = render_image(idents[job.pid], cameras[(job.cam, job.modality)], rng, cfg)
        (tmp / job.relpath).write_bytes(_encode_jpeg(img, cfg.jpeg_quality))

    n_workers = workers or min(4, os.cpu_count() or 1)
    if n_workers <= 1:
        for job in jobs:
            work(job)
    else:
        with ThreadPoolExecutor(n_workers) as pool:
            for _ in pool.map(work, jobs):
                pass


def _summary(layout: str, seed: int, first_pid: int, images_per_cam: int,
             splits: dict[str, list[int]], jobs: list[_Job], cfg: SyntheticConfig) -> dict:
    """What ``synthetic.json`` records: the request, the counts and the generator settings."""
    test_ids = set(splits["test"])
    counts = {s: {"visible": 0, "infrared": 0} for s in ("train", "test")}
    for j in jobs:
        counts["test" if j.pid in test_ids else "train"][
            "visible" if j.modality == VISIBLE else "infrared"] += 1
    cams = {(j.cam, j.modality) for j in jobs}
    return {
        "layout": layout,
        "seed": seed,
        "first_pid": first_pid,
        "images_per_cam": images_per_cam,
        "ids": {k: len(v) for k, v in splits.items()},
        "images": len(jobs),
        "counts": counts,  # train = train + val identities (test split for RegDB varies by trial)
        "cameras": {
            "visible": sorted(c for c, m in cams if m == VISIBLE),
            "infrared": sorted(c for c, m in cams if m == INFRARED),
        },
        "config": cfg.generator_settings(),
    }


def _publish(tmp: Path, root: Path) -> None:
    """Rename the finished tree ``tmp`` to ``root``, replacing what was there."""
    old = None
    if root.exists():
        old = root.with_name(f".{root.name}.old-{os.getpid()}")
        os.replace(root, old)
    os.replace(tmp, root)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
