"""Ranked-list pictures that explain a result (``evaluate --visualize K / --visualize-worst K``).

One PNG per query of the first trial: the query, then its top-10 gallery matches left to right,
each drawn at least ``CELL_HEIGHT`` px high. Under each image: the rank and distance, the
identity and the camera (for the query: its AP). A gallery image has a thick green frame when it
shows the query's identity (a hit), red when not; the query's frame is grey. Gallery entries the
protocol excludes for that query are not shown.

Which queries: ``--visualize K`` takes K queries evenly spread over the trial's queries
(``WS/eval/ranks/<mode>-<checkpoint>-qNNNNN.png``); ``--visualize-worst K`` the K valid queries
with the lowest AP, worst first (``...-worstNN-qNNNNN.png``). ``NNNNN`` is the query's position
among the test rows of the index.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from dmdl_cli.atomic import atomic_output
from dmdl_cli.data.index import IndexTable
from dmdl_cli.evaluation.metrics import query_average_precision
from dmdl_cli.evaluation.protocols import Trial

TOP = 10  # gallery matches drawn per query
CELL_HEIGHT = 128  # smallest drawn image height (px); smaller crops are upscaled
TEXT_WIDTH = 100  # smallest cell width (px), so that the captions fit
BORDER = 6  # frame width (px)
PAD = 4  # space between gallery cells (px)
GAP = 20  # space between the query and the gallery (px)
FONT_SIZE = 13
LINE = FONT_SIZE + 4  # caption line height (px)
CAPTION_LINES = 2
COLOURS = {"query": (110, 110, 110), "hit": (0, 170, 0), "miss": (215, 0, 0)}


@dataclass
class Cell:
    """One drawn image: the crop, its caption lines and its frame colour."""

    image: np.ndarray  # (H, W, 3) uint8
    lines: tuple[str, str]
    frame: tuple[int, int, int]


def _scaled(image: np.ndarray) -> Image.Image:
    picture = Image.fromarray(image)
    h, w = image.shape[:2]
    if h >= CELL_HEIGHT:
        return picture
    return picture.resize((max(1, round(w * CELL_HEIGHT / h)), CELL_HEIGHT), Image.BICUBIC)


def ranked_list_image(query: Cell, gallery: list[Cell]) -> Image.Image:
    """Compose the query and its gallery cells side by side with frames and captions."""
    crops = [_scaled(c.image) for c in (query, *gallery)]
    img_h = max(p.height for p in crops)
    cell_w = max(max(p.width for p in crops), TEXT_WIDTH) + 2 * BORDER
    cell_h = img_h + 2 * BORDER
    width = cell_w * len(crops) + GAP + PAD * max(len(gallery) - 1, 0)
    canvas = Image.new("RGB", (width, cell_h + PAD + CAPTION_LINES * LINE + PAD), "white")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=FONT_SIZE)
    x = 0
    for i, (cell, crop) in enumerate(zip((query, *gallery), crops)):
        draw.rectangle([x, 0, x + cell_w - 1, cell_h - 1], fill=cell.frame)
        canvas.paste(crop, (x + (cell_w - crop.width) // 2, BORDER + (img_h - crop.height) // 2))
        for n, text in enumerate(cell.lines):
            draw.text((x + BORDER, cell_h + PAD + n * LINE), text, fill=(0, 0, 0), font=font)
        x += cell_w + (GAP if i == 0 else PAD)
    return canvas


def spread_queries(num_queries: int, count: int) -> np.ndarray:
    """``count`` query positions evenly spread over ``num_queries``."""
    if count <= 0 or num_queries == 0:
        return np.zeros(0, dtype=np.int64)
    return np.unique(np.linspace(0, num_queries - 1, num=min(count, num_queries)).round().astype(np.int64))


def worst_queries(ap: np.ndarray, count: int) -> np.ndarray:
    """Positions of the ``count`` valid queries (AP not NaN) with the lowest AP, worst first."""
    valid = np.flatnonzero(~np.isnan(ap))
    order = valid[np.argsort(ap[valid], kind="stable")]
    return order[:max(count, 0)]


def _cells(cache: np.ndarray, test: IndexTable, test_rows: np.ndarray, dist: np.ndarray,
           trial: Trial, qi: int, ap: float) -> tuple[Cell, list[Cell]]:
    q = trial.query[qi]
    row = dist[qi].astype(np.float64)  # (G,)
    kept = np.flatnonzero(~trial.exclude[qi]) if trial.exclude is not None else np.arange(row.size)
    ranked = kept[np.argsort(row[kept], kind="stable")][:TOP]
    ap_text = "no match" if np.isnan(ap) else f"AP {ap:.2f}"
    query = Cell(cache[test_rows[q]], (f"query {ap_text}", f"id {test.pids[q]} cam {test.cams[q]}"),
                 COLOURS["query"])
    gallery = []
    for rank, j in enumerate(ranked, start=1):
        g = trial.gallery[j]
        hit = bool(test.pids[g] == test.pids[q])
        gallery.append(Cell(cache[test_rows[g]], (f"#{rank} d {row[j]:.3f}",
                                                  f"id {test.pids[g]} cam {test.cams[g]}"),
                            COLOURS["hit" if hit else "miss"]))
    return query, gallery


def write_ranked_lists(out_dir: Path, cache: np.ndarray, test: IndexTable, test_rows: np.ndarray,
                       dist: np.ndarray, trial: Trial, prefix: str, *, spread: int = 0,
                       worst: int = 0) -> list[Path]:
    """Pictures of ``spread`` evenly spread and the ``worst`` lowest-AP queries of ``trial``.

    ``dist``: (Q, G) distances of the trial, as evaluated; ``prefix``: ``<mode>-<checkpoint>``.
    """
    ap = query_average_precision(dist, test.pids[trial.query], test.pids[trial.gallery],
                                 trial.exclude)  # (Q,)
    picks = [(qi, f"{prefix}-q{int(trial.query[qi]):05d}.png")
             for qi in spread_queries(len(trial.query), spread)]
    picks += [(qi, f"{prefix}-worst{n:02d}-q{int(trial.query[qi]):05d}.png")
              for n, qi in enumerate(worst_queries(ap, worst), start=1)]
    written = []
    for qi, filename in picks:
        picture = ranked_list_image(*_cells(cache, test, test_rows, dist, trial, qi, ap[qi]))
        path = Path(out_dir) / filename
        with atomic_output(path) as tmp:
            picture.save(tmp, format="PNG")
        written.append(path)
    return written
