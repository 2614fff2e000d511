"""DBSCAN's eps without labels: the labelling's sparse Jaccard graph clustered at other eps.

The labelling (:func:`dmdl_cli.clustering.pseudo_labels.cluster_features`) builds the sparse
k-reciprocal Jaccard graph storing distances up to eps. :func:`jaccard_graph` builds the same
graph by the same code path (same k1, k2, k-NN search) storing distances up to a larger
``reach``; DBSCAN at any eps <= reach on it gives exactly the labels of the graph built to eps
(sklearn takes the stored entries <= eps as the eps-neighbourhoods; a test checks the labels
are identical). So one graph serves the labelling, its re-runs at eps - delta and eps + delta
(:func:`relabel_around`, for the ``eps_robustness`` criterion of
:mod:`dmdl_cli.clustering.criteria`) and a whole grid of eps (:func:`eps_sweep`). The
training's labelling builds it so at every epoch
(:func:`dmdl_cli.clustering.modalities.cluster_modalities` with a ``margin``).

The rule that picks an eps from a sweep is declared here, before any data is seen
(:func:`pick_eps`, docs/selection.md): robustness of each grid eps measured against its grid
neighbours (delta = the grid's step); among the eps whose largest cluster holds at most
``max_largest_share`` of every modality's images, the first peak of the robustness curve that
reaches ``min_peak`` times its best value. True identities, where the data set has them, are
only printed beside the sweep as a diagnostic: the rule never reads them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import scipy.sparse as sp

from dmdl_cli.clustering.criteria import eps_robustness, json_ready, label_alarms
from dmdl_cli.clustering.jaccard import jaccard_distance
from dmdl_cli.clustering.pseudo_labels import cluster_stats, dbscan_precomputed
from dmdl_cli.errors import DmdlError
from dmdl_cli.recipe import ClusterRecipe

# Decimals eps values are rounded to (grid points, eps +- delta): 0.4 + 3 * 0.1 is 0.7.
_EPS_DECIMALS = 9
# The most eps a sweep runs (a typo like 0.4:0.7:0.0001 would otherwise run 3,000 DBSCANs).
MAX_GRID = 200


@dataclass(frozen=True)
class JaccardGraph:
    """The sparse Jaccard distance of one modality's images (``dmdl_cli/clustering/jaccard.py``
    storage convention), storing every distance up to ``reach``."""

    distances: sp.csr_matrix  # (N, N) float32
    reach: float
    warnings: tuple[str, ...] = ()  # what the distance adjusted (k1 >= N clamped, ...)

    @property
    def size(self) -> int:
        return int(self.distances.shape[0])


def jaccard_graph(features: np.ndarray, cfg: ClusterRecipe, *, reach: float,
                  k1: int | None = None, neighbors: tuple[np.ndarray, np.ndarray] | None = None
                  ) -> JaccardGraph:
    """The labelling's Jaccard graph of features (N, D) (``cfg.k1`` or ``k1``, ``cfg.k2``,
    ``cfg.knn``), storing distances up to ``reach`` (at least the eps DBSCAN will use)."""
    if not 0.0 < reach < 1.0:
        raise DmdlError(f"the Jaccard graph's reach must be in (0, 1), got {reach}: eps + delta "
                        "must stay below 1 (lower the eps grid or select.eps_delta)")
    dist, info = jaccard_distance(features, k1=cfg.k1 if k1 is None else k1, k2=cfg.k2,
                                  knn_method=cfg.knn, max_distance=float(reach),
                                  neighbors=neighbors, return_info=True)
    return JaccardGraph(dist, float(reach), tuple(info.get("warnings", ())))


def labels_at(graph: JaccardGraph, eps: float, min_samples: int) -> np.ndarray:
    """DBSCAN labels (N,) int64 (-1 outlier, renumbered) of ``graph`` at ``eps`` <= its reach."""
    eps = round(float(eps), _EPS_DECIMALS)
    if not 0.0 < eps <= graph.reach:
        raise ValueError(f"eps {eps} outside (0, reach {graph.reach}] of the Jaccard graph")
    return dbscan_precomputed(graph.distances, eps=eps, min_samples=min_samples)


def relabel_around(graph: JaccardGraph, eps: float, delta: float, min_samples: int
                   ) -> tuple[np.ndarray, np.ndarray]:
    """The labels at ``eps - delta`` (tighter) and ``eps + delta`` (looser), each (N,) int64,
    for the ``eps_robustness`` criterion; the graph must reach eps + delta."""
    return (labels_at(graph, eps - delta, min_samples), labels_at(graph, eps + delta, min_samples))


def feasible_margin(eps: float, delta: float) -> bool:
    """Whether DBSCAN can be re-run at ``eps - delta`` and ``eps + delta`` on a Jaccard graph:
    both inside (0, 1) (a distance of 1 is "no overlap", which the sparse graph does not store)."""
    return 0.0 < round(eps - delta, _EPS_DECIMALS) and round(eps + delta, _EPS_DECIMALS) < 1.0


@dataclass(frozen=True)
class EpsGrid:
    """The eps values of a sweep (ascending) and the step between them."""

    values: tuple[float, ...]
    step: float


def parse_eps_grid(text: str, *, option: str = "--eps-sweep") -> EpsGrid:
    """``"0.4:0.7:0.05"`` -> eps 0.4, 0.45, ..., 0.7 (START:STOP:STEP, both ends included).

    Bad text raises one :class:`DmdlError` line naming ``option`` and the fix.
    """
    parts = str(text).strip().split(":")
    example = f"e.g. {option} 0.4:0.7:0.05"
    if len(parts) != 3:
        raise DmdlError(f"{option} {text!r}: expected START:STOP:STEP, {example}")
    try:
        start, stop, step = (float(p) for p in parts)
    except ValueError:
        raise DmdlError(f"{option} {text!r}: START, STOP and STEP must be numbers, {example}") from None
    if not all(math.isfinite(v) for v in (start, stop, step)):
        raise DmdlError(f"{option} {text!r}: START, STOP and STEP must be finite, {example}")
    if step <= 0:
        raise DmdlError(f"{option} {text!r}: STEP must be > 0, {example}")
    if not (0.0 < start - step and stop + step < 1.0 and start <= stop):
        raise DmdlError(f"{option} {text!r}: need START <= STOP with START - STEP > 0 and "
                        f"STOP + STEP < 1 (each eps is compared with eps -+ STEP; Jaccard "
                        f"distances lie in [0, 1]), {example}")
    count = int(math.floor((stop - start) / step + 1e-9)) + 1
    if count > MAX_GRID:
        raise DmdlError(f"{option} {text!r}: {count} values of eps, more than {MAX_GRID}: "
                        f"use a larger STEP, {example}")
    values = tuple(round(start + i * step, _EPS_DECIMALS) for i in range(count))
    return EpsGrid(values, round(step, _EPS_DECIMALS))


@dataclass
class SweepRow:
    """One eps and one modality of a sweep. ``ari``, ``nmi``, ``purity``: against the data
    set's true identities (diagnostic only; None without identities)."""

    eps: float
    modality: int
    clusters: int
    outliers: int
    largest_share: float
    eps_robustness: float
    independence: float
    compactness: float
    ari: float | None = None
    nmi: float | None = None
    purity: float | None = None


@dataclass
class SweepResult:
    """Rows per (eps, modality), in grid order; the eps the rule picked (None: no eps was
    eligible) and why; the score (mean robustness over the modalities) of every eps."""

    rows: list[SweepRow]
    picked: float | None
    reason: str
    scores: dict[float, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return json_ready({"rows": [dict(vars(r)) for r in self.rows], "picked": self.picked,
                           "reason": self.reason,
                           "scores": {str(k): v for k, v in self.scores.items()}})


def sweep_reach(grid: EpsGrid) -> float:
    """The reach a sweep's Jaccard graphs need: the grid's largest eps + its step."""
    return round(grid.values[-1] + grid.step, _EPS_DECIMALS)


def eps_sweep(graphs: Mapping[int, JaccardGraph], grid: EpsGrid, *, min_samples: int,
              max_largest_share: float = 0.5, min_peak: float = 0.5,
              true_ids: Mapping[int, np.ndarray] | None = None) -> SweepResult:
    """DBSCAN of each modality's graph at every eps of ``grid`` and the eps :func:`pick_eps`
    chooses: rows per (eps, modality) with clusters, outliers, largest share and
    ``eps_robustness`` against the grid's neighbours (delta = ``grid.step``).

    ``graphs``: modality -> its :class:`JaccardGraph`, reaching :func:`sweep_reach`;
    ``true_ids``: modality -> (N_m,) true person ids, only for the diagnostic columns.
    Each distinct eps is clustered once (neighbouring grid points share runs).
    """
    delta = grid.step
    rows: list[SweepRow] = []
    for m, graph in sorted(graphs.items()):
        if sweep_reach(grid) > graph.reach:
            raise ValueError(f"graph of modality {m} reaches {graph.reach} < {sweep_reach(grid)}")
        cache: dict[float, np.ndarray] = {}

        def at(eps: float) -> np.ndarray:
            key = round(eps, _EPS_DECIMALS)
            if key not in cache:
                cache[key] = labels_at(graph, key, min_samples)
            return cache[key]

        for eps in grid.values:
            labels = at(eps)
            rob = eps_robustness(labels, at(eps - delta), at(eps + delta))
            alarms = label_alarms(labels)
            row = SweepRow(eps, m, alarms["clusters"], int(np.count_nonzero(labels < 0)),
                           alarms["largest_share"], rob["eps_robustness"], rob["independence"],
                           rob["compactness"])
            if true_ids is not None and m in true_ids:
                stats = cluster_stats(labels, true_ids[m])
                row.ari, row.nmi, row.purity = stats["ari"], stats["nmi"], stats["purity"]
            rows.append(row)
    picked, reason, scores = pick_eps(rows, max_largest_share=max_largest_share,
                                      min_peak=min_peak)
    rows.sort(key=lambda r: (r.eps, r.modality))
    return SweepResult(rows, picked, reason, scores)


def pick_eps(rows: Sequence[SweepRow], *, max_largest_share: float = 0.5, min_peak: float = 0.5
             ) -> tuple[float | None, str, dict[float, float]]:
    """The pre-declared label-free rule: ``(eps or None, reason, score per eps)``.

    score(eps) = mean over the modalities of ``eps_robustness`` at eps. Eligible eps: every
    modality has a cluster and its largest cluster holds at most ``max_largest_share`` of its
    images (one giant cluster is robust too). A peak is a run of consecutive eligible eps with
    equal scores, at least as high as the eligible eps on either side (the grid's ends count as
    lower). The rule takes the first peak (smallest eps) scoring at least ``min_peak`` times the
    best eligible score, and the middle eps of its run (the lower middle of an even count): the
    finest clustering that is stable under eps +- delta. Coarser stable clusterings exist at
    larger eps when look-alike people merge into stable groups; they come after, so the first
    peak is the people's. No true identity is read.
    """
    by_eps: dict[float, list[SweepRow]] = {}
    for row in rows:
        by_eps.setdefault(row.eps, []).append(row)
    scores = {eps: float(np.mean([r.eps_robustness for r in group]))
              for eps, group in sorted(by_eps.items())}
    eligible = [eps for eps, group in sorted(by_eps.items())
                if all(r.clusters > 0 and r.largest_share <= max_largest_share for r in group)]
    if not eligible:
        return None, (f"no eps of the grid keeps every modality's largest cluster at or below "
                      f"{max_largest_share:.0%} of its images with at least one cluster"), scores
    values = [scores[e] for e in eligible]
    floor = min_peak * max(values)
    i = 0
    while i < len(values):
        j = i  # values[i..j]: a run of equal scores
        while j + 1 < len(values) and values[j + 1] == values[i]:
            j += 1
        left = values[i - 1] if i > 0 else -np.inf
        right = values[j + 1] if j + 1 < len(values) else -np.inf
        if values[i] >= left and values[i] >= right and values[i] >= floor:
            picked = eligible[i + (j - i) // 2]
            run = f"eps {eligible[i]:g}-{eligible[j]:g}" if j > i else f"eps {eligible[i]:g}"
            return picked, (f"eps {picked:g}: the first peak of eps robustness ({run}, "
                            f"{values[i]:.3f}; best {max(values):.3f}) among {len(eligible)} "
                            "eligible eps"), scores
        i = j + 1
    raise AssertionError("a finite sequence has a peak at its maximum")  # pragma: no cover


__all__ = ["EpsGrid", "JaccardGraph", "MAX_GRID", "SweepResult", "SweepRow", "eps_sweep",
           "feasible_margin", "jaccard_graph", "labels_at", "parse_eps_grid", "pick_eps",
           "relabel_around", "sweep_reach"]
