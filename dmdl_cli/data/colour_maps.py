"""Colour maps of the infrared pseudo-colour view (``augment.ir_pseudo_colour_scheme``).

Two families of lookup tables, each ``uint8 (256, 3)``, row ``v`` = the colour of gray level v:

* ``formula``: the maps of ``recipe.COLOUR_MAPS`` (jet, hot, hsv, ...), computed here from their
  closed-form RGB formulae (:func:`colour_map_lut`, RGB order). The ``formula-distinct`` scheme
  draws three distinct ones per image.
* ``opencv``: the maps of ``recipe.OPENCV_COLOUR_MAPS`` exactly as OpenCV's
  ``cv2.applyColorMap`` returns them (:func:`opencv_colour_map`, **BGR** order, as OpenCV
  writes its output), read from ``opencv_colour_maps.json`` next to this module. OpenCV is not
  a dependency: ``benchmarks/opencv_colour_maps.py`` wrote that file once with OpenCV and
  re-checks it wherever ``cv2`` is importable. The file also holds OpenCV's fixed-point
  ``COLOR_BGR2GRAY`` weights, which ``applyColorMap`` applies to a 3-channel input before the
  lookup (:func:`opencv_gray`): the reference implementation hands it an RGB array, so the
  array's channel 0 (red) is weighted as blue.
"""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from importlib import resources

import numpy as np

from dmdl_cli.recipe import COLOUR_MAPS, OPENCV_COLOUR_MAPS

__all__ = [
    "COLOUR_MAPS",
    "OPENCV_COLOUR_MAPS",
    "OPENCV_TABLE_FILE",
    "OpenCVTables",
    "colour_map_lut",
    "lut_bank",
    "opencv_colour_map",
    "opencv_gray",
    "opencv_tables",
    "parse_tables",
]

#: The data file of OpenCV's tables, in this package (written by benchmarks/opencv_colour_maps.py).
OPENCV_TABLE_FILE = "opencv_colour_maps.json"


# --------------------------------------------------------------------------------------------
# Formula maps
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


def lut_bank(names: tuple[str, ...]) -> np.ndarray:
    """``uint8 (M, 3, 256)``: channel c of map m at intensity v is ``bank[m, c, v]`` (cached)."""
    bank = _LUT_CACHE.get(names)
    if bank is None:
        bank = np.ascontiguousarray(np.stack([colour_map_lut(n).T for n in names]))
        _LUT_CACHE[names] = bank
    return bank


# --------------------------------------------------------------------------------------------
# OpenCV's maps
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class OpenCVTables:
    """The content of ``opencv_colour_maps.json``.

    * ``maps``: name -> ``uint8 (256, 3)``, row v = BGR colour of gray level v;
    * ``ids``: name -> OpenCV's ``COLORMAP_*`` number (the reference names maps by it);
    * ``gray_weights``: the fixed-point weights of ``COLOR_BGR2GRAY`` for the input array's
      channels 0, 1, 2 (which OpenCV reads as B, G, R); ``gray = (sum_c w_c x_c + 2^(s-1)) >> s``
      with ``s = gray_shift``;
    * ``opencv_version``: the OpenCV that wrote the file.
    """

    maps: dict[str, np.ndarray]
    ids: dict[str, int]
    gray_weights: tuple[int, int, int]
    gray_shift: int
    opencv_version: str


def parse_tables(data: dict) -> OpenCVTables:
    """The tables of the JSON document ``data`` (the content of ``opencv_colour_maps.json``)."""
    maps, ids = {}, {}
    for name, entry in data["maps"].items():
        table = np.frombuffer(bytes.fromhex(entry["bgr"]), dtype=np.uint8)
        maps[name] = table.reshape(256, 3).copy()
        ids[name] = int(entry["id"])
    w0, w1, w2 = (int(w) for w in data["gray"]["weights"])
    return OpenCVTables(maps=maps, ids=ids, gray_weights=(w0, w1, w2),
                        gray_shift=int(data["gray"]["shift"]),
                        opencv_version=str(data["opencv_version"]))


@functools.lru_cache(maxsize=1)
def opencv_tables() -> OpenCVTables:
    """OpenCV's colour maps and gray weights, read once per process from the package data."""
    text = resources.files("dmdl_cli.data").joinpath(OPENCV_TABLE_FILE).read_text(encoding="utf-8")
    return parse_tables(json.loads(text))


def opencv_colour_map(name: str) -> np.ndarray:
    """OpenCV's colour map ``name`` (one of ``OPENCV_COLOUR_MAPS``): ``uint8 (256, 3)``, BGR."""
    maps = opencv_tables().maps
    if name not in maps:
        raise ValueError(f"unknown OpenCV colour map {name!r}; known: {', '.join(maps)}")
    return maps[name]


def opencv_gray(channels: np.ndarray, tables: OpenCVTables | None = None) -> np.ndarray:
    """What ``cv2.cvtColor(a, COLOR_BGR2GRAY)`` returns for the ``(H, W, 3)`` array ``a`` whose
    channel c is ``channels[c]``: ``channels`` uint8 ``(3, H, W)`` -> uint8 ``(H, W)``.

    Handed an RGB image, as the reference does, red takes the blue weight and blue the red one;
    a gray image (three equal channels) keeps its values (the weights sum to ``2^shift``).
    ``tables``: the stored ones by default.
    """
    t = tables if tables is not None else opencv_tables()
    if np.array_equal(channels[0], channels[1]) and np.array_equal(channels[1], channels[2]):
        return channels[0].copy()  # equal channels (an infrared image): the gray is the value
    a = channels.astype(np.uint32)
    w0, w1, w2 = t.gray_weights
    acc = a[0] * np.uint32(w0) + a[1] * np.uint32(w1) + a[2] * np.uint32(w2)
    acc += np.uint32(1 << (t.gray_shift - 1))
    return (acc >> np.uint32(t.gray_shift)).astype(np.uint8)
