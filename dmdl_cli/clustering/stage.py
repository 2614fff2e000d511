"""Stage `cluster`: pseudo-label the train images of each modality with one checkpoint.

Writes ``WS/labels/cluster-<checkpoint name>.npz`` (labels aligned with index rows, -1 outlier
or not clustered, with the checkpoint sha256 and recipe hash inside) and the resolved recipe
beside it (``cluster-<checkpoint name>.recipe.yaml``), and prints per modality:
clusters, outliers, largest and mean cluster size, seconds; and, when the data set has
identities, ARI, NMI and purity against them, labelled as diagnostics.
"""
from __future__ import annotations

import numpy as np
from rich.markup import escape
from rich.table import Table

from dmdl_cli.clustering.modalities import cluster_modalities
from dmdl_cli.console import console, log
from dmdl_cli.context import StageContext
from dmdl_cli.data.index import INFRARED, MODALITY_NAMES, VISIBLE
from dmdl_cli.errors import DmdlError
from dmdl_cli.features.extract import cached_features
from dmdl_cli.provenance import sidecar_recipe_path, write_recipe
from dmdl_cli.recipe import CLUSTER_MODALITIES
from dmdl_cli.workspace import save_labels

MODALITY_CHOICES = dict(zip(CLUSTER_MODALITIES, ((VISIBLE,), (INFRARED,), (VISIBLE, INFRARED))))


def cluster_stage(ctx: StageContext, *, modality: str = "both") -> np.ndarray:
    """Cluster the train images of ``modality`` with the features of the checkpoint the command
    loads (``ctx.checkpoint``: without ``--checkpoint`` the newest stage result, or the untrained
    backbone before any training)."""
    if modality not in MODALITY_CHOICES:
        raise DmdlError(f"--modality {modality}: choose visible, infrared or both")
    wanted = MODALITY_CHOICES[modality]
    ws, recipe, index = ctx.ws, ctx.recipe, ctx.index
    train_rows = index.rows(split="train")
    for m in wanted:
        if not (index.modality[train_rows] == m).any():
            raise DmdlError(f"{ws.index_path} has no {MODALITY_NAMES[m]} train images to cluster")
    cache = ctx.cache  # checked before the model is built
    loaded = ctx.model()
    log(f"clustering with {escape(loaded.description)}")
    feats, features_file, reused = cached_features(ws, loaded.model, loaded.sha256, "train", cache,
                                                   train_rows, ctx.runtime,
                                                   batch_size=recipe.run.feature_batch)
    (ctx.record_input if reused else ctx.record_output)(features_file)
    mod = index.modality[train_rows].astype(np.int8)
    keep = np.isin(mod, wanted)
    has_ids = bool((index.pids[train_rows] >= 0).any())
    clusters = cluster_modalities(recipe.cluster, feats[keep], train_rows[keep], mod[keep],
                                  index.pids[train_rows][keep] if has_ids else None)

    labels = np.full(len(index), -1, dtype=np.int64)
    offset = 0
    title = (f"pseudo labels: {loaded.name} (k1={recipe.cluster.k1}, k2={recipe.cluster.k2}, "
             f"eps={recipe.cluster.eps}, min_samples={recipe.cluster.min_samples})")
    table = Table(title=escape(title))
    for col in ("modality", "images", "clusters", "outliers", "largest", "mean size", "seconds"):
        table.add_column(col, justify="left" if col == "modality" else "right")
    if has_ids:
        for col in ("ARI*", "NMI*", "purity*"):
            table.add_column(col, justify="right")
    for m in wanted:
        c = clusters[m]
        labels[c.rows] = np.where(c.labels >= 0, c.labels + offset, -1)
        offset += c.centroids.shape[0]
        s = c.stats
        cells = [MODALITY_NAMES[m], str(len(c.rows)), str(s["clusters"]), str(s["outliers"]),
                 str(s["largest"]), f"{s['mean_size']:.1f}", f"{s['seconds']:.1f}"]
        if has_ids:
            cells += [f"{s['ari']:.3f}", f"{s['nmi']:.3f}", f"{s['purity']:.3f}"]
        table.add_row(*cells)
    out = ctx.output(f"cluster-{loaded.name}.npz")
    save_labels(out, labels, checkpoint=loaded.name, checkpoint_sha256=loaded.sha256,
                cache_sha256=cache.sha256, recipe_hash=recipe.hash(), modality=modality,
                stats={MODALITY_NAMES[m]: clusters[m].stats for m in wanted})
    recipe_file = write_recipe(sidecar_recipe_path(out), recipe)
    ctx.record_output(out, recipe_file)
    console.print(table)
    if has_ids:
        console.print("* diagnostics against the data set's identities; training never reads them")
    log(f"wrote {escape(str(out))} and {escape(str(recipe_file))}")
    return labels
