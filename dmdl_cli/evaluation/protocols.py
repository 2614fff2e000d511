"""Test protocols: which test rows are queries / gallery in each trial of each data set.

A protocol turns the metadata of the TEST rows (identity, camera, modality; ``0`` visible,
``1`` infrared) into a list of :class:`Trial` objects. A trial holds row positions into those
arrays plus what :func:`dmdl_cli.evaluation.metrics.rank_metrics` needs besides distances:

* **SYSU-MM01** (and ``synthetic``, which mirrors it) — IR query -> visible gallery. Queries:
  all infrared test rows (cams 3, 6). Gallery candidates: visible rows of cams 1, 2, 4, 5
  (``all-search``) or 1, 2 (``indoor-search``). Per trial ``t`` (seed ``t``, ``t = 0..trials-1``)
  the gallery keeps ``shots`` random images (without replacement; all if fewer) of each
  (identity, camera) pair. Exclusion: a cam-3 query ignores every cam-2 gallery image
  (:func:`sysu_exclusion`). De-duplicated CMC.
* **RegDB** — the workspace holds one trial's test split. ``visible-to-infrared``: visible
  queries vs all infrared rows; ``infrared-to-visible``: the reverse. One trial, no sampling,
  no exclusion, plain CMC.
* **LLCM** — ``visible-to-infrared`` / ``infrared-to-visible``: all rows of the query modality vs
  ``shots`` random images per (identity, camera) of the other modality, seeds ``0..trials-1``.
  Exclusion: a query ignores gallery images of its own identity taken by its own camera number.
  De-duplicated CMC.

Sampling uses ``numpy.random.default_rng(seed)`` and is vectorised: one uniform draw per
candidate row, a lexicographic sort by (identity, camera, draw), and the first ``shots`` rows
of each group are kept. The gallery of a trial is ordered by (identity, camera, row position).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dmdl_cli.errors import DmdlError

__all__ = [
    "Trial",
    "PROTOCOLS",
    "protocol_modes",
    "build_trials",
    "sysu_exclusion",
    "same_id_same_cam_exclusion",
    "sample_gallery",
]

_VISIBLE, _INFRARED = 0, 1

# SYSU-MM01 camera layout (data-set facts, not tunable numbers).
SYSU_QUERY_CAMS = (3, 6)
SYSU_GALLERY_CAMS = {"all-search": (1, 2, 4, 5), "indoor-search": (1, 2)}
SYSU_EXCLUDE_QUERY_CAM = 3     # a query from this camera ...
SYSU_EXCLUDE_GALLERY_CAM = 2   # ... ignores gallery images from this one (same place)

_CROSS_MODES = ("visible-to-infrared", "infrared-to-visible")
PROTOCOLS: dict[str, tuple[str, ...]] = {
    "sysu": ("all-search", "indoor-search"),
    "synthetic": ("all-search", "indoor-search"),
    "regdb": _CROSS_MODES,
    "llcm": _CROSS_MODES,
}


@dataclass(frozen=True, eq=False)
class Trial:
    """One evaluation trial (``eq=False``: numpy arrays have no boolean equality).

    Attributes:
        query: ``(Q,)`` int64 row positions of the queries in the test arrays.
        gallery: ``(G,)`` int64 row positions of the gallery.
        exclude: ``(Q, G)`` bool, ``True`` = that query ignores that gallery entry; or ``None``.
        dedup: whether CMC is identity de-duplicated (``rank_metrics(dedup=...)``).
        seed: gallery sampling seed, or ``None`` when the gallery is not sampled.
    """

    query: np.ndarray
    gallery: np.ndarray
    exclude: np.ndarray | None
    dedup: bool
    seed: int | None


def protocol_modes(dataset: str) -> tuple[str, ...]:
    """Evaluation modes of ``dataset``; :class:`DmdlError` for an unknown data set."""
    try:
        return PROTOCOLS[dataset]
    except KeyError:
        raise DmdlError(
            f"unknown data set {dataset!r} for evaluation; known data sets: "
            f"{', '.join(sorted(PROTOCOLS))}"
        ) from None


def sysu_exclusion(q_cams: np.ndarray, g_cams: np.ndarray) -> np.ndarray:
    """``(Q, G)`` bool: ``True`` where a cam-3 query meets a cam-2 gallery image.

    ``exclude[i, j] = (q_cams[i] == 3) and (g_cams[j] == 2)``, whatever the identities, as in
    the SYSU-MM01 reference evaluation.
    """
    q_cams = np.asarray(q_cams)
    g_cams = np.asarray(g_cams)
    return ((q_cams[:, None] == SYSU_EXCLUDE_QUERY_CAM)
            & (g_cams[None, :] == SYSU_EXCLUDE_GALLERY_CAM))


def same_id_same_cam_exclusion(
    q_pids: np.ndarray, g_pids: np.ndarray, q_cams: np.ndarray, g_cams: np.ndarray
) -> np.ndarray:
    """``(Q, G)`` bool: ``True`` where gallery identity and camera number equal the query's."""
    q_pids, g_pids = np.asarray(q_pids), np.asarray(g_pids)
    q_cams, g_cams = np.asarray(q_cams), np.asarray(g_cams)
    return (q_pids[:, None] == g_pids[None, :]) & (q_cams[:, None] == g_cams[None, :])


def sample_gallery(
    candidates: np.ndarray,
    pids: np.ndarray,
    cams: np.ndarray,
    *,
    shots: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """Pick ``shots`` random rows (without replacement; all if fewer) per (identity, camera).

    Args:
        candidates: ``(N,)`` int64 row positions eligible for the gallery.
        pids, cams: full ``(rows,)`` identity / camera arrays indexed by ``candidates``.
        shots: images kept per (identity, camera) pair (1 single-shot, 10 multi-shot).
        rng: the generator; exactly one ``rng.random(N)`` draw is consumed.

    Returns:
        ``(G,)`` int64 row positions ordered by (identity, camera, row position).
    """
    candidates = np.asarray(candidates, dtype=np.int64)
    n = candidates.size
    draw = rng.random(n)                                           # (N,) uniform keys
    if n == 0:
        return candidates
    c_p, c_c = pids[candidates], cams[candidates]
    o = np.lexsort((draw, c_c, c_p))                               # by pid, cam, random key
    p_s, c_s = c_p[o], c_c[o]
    new_group = np.r_[True, (p_s[1:] != p_s[:-1]) | (c_s[1:] != c_s[:-1])]  # (N,)
    pos = np.arange(n)
    group_start = np.maximum.accumulate(np.where(new_group, pos, 0))
    chosen = candidates[o[(pos - group_start) < shots]]
    return chosen[np.lexsort((chosen, cams[chosen], pids[chosen]))]


def _check_inputs(pids, cams, modality, trials: int, shots: int):
    pids = np.asarray(pids)
    cams = np.asarray(cams)
    modality = np.asarray(modality)
    if pids.ndim != 1 or cams.shape != pids.shape or modality.shape != pids.shape:
        raise ValueError(
            f"pids, cams and modality must be 1-D arrays of equal length, got shapes "
            f"{pids.shape}, {cams.shape}, {modality.shape}"
        )
    bad = ~np.isin(modality, (_VISIBLE, _INFRARED))
    if bad.any():
        raise ValueError(
            f"modality must be 0 (visible) or 1 (infrared); found {modality[bad][0]!r}")
    if trials < 1:
        raise DmdlError(f"the number of evaluation trials must be >= 1, got {trials}")
    if shots < 1:
        raise DmdlError(f"the number of gallery shots must be >= 1, got {shots}")
    return pids, cams, modality


def _nonempty(rows: np.ndarray, what: str, dataset: str, mode: str) -> np.ndarray:
    if rows.size == 0:
        raise DmdlError(
            f"{dataset} {mode}: the test split has no {what}; check the workspace index "
            f"(index.csv test rows)"
        )
    return rows.astype(np.int64)


def build_trials(
    dataset: str,
    mode: str,
    *,
    pids: np.ndarray,
    cams: np.ndarray,
    modality: np.ndarray,
    trials: int = 10,
    shots: int = 1,
) -> list[Trial]:
    """The evaluation trials of ``dataset`` / ``mode`` over the given TEST rows.

    Args:
        dataset: ``sysu``, ``synthetic``, ``regdb`` or ``llcm`` (see :data:`PROTOCOLS`).
        mode: one of :func:`protocol_modes` ``(dataset)``.
        pids, cams, modality: ``(N,)`` arrays of the test rows (modality 0 visible, 1 IR).
        trials: number of sampled galleries (seeds ``0..trials-1``); ignored for RegDB.
        shots: gallery images per (identity, camera): 1 single-shot, 10 multi-shot; ignored
            for RegDB.

    Returns:
        ``trials`` :class:`Trial` objects (one for RegDB).

    Raises:
        DmdlError: unknown data set, a mode the data set does not have (the message lists the
            valid ones), bad ``trials``/``shots``, or an empty query / gallery set.
    """
    modes = protocol_modes(dataset)
    if mode not in modes:
        raise DmdlError(
            f"evaluation mode {mode!r} does not fit data set {dataset!r}; "
            f"valid modes: {', '.join(modes)}"
        )
    pids, cams, modality = _check_inputs(pids, cams, modality, trials, shots)

    if dataset in ("sysu", "synthetic"):
        query = _nonempty(np.flatnonzero(modality == _INFRARED), "infrared query images",
                          dataset, mode)
        cand = _nonempty(
            np.flatnonzero((modality == _VISIBLE) & np.isin(cams, SYSU_GALLERY_CAMS[mode])),
            f"visible gallery images from cams {SYSU_GALLERY_CAMS[mode]}", dataset, mode,
        )
        out = []
        for seed in range(trials):
            gallery = sample_gallery(cand, pids, cams, shots=shots,
                                     rng=np.random.default_rng(seed))
            out.append(Trial(query, gallery, sysu_exclusion(cams[query], cams[gallery]),
                             True, seed))
        return out

    q_mod = _VISIBLE if mode == "visible-to-infrared" else _INFRARED
    g_mod = 1 - q_mod
    names = {_VISIBLE: "visible images", _INFRARED: "infrared images"}
    query = _nonempty(np.flatnonzero(modality == q_mod), names[q_mod], dataset, mode)
    cand = _nonempty(np.flatnonzero(modality == g_mod), names[g_mod], dataset, mode)

    if dataset == "regdb":
        return [Trial(query, cand, None, False, None)]

    # llcm
    out = []
    for seed in range(trials):
        gallery = sample_gallery(cand, pids, cams, shots=shots, rng=np.random.default_rng(seed))
        excl = same_id_same_cam_exclusion(pids[query], pids[gallery], cams[query], cams[gallery])
        out.append(Trial(query, gallery, excl, True, seed))
    return out
