"""Batched, flip-averaged feature extraction from the image cache, cached per checkpoint.

``extract_features`` runs the network under ``torch.inference_mode`` (AMP on GPU) and returns
the L2-normalised mean of the embeddings of each image and its horizontal mirror.
``cached_features`` keeps the result in ``WS/features/`` keyed by (checkpoint sha256, cache
sha256, split, input size), so a second evaluation of one checkpoint does not touch the network.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dmdl_cli.atomic import atomic_output
from dmdl_cli.console import log, make_progress
from dmdl_cli.data.cache import ImageCache, read_rows
from dmdl_cli.model.backbone import normalize_batch
from dmdl_cli.runtime import Runtime, eval_mode
from dmdl_cli.workspace import Workspace


def extract_features(
    model: torch.nn.Module,
    cache: np.ndarray,
    rows: np.ndarray,
    runtime: Runtime,
    *,
    batch_size: int = 256,
    flip: bool = True,
    description: str = "features",
) -> np.ndarray:
    """Embeddings of cache rows ``rows``: ``(len(rows), D)`` float32, L2-normalised."""
    rows = np.asarray(rows, dtype=np.int64)
    chunks: list[torch.Tensor] = []
    with eval_mode(model), torch.inference_mode(), make_progress("img") as progress:
        task = progress.add_task(description, total=len(rows), info="")
        for start in range(0, len(rows), batch_size):
            batch_rows = rows[start:start + batch_size]
            images = torch.from_numpy(read_rows(cache, batch_rows)).permute(0, 3, 1, 2)  # (B, 3, H, W) uint8
            x = runtime.to_input(normalize_batch(images))
            with runtime.autocast():
                emb = model(x).float()  # (B, D) L2-normalised
                if flip:
                    emb = emb + model(torch.flip(x, dims=[3])).float()
            chunks.append(F.normalize(emb, dim=1).cpu())
            progress.advance(task, len(batch_rows))
    if not chunks:
        return np.zeros((0, getattr(model, "feat_dim", 0)), dtype=np.float32)
    return torch.cat(chunks).numpy().astype(np.float32, copy=False)


def cached_features(
    ws: Workspace,
    model: torch.nn.Module,
    sha256: str,
    split: str,
    cache: ImageCache,
    rows: np.ndarray,
    runtime: Runtime,
    *,
    batch_size: int,
) -> tuple[np.ndarray, Path, bool]:
    """``extract_features`` of ``rows`` memoised in
    ``WS/features/<checkpoint sha16>-<cache sha16>-<split>-HxW.npz``; returns the features,
    the file and whether it was reused (rather than written).

    The file is keyed by the checkpoint's sha256 and by the cache's: features are made only from
    rows that matched their checksums, so a cache rebuilt from other images (or repaired into
    other bytes) is never served features of the old one. It also holds the rows and the cache
    sha256 it was made from, checked before it is reused.
    """
    height, width = cache.shape[1:3]
    path = ws.dir("features") / f"{sha256[:16]}-{cache.sha256[:16]}-{split}-{height}x{width}.npz"
    rows = np.asarray(rows, dtype=np.int64)
    if path.is_file():
        try:
            with np.load(path) as data:
                if np.array_equal(data["rows"], rows) and str(data["cache_sha256"]) == cache.sha256:
                    log(f"read cached features {ws.rel(path)}")
                    return data["features"], path, True
        except (OSError, ValueError, KeyError):
            pass  # damaged or stale: recompute below
    feats = extract_features(model, cache, rows, runtime, batch_size=batch_size,
                             description=f"{split} features")
    with atomic_output(path) as tmp:
        with open(tmp, "wb") as handle:
            np.savez(handle, features=feats, rows=rows, cache_sha256=np.asarray(cache.sha256))
    log(f"wrote {path} ({len(rows)} x {feats.shape[1]})")
    return feats, path, False
