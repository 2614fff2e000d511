"""Ranked-list pictures: a query, then its top gallery matches, green = same identity, red = not."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from dmdl_cli.atomic import atomic_output
from dmdl_cli.data.index import IndexTable
from dmdl_cli.evaluation.protocols import Trial
from dmdl_cli.workspace import Workspace

TOP = 10
BORDER = 4
GAP = 8
COLOURS = {"query": (40, 40, 40), "hit": (0, 170, 0), "miss": (210, 0, 0)}


def ranked_list_image(query: np.ndarray, gallery: list[np.ndarray], hits: list[bool]) -> Image.Image:
    """Compose (H, W, 3) uint8 crops side by side with coloured borders."""
    h, w = query.shape[:2]
    cell_w = w + 2 * BORDER
    canvas = Image.new("RGB", (cell_w * (len(gallery) + 1) + GAP, h + 2 * BORDER), "white")
    draw = ImageDraw.Draw(canvas)
    items = [(query, COLOURS["query"])] + [(g, COLOURS["hit" if hit else "miss"])
                                           for g, hit in zip(gallery, hits)]
    x = 0
    for i, (img, colour) in enumerate(items):
        draw.rectangle([x, 0, x + cell_w - 1, h + 2 * BORDER - 1], fill=colour)
        canvas.paste(Image.fromarray(img), (x + BORDER, BORDER))
        x += cell_w + (GAP if i == 0 else 0)
    return canvas


def write_ranked_lists(ws: Workspace, cache: np.ndarray, test: IndexTable, test_rows: np.ndarray,
                       feats: np.ndarray, trial: Trial, mode: str, name: str, *,
                       count: int) -> list[Path]:
    """Pictures for the first ``count`` queries of ``trial`` (evenly spread over the queries)."""
    out_dir = ws.dir("eval") / "ranks"
    picks = np.linspace(0, len(trial.query) - 1, num=min(count, len(trial.query))).astype(int)
    written = []
    for qi in picks:
        q = trial.query[qi]
        dist = 2.0 - 2.0 * (feats[trial.gallery] @ feats[q])  # (G,)
        if trial.exclude is not None:
            dist = np.where(trial.exclude[qi], np.inf, dist)
        order = np.argsort(dist, kind="stable")[:TOP]
        gallery = [cache[test_rows[trial.gallery[j]]] for j in order]
        hits = [bool(test.pids[trial.gallery[j]] == test.pids[q]) for j in order]
        picture = ranked_list_image(cache[test_rows[q]], gallery, hits)
        path = out_dir / f"{mode}-{name}-q{int(q):05d}.jpg"
        with atomic_output(path) as tmp:
            picture.save(tmp, format="JPEG", quality=92)
        written.append(path)
    return written
