"""The stored OpenCV colour maps (dmdl_cli/data/opencv_colour_maps.json), checked without OpenCV.

``benchmarks/opencv_colour_maps.py`` checks the file against OpenCV itself where ``cv2`` is
importable; here: the maps OpenCV shares with matplotlib agree with matplotlib's, the others
have their documented shape, and the gray conversion is OpenCV's BGR2GRAY of an RGB array.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import matplotlib
import numpy as np
import pytest
import torch

from dmdl_cli.data import colour_maps as C
from dmdl_cli.data.augment import pseudo_colour_opencv
from dmdl_cli.recipe import OPENCV_COLOUR_MAPS

REPO = Path(__file__).resolve().parents[1]
# OpenCV's COLORMAP_* numbers (the reference's PseudoColor_new names its maps by them)
OPENCV_IDS = {"autumn": 0, "jet": 2, "ocean": 5, "inferno": 14, "cividis": 17, "deepgreen": 21}


def test_the_file_holds_the_recipe_maps_with_their_opencv_ids():
    tables = C.opencv_tables()
    assert tuple(tables.maps) == OPENCV_COLOUR_MAPS
    assert tables.ids == OPENCV_IDS
    for table in tables.maps.values():
        assert table.shape == (256, 3) and table.dtype == np.uint8


@pytest.mark.parametrize("name", ["autumn", "inferno", "cividis"])
def test_maps_opencv_shares_with_matplotlib_agree(name):
    rgb = C.opencv_colour_map(name)[:, ::-1].astype(int)  # BGR -> RGB
    theirs = np.rint(matplotlib.colormaps[name](np.arange(256) / 255.0)[:, :3] * 255).astype(int)
    assert np.abs(rgb - theirs).max() <= 2


def luminance(bgr: np.ndarray) -> np.ndarray:
    return bgr.astype(float) @ np.array([0.114, 0.587, 0.299])


def test_maps_without_a_matplotlib_twin_have_their_shape():
    jet = C.opencv_colour_map("jet")  # BGR: dark blue -> green -> dark red
    assert tuple(jet[0]) == (128, 0, 0) and tuple(jet[255]) == (0, 0, 128) and jet[128, 1] == 255
    for name in ("ocean", "deepgreen"):  # black -> white, brighter at every level
        table = C.opencv_colour_map(name)
        assert tuple(table[0]) == (0, 0, 0) and tuple(table[255]) == (255, 255, 255)
        assert (np.diff(luminance(table)) > 0).all()
    # ocean is blue-green (blue leads), deepgreen green (green leads), as their names say
    ocean, deepgreen = C.opencv_colour_map("ocean")[128], C.opencv_colour_map("deepgreen")[128]
    assert ocean[0] > ocean[1] > ocean[2] and deepgreen[1] > deepgreen[0] >= deepgreen[2]


def test_gray_is_bgr2gray_of_the_rgb_array():
    tables = C.opencv_tables()
    w0, w1, w2 = tables.gray_weights
    scale = 1 << tables.gray_shift
    assert w0 + w1 + w2 == scale  # a gray image keeps its values
    # channel 0 takes the blue weight (OpenCV reads the array as B, G, R): 0.114, 0.587, 0.299
    assert [round(w / scale, 3) for w in (w0, w1, w2)] == [0.114, 0.587, 0.299]
    levels = np.arange(256, dtype=np.uint8)
    assert np.array_equal(C.opencv_gray(np.stack([levels] * 3)), levels)
    red = np.array([255, 0, 0], dtype=np.uint8).reshape(3, 1, 1)  # RGB red
    assert C.opencv_gray(red)[0, 0] == 29  # round(255 * 0.114): red weighted as blue
    rng = np.random.default_rng(5)
    rgb = rng.integers(0, 256, (3, 8, 8), dtype=np.uint8)
    exact = (0.114 * rgb[0] + 0.587 * rgb[1] + 0.299 * rgb[2])
    assert np.abs(C.opencv_gray(rgb).astype(float) - exact).max() <= 0.5 + 1e-9


def test_pseudo_colour_opencv_takes_channel_c_of_map_c():
    rng = np.random.default_rng(6)
    rgb = torch.from_numpy(rng.integers(0, 256, (3, 6, 5), dtype=np.uint8))
    names = ("cividis", "autumn", "jet")
    out = pseudo_colour_opencv(rgb, names)
    gray = C.opencv_gray(rgb.numpy())
    for c, name in enumerate(names):
        assert np.array_equal(out[c].numpy(), C.opencv_colour_map(name)[gray, c])


def test_the_script_says_when_it_cannot_check():
    try:
        import cv2  # noqa: F401
    except ImportError:
        pass
    else:  # pragma: no cover - an environment with OpenCV runs the real check instead
        pytest.skip("cv2 is importable here: benchmarks/opencv_colour_maps.py checks for real")
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "opencv_colour_maps.py")],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 2
    assert "cv2 is not importable" in done.stdout and "neither written nor checked" in done.stdout
