"""Batch samplers driven by pseudo labels only (never by true identities).

An epoch's batches are a pure function of ``(labels, modality, P, K, iters, seed, stream,
epoch, mode, cross_sampler, cameras)``: a resumed run regenerates the epoch with
:func:`epoch_batches` and skips the steps it has done with :class:`ResumableBatchSampler`
(``start=s`` yields exactly ``batches[s:]``).

A batch is a list of keys ``(row, aug_seed)``; each key has two views, the items
``(row, aug_seed, view)`` of :class:`~dmdl_cli.data.train_dataset.ViewDataset`.
Layout of one batch (``B = 2 * P * K``)::

    [ visible: cluster 1 x K, cluster 2 x K, ..., cluster P x K | infrared: same layout ]

Input convention: ``labels`` is one ``(N,)`` int64 array aligned with the index / cache rows,
``-1`` = outlier (never sampled), and ``modality`` the ``(N,)`` modality of each row
(0 visible, 1 infrared). A cluster is the pair ``(modality, label)``:

* ``mode="per-modality"`` (stage 1; stage 2 before ``cross_sampler_from``): the label values of
  the two modalities are independent name spaces, so stage 1 passes the per-modality DBSCAN
  labels as they are (visible ids 0..Cv-1 and IR ids 0..Ci-1 in one array, no offset). Each batch
  draws P visible clusters and, independently, P infrared clusters, K images of each. Stage 2
  may pass unified ids here too: each modality then samples the ids it has members of.
* ``mode="cross-modality"`` (stage 2 from ``cross_sampler_from``): labels are unified ids shared
  by both modalities; slot ``i`` of the visible half and slot ``i`` of the infrared half hold
  K visible and K infrared images of one id and its partner. ``cross_sampler`` says which ids:

  - ``"shared"``: each batch draws P ids that have members in *both* modalities; an id is its
    own partner.
  - ``"union"`` (the reference's ``RandomMultipleGallerySamplerInterModality``): one shuffled
    order of the *union* of both modalities' ids per epoch. An id without members in a
    modality gets a random id of that modality as its partner there, and each id's K images
    per modality are drawn once, with the order. Batch ``j`` holds the ``j``-th chunk of P
    consecutive ids of the order; the last incomplete chunk is dropped, and step ``s`` trains
    chunk ``s mod (U // P)``: the same batches, in the same order, on every pass through the
    order (the reference computes its index list once per epoch, batches it with
    ``drop_last=True`` and re-iterates the loader when it runs out). With fewer union ids than
    P (``U < P``, where the reference's loader would hold no batch and stop) the order is
    repeated to fill the P slots of one batch, which every step then trains: an id appears
    up to ``ceil(P / U)`` times, with the same images.

Clusters of a batch are distinct when a modality has at least P of them (otherwise each appears
at most ``ceil(P / C)`` times). The K images of a cluster are distinct when it has at least K
members; a smaller cluster contributes every member once, the remaining slots drawn with
replacement.

With ``cameras`` (the ``(N,)`` camera of each row; ``stageN.camera_aware_sampling``) a
cluster's K images are drawn as the reference sampler draws them: an anchor member at random,
then K - 1 members from cameras other than the anchor's (without replacement when there are
at least K - 1, else each once and the rest with replacement); a cluster seen by one camera
only gives its other members instead, and a singleton repeats its anchor. Camera numbers are
data, not labels: the batches stay a pure function of the arguments.

``aug_seed`` of slot ``j`` of step ``s`` is drawn from its own random stream keyed by
``(seed, stream, epoch)``, independent of the labels: the same image appearing twice gets
different augmentations, and the same ``(seed, stream, epoch, s, j)`` always the same seed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler

from dmdl_cli.data.index import INFRARED, MODALITY_NAMES, VISIBLE
from dmdl_cli.errors import DmdlError
from dmdl_cli.recipe import CROSS_SAMPLERS

__all__ = ["SAMPLER_MODES", "epoch_batch_arrays", "epoch_batches", "ResumableBatchSampler"]

SAMPLER_MODES = ("per-modality", "cross-modality")
_SAMPLE_STREAM = 0  # spawn-key component of the cluster / member draws
_AUG_STREAM = 1  # spawn-key component of the augmentation seeds

Batch = list[tuple[int, int]]


@dataclass
class _Groups:
    """Rows of one modality grouped by label: members of ``ids[c]`` are
    ``rows[starts[c]:starts[c] + sizes[c]]`` (ascending row order)."""

    ids: np.ndarray  # (C,) int64, ascending
    rows: np.ndarray  # (T,) int64
    starts: np.ndarray  # (C,) int64
    sizes: np.ndarray  # (C,) int64


def _group(labels: np.ndarray, mask: np.ndarray) -> _Groups:
    rows = np.flatnonzero(mask & (labels >= 0))
    lab = labels[rows]
    order = np.argsort(lab, kind="stable")
    rows, lab = rows[order].astype(np.int64), lab[order]
    ids, starts, sizes = np.unique(lab, return_index=True, return_counts=True)
    return _Groups(ids.astype(np.int64), rows, starts.astype(np.int64), sizes.astype(np.int64))


def _pick_clusters(rng: np.random.Generator, num_clusters: int, iters: int, p: int) -> np.ndarray:
    """``(iters, p)`` cluster indices in ``[0, num_clusters)``: per step a uniformly random
    ordered subset (distinct when ``num_clusters >= p``; else each cluster at most
    ``ceil(p / num_clusters)`` times)."""
    reps = -(-p // num_clusters)
    keys = rng.random((iters, reps * num_clusters))
    return np.argsort(keys, axis=1, kind="stable")[:, :p] % num_clusters


def _draw_members(rng: np.random.Generator, groups: _Groups, picks: np.ndarray,
                  k: int) -> np.ndarray:
    """``(n, k)`` rows: k members of each picked cluster ``picks (n,)``, without replacement
    when the cluster has >= k members, else all members once + the rest with replacement."""
    sizes = groups.sizes[picks]  # (n,)
    starts = groups.starts[picks]  # (n,)
    n = picks.shape[0]
    base = np.concatenate(([0], np.cumsum(sizes)[:-1])).astype(np.int64)  # (n,) block offsets
    total = int(sizes.sum())
    owner = np.repeat(np.arange(n), sizes)  # (total,) pick owning each slot
    local = np.arange(total, dtype=np.int64) - np.repeat(base, sizes)  # position in the cluster
    members = groups.rows[np.repeat(starts, sizes) + local]  # (total,)
    # Shuffle within each block: sort by (owner, random key).
    shuffled = members[np.lexsort((rng.random(total), owner))]
    j = np.arange(k)[None, :]  # (1, k)
    extra = np.floor(rng.random((n, k)) * sizes[:, None]).astype(np.int64)
    extra = np.minimum(extra, sizes[:, None] - 1)
    pos = np.where(j < sizes[:, None], j, extra)  # (n, k) position in the shuffled block
    return shuffled[base[:, None] + pos]


def _draw_members_camera_aware(rng: np.random.Generator, groups: _Groups, picks: np.ndarray,
                               k: int, cams: np.ndarray) -> np.ndarray:
    """``(n, k)`` rows: per picked cluster a random anchor, then k - 1 members of other cameras
    than the anchor's (else other members, else the anchor again). ``cams (N,)`` per row."""
    sizes = groups.sizes[picks]  # (n,)
    n = picks.shape[0]
    base = np.concatenate(([0], np.cumsum(sizes)[:-1])).astype(np.int64)  # (n,) block offsets
    total = int(sizes.sum())
    owner = np.repeat(np.arange(n), sizes)  # (total,)
    local = np.arange(total, dtype=np.int64) - np.repeat(base, sizes)  # position in the cluster
    members = groups.rows[np.repeat(groups.starts[picks], sizes) + local]  # (total,)
    anchor_pos = np.minimum(np.floor(rng.random(n) * sizes).astype(np.int64), sizes - 1)  # (n,)
    anchors = members[base + anchor_pos]  # (n,)
    member_cam = cams[members]
    other_cam = member_cam != cams[anchors][owner]  # (total,)
    not_anchor = local != anchor_pos[owner]
    has_other_cam = np.bincount(owner, weights=other_cam, minlength=n) > 0  # (n,)
    pool = np.where(has_other_cam[owner], other_cam, not_anchor)
    pool = np.where((sizes == 1)[owner], True, pool)  # a singleton's pool is its anchor
    pool_size = np.bincount(owner, weights=pool, minlength=n).astype(np.int64)  # (n,) >= 1
    # Pool members first within each block, in random order: sort by (owner, not pool, key).
    shuffled = members[np.lexsort((rng.random(total), ~pool, owner))]
    j = np.arange(k - 1)[None, :]  # (1, k - 1)
    extra = np.minimum(np.floor(rng.random((n, k - 1)) * pool_size[:, None]).astype(np.int64),
                       pool_size[:, None] - 1)
    pos = np.where(j < pool_size[:, None], j, extra)  # (n, k - 1) position in the pool
    return np.concatenate([anchors[:, None], shuffled[base[:, None] + pos]], axis=1)


def _union_slots(rng: np.random.Generator, groups: Sequence[_Groups], iters: int,
                 p: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """The union sampler (module docstring): ``(iters, p)`` positions into the epoch's order
    of the union ids, and per modality the ``(U,)`` id at each position (the id itself, or its
    random partner where the modality has no member of it)."""
    union = np.union1d(groups[0].ids, groups[1].ids)  # (U,)
    order = union[rng.permutation(union.size)]  # (U,) the epoch's order
    partners = []
    for g in groups:
        random_ids = g.ids[rng.integers(0, g.ids.size, size=order.size)]  # (U,)
        partners.append(np.where(np.isin(order, g.ids), order, random_ids))
    chunks = max(order.size // p, 1)  # full chunks of P ids (one, wrapped, when U < P)
    slots = (np.arange(chunks * p) % order.size).reshape(chunks, p)  # (chunks, p)
    return slots[np.arange(iters) % chunks], partners


def _stream_rng(seed: int, stream: int, epoch: int, tag: int) -> np.random.Generator:
    """Independent generator for ``(seed, stream, epoch, tag)`` (SeedSequence spawn key)."""
    key = (int(stream), int(epoch), int(tag))
    return np.random.default_rng(np.random.SeedSequence(int(seed), spawn_key=key))


def _check_inputs(labels: np.ndarray, modality: np.ndarray, num_instances: int,
                  clusters_per_batch: int, iters: int, seed: int, epoch: int, stream: int,
                  mode: str, cross_sampler: str) -> None:
    if labels.ndim != 1 or modality.shape != labels.shape:
        raise ValueError(f"labels {labels.shape} and modality {modality.shape} must be equal (N,)")
    if not np.isin(modality, (VISIBLE, INFRARED)).all():
        raise ValueError(f"modality values must be {VISIBLE} or {INFRARED}")
    for name, value, lo in (("num_instances", num_instances, 1),
                            ("clusters_per_batch", clusters_per_batch, 1), ("iters", iters, 0),
                            ("seed", seed, 0), ("epoch", epoch, 0), ("stream", stream, 0)):
        if int(value) != value or value < lo:
            raise ValueError(f"{name} must be an integer >= {lo}, got {value}")
    if mode not in SAMPLER_MODES:
        raise ValueError(f"mode must be one of {SAMPLER_MODES}, got {mode!r}")
    if cross_sampler not in CROSS_SAMPLERS:
        raise ValueError(f"cross_sampler must be one of {CROSS_SAMPLERS}, got {cross_sampler!r}")


def epoch_batch_arrays(labels: np.ndarray, *, modality: np.ndarray, num_instances: int = 16,
                       clusters_per_batch: int = 8, iters: int, seed: int, epoch: int,
                       mode: str = "per-modality", stream: int = 0,
                       cameras: np.ndarray | None = None,
                       cross_sampler: str = "shared") -> tuple[np.ndarray, np.ndarray]:
    """The epoch's batches as arrays: ``rows (iters, B)`` int64 and ``aug_seeds (iters, B)``
    int64 in ``[0, 2**63 - 1)``, ``B = 2 * clusters_per_batch * num_instances``.

    See the module docstring for the input convention and the batch layout. ``stream``
    separates otherwise identical runs of the same seed (e.g. pass the stage number).
    ``cross_sampler`` (``"shared"`` or ``"union"``) chooses the ids of ``mode="cross-modality"``.
    Raises :class:`DmdlError` when a modality has no pseudo-labelled cluster (per-modality and
    union cross-modality) or no id has members in both modalities (shared cross-modality).
    """
    labels = np.asarray(labels)
    modality = np.asarray(modality)
    _check_inputs(labels, modality, num_instances, clusters_per_batch, iters, seed, epoch,
                  stream, mode, cross_sampler)
    labels = labels.astype(np.int64, copy=False)
    p, k = int(clusters_per_batch), int(num_instances)
    if iters == 0:
        return np.zeros((0, 2 * p * k), np.int64), np.zeros((0, 2 * p * k), np.int64)
    rng = _stream_rng(seed, stream, epoch, _SAMPLE_STREAM)  # clusters and members
    aug_rng = _stream_rng(seed, stream, epoch, _AUG_STREAM)  # augmentation seeds
    groups = [_group(labels, modality == m) for m in (VISIBLE, INFRARED)]
    if cameras is not None:
        cams = np.asarray(cameras, dtype=np.int64)
        if cams.shape != labels.shape:
            raise ValueError(f"cameras {cams.shape} must match labels {labels.shape}")

        def draw(g: _Groups, picks: np.ndarray) -> np.ndarray:
            return _draw_members_camera_aware(rng, g, picks, k, cams)
    else:
        def draw(g: _Groups, picks: np.ndarray) -> np.ndarray:
            return _draw_members(rng, g, picks, k)

    halves = []
    if mode == "per-modality" or cross_sampler == "union":
        for m, g in zip((VISIBLE, INFRARED), groups):
            if g.ids.size == 0:
                raise DmdlError(
                    f"epoch {epoch}: no {MODALITY_NAMES[m]} image has a pseudo label, so no batch "
                    "can be drawn; loosen the clustering (cluster.eps / cluster.min_samples) in "
                    "the recipe")
    if mode == "per-modality":
        for g in groups:
            picks = _pick_clusters(rng, g.ids.size, iters, p)  # (iters, p)
            halves.append(draw(g, picks.reshape(-1)).reshape(iters, p * k))
    elif cross_sampler == "union":
        slots, partners = _union_slots(rng, groups, iters, p)  # (iters, p), per modality (U,)
        for g, ids in zip(groups, partners):
            members = draw(g, np.searchsorted(g.ids, ids))  # (U, k): drawn once per epoch
            halves.append(members[slots].reshape(iters, p * k))
    else:
        shared = np.intersect1d(groups[0].ids, groups[1].ids)  # ids in both modalities
        if shared.size == 0:
            raise DmdlError(
                f"epoch {epoch}: no pseudo identity has members in both modalities, so no "
                "cross-modality batch can be drawn; start the cross-modality sampler later "
                "(stage2.cross_sampler_from) or loosen the clustering in the recipe")
        picks = shared[_pick_clusters(rng, shared.size, iters, p)].reshape(-1)  # ids (iters*p,)
        for g in groups:
            idx = np.searchsorted(g.ids, picks)
            halves.append(draw(g, idx).reshape(iters, p * k))

    rows = np.concatenate(halves, axis=1)  # (iters, 2 * p * k)
    aug_seeds = aug_rng.integers(0, 2**63 - 1, size=rows.shape, dtype=np.int64)
    return rows.astype(np.int64), aug_seeds


def epoch_batches(labels: np.ndarray, *, modality: np.ndarray, num_instances: int = 16,
                  clusters_per_batch: int = 8, iters: int, seed: int, epoch: int,
                  mode: str = "per-modality", stream: int = 0,
                  cameras: np.ndarray | None = None, cross_sampler: str = "shared") -> list[Batch]:
    """The epoch's ``iters`` batches, each a list of ``(row, aug_seed)`` Python int pairs of
    length ``2 * clusters_per_batch * num_instances`` (layout in the module docstring).

    Deterministic in all its arguments; never reads a global RNG. ``labels (N,)`` int64 pseudo
    labels with -1 outliers, ``modality (N,)`` 0/1.
    """
    rows, seeds = epoch_batch_arrays(labels, modality=modality, num_instances=num_instances,
                                     clusters_per_batch=clusters_per_batch, iters=iters,
                                     seed=seed, epoch=epoch, mode=mode, stream=stream,
                                     cameras=cameras, cross_sampler=cross_sampler)
    return [list(zip(r, s)) for r, s in zip(rows.tolist(), seeds.tolist())]


class ResumableBatchSampler(Sampler):
    """Yields ``batches[start:]``, for ``DataLoader(dataset, batch_sampler=...)``.

    A run resumed after ``s`` completed steps of an epoch regenerates the epoch's batches and
    passes ``start=s``; the batches it then sees are exactly those it had not yet trained on.
    """

    def __init__(self, batches: Sequence[Batch], start: int = 0) -> None:
        if not 0 <= int(start) <= len(batches):
            raise ValueError(f"start must lie in [0, {len(batches)}], got {start}")
        self.batches = batches
        self.start = int(start)

    def __iter__(self) -> Iterator[Batch]:
        for i in range(self.start, len(self.batches)):
            yield list(self.batches[i])

    def __len__(self) -> int:
        return len(self.batches) - self.start
