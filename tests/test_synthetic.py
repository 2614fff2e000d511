"""The synthetic data set: determinism, layouts, splits, and the modality bias it must carry."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from dmdl_cli.data.index import INFRARED, VISIBLE
from dmdl_cli.data.synthetic import (
    LLCM_NIR_CAMS,
    LLCM_VIS_CAMS,
    SYSU_CAMERAS,
    SyntheticConfig,
    generate,
    make_camera,
    make_identity,
    render_image,
    split_ids,
)
from dmdl_cli.errors import DmdlError

from conftest import load_benchmark

TINY = (3, 1, 2)  # train / val / test identities


bias = load_benchmark("synthetic_bias")  # its hand-made descriptors are tested here, not copied


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_other_seed_other_images(tmp_path):
    a = generate(tmp_path / "a", ids=TINY, images_per_cam=2, seed=7)
    b = generate(tmp_path / "b", ids=TINY, images_per_cam=2, seed=7, workers=1)
    c = generate(tmp_path / "c", ids=TINY, images_per_cam=2, seed=8)
    ta, tb, tc = (_tree_bytes(tmp_path / n) for n in "abc")
    assert ta == tb
    assert a["images"] == b["images"] == 6 * 6 * 2
    assert set(ta) == set(tc)  # same layout ...
    jpgs = [k for k in ta if k.endswith(".jpg")]
    assert sum(ta[k] != tc[k] for k in jpgs) == len(jpgs)  # ... every image differs
    assert c["ids"] == {"train": 3, "val": 1, "test": 2}


def test_ids_and_seed_default_to_the_recipe_section(tmp_path):
    a = generate(tmp_path / "a", images_per_cam=1, config=SyntheticConfig(ids=6, seed=7), workers=1)
    generate(tmp_path / "b", ids=6, seed=7, images_per_cam=1, workers=1)
    assert _tree_bytes(tmp_path / "a") == _tree_bytes(tmp_path / "b")
    assert (a["seed"], a["ids"]) == (7, {"train": 3, "val": 1, "test": 2})
    assert "ids" not in a["config"] and "seed" not in a["config"]  # recorded once, above


def test_sysu_layout_files_and_summary(tmp_path):
    root = tmp_path / "syn"
    summary = generate(root, ids=TINY, images_per_cam=3, seed=1)
    splits = split_ids(TINY, 1)
    assert sorted(splits["train"] + splits["val"] + splits["test"]) == list(range(1, 7))
    for name in ("train", "val", "test"):
        text = (root / "exp" / f"{name}_id.txt").read_text()
        assert [int(x) for x in text.strip().split(",")] == splits[name]
    for cam in SYSU_CAMERAS:
        for pid in range(1, 7):
            files = sorted(p.name for p in (root / f"cam{cam}" / f"{pid:04d}").iterdir())
            assert files == ["0001.jpg", "0002.jpg", "0003.jpg"]
    meta = json.loads((root / "synthetic.json").read_text())
    assert meta["images"] == summary["images"] == 6 * 6 * 3
    assert summary["counts"]["train"] == {"visible": 4 * 4 * 3, "infrared": 4 * 2 * 3}
    assert summary["counts"]["test"] == {"visible": 2 * 4 * 3, "infrared": 2 * 2 * 3}
    assert summary["cameras"] == {"visible": [1, 2, 4, 5], "infrared": [3, 6]}
    assert not list(tmp_path.glob(".syn*"))  # no temporary tree left behind


def test_refuses_non_empty_root_unless_overwrite(tmp_path):
    root = tmp_path / "syn"
    root.mkdir()
    (root / "keep.txt").write_text("x")
    with pytest.raises(DmdlError, match="not empty"):
        generate(root, ids=TINY, images_per_cam=1)
    generate(root, ids=TINY, images_per_cam=1, overwrite=True)
    assert not (root / "keep.txt").exists() and (root / "cam1").is_dir()


def test_bad_arguments(tmp_path):
    with pytest.raises(DmdlError, match="layout"):
        generate(tmp_path / "x", ids=TINY, layout="market")
    with pytest.raises(DmdlError, match="images_per_cam"):
        generate(tmp_path / "x", ids=TINY, images_per_cam=0)
    with pytest.raises(DmdlError, match="ids"):
        generate(tmp_path / "x", ids=(0, 0, 1))
    # settings built in code are checked by the recipe's rules, naming the recipe key
    with pytest.raises(DmdlError, match="synthetic.ir_noise.*minimum"):
        SyntheticConfig(ir_noise=-1.0)
    with pytest.raises(DmdlError, match="synthetic.material_coupling"):
        SyntheticConfig(material_coupling=-1.5)
    with pytest.raises(DmdlError, match="synthetic.occlusion_prob.*maximum"):
        SyntheticConfig(occlusion_prob=1.5)
    with pytest.raises(DmdlError, match="synthetic.height"):
        SyntheticConfig(height=16)
    SyntheticConfig(material_coupling=-1.0)  # negative is allowed: thermal cameras
    assert split_ids(90, 0)["test"].__len__() == 30


def test_images_have_the_modality_look():
    cfg = SyntheticConfig()
    ident = make_identity(3, 0, cfg)
    vis = render_image(ident, make_camera(1, VISIBLE, 0, cfg), np.random.default_rng(0), cfg)
    ir = render_image(ident, make_camera(3, INFRARED, 0, cfg), np.random.default_rng(0), cfg)
    assert vis.shape == ir.shape == (96, 48, 3) and vis.dtype == np.uint8
    assert np.array_equal(ir[..., 0], ir[..., 1]) and np.array_equal(ir[..., 0], ir[..., 2])
    assert np.abs(vis[..., 0].astype(int) - vis[..., 2]).mean() > 5  # visible has colour
    small = SyntheticConfig(height=64, width=32)
    img = render_image(ident, make_camera(1, VISIBLE, 0, small), np.random.default_rng(0), small)
    assert img.shape == (64, 32, 3)


def test_regdb_and_llcm_layouts(tmp_path):
    generate(tmp_path / "regdb", ids=(3, 1, 2), images_per_cam=2, layout="regdb", seed=3)
    idx = tmp_path / "regdb" / "idx"
    trials_train = set()
    for t in range(1, 11):
        train = (idx / f"train_visible_{t}.txt").read_text().split("\n")
        test = (idx / f"test_thermal_{t}.txt").read_text().split("\n")
        train_ids = {int(line.split()[1]) for line in train if line}
        test_ids = {int(line.split()[1]) for line in test if line}
        assert len(train_ids) == len(test_ids) == 3 and not train_ids & test_ids
        trials_train.add(frozenset(train_ids))
    assert len(trials_train) > 1  # the trials differ
    assert len(list((tmp_path / "regdb" / "Thermal").rglob("*.jpg"))) == 6 * 2

    generate(tmp_path / "llcm", ids=(3, 1, 2), images_per_cam=1, layout="llcm", seed=3)
    llcm = tmp_path / "llcm"
    assert sorted(int(p.name[3:]) for p in (llcm / "train_vis").iterdir()) == list(LLCM_VIS_CAMS)
    assert sorted(int(p.name[3:]) for p in (llcm / "test_nir").iterdir()) == list(LLCM_NIR_CAMS)
    lines = (llcm / "idx" / "test_nir.txt").read_text().split()
    assert len(lines) == 2 * 2 * len(LLCM_NIR_CAMS)


# --------------------------------------------------------------------------------------------
# the bias: visible-only cues strong, cross-modal cues weak but present
# --------------------------------------------------------------------------------------------

def _test_set(tmp_path, **config):
    root = tmp_path / "syn"
    generate(root, ids=(1, 0, 24), images_per_cam=3, seed=0, config=SyntheticConfig(**config))
    return bias.load_test_split(root)


def test_bias_colour_shortcut_does_not_transfer_shape_cues_do(tmp_path):
    imgs, pids, cams, mods = _test_set(tmp_path)
    vis, ir = np.flatnonzero(mods == VISIBLE), np.flatnonzero(mods == INFRARED)
    chance = 1 / 24

    colour = bias.garment_colour(imgs)
    lum, chroma = bias.luminance_chroma(colour)
    colour_within, _ = bias.retrieval(colour, pids, cams, vis, vis)
    chroma_cross, _ = bias.retrieval(chroma, pids, cams, ir, vis)
    lum_cross, _ = bias.retrieval(lum, pids, cams, ir, vis)
    shape_cross, _ = bias.retrieval(bias.gradient_histogram(imgs), pids, cams, ir, vis)
    assert colour_within > 0.85                    # the visible-only cue is strong ...
    assert chroma_cross < 2.5 * chance             # ... and its hue is useless on infrared images
    assert lum_cross > 3 * chance                  # garment brightness partly survives (NIR) ...
    assert shape_cross > 3 * chance                # ... and so do shape and texture ...
    assert colour_within > shape_cross + 0.1       # ... but colour is the stronger cue


@pytest.mark.parametrize("coupling", [0.8, -0.8])
def test_material_coupling_sign_sets_how_visible_brightness_follows_infrared(tmp_path, coupling):
    imgs, pids, _, mods = _test_set(tmp_path, material_coupling=coupling)
    lum, _ = bias.luminance_chroma(bias.garment_colour(imgs))  # IR images are grey: lum = intensity
    ids = np.unique(pids)
    vis_lum = np.array([lum[(pids == p) & (mods == VISIBLE)].mean(0) for p in ids]).ravel()
    ir_lum = np.array([lum[(pids == p) & (mods == INFRARED)].mean(0) for p in ids]).ravel()
    r = np.corrcoef(vis_lum, ir_lum)[0, 1]  # over 24 ids x 2 garments
    assert r > 0.5 if coupling > 0 else r < -0.5


def test_first_pid_gives_a_disjoint_identity_range(tmp_path):
    default = split_ids(TINY, 3)
    shifted = split_ids(TINY, 3, first_pid=101)
    # the same shuffle, moved by 100: no identity in common with the default range
    for name in ("train", "val", "test"):
        assert shifted[name] == [p + 100 for p in default[name]]
    a = generate(tmp_path / "a", ids=TINY, images_per_cam=1, seed=3)
    b = generate(tmp_path / "b", ids=TINY, images_per_cam=1, seed=4, first_pid=101)
    assert b["first_pid"] == 101
    pids = {name: {int(p.name) for p in (tmp_path / name / "cam1").iterdir()} for name in "ab"}
    assert pids["a"] == set(range(1, 7)) and pids["b"] == set(range(101, 107))
    # the person is drawn from (seed, pid): another pid is another person under the same seed
    cfg = SyntheticConfig()
    same = make_identity(5, 3, cfg), make_identity(5, 3, cfg)
    other = make_identity(105, 3, cfg)
    np.testing.assert_array_equal(same[0].upper_rgb, same[1].upper_rgb)
    assert not np.allclose(same[0].upper_rgb, other.upper_rgb)
    with pytest.raises(DmdlError, match="first_pid"):
        generate(tmp_path / "c", ids=TINY, first_pid=9998)
