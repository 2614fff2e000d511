"""Criteria of kept checkpoints computed after training, for a run whose log holds none.

With ``run.keep_epochs`` a stage keeps ``epoch-NNN.pt``: the model after NNN epochs, i.e. the
model that made epoch NNN's labels (0-based loop epoch NNN). Its train features, labelled as the
stage labels them (``cluster:`` keys; in stage 2 ``stage2.k1_adopting`` for the adopting
modality and the association at that epoch), give the same criteria record the training would
have logged at epoch NNN (:func:`dmdl_cli.clustering.criteria.epoch_criteria`), provided the
BatchNorm statistics are not re-estimated before each labelling (``train.bn_recalibration: 0``,
the default). The record of epoch 0 comes from the model the stage started from (stage 1: the
recipe's untrained network; stage 2: stage 1's ``final.pt``). Stability compares each epoch
with the previous record, so skipped epochs make it a comparison over a longer step (the
record's ``previous_epoch`` says which).

Reads train images only: never a test row.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from dmdl_cli.clustering.criteria import EpochLabels, epoch_criteria
from dmdl_cli.clustering.modalities import epoch_labels
from dmdl_cli.data.index import IndexTable
from dmdl_cli.features.extract import extract_features
from dmdl_cli.model.loading import LoadedModel, resolve_model
from dmdl_cli.recipe import Recipe
from dmdl_cli.runtime import Runtime
from dmdl_cli.selected import start_checkpoint
from dmdl_cli.stages import stage_spec
from dmdl_cli.training.cross import clustering_k1
from dmdl_cli.workspace import Workspace

_EPOCH_FILE = re.compile(r"epoch-(\d+)\.pt")


def kept_checkpoints(ws: Workspace, stage_name: str, recipe: Recipe | None = None) -> dict[int, Path]:
    """``{epoch: path}`` of a stage's models by epochs trained: the kept ``epoch-NNN.pt`` and
    the model it started from (0: stage 2's upstream ``final.pt``, or with ``recipe``'s
    ``stage2.start_from: selected`` the model ``stage1/selected.pt`` names; stage 1's untrained
    network is the string ``imagenet``, the name :func:`resolve_model` knows it by)."""
    spec = stage_spec(stage_name)
    out: dict[int, Path] = {}
    folder = ws.root / spec.folder
    for path in folder.glob("epoch-*.pt") if folder.is_dir() else ():
        match = _EPOCH_FILE.fullmatch(path.name)
        if match:
            out[int(match.group(1))] = path
    if spec.upstream is not None:
        start = (start_checkpoint(ws, spec, recipe)[0] if recipe is not None
                 else stage_spec(spec.upstream).final(ws))
        if start.is_file():
            out[0] = start
    else:
        out[0] = Path("imagenet")
    return dict(sorted(out.items()))


def checkpoint_criteria(ws: Workspace, recipe: Recipe, stage_name: str, *, index: IndexTable,
                        cache: np.ndarray, runtime: Runtime,
                        load: Callable[[str], LoadedModel] | None = None,
                        epochs: list[int] | None = None) -> Iterator[dict]:
    """The criteria record of each kept model of ``stage_name`` (:func:`kept_checkpoints`, or
    only ``epochs``), in epoch order, each with ``checkpoint`` (its name) and
    ``previous_epoch``. ``load``: checkpoint -> model (default :func:`resolve_model`; a stage
    passes ``ctx.model`` so the ledger records what it read)."""
    load = load or (lambda name: resolve_model(ws, recipe, name))
    spec = stage_spec(stage_name)
    select, cluster = recipe.select, recipe.cluster
    rows = index.rows(split="train")
    modality = index.modality[rows]
    previous: tuple[int, EpochLabels] | None = None
    for epoch, path in kept_checkpoints(ws, stage_name, recipe).items():
        if epochs is not None and epoch not in epochs:
            continue
        loaded = load(str(path))
        feats = extract_features(loaded.model, cache, rows, runtime, batch_size=recipe.run.feature_batch,
                                 flip=cluster.flip_average, description=f"{loaded.name} train features")
        trains_across = spec.upstream is not None  # stage 2: association, k1 alternation
        now = epoch_labels(feats, modality, cluster, delta=select.eps_delta,
                           k1=clustering_k1(recipe, epoch) if trains_across else None,
                           association=recipe.association if trains_across else None,
                           epoch=epoch)
        record = epoch_criteria(now, previous[1] if previous else None, feats, epoch=epoch,
                                rank_samples=select.rank_samples, seed=recipe.train.seed)
        record.update(checkpoint=loaded.name, previous_epoch=previous[0] if previous else None)
        previous = (epoch, now)
        yield record


__all__ = ["checkpoint_criteria", "kept_checkpoints"]
