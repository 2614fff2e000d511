"""Ranked-list pictures that explain a result (``evaluate --visualize K / --visualize-worst K``).

One PNG per query of the first trial. On top, a title: the data set, protocol and checkpoint;
which query this is, its AP and the rank of its first true match in the whole gallery; how to
read the picture. Below, the query, then its top-10 gallery matches left to right, each drawn at
least ``CELL_HEIGHT`` px high. Under each image: the rank and the distance to the query
(``dist``, as evaluated: ``2 - 2 cos``, or the re-ranked distance), the identity and the camera.
A gallery image has a thick green frame when it shows the query's identity (a hit), red when
not; the query's frame is grey. Gallery entries the protocol excludes for that query are not
shown.

Which queries: ``--visualize K`` takes K queries evenly spread over the trial's queries
(``WS/eval/ranks/<mode>-<checkpoint>-queryNN-id<pid>-cam<cam>.png``); ``--visualize-worst K``
the K valid queries with the lowest AP, worst first (``...-worstNN-id<pid>-cam<cam>.png``).
``NN`` counts the pictures of each kind from 01.
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
TITLE_FONT_SIZE = 15
TITLE_LINE = TITLE_FONT_SIZE + 6  # title line height (px)
COLOURS = {"query": (110, 110, 110), "hit": (0, 170, 0), "miss": (215, 0, 0)}
LEGEND = ("green frame: the query's identity, red: another; dist: distance to the query "
          "(smaller first)")


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


def ranked_list_image(query: Cell, gallery: list[Cell], title: tuple[str, ...] = ()) -> Image.Image:
    """Compose the query and its gallery cells side by side with frames and captions, under the
    ``title`` lines (none: the cells start at the top)."""
    crops = [_scaled(c.image) for c in (query, *gallery)]
    img_h = max(p.height for p in crops)
    cell_w = max(max(p.width for p in crops), TEXT_WIDTH) + 2 * BORDER
    cell_h = img_h + 2 * BORDER
    top = len(title) * TITLE_LINE + (PAD if title else 0)
    width = cell_w * len(crops) + GAP + PAD * max(len(gallery) - 1, 0)
    canvas = Image.new("RGB", (width, top + cell_h + PAD + CAPTION_LINES * LINE + PAD), "white")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=FONT_SIZE)
    title_font = ImageFont.load_default(size=TITLE_FONT_SIZE)
    for n, text in enumerate(title):
        draw.text((BORDER, n * TITLE_LINE), text, fill=(0, 0, 0) if n < 2 else (90, 90, 90),
                  font=title_font)
    x = 0
    for i, (cell, crop) in enumerate(zip((query, *gallery), crops)):
        draw.rectangle([x, top, x + cell_w - 1, top + cell_h - 1], fill=cell.frame)
        canvas.paste(crop, (x + (cell_w - crop.width) // 2, top + BORDER + (img_h - crop.height) // 2))
        for n, text in enumerate(cell.lines):
            draw.text((x + BORDER, top + cell_h + PAD + n * LINE), text, fill=(0, 0, 0), font=font)
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


def _ranked(trial: Trial, row: np.ndarray, qi: int) -> np.ndarray:
    """Gallery positions the protocol keeps for query ``qi``, nearest first (stable)."""
    kept = np.flatnonzero(~trial.exclude[qi]) if trial.exclude is not None else np.arange(row.size)
    return kept[np.argsort(row[kept], kind="stable")]


def first_match_rank(test: IndexTable, trial: Trial, dist: np.ndarray, qi: int) -> int | None:
    """1-based rank of the first gallery image of the query's identity among the kept gallery
    entries; None when the gallery holds none."""
    ranked = _ranked(trial, dist[qi].astype(np.float64), qi)
    hits = np.flatnonzero(test.pids[trial.gallery[ranked]] == test.pids[trial.query[qi]])
    return int(hits[0]) + 1 if hits.size else None


def _cells(cache: np.ndarray, test: IndexTable, test_rows: np.ndarray, dist: np.ndarray,
           trial: Trial, qi: int) -> tuple[Cell, list[Cell]]:
    q = trial.query[qi]
    row = dist[qi].astype(np.float64)  # (G,)
    query = Cell(cache[test_rows[q]], ("query", f"id {test.pids[q]} cam {test.cams[q]}"),
                 COLOURS["query"])
    gallery = []
    for rank, j in enumerate(_ranked(trial, row, qi)[:TOP], start=1):
        g = trial.gallery[j]
        hit = bool(test.pids[g] == test.pids[q])
        gallery.append(Cell(cache[test_rows[g]], (f"#{rank} dist {row[j]:.3f}",
                                                  f"id {test.pids[g]} cam {test.cams[g]}"),
                            COLOURS["hit" if hit else "miss"]))
    return query, gallery


def _about(which: str, ap: float, first: int | None, gallery: int) -> str:
    """The title line of one query: which it is, its AP, where its first true match is among
    the ``gallery`` images it is ranked against."""
    if np.isnan(ap) or first is None:
        return f"{which}: no image of its identity among the {gallery} gallery images"
    return f"{which}: AP {ap:.2f}, first true match at rank {first} of {gallery}"


def write_ranked_lists(out_dir: Path, cache: np.ndarray, test: IndexTable, test_rows: np.ndarray,
                       dist: np.ndarray, trial: Trial, prefix: str, *, spread: int = 0,
                       worst: int = 0, title: str = "") -> list[Path]:
    """Pictures of ``spread`` evenly spread and the ``worst`` lowest-AP queries of ``trial``.

    ``dist``: (Q, G) distances of the trial, as evaluated; ``prefix``: ``<mode>-<checkpoint>``;
    ``title``: the pictures' first line (data set, protocol, checkpoint).
    """
    ap = query_average_precision(dist, test.pids[trial.query], test.pids[trial.gallery],
                                 trial.exclude)  # (Q,)
    spread_at, worst_at = spread_queries(len(trial.query), spread), worst_queries(ap, worst)
    picks = [(qi, "query", n, f"query {n} of {len(spread_at)} spread over the first gallery trial")
             for n, qi in enumerate(spread_at, start=1)]
    picks += [(qi, "worst", n, f"worst {n} of {len(worst_at)} (lowest AP first)")
              for n, qi in enumerate(worst_at, start=1)]
    written = []
    for qi, kind, n, which in picks:
        q = trial.query[qi]
        filename = f"{prefix}-{kind}{n:02d}-id{test.pids[q]}-cam{test.cams[q]}.png"
        shown = len(_ranked(trial, dist[qi], qi))  # the gallery the query is ranked against
        lines = (title or prefix,
                 _about(which, ap[qi], first_match_rank(test, trial, dist, qi), shown), LEGEND)
        picture = ranked_list_image(*_cells(cache, test, test_rows, dist, trial, qi), title=lines)
        path = Path(out_dir) / filename
        with atomic_output(path) as tmp:
            picture.save(tmp, format="PNG")
        written.append(path)
    return written
