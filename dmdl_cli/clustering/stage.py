"""Stage `cluster`: pseudo-label the train images of each modality with one checkpoint.

Writes ``WS/labels/cluster-<checkpoint name>.npz`` (labels aligned with index rows, -1 outlier
or not clustered, with the checkpoint sha256 and recipe hash inside) and the resolved recipe
beside it (``cluster-<checkpoint name>.recipe.yaml``), and prints per modality:
clusters, outliers, largest and mean cluster size, seconds; and, when the data set has
identities, ARI, NMI and purity against them, labelled as diagnostics.

With ``--eps-sweep START:STOP:STEP`` it labels nothing: it prints, per eps of the grid and
modality, clusters, outliers, the largest cluster's share and the eps robustness, and the eps
the label-free rule of :func:`dmdl_cli.clustering.eps.pick_eps` picks (docs/selection.md), and
writes the same to ``WS/labels/eps-sweep-<checkpoint name>.json``.
"""
from __future__ import annotations

import numpy as np
from rich.markup import escape
from rich.table import Table

from dmdl_cli.atomic import atomic_write_json
from dmdl_cli.clustering.eps import EpsGrid, eps_sweep, jaccard_graph, parse_eps_grid, sweep_reach
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


def cluster_stage(ctx: StageContext, *, modality: str = "both",
                  eps_sweep: str | None = None) -> np.ndarray | dict:
    """Cluster the train images of ``modality`` with the features of the checkpoint the command
    loads (``ctx.checkpoint``: without ``--checkpoint`` the newest stage result, or the untrained
    backbone before any training); with ``eps_sweep`` (START:STOP:STEP) sweep eps instead."""
    if modality not in MODALITY_CHOICES:
        raise DmdlError(f"--modality {modality}: choose visible, infrared or both")
    grid = parse_eps_grid(eps_sweep) if eps_sweep is not None else None
    wanted = MODALITY_CHOICES[modality]
    ws, recipe, index = ctx.ws, ctx.recipe, ctx.index
    train_rows = index.rows(split="train")
    for m in wanted:
        if not (index.modality[train_rows] == m).any():
            raise DmdlError(f"{ws.index_path} has no {MODALITY_NAMES[m]} train images to cluster")
    cache = ctx.cache  # checked before the model is built
    loaded = ctx.model()
    log(f"clustering with {escape(loaded.description)}")
    feats = cached_features(ws, loaded.model, loaded.sha256, "train", cache, train_rows,
                            ctx.runtime, batch_size=recipe.run.feature_batch)
    mod = index.modality[train_rows].astype(np.int8)
    keep = np.isin(mod, wanted)
    has_ids = bool((index.pids[train_rows] >= 0).any())
    if grid is not None:
        truth = index.pids[train_rows][keep] if has_ids else None
        return _sweep(ctx, grid, loaded, feats[keep], mod[keep], truth, wanted)
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
                recipe_hash=recipe.hash(), modality=modality,
                stats={MODALITY_NAMES[m]: clusters[m].stats for m in wanted})
    recipe_file = write_recipe(sidecar_recipe_path(out), recipe)
    ctx.record_output(out, recipe_file)
    console.print(table)
    if has_ids:
        console.print("* diagnostics against the data set's identities; training never reads them")
    log(f"wrote {escape(str(out))} and {escape(str(recipe_file))}")
    return labels


def _sweep(ctx: StageContext, grid: EpsGrid, loaded, feats: np.ndarray, mod: np.ndarray,
           truth: np.ndarray | None, wanted: tuple[int, ...]) -> dict:
    """``--eps-sweep``: one Jaccard graph per modality, DBSCAN at every eps of the grid, the
    table, the picked eps and its JSON record. ``feats (N, D)``, ``mod``/``truth`` ``(N,)``."""
    cfg, select = ctx.recipe.cluster, ctx.recipe.select
    graphs, true_ids = {}, {}
    for m in wanted:
        sel = mod == m
        graphs[m] = jaccard_graph(feats[sel], cfg, reach=sweep_reach(grid))
        if truth is not None:
            true_ids[m] = truth[sel]
    result = eps_sweep(graphs, grid, min_samples=cfg.min_samples,
                       max_largest_share=select.max_largest_share,
                       min_peak=select.sweep_min_peak, true_ids=true_ids or None)
    table = Table(title=escape(f"eps sweep: {loaded.name} (k1={cfg.k1}, k2={cfg.k2}, "
                               f"min_samples={cfg.min_samples}, delta = step {grid.step:g})"))
    columns = ["eps", "modality", "clusters", "outliers", "largest %", "robustness"]
    columns += ["ARI*", "NMI*"] if true_ids else []
    for col in columns:
        table.add_column(col, justify="left" if col == "modality" else "right")
    for row in result.rows:
        cells = [f"{row.eps:g}" + (" <" if row.eps == result.picked else ""),
                 MODALITY_NAMES[row.modality], str(row.clusters), str(row.outliers),
                 f"{100 * row.largest_share:.1f}", f"{row.eps_robustness:.3f}"]
        if true_ids:
            cells += [f"{row.ari:.3f}", f"{row.nmi:.3f}"]
        table.add_row(*cells)
    console.print(table)
    if true_ids:
        console.print("* diagnostics against the data set's identities; the rule never reads them")
    log(f"picked {escape(result.reason)} (the recipe's cluster.eps is {cfg.eps:g})"
        if result.picked is not None else f"no eps picked: {escape(result.reason)}")
    out = ctx.output(f"eps-sweep-{loaded.name}.json")
    record = {"checkpoint": loaded.name, "checkpoint_sha256": loaded.sha256,
              "recipe_hash": ctx.recipe.hash(), "grid": list(grid.values), "step": grid.step,
              **result.to_dict()}
    atomic_write_json(out, record)
    ctx.record_output(out)
    log(f"wrote {escape(str(out))}")
    return record
