"""Write or check dmdl_cli/data/opencv_colour_maps.json against OpenCV itself.

The reference implementation colours infrared view B with ``cv2.applyColorMap``. dmdl does not
depend on OpenCV: the tables it needs (``recipe.OPENCV_COLOUR_MAPS``, 256 BGR colours each) and
OpenCV's ``COLOR_BGR2GRAY`` fixed-point weights (applyColorMap converts a 3-channel input to
gray first) live in that JSON file. This script made it and checks it:

* each table equals ``cv2.applyColorMap`` of the 256-level gray ramp;
* the gray weights reproduce ``cv2.cvtColor(a, COLOR_BGR2GRAY)`` on all 2^24 colours;
* ``cv2.applyColorMap`` of a random 3-channel image equals the table looked up at that gray,
  which is how ``dmdl_cli/data/augment.py`` computes it.

OpenCV is needed only here, in a throwaway environment (the reference pins 4.12.0.88):

    python3 -m venv /tmp/cvenv
    /tmp/cvenv/bin/pip install opencv-python-headless==4.12.0.88 numpy pyyaml
    /tmp/cvenv/bin/python benchmarks/opencv_colour_maps.py            # check the file
    /tmp/cvenv/bin/python benchmarks/opencv_colour_maps.py --write    # (re)write it
    rm -rf /tmp/cvenv

Without ``cv2`` it says so and exits with status 2 (nothing was checked).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dmdl_cli.atomic import atomic_write_text  # noqa: E402
from dmdl_cli.data import colour_maps  # noqa: E402
from dmdl_cli.recipe import OPENCV_COLOUR_MAPS  # noqa: E402

TABLE_PATH = ROOT / "dmdl_cli" / "data" / colour_maps.OPENCV_TABLE_FILE
# ITU-R 601 luma weights; OpenCV rounds R and G to fixed point and gives B the remainder
LUMA_R, LUMA_G = 0.299, 0.587
SHIFTS = (14, 15, 16)  # fixed-point precisions OpenCV versions have used


def all_colours() -> np.ndarray:
    """Every uint8 triple once: ``(4096, 4096, 3)``."""
    v = np.arange(256, dtype=np.uint8)
    return np.stack(np.meshgrid(v, v, v, indexing="ij"), axis=-1).reshape(4096, 4096, 3)


def gray_formula(a: np.ndarray, weights: tuple[int, int, int], shift: int) -> np.ndarray:
    """``(H, W, 3)`` uint8 -> ``(H, W)`` uint8 by ``(sum_c w_c a_c + 2^(s-1)) >> s``."""
    acc = sum(a[..., c].astype(np.uint32) * np.uint32(w) for c, w in enumerate(weights))
    return ((acc + np.uint32(1 << (shift - 1))) >> np.uint32(shift)).astype(np.uint8)


def find_gray_weights(cv2) -> tuple[tuple[int, int, int], int]:  # noqa: ANN001
    """The (B, G, R) fixed-point weights and shift that reproduce this OpenCV's BGR2GRAY."""
    colours = all_colours()
    gray = cv2.cvtColor(colours, cv2.COLOR_BGR2GRAY)
    for shift in SHIFTS:
        r, g = round(LUMA_R * (1 << shift)), round(LUMA_G * (1 << shift))
        weights = ((1 << shift) - r - g, g, r)  # the array's channels 0, 1, 2 are B, G, R to OpenCV
        if np.array_equal(gray_formula(colours, weights, shift), gray):
            return weights, shift
    raise SystemExit(f"OpenCV {cv2.__version__}: no fixed-point BGR2GRAY with shift {SHIFTS} "
                     "reproduces cvtColor; the conversion changed, update this script")


def opencv_tables(cv2) -> dict:  # noqa: ANN001
    """The JSON document of this OpenCV's maps and gray weights."""
    ramp = np.arange(256, dtype=np.uint8).reshape(256, 1)
    maps = {}
    for name in OPENCV_COLOUR_MAPS:
        map_id = int(getattr(cv2, f"COLORMAP_{name.upper()}"))
        bgr = cv2.applyColorMap(ramp, map_id).reshape(256, 3)
        maps[name] = {"id": map_id, "bgr": bgr.astype(np.uint8).tobytes().hex()}
    weights, shift = find_gray_weights(cv2)
    return {
        "about": "OpenCV colour maps as cv2.applyColorMap returns them: 'bgr' is 256 rows of "
                 "B, G, R bytes (hex), row v the colour of gray level v. 'gray': "
                 "cv2.cvtColor(a, COLOR_BGR2GRAY) = (w0 a0 + w1 a1 + w2 a2 + 2^(shift-1)) >> "
                 "shift over the array's channels 0, 1, 2 (OpenCV reads them as B, G, R). "
                 "Written and checked by benchmarks/opencv_colour_maps.py; do not edit.",
        "opencv_version": cv2.__version__,
        "gray": {"weights": list(weights), "shift": shift},
        "maps": maps,
    }


def check(cv2, stored: colour_maps.OpenCVTables) -> list[str]:  # noqa: ANN001
    """Differences between the stored tables and this OpenCV (empty: they agree)."""
    fresh = colour_maps.parse_tables(opencv_tables(cv2))
    problems = []
    if set(stored.maps) != set(OPENCV_COLOUR_MAPS):
        problems.append(f"maps {sorted(stored.maps)} != recipe.OPENCV_COLOUR_MAPS")
    for name in OPENCV_COLOUR_MAPS:
        if name in stored.maps and not np.array_equal(stored.maps[name], fresh.maps[name]):
            diff = np.abs(stored.maps[name].astype(int) - fresh.maps[name].astype(int)).max()
            problems.append(f"map {name}: up to {diff} levels from applyColorMap")
        if stored.ids.get(name) != fresh.ids[name]:
            problems.append(f"map {name}: id {stored.ids.get(name)} != COLORMAP {fresh.ids[name]}")
    if (stored.gray_weights, stored.gray_shift) != (fresh.gray_weights, fresh.gray_shift):
        problems.append(f"gray weights {stored.gray_weights} >> {stored.gray_shift} != "
                        f"{fresh.gray_weights} >> {fresh.gray_shift}")
    # applyColorMap of a colour image: the table looked up at the gray of the array as BGR
    rgb = np.random.default_rng(0).integers(0, 256, (64, 48, 3), dtype=np.uint8)
    gray = colour_maps.opencv_gray(np.moveaxis(rgb, -1, 0), stored)  # (64, 48)
    for name in stored.maps:
        want = cv2.applyColorMap(rgb, stored.ids[name])
        if not np.array_equal(stored.maps[name][gray], want):
            problems.append(f"map {name}: applyColorMap of a colour image is not table[gray]")
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true", help="(re)write the file from OpenCV")
    args = parser.parse_args()
    try:
        import cv2
    except ImportError:
        print(f"cv2 is not importable here: {TABLE_PATH.relative_to(ROOT)} was neither written "
              "nor checked. Run this script with OpenCV installed (see its docstring).")
        return 2
    if args.write:
        text = json.dumps(opencv_tables(cv2), indent=1) + "\n"
        atomic_write_text(TABLE_PATH, text)
        print(f"wrote {TABLE_PATH.relative_to(ROOT)} ({len(text)} bytes) from OpenCV "
              f"{cv2.__version__}")
    stored = colour_maps.parse_tables(json.loads(TABLE_PATH.read_text(encoding="utf-8")))
    problems = check(cv2, stored)
    for line in problems:
        print(f"MISMATCH {line}")
    print(f"{TABLE_PATH.relative_to(ROOT)} (written by OpenCV {stored.opencv_version}) against "
          f"OpenCV {cv2.__version__}: {'differs' if problems else 'identical'}"
          f" ({len(stored.maps)} maps, gray weights {stored.gray_weights} >> {stored.gray_shift})")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
