"""Re-estimating BatchNorm running statistics on clean training images ("precise BN").

During training every BatchNorm layer normalises with the statistics of the current batch of
augmented two-view images, and its running mean / variance are an exponential average of those
batches taken while the weights move. Clustering features, the memories built from them and the
test embeddings are computed in eval mode with these running statistics. For an
ImageNet-initialised network the two agree closely; for a network trained from scratch they do
not (on the demo's stage-1 model the train-mode and eval-mode embeddings of the same clean
images have cosine 0.41; after re-estimation 0.89), and the contrastive memory then describes a
different embedding from the one being trained.

``recalibrate_batchnorm`` replaces every running mean / variance by the plain average over
batches of clean (un-augmented) cache images, with the weights fixed. It reads no labels.
"""
from __future__ import annotations

import numpy as np
import torch

from dmdl_cli.console import make_progress
from dmdl_cli.data.cache import read_rows
from dmdl_cli.model.backbone import normalize_batch
from dmdl_cli.runtime import Runtime


def batchnorm_layers(model: torch.nn.Module) -> list[torch.nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
            and m.track_running_stats]


def recalibration_rows(rows: np.ndarray, count: int, seed: int, epoch: int) -> np.ndarray:
    """``min(count, len(rows))`` of ``rows`` in a shuffled order fixed by (seed, epoch)."""
    rng = np.random.default_rng([seed, epoch, 0x42_4E])  # 0x424E: "BN", a stream of its own
    order = rng.permutation(len(rows))[:count]
    return np.asarray(rows, dtype=np.int64)[order]


def recalibrate_batchnorm(model: torch.nn.Module, cache: np.ndarray, rows: np.ndarray,
                          runtime: Runtime, *, batch_size: int,
                          description: str = "BatchNorm statistics") -> int:
    """Set every BatchNorm layer's running statistics to their average over the clean images
    ``cache[rows]`` (batches of ``batch_size`` in the given order). Returns the number of layers.

    A trailing batch of fewer than 2 images is skipped (its variance is undefined). The model's
    parameters, train/eval mode and the layers' momentum are left as they were.
    """
    layers = batchnorm_layers(model)
    if not layers or len(rows) < 2:
        return 0
    momenta = [layer.momentum for layer in layers]
    was_training = model.training
    for layer in layers:
        layer.reset_running_stats()
        layer.momentum = None  # cumulative moving average: the plain mean over batches
    model.train()
    try:
        with torch.no_grad(), make_progress("img") as progress:
            task = progress.add_task(description, total=len(rows), info="")
            for start in range(0, len(rows), batch_size):
                batch_rows = np.sort(rows[start:start + batch_size])
                if len(batch_rows) < 2:
                    break
                images = torch.from_numpy(read_rows(cache, batch_rows)).permute(0, 3, 1, 2)
                x = runtime.to_input(normalize_batch(images))  # (B, 3, H, W)
                with runtime.autocast():
                    model(x)
                progress.advance(task, len(batch_rows))
    finally:
        for layer, momentum in zip(layers, momenta):
            layer.momentum = momentum
        model.train(was_training)
    return len(layers)
