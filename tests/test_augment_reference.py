"""The ``reference`` augmentation pipeline against hand-computed tensors, and ``dmdl-v1`` pinned.

The reference order (its ``dmdl_sysu.py`` transforms and ``ChannelAug.py``): geometry on the
image, colour jitter / pseudo-colour after the crop, then ToTensor + Normalize, random erasing
with N(0, 1) noise, and the channel operations on the normalised values. Each test recomputes a
view here from the documented random layout (two child seeds, then one block of uniforms per
view, then the erasing noise) with plain numpy / torch arithmetic.
"""
from __future__ import annotations

import hashlib
import math

import numpy as np
import pytest
import torch

from dmdl_cli.data import augment as A
from dmdl_cli.data.augment import AugmentConfig, make_view, make_views, standard_view, view_dtype
from dmdl_cli.data.colour_maps import opencv_colour_map
from dmdl_cli.data.normalisation import IMAGENET_MEAN, IMAGENET_STD, normalise_images
from dmdl_cli.errors import DmdlError
from dmdl_cli.recipe import load_recipe

VIS, IR = 0, 1
H, W = 24, 12
MEAN = np.array(IMAGENET_MEAN, dtype=np.float32).reshape(3, 1, 1)
STD = np.array(IMAGENET_STD, dtype=np.float32).reshape(3, 1, 1)
# nothing random but what a test switches on
QUIET = dict(pipeline="reference", pad=0, flip_p=0.0, erasing_p=0.0, jitter_p=0.0,
             channel_exchange_p=0.0, ir_channel_copy_p=0.0, ir_pseudo_colour_p=0.0)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def view_draws(seed: int, which: str) -> tuple[list[float], torch.Generator]:
    """The documented layout: two child seeds (view a, view b), then the view's uniforms;
    returns them and the view's generator, positioned where the erasing noise is drawn."""
    parent = gen(seed)
    seeds = [int(torch.randint(0, 2**62, (1,), generator=parent).item()) for _ in range(2)]
    child = gen(seeds[0 if which == "a" else 1])
    u = torch.rand(A._NUM_UNIFORMS, generator=child, dtype=torch.float64).tolist()
    return u, child


def normalised(img: torch.Tensor) -> np.ndarray:
    """ToTensor + Normalize by hand: uint8 (3, H, W) -> float32 (3, H, W)."""
    return (img.numpy().astype(np.float32) / np.float32(255.0) - MEAN) / STD


def erasing_box(u: list[float], h: int, w: int) -> tuple[int, int, int, int]:
    """timm's RandomErasing box (area 0.02-0.5, log-uniform aspect 0.3-1/0.3) from the slots."""
    for attempt in range(10):
        target = h * w * (0.02 + 0.48 * u[A._U_ERASE_ATTEMPTS + 2 * attempt])
        aspect = math.exp(math.log(0.3) + (math.log(1 / 0.3) - math.log(0.3))
                          * u[A._U_ERASE_ATTEMPTS + 2 * attempt + 1])
        eh, ew = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < eh < h and 0 < ew < w:
            return int(u[A._U_ERASE_POS_Y] * (h - eh + 1)), int(u[A._U_ERASE_POS_X] * (w - ew + 1)), eh, ew
    raise AssertionError("no box fits: pick another seed")


def padded_crop(img: np.ndarray, u: list[float], pad: int) -> np.ndarray:
    """Pad(pad) with zeros, then the (H, W) crop at the offsets the crop slots draw."""
    span = 2 * pad + 1
    top, left = int(u[A._U_CROP_Y] * span), int(u[A._U_CROP_X] * span)
    padded = np.zeros((3, H + 2 * pad, W + 2 * pad), dtype=img.dtype)
    padded[:, pad:pad + H, pad:pad + W] = img
    return padded[:, top:top + H, left:left + W]


@pytest.fixture(scope="module")
def colour_image() -> torch.Tensor:
    """Three different channels, no zero pixel (so black padding is told apart)."""
    rng = np.random.default_rng(11)
    return torch.from_numpy(rng.integers(1, 256, (3, H, W), dtype=np.uint8))


@pytest.fixture(scope="module")
def ir_image() -> torch.Tensor:
    rng = np.random.default_rng(12)
    return torch.from_numpy(rng.integers(1, 256, (H, W), dtype=np.uint8)).expand(3, H, W).contiguous()


def test_reference_views_are_normalised_float(colour_image):
    cfg = AugmentConfig(**QUIET)
    assert view_dtype(cfg) == torch.float32 and view_dtype(AugmentConfig()) == torch.uint8
    for modality in (VIS, IR):
        for view in make_views(colour_image, modality, cfg, gen(0)):
            assert view.dtype == torch.float32 and view.shape == (3, H, W)
            np.testing.assert_array_equal(view.numpy(), normalised(colour_image))


def test_normalisation_is_torchvision_totensor_then_normalize(colour_image):
    from PIL import Image
    from torchvision import transforms as T

    pil = Image.fromarray(colour_image.permute(1, 2, 0).numpy())
    theirs = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)(T.ToTensor()(pil))
    assert torch.equal(normalise_images(colour_image), theirs)


def test_normal_fill_in_the_box_and_nothing_else(colour_image):
    cfg = AugmentConfig(**{**QUIET, "erasing_p": 1.0, "erasing_fill": "normal"})
    for seed in range(4):
        view = make_views(colour_image, VIS, cfg, gen(seed))[0].numpy()
        u, child = view_draws(seed, "a")
        top, left, eh, ew = erasing_box(u, H, W)
        noise = torch.randn((3, eh, ew), generator=child, dtype=torch.float32).numpy()
        want = normalised(colour_image)
        want[:, top:top + eh, left:left + ew] = noise
        np.testing.assert_array_equal(view, want)


def test_channel_exchange_copies_normalised_values_after_erasing(colour_image):
    cfg = AugmentConfig(**{**QUIET, "erasing_p": 1.0, "erasing_fill": "normal",
                           "channel_exchange_p": 1.0})
    seen = set()
    for seed in range(12):
        view = make_views(colour_image, VIS, cfg, gen(seed))[1].numpy()
        u, child = view_draws(seed, "b")
        top, left, eh, ew = erasing_box(u, H, W)
        erased = normalised(colour_image)
        erased[:, top:top + eh, left:left + ew] = torch.randn((3, eh, ew), generator=child).numpy()
        k = int(u[A._U_CHANNEL_CHOICE] * 3)
        seen.add(k)
        for c in range(3):  # channel k's normalised values (noise included) in all three
            np.testing.assert_array_equal(view[c], erased[k])
    assert seen == {0, 1, 2}


def classify(view: np.ndarray, x: np.ndarray) -> str:
    """Which infrared view A channel operation turned ``x`` (normalised) into ``view``."""
    if np.array_equal(view, x):
        return "none"
    for k, name in enumerate("RGB"):
        if all(np.array_equal(view[c], x[k]) for c in range(3)):
            return name
    gray = np.float32(0.2989) * x[0] + np.float32(0.5870) * x[1] + np.float32(0.1140) * x[2]
    if all(np.allclose(view[c], gray, rtol=0, atol=1e-6) for c in range(3)):
        return "gray"
    return "other"


@pytest.mark.parametrize("settings, expected", [
    # the reference: ChannelAdapGray(0.5), R / G / B / (gray with p 0.5)
    (dict(ir_channel_copy_p=1.0, ir_gray_p=0.5),
     {"R": 0.25, "G": 0.25, "B": 0.25, "gray": 0.125, "none": 0.125}),
    # dmdl-v1's values: the operation on half the views, gray one of its four choices
    (dict(ir_channel_copy_p=0.5, ir_gray_p=1.0),
     {"R": 0.125, "G": 0.125, "B": 0.125, "gray": 0.125, "none": 0.5}),
])
def test_infrared_channel_operation_frequencies(settings, expected):
    tiny = torch.tensor([[[200]], [[90]], [[30]]], dtype=torch.uint8).expand(3, 2, 2).contiguous()
    x = normalised(tiny)
    cfg = AugmentConfig(**{**QUIET, **settings})
    n = 4000
    counts: dict[str, int] = {}
    for seed in range(n):
        outcome = classify(make_view(tiny, IR, cfg, gen(seed), "a").numpy(), x)
        counts[outcome] = counts.get(outcome, 0) + 1
    assert "other" not in counts
    for outcome, p in expected.items():
        # 4 binomial standard deviations at p = 0.5, n = 4000: 0.032
        assert abs(counts.get(outcome, 0) / n - p) < 0.032, (outcome, counts)


def test_reference_gray_is_computed_on_normalised_values(colour_image):
    cfg = AugmentConfig(**{**QUIET, "ir_channel_copy_p": 1.0, "ir_gray_p": 1.0})
    x = normalised(colour_image)
    want = np.float32(0.2989) * x[0] + np.float32(0.5870) * x[1] + np.float32(0.1140) * x[2]
    grays = 0
    for seed in range(16):
        u, _ = view_draws(seed, "a")
        view = make_views(colour_image, IR, cfg, gen(seed))[0].numpy()
        if int(u[A._U_CHANNEL_CHOICE] * 4) == 3:
            grays += 1
            for c in range(3):
                np.testing.assert_allclose(view[c], want, rtol=0, atol=1e-6)
            # one gray in all three: a normalised uint8 grayscale would differ channel by channel
            assert np.array_equal(view[0], view[1]) and np.array_equal(view[1], view[2])
    assert grays >= 2


def test_pseudo_colour_after_the_crop_colours_the_padding(ir_image):
    common = {**QUIET, "pad": 6, "ir_pseudo_colour_p": 1.0,
              "ir_pseudo_colour_scheme": "opencv-per-channel"}
    ref = AugmentConfig(**common)
    old = AugmentConfig(**{**common, "pipeline": "dmdl-v1"})
    coloured_padding = 0
    for seed in range(10):
        u, _ = view_draws(seed, "b")
        crop = padded_crop(ir_image.numpy(), u, 6)  # (3, H, W): the padding is gray level 0
        pools = (("ocean", "cividis"), ("inferno", "autumn"), ("deepgreen", "jet"))
        names = [pool[int(u[A._U_CHANNEL_CHOICE + c] * 2)] for c, pool in enumerate(pools)]
        # an equal-channel image: OpenCV's gray is the value itself; channel c of map c's BGR
        coloured = np.stack([opencv_colour_map(names[c])[crop[0], c] for c in range(3)])
        view = make_views(ir_image, IR, ref, gen(seed))[1]
        np.testing.assert_array_equal(view.numpy(), normalised(torch.from_numpy(coloured)))
        pad_mask = crop[0] == 0
        if pad_mask.any() and names[0] == "cividis":  # cividis maps 0 to red 78 (BGR channel 0)
            coloured_padding += 1
            assert (coloured[0][pad_mask] == 78).all()
        # dmdl-v1 colours before the crop: its padding stays black
        old_view = make_views(ir_image, IR, old, gen(seed))[1]
        if pad_mask.any():
            assert (old_view[:, torch.from_numpy(pad_mask)] == 0).all()
    assert coloured_padding >= 1


def test_colour_jitter_after_the_crop_jitters_the_padding(colour_image):
    cfg = AugmentConfig(**{**QUIET, "pad": 6, "jitter_p": 1.0, "jitter_brightness": 0.0,
                           "jitter_contrast": 0.5, "jitter_saturation": 0.0, "jitter_hue": 0.0})
    grey_padding = 0
    for seed in range(8):
        u, _ = view_draws(seed, "b")
        crop = padded_crop(colour_image.numpy(), u, 6).astype(np.float32)
        factor = np.float32(0.5 + u[A._U_JITTER_FACTORS + 1])  # contrast in [0.5, 1.5]
        # torchvision's adjust_contrast: blend with the mean gray level of the (cropped) image
        mean = (np.float32(0.299) * crop[0] + np.float32(0.587) * crop[1]
                + np.float32(0.114) * crop[2]).mean()
        want = np.rint(np.clip(crop * factor + (1 - factor) * mean, 0, 255)).astype(np.uint8)
        view = make_views(colour_image, VIS, cfg, gen(seed))[1].numpy()
        got = np.rint((view * STD + MEAN) * 255).astype(np.int64)  # back to grey levels
        assert np.abs(got - want).max() <= 1
        pad_mask = (crop == 0).all(axis=0)
        if pad_mask.any():  # the black padding took the blend's gray, (1 - c) * mean
            blend = np.clip(np.rint((1 - factor) * mean), 0, 255)
            assert np.abs(got[:, pad_mask] - blend).max() <= 1
            grey_padding += int(blend > 1)
    assert grey_padding >= 1


@pytest.mark.parametrize("pipeline", ["dmdl-v1", "reference"])
@pytest.mark.parametrize("modality", [VIS, IR])
def test_make_view_is_one_of_make_views(colour_image, pipeline, modality):
    cfg = AugmentConfig(pipeline=pipeline, erasing_p=1.0, erasing_fill="normal",
                        ir_pseudo_colour_scheme="opencv-per-channel")
    for seed in range(3):
        views = make_views(colour_image, modality, cfg, gen(seed))
        for which, want in zip("ab", views):
            parent, twin = gen(seed), gen(seed)
            got = make_view(colour_image, modality, cfg, parent, which)
            assert got.dtype == view_dtype(cfg) and torch.equal(got, want)
            make_views(colour_image, modality, cfg, twin)  # both child seeds drawn either way
            assert torch.equal(parent.get_state(), twin.get_state())
    with pytest.raises(ValueError):
        make_view(colour_image, modality, cfg, gen(0), "c")


def test_fills_are_colours_in_either_number_format(colour_image):
    base = dict(modality_specific=False, pad=0, flip_p=0.0, erasing_p=1.0)
    for seed in range(3):
        u, child = view_draws(seed, "a")  # standard_view draws one child: view a's seed
        top, left, eh, ew = erasing_box(u, H, W)
        box = (slice(None), slice(top, top + eh), slice(left, left + ew))
        ref_zero = standard_view(colour_image, AugmentConfig(**base, pipeline="reference",
                                                             erasing_fill="zero"), gen(seed))
        np.testing.assert_allclose(ref_zero[box].numpy(), np.broadcast_to(-MEAN / STD, (3, eh, ew)),
                                   rtol=0, atol=1e-6)
        ref_mean = standard_view(colour_image, AugmentConfig(**base, pipeline="reference",
                                                             erasing_fill="mean"), gen(seed))
        assert (ref_mean[box] == 0).all()
        # dmdl-v1 stores N(0, 1) de-normalised: round(255 (mean + std z)), clipped
        noise = torch.randn((3, eh, ew), generator=child).numpy()
        want = np.clip(np.rint((noise * STD + MEAN) * 255), 0, 255)
        old = standard_view(colour_image, AugmentConfig(**base, erasing_fill="normal"), gen(seed))
        assert old.dtype == torch.uint8
        np.testing.assert_allclose(old[box].numpy(), want, atol=1)


def test_recipe_refuses_bad_augment_values():
    for text, key in (("augment.pipeline=torchvision", "augment.pipeline"),
                      ("augment.erasing_fill=gauss", "augment.erasing_fill"),
                      ("augment.ir_gray_p=1.5", "augment.ir_gray_p"),
                      ("augment.ir_pseudo_colour_scheme=matplotlib", "augment.ir_pseudo_colour_scheme"),
                      ("augment.ir_opencv_maps_red=[ocean, viridis]", "augment.ir_opencv_maps_red"),
                      ("augment.ir_opencv_maps_blue=[]", "augment.ir_opencv_maps_blue")):
        with pytest.raises(DmdlError, match=key):
            load_recipe(overrides=[text])


@pytest.mark.parametrize("name", ["sysu", "regdb", "llcm", "demo"])
def test_paper_and_demo_recipes_train_the_reference_augmentation(name):
    aug = load_recipe(f"recipes/{name}.yaml").augment
    assert (aug.pipeline, aug.erasing_fill, aug.ir_channel_copy_p, aug.ir_gray_p) == \
        ("reference", "normal", 1.0, 0.5)
    assert aug.ir_pseudo_colour_scheme == "opencv-per-channel"
    assert (aug.ir_opencv_maps_red, aug.ir_opencv_maps_green, aug.ir_opencv_maps_blue) == \
        (["ocean", "cividis"], ["inferno", "autumn"], ["deepgreen", "jet"])


# --------------------------------------------------------------------------------------------
# dmdl-v1: the views of commit 6daeb9d (before `pipeline` existed), bit for bit
# --------------------------------------------------------------------------------------------
V1_SETTINGS = {  # name -> (AugmentConfig keys, sha256[:16] of the views that commit made)
    "default": ({}, "9120bcb8e3be49bf"),
    "baseline": (dict(modality_specific=False), "75cc5984ecec17c0"),
    "mean-fill": (dict(erasing_fill="mean", erasing_p=1.0), "5c7b305eebe8d152"),
    "zero-fill-allcopy": (dict(erasing_fill="zero", ir_channel_copy_p=1.0, jitter_p=0.7),
                          "2af133f2761bd58e"),
    "resized": (dict(size=(32, 16)), "2bcc25d0dd6a5ae5"),
    "fewmaps": (dict(ir_pseudo_colour_maps=["cool", "winter"], channel_exchange_p=0.5),
                "12f15e3b9659396b"),
}


@pytest.mark.parametrize("name", sorted(V1_SETTINGS))
def test_dmdl_v1_views_unchanged(name):
    rng = np.random.default_rng(25)
    y, x = np.meshgrid(np.linspace(0, 1, 48), np.linspace(0, 1, 24), indexing="ij")
    vis = np.stack([200 * y + 40, 230 * x + 10, 120 * (1 - y) * x + 60]) + rng.normal(0, 8, (3, 48, 24))
    vis = torch.from_numpy(np.clip(np.rint(vis), 0, 255).astype(np.uint8))
    ir = torch.from_numpy(rng.integers(0, 256, (48, 24), dtype=np.uint8)).expand(3, 48, 24).contiguous()
    settings, digest = V1_SETTINGS[name]
    cfg = AugmentConfig(**settings)
    assert cfg.pipeline == "dmdl-v1"  # the default
    h = hashlib.sha256()
    for modality, img in ((VIS, vis), (IR, ir)):
        for seed in range(6):
            a, b = make_views(img, modality, cfg, gen(seed))
            h.update(a.numpy().tobytes())
            h.update(b.numpy().tobytes())
    assert h.hexdigest()[:16] == digest
