"""CBT data level: modality-specific two-view augmentation (dmdl_cli.data.augment)."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from dmdl_cli.data import augment as A
from dmdl_cli.data.normalisation import imagenet_mean_uint8
from dmdl_cli.errors import DmdlError
from dmdl_cli.recipe import AugmentRecipe, load_recipe
from dmdl_cli.data.augment import (
    COLOUR_MAPS,
    AugmentConfig,
    channel_exchange,
    colour_map_lut,
    jitter_colour,
    make_views,
    pseudo_colour,
    standard_view,
)

VIS, IR = 0, 1
H, W = 48, 24


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def visible_image() -> torch.Tensor:
    # Smooth colourful image: three different channels.
    y, x = torch.meshgrid(torch.linspace(0, 1, H), torch.linspace(0, 1, W), indexing="ij")
    img = torch.stack([200 * y + 40, 230 * x + 10, 120 * (1 - y) * x + 60])
    return img.round().to(torch.uint8)  # (3, H, W)


@pytest.fixture(scope="module")
def ir_image() -> torch.Tensor:
    # Gray image (equal channels) with varied intensities 0..255.
    rng = np.random.default_rng(0)
    gray = torch.from_numpy(rng.integers(0, 256, size=(H, W), dtype=np.uint8))
    return gray.expand(3, H, W).contiguous()


def is_gray(img: torch.Tensor) -> bool:
    return bool(torch.equal(img[0], img[1]) and torch.equal(img[1], img[2]))


@pytest.mark.parametrize("modality", [VIS, IR])
@pytest.mark.parametrize("specific", [True, False])
def test_same_seed_same_views_different_seed_different(visible_image, ir_image, modality,
                                                       specific):
    img = visible_image if modality == VIS else ir_image
    cfg = AugmentConfig(modality_specific=specific)
    a1, b1 = make_views(img, modality, cfg, gen(7))
    torch.manual_seed(123)  # global RNG state must not matter
    a2, b2 = make_views(img, modality, cfg, gen(7))
    assert torch.equal(a1, a2) and torch.equal(b1, b2)
    others = [make_views(img, modality, cfg, gen(s)) for s in range(8, 12)]
    assert any(not torch.equal(a1, a) for a, _ in others)
    assert any(not torch.equal(b1, b) for _, b in others)
    assert not torch.equal(a1, b1)  # the two views are independent draws


@pytest.mark.parametrize("modality", [VIS, IR])
def test_views_dtype_shape_and_input_untouched(visible_image, ir_image, modality):
    img = visible_image if modality == VIS else ir_image
    before = img.clone()
    a, b = make_views(img, modality, AugmentConfig(), gen(1))
    for v in (a, b):
        assert v.dtype == torch.uint8 and v.shape == (3, H, W)
    assert torch.equal(img, before)
    # Resizing to the network input size.
    a, b = make_views(img, modality, AugmentConfig(size=(32, 16)), gen(1))
    assert a.shape == b.shape == (3, 32, 16)
    # A view that no operation touched is still a tensor of its own.
    idle = AugmentConfig(modality_specific=False, pad=0, flip_p=0.0, erasing_p=0.0)
    a, b = make_views(img, modality, idle, gen(1))
    assert torch.equal(a, img) and a.data_ptr() != img.data_ptr()


def test_bad_inputs_raise(visible_image):
    with pytest.raises(ValueError):
        make_views(visible_image.float(), VIS, AugmentConfig(), gen(0))
    with pytest.raises(ValueError):
        make_views(visible_image, 2, AugmentConfig(), gen(0))
    # a configuration built in code is checked by the recipe's rules, naming the recipe key
    for bad, key in ((dict(flip_p=1.5), "augment.flip_p"),
                     (dict(ir_pseudo_colour_maps=("jet", "viridis-from-matplotlib")),
                      "augment.ir_pseudo_colour_maps"),
                     (dict(erasing_scale=(0.5, 0.2)), "augment.erasing_scale"),
                     (dict(erasing_attempts=11), "augment.erasing_attempts"),
                     (dict(erasing_fill="blue"), "augment.erasing_fill")):
        with pytest.raises(DmdlError, match=key):
            AugmentConfig(**bad)


def test_pseudo_colour_view_is_not_gray(ir_image):
    cfg = AugmentConfig(erasing_p=0.0)
    assert is_gray(ir_image)
    for seed in range(12):
        _, b = make_views(ir_image, IR, cfg, gen(seed))
        assert not is_gray(b)
        # False colours: the channels differ on a large share of the pixels.
        assert (b[0] != b[1]).float().mean() > 0.3 or (b[1] != b[2]).float().mean() > 0.3


def test_pseudo_colour_is_a_per_channel_lut(ir_image):
    maps = ("jet", "hot", "ocean")
    out = pseudo_colour(ir_image, maps)
    gray = ir_image[0].long()  # gray image: luma == channel value
    for c, name in enumerate(maps):
        lut = torch.from_numpy(colour_map_lut(name)[:, c])
        assert torch.equal(out[c], lut[gray])


def test_colour_map_luts():
    for name in COLOUR_MAPS:
        lut = colour_map_lut(name)
        assert lut.shape == (256, 3) and lut.dtype == np.uint8
        assert not (lut[:, 0] == lut[:, 1]).all() or not (lut[:, 1] == lut[:, 2]).all()
    jet = colour_map_lut("jet")
    assert tuple(jet[0]) == (0, 0, 128) and tuple(jet[255]) == (128, 0, 0)  # blue -> red
    hot = colour_map_lut("hot")
    assert tuple(hot[0]) == (0, 0, 0) and tuple(hot[255]) == (255, 255, 255)


def test_ir_channel_copy_makes_view_a_gray(visible_image):
    # A colourful image treated as IR: view A must come out gray whenever the copy applies,
    # including the random-noise erasing box (the copy is the last operation).
    cfg = AugmentConfig(ir_channel_copy_p=1.0, erasing_p=1.0)
    for seed in range(12):
        a, _ = make_views(visible_image, IR, cfg, gen(seed))
        assert is_gray(a)
    cfg = AugmentConfig(ir_channel_copy_p=0.0, erasing_p=0.0)
    a, _ = make_views(visible_image, IR, cfg, gen(0))
    assert not is_gray(a)


def test_channel_exchange_makes_channels_equal(visible_image):
    cfg = AugmentConfig(channel_exchange_p=1.0, erasing_p=1.0)
    for seed in range(12):
        a, b = make_views(visible_image, VIS, cfg, gen(seed))
        assert is_gray(b)
        assert not is_gray(a)  # view A has no colour operation
    for c in range(3):
        out = channel_exchange(visible_image, c)
        assert torch.equal(out, visible_image[c].expand(3, H, W))


def test_baseline_never_applies_colour_ops():
    # A flat-colour image: geometric ops only ever yield that colour or the black padding.
    colour = torch.tensor([200, 120, 60], dtype=torch.uint8).view(3, 1, 1)
    img = colour.expand(3, H, W).contiguous()
    strong = dict(jitter_p=1.0, channel_exchange_p=1.0, ir_channel_copy_p=1.0,
                  ir_pseudo_colour_p=1.0, erasing_p=0.0)
    base = AugmentConfig(modality_specific=False, **strong)
    allowed = {(200, 120, 60), (0, 0, 0)}
    for modality in (VIS, IR):
        for seed in range(10):
            for view in make_views(img, modality, base, gen(seed)):
                pixels = {tuple(p) for p in view.reshape(3, -1).T.tolist()}
                assert pixels <= allowed
    # ... whereas DMDL's view B of either modality changes the colours.
    dmdl = AugmentConfig(**strong)
    for modality in (VIS, IR):
        for seed in range(5):
            _, b = make_views(img, modality, dmdl, gen(seed))
            assert not {tuple(p) for p in b.reshape(3, -1).T.tolist()} <= allowed


def test_baseline_view_a_is_standard_view(visible_image):
    cfg = AugmentConfig(modality_specific=False)
    for seed in range(5):
        a, _ = make_views(visible_image, VIS, cfg, gen(seed))
        assert torch.equal(a, standard_view(visible_image, cfg, gen(seed)))


def test_pad_crop_matches_pad_then_crop(visible_image):
    padded = TF.pad(visible_image, [10])
    for top, left in [(0, 0), (20, 20), (3, 17), (10, 10), (20, 0)]:
        want = TF.crop(padded, top, left, H, W)
        assert torch.equal(A._pad_crop(visible_image, 10, top, left), want)


def test_erasing_box_within_configured_area(visible_image):
    cfg = AugmentConfig(modality_specific=False, pad=0, flip_p=0.0, erasing_p=1.0,
                        erasing_fill="zero")
    img = visible_image.clamp(min=1)  # no zero pixel before erasing
    for seed in range(10):
        out = standard_view(img, cfg, gen(seed))
        erased = (out == 0).all(dim=0)
        frac = erased.float().mean().item()
        assert 0.0 < frac <= 0.5 + 0.05
        rows, cols = erased.any(dim=1).nonzero(), erased.any(dim=0).nonzero()
        box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
        assert int(box) == int(erased.sum())  # one axis-aligned rectangle


def test_hue_matches_torchvision(visible_image):
    rng = np.random.default_rng(3)
    img = torch.from_numpy(rng.integers(0, 256, (3, 32, 16), dtype=np.uint8))
    for shift in (-0.5, -0.3, 0.0, 0.1, 0.45):
        mine = A._adjust_hue(img, shift).int()
        ref = TF.adjust_hue(img, shift).int()
        assert (mine - ref).abs().max() <= 1


def test_jitter_matches_torchvision_chain():
    rng = np.random.default_rng(4)
    img = torch.from_numpy(rng.integers(0, 256, (3, 32, 16), dtype=np.uint8))
    ref = TF.adjust_brightness(img, 1.3)
    ref = TF.adjust_contrast(ref, 0.7)
    ref = TF.adjust_saturation(ref, 1.4)
    ref = TF.adjust_hue(ref, -0.2)
    mine = jitter_colour(img, 1.3, 0.7, 1.4, -0.2, order=(0, 1, 2, 3))
    diff = (mine.int() - ref.int()).abs()
    # torchvision rounds to uint8 after each step, jitter_colour once at the end.
    assert diff.float().mean() < 1.5 and diff.max() <= 8
    assert torch.equal(jitter_colour(img, 1.0, 1.0, 1.0, 0.0), img)


def test_from_recipe_carries_every_augment_key():
    recipe = load_recipe(overrides=[
        "augment.pad=4", "augment.flip_p=0.25", "augment.erasing_scale=[0.1, 0.2]",
        "augment.erasing_ratio=[0.5, 2]", "augment.erasing_attempts=3", "augment.erasing_fill=mean",
        "augment.ir_pseudo_colour_maps=[cool, spring, summer]"])
    cfg = AugmentConfig.from_recipe(recipe.augment, modality_specific=False, size=(64, 32))
    for fld in dataclasses.fields(AugmentRecipe):
        assert getattr(cfg, fld.name) == getattr(recipe.augment, fld.name), fld.name
    assert (cfg.erasing_scale, cfg.erasing_ratio, cfg.erasing_fill) == ([0.1, 0.2], [0.5, 2.0], "mean")
    assert cfg.ir_pseudo_colour_maps == ["cool", "spring", "summer"]
    assert cfg.modality_specific is False and cfg.size == (64, 32)
    # the augmentation declares no field of its own beyond the two the run derives
    derived = {f.name for f in dataclasses.fields(AugmentConfig)} - {f.name for f in dataclasses.fields(AugmentRecipe)}
    assert derived == {"modality_specific", "size"}


def test_recipe_colour_maps_are_the_formulae_here():
    assert tuple(A._MAP_FORMULAE) == COLOUR_MAPS


def test_recipe_erasing_keys_change_the_view(visible_image):
    base = dict(modality_specific=False, pad=0, flip_p=0.0, erasing_p=1.0)
    zero = standard_view(visible_image, AugmentConfig(**base, erasing_fill="zero"), gen(4))
    mean = standard_view(visible_image, AugmentConfig(**base, erasing_fill="mean"), gen(4))
    erased = (zero == 0).all(dim=0) & (visible_image != 0).any(dim=0)
    assert erased.any()
    mean_colour = torch.tensor(imagenet_mean_uint8(), dtype=torch.uint8).view(3, 1)
    assert (mean[:, erased] == mean_colour).all()
    small = standard_view(visible_image, AugmentConfig(**base, erasing_fill="zero",
                                                       erasing_scale=(0.02, 0.03)), gen(4))
    assert 0 < int(((small == 0).all(dim=0) & (visible_image != 0).any(dim=0)).sum()) < int(erased.sum())
