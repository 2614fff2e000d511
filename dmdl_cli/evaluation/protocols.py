"""Test protocols: which test rows are queries / gallery in each trial of each data set.

A protocol turns the metadata of the TEST rows (identity, camera, modality; ``0`` visible,
``1`` infrared) into a list of :class:`Trial` objects. A trial holds row positions into those
arrays plus what :func:`dmdl_cli.evaluation.metrics.rank_metrics` needs besides distances.
Each data set names its protocol kind, modes and camera groups in the table of data sets
(``dmdl_cli/datasets.py``); the kinds:

* ``sysu`` (SYSU-MM01, and ``synthetic``, which mirrors it) — IR query -> visible gallery.
  Queries: all infrared test rows. Gallery candidates: the visible rows of the mode's gallery
  cameras (SYSU-MM01: cams 1, 2, 4, 5 ``all-search``, 1, 2 ``indoor-search``). Per trial ``t``
  (seed ``t``, ``t = 0..trials-1``) the gallery keeps ``shots`` random images (without
  replacement; all if fewer) of each (identity, camera) pair. Exclusion: a query ignores the
  gallery images of the cameras paired with its own (SYSU-MM01: a cam-3 query ignores cam 2,
  :func:`camera_exclusion`). De-duplicated CMC.
* ``regdb`` — the workspace holds one trial's test split. ``visible-to-infrared``: visible
  queries vs all infrared rows; ``infrared-to-visible``: the reverse. One trial, no sampling,
  no exclusion, plain CMC.
* ``llcm`` — ``visible-to-infrared`` / ``infrared-to-visible``: all rows of the query modality
  vs ``shots`` random images per (identity, camera) of the other modality, seeds
  ``0..trials-1``. Exclusion: a query ignores gallery images of its own identity taken by its own
  camera number. De-duplicated CMC.

Sampling uses ``numpy.random.default_rng(seed)`` and is vectorised: one uniform draw per
candidate row, a lexicographic sort by (identity, camera, draw), and the first ``shots`` rows
of each group are kept. The gallery of a trial is ordered by (identity, camera, row position).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dmdl_cli.datasets import CROSS_MODES, DataSet, dataset_record
from dmdl_cli.errors import DmdlError

__all__ = [
    "Trial",
    "protocol_modes",
    "build_trials",
    "camera_exclusion",
    "same_id_same_cam_exclusion",
    "sample_gallery",
]

_VISIBLE, _INFRARED = 0, 1


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
    return dataset_record(dataset).modes


def camera_exclusion(q_cams: np.ndarray, g_cams: np.ndarray,
                     pairs: tuple[tuple[int, int], ...]) -> np.ndarray:
    """``(Q, G)`` bool: ``True`` where a query of camera ``a`` meets a gallery image of camera
    ``b`` for a pair ``(a, b)`` of ``pairs``, whatever the identities (SYSU-MM01: ``((3, 2),)``,
    as in its reference evaluation)."""
    q_cams = np.asarray(q_cams)
    g_cams = np.asarray(g_cams)
    out = np.zeros((q_cams.size, g_cams.size), dtype=bool)
    for query_cam, gallery_cam in pairs:
        out |= (q_cams[:, None] == query_cam) & (g_cams[None, :] == gallery_cam)
    return out


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
        dataset: a data set of ``dmdl_cli/datasets.py``; its record names the protocol kind.
        mode: one of :func:`protocol_modes` ``(dataset)``.
        pids, cams, modality: ``(N,)`` arrays of the test rows (modality 0 visible, 1 IR).
        trials: number of sampled galleries (seeds ``0..trials-1``); ignored by ``regdb``.
        shots: gallery images per (identity, camera): 1 single-shot, 10 multi-shot; ignored
            by ``regdb``.

    Returns:
        ``trials`` :class:`Trial` objects (one for ``regdb``).

    Raises:
        DmdlError: unknown data set, a mode the data set does not have (the message lists the
            valid ones), bad ``trials``/``shots``, or an empty query / gallery set.
    """
    record = dataset_record(dataset)
    if mode not in record.modes:
        raise DmdlError(
            f"evaluation mode {mode!r} does not fit data set {dataset!r}; "
            f"valid modes: {', '.join(record.modes)}"
        )
    pids, cams, modality = _check_inputs(pids, cams, modality, trials, shots)
    return _PROTOCOLS[record.protocol](record, mode, pids, cams, modality, trials, shots)


def _sysu_trials(record: DataSet, mode: str, pids, cams, modality, trials: int, shots: int
                 ) -> list[Trial]:
    """IR queries against a sampled gallery of the mode's visible cameras (module docstring)."""
    gallery_cams = record.gallery_cameras[mode]
    query = _nonempty(np.flatnonzero(modality == _INFRARED), "infrared query images",
                      record.name, mode)
    cand = _nonempty(
        np.flatnonzero((modality == _VISIBLE) & np.isin(cams, gallery_cams)),
        f"visible gallery images from cams {gallery_cams}", record.name, mode,
    )
    out = []
    for seed in range(trials):
        gallery = sample_gallery(cand, pids, cams, shots=shots, rng=np.random.default_rng(seed))
        out.append(Trial(query, gallery,
                         camera_exclusion(cams[query], cams[gallery], record.excluded_cameras),
                         True, seed))
    return out


def _query_and_candidates(record: DataSet, mode: str, modality) -> tuple[np.ndarray, np.ndarray]:
    """Every row of the mode's query modality and every row of the other one."""
    q_mod = _VISIBLE if mode == CROSS_MODES[0] else _INFRARED
    g_mod = 1 - q_mod
    names = {_VISIBLE: "visible images", _INFRARED: "infrared images"}
    query = _nonempty(np.flatnonzero(modality == q_mod), names[q_mod], record.name, mode)
    cand = _nonempty(np.flatnonzero(modality == g_mod), names[g_mod], record.name, mode)
    return query, cand


def _regdb_trials(record: DataSet, mode: str, pids, cams, modality, trials: int, shots: int
                  ) -> list[Trial]:
    """One trial: all rows of the query modality against all rows of the other."""
    query, cand = _query_and_candidates(record, mode, modality)
    return [Trial(query, cand, None, False, None)]


def _llcm_trials(record: DataSet, mode: str, pids, cams, modality, trials: int, shots: int
                 ) -> list[Trial]:
    """All rows of the query modality against a sampled gallery of the other (module docstring)."""
    query, cand = _query_and_candidates(record, mode, modality)
    out = []
    for seed in range(trials):
        gallery = sample_gallery(cand, pids, cams, shots=shots, rng=np.random.default_rng(seed))
        excl = same_id_same_cam_exclusion(pids[query], pids[gallery], cams[query], cams[gallery])
        out.append(Trial(query, gallery, excl, True, seed))
    return out


# protocol kind (dmdl_cli/datasets.py: PROTOCOL_KINDS) -> the function building its trials
_PROTOCOLS = {"sysu": _sysu_trials, "regdb": _regdb_trials, "llcm": _llcm_trials}
