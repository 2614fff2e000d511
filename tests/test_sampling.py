"""Pseudo-label batch samplers (dmdl_cli.data.sampling) and the two-view dataset they feed."""
from __future__ import annotations

import inspect
import pickle

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from dmdl_cli.data.augment import AugmentConfig, make_views
from dmdl_cli.data.sampling import (
    ResumableBatchSampler,
    epoch_batch_arrays,
    epoch_batches,
)
from dmdl_cli.data.train_dataset import ViewDataset, collate_items
from dmdl_cli.errors import DmdlError

P, K = 4, 5


def make_labels(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """300 rows, modality interleaved; per-modality cluster ids (overlapping name spaces):
    visible clusters 0..9 (sizes 2..20), IR clusters 0..6, ~15% outliers."""
    rng = np.random.default_rng(seed)
    n = 300
    modality = (np.arange(n) % 3 == 0).astype(np.int64)  # 100 IR, 200 visible
    labels = np.full(n, -1, dtype=np.int64)
    vis = np.flatnonzero(modality == 0)
    ir = np.flatnonzero(modality == 1)
    sizes_v = [2, 3, 20, 20, 20, 20, 20, 20, 20, 20]
    start = 0
    for c, s in enumerate(sizes_v):
        labels[vis[start:start + s]] = c
        start += s
    labels[ir[:84]] = np.repeat(np.arange(7), 12)
    perm = rng.permutation(n)  # shuffle rows so clusters are not contiguous
    return labels[perm], modality[perm]


def check_batch_layout(batch, labels, modality, p, k):
    rows = np.array([r for r, _ in batch])
    assert len(batch) == 2 * p * k
    assert (labels[rows] >= 0).all()  # never an outlier
    halves = rows[:p * k], rows[p * k:]
    for m, half in enumerate(halves):
        assert (modality[half] == m).all()
        blocks = labels[half].reshape(p, k)
        assert (blocks == blocks[:, :1]).all()  # K images of one cluster per block
        for block_rows, lab in zip(half.reshape(p, k), blocks[:, 0]):
            size = int(((labels == lab) & (modality == m)).sum())
            # without replacement when possible; all members when the cluster is small
            assert len(set(block_rows.tolist())) == min(size, k)
    return halves


def test_per_modality_batches_layout():
    labels, modality = make_labels()
    batches = epoch_batches(labels, modality=modality, num_instances=K, clusters_per_batch=P,
                            iters=30, seed=1, epoch=0)
    assert len(batches) == 30
    for batch in batches:
        vis, ir = check_batch_layout(batch, labels, modality, P, K)
        # at least P clusters per modality here: clusters of a batch are distinct
        assert len(set(labels[vis].tolist())) == P
        assert len(set(labels[ir].tolist())) == P
        assert all(isinstance(r, int) and isinstance(s, int) for r, s in batch)
    # every labelled cluster of each modality gets sampled over the epoch
    rows = np.array([r for b in batches for r, _ in b])
    assert set(zip(modality[rows].tolist(), labels[rows].tolist())) == \
        {(m, c) for m, c in zip(modality.tolist(), labels.tolist()) if c >= 0}


def test_fewer_clusters_than_p():
    labels, modality = make_labels()
    labels = np.where(modality == 1, np.where(labels >= 0, labels % 2, -1), labels)  # 2 IR clusters
    batches = epoch_batches(labels, modality=modality, num_instances=K, clusters_per_batch=P,
                            iters=5, seed=0, epoch=0)
    for batch in batches:
        _, ir = check_batch_layout(batch, labels, modality, P, K)
        counts = np.bincount(labels[ir].reshape(P, K)[:, 0], minlength=2)
        assert counts.max() <= 2 and counts.sum() == P  # each at most ceil(P / 2) times


def test_cross_modality_batches_pair_identities():
    labels, modality = make_labels()
    # Unified ids: visible 0..9, IR 0..6 -> ids 7, 8, 9 exist only in the visible modality.
    batches = epoch_batches(labels, modality=modality, num_instances=K, clusters_per_batch=P,
                            iters=20, seed=3, epoch=4, mode="cross-modality")
    for batch in batches:
        vis, ir = check_batch_layout(batch, labels, modality, P, K)
        ids_v = labels[vis].reshape(P, K)[:, 0]
        ids_i = labels[ir].reshape(P, K)[:, 0]
        assert np.array_equal(ids_v, ids_i)  # slot i of both halves: the same identity
        assert set(ids_v.tolist()) <= set(range(7))  # only ids present in both modalities
        assert len(set(ids_v.tolist())) == P


# ---------------------------------------------------------------------------------------------
# The union cross-modality sampler (the reference's RandomMultipleGallerySamplerInterModality)
# ---------------------------------------------------------------------------------------------
def union_batches(labels, modality, p, iters, epoch=4, seed=3, cross_sampler="union"):
    return epoch_batch_arrays(labels, modality=modality, num_instances=K, clusters_per_batch=p,
                              iters=iters, seed=seed, epoch=epoch, mode="cross-modality",
                              cross_sampler=cross_sampler)


def slot_ids(rows, labels, p):
    """``(iters, p)`` ids of the visible half's slots and of the infrared half's."""
    half = p * K
    return (labels[rows[:, :half]].reshape(-1, p, K)[:, :, 0],
            labels[rows[:, half:]].reshape(-1, p, K)[:, :, 0])


def test_union_sampler_draws_every_id_once_per_pass_with_partners():
    labels, modality = make_labels()
    # visible ids 0..9, infrared ids 0..6 and an infrared-only id 12: the union holds 11 ids
    labels = np.where((modality == 1) & (labels == 6), 12, labels)
    vis_ids, ir_ids = set(range(10)), {0, 1, 2, 3, 4, 5, 12}
    p = 11  # U = 11: one chunk holds the whole order
    rows, seeds = union_batches(labels, modality, p, iters=3)
    for r in rows:
        check_batch_layout([(int(x), 0) for x in r], labels, modality, p, K)
    ids_v, ids_i = slot_ids(rows, labels, p)
    for v, i in zip(ids_v, ids_i):
        own = [x if y in vis_ids else y for x, y in zip(v, i)]  # the order's id of each slot
        assert sorted(own) == sorted(vis_ids | ir_ids)  # every union id once
        for x, y, u in zip(v, i, own):
            if u in vis_ids & ir_ids:
                assert x == y == u  # an id of both modalities is its own partner
            elif u in vis_ids:  # visible-only: a random infrared partner
                assert x == u and y in ir_ids
            else:  # the infrared-only id: a random visible partner
                assert y == u == 12 and x in vis_ids
    assert set(ids_i[0].tolist()) <= ir_ids and set(ids_v[0].tolist()) <= vis_ids
    assert 12 in ids_i[0]
    # partners are drawn at random with each epoch's order: over epochs they vary
    partners = set()
    for epoch in range(6):
        v, i = slot_ids(union_batches(labels, modality, p, iters=1, epoch=epoch)[0], labels, p)
        partners |= {(int(x), int(y)) for x, y in zip(v[0], i[0]) if x != y}
    assert len({y for x, y in partners if x == 6}) > 1
    assert len({x for x, y in partners if y == 12}) > 1


def test_union_sampler_reuses_its_order_and_drops_the_incomplete_chunk():
    labels, modality = make_labels()  # union = visible ids 0..9 (infrared 0..6)
    p = 4  # U = 10: two full chunks (8 ids), the last two ids of the order are dropped
    rows, seeds = union_batches(labels, modality, p, iters=7)
    for s in range(2, 7):  # the same two batches on every pass, in the same order
        assert np.array_equal(rows[s], rows[s % 2])
    assert not np.array_equal(rows[0], rows[1])
    assert len(np.unique(seeds)) == seeds.size  # each (step, slot) augmented anew
    ids_v, _ = slot_ids(rows, labels, p)
    first_pass = ids_v[:2].reshape(-1)
    assert len(set(first_pass.tolist())) == 2 * p  # each id at most once per pass
    # a new order each epoch: over epochs every id of the union gets drawn
    seen = set()
    for epoch in range(12):
        r, _ = union_batches(labels, modality, p, iters=2, epoch=epoch)
        seen |= set(slot_ids(r, labels, p)[0].reshape(-1).tolist())
    assert seen == set(range(10))
    again, again_seeds = union_batches(labels.copy(), modality.copy(), p, iters=7)
    assert np.array_equal(rows, again) and np.array_equal(seeds, again_seeds)
    assert not np.array_equal(rows, union_batches(labels, modality, p, iters=7, epoch=5)[0])
    assert not np.array_equal(rows, union_batches(labels, modality, p, iters=7, seed=4)[0])
    shared, _ = epoch_batch_arrays(labels, modality=modality, num_instances=K,
                                   clusters_per_batch=p, iters=7, seed=3, epoch=4,
                                   mode="cross-modality")
    assert not np.array_equal(rows, shared)


def test_union_sampler_with_fewer_ids_than_p_repeats_the_order():
    labels, modality = make_labels()
    labels = np.where(labels >= 3, -1, labels)  # ids 0, 1, 2 in both modalities
    p = 8
    rows, _ = union_batches(labels, modality, p, iters=4)
    assert (rows == rows[:1]).all()  # one batch, trained at every step
    ids_v, ids_i = slot_ids(rows, labels, p)
    assert np.array_equal(ids_v, ids_i)
    order = ids_v[0, :3]
    assert sorted(order.tolist()) == [0, 1, 2]
    assert np.array_equal(ids_v[0], np.resize(order, p))  # the order, repeated to P slots
    half = p * K  # a repeated id brings the same images
    assert np.array_equal(rows[0, :K], rows[0, 3 * K:4 * K])
    assert np.array_equal(rows[0, half:half + K], rows[0, half + 3 * K:half + 4 * K])


def test_union_sampler_needs_both_modalities():
    labels, modality = make_labels()
    no_ir = np.where(modality == 1, -1, labels)
    with pytest.raises(DmdlError, match="infrared"):
        union_batches(no_ir, modality, P, iters=2)
    with pytest.raises(ValueError, match="cross_sampler"):
        union_batches(labels, modality, P, iters=2, cross_sampler="bogus")


def test_deterministic_per_seed_and_epoch():
    labels, modality = make_labels()
    kw = dict(modality=modality, num_instances=K, clusters_per_batch=P, iters=10)
    a = epoch_batches(labels, seed=5, epoch=2, **kw)
    assert a == epoch_batches(labels.copy(), seed=5, epoch=2, **kw)
    np.random.seed(0)  # the global RNGs play no part
    torch.manual_seed(0)
    assert a == epoch_batches(labels, seed=5, epoch=2, **kw)
    assert a != epoch_batches(labels, seed=5, epoch=3, **kw)
    assert a != epoch_batches(labels, seed=6, epoch=2, **kw)
    assert a != epoch_batches(labels, seed=5, epoch=2, stream=1, **kw)
    for mode, cross in (("per-modality", "shared"), ("cross-modality", "shared"),
                        ("cross-modality", "union")):
        r1, s1 = epoch_batch_arrays(labels, seed=5, epoch=2, mode=mode, cross_sampler=cross, **kw)
        r2, s2 = epoch_batch_arrays(labels, seed=5, epoch=2, mode=mode, cross_sampler=cross, **kw)
        assert np.array_equal(r1, r2) and np.array_equal(s1, s2)


def test_aug_seeds_distinct_and_label_independent():
    labels, modality = make_labels()
    kw = dict(modality=modality, num_instances=K, clusters_per_batch=P, iters=10, seed=5, epoch=2)
    rows, seeds = epoch_batch_arrays(labels, **kw)
    assert seeds.shape == rows.shape == (10, 2 * P * K)
    assert len(np.unique(seeds)) == seeds.size  # the same image twice: different augmentations
    assert (seeds >= 0).all()
    other_labels, _ = make_labels(seed=9)
    _, seeds2 = epoch_batch_arrays(other_labels, **kw)
    assert np.array_equal(seeds, seeds2)  # a function of (seed, stream, epoch, step, slot) only


def test_resume_from_step_yields_remaining_batches():
    labels, modality = make_labels()
    batches = epoch_batches(labels, modality=modality, num_instances=K, clusters_per_batch=P,
                            iters=12, seed=0, epoch=7)
    assert list(ResumableBatchSampler(batches)) == batches
    for s in (0, 5, 11, 12):
        sampler = ResumableBatchSampler(batches, start=s)
        assert len(sampler) == 12 - s
        assert list(sampler) == batches[s:]
    # A resumed process regenerates the identical epoch and skips to step 5.
    again = epoch_batches(labels, modality=modality, num_instances=K, clusters_per_batch=P,
                          iters=12, seed=0, epoch=7)
    assert list(ResumableBatchSampler(again, start=5)) == batches[5:]
    with pytest.raises(ValueError):
        ResumableBatchSampler(batches, start=13)


def test_sampler_api_takes_no_true_ids():
    params = set(inspect.signature(epoch_batch_arrays).parameters)
    assert params == {"labels", "modality", "num_instances", "clusters_per_batch", "iters",
                      "seed", "epoch", "mode", "stream", "cameras", "cross_sampler"}
    assert set(inspect.signature(epoch_batches).parameters) == params


def _cameras(labels: np.ndarray, modality: np.ndarray) -> np.ndarray:
    """Cameras per row: visible clusters 0..9 each spread over cameras 1 and 2 except cluster 9
    (camera 1 only); IR clusters 3 and 6 alternately."""
    rows = np.arange(len(labels))
    cams = np.where(modality == 0, 1 + rows % 2, 3 + 3 * (rows % 2))
    cams[(modality == 0) & (labels == 9)] = 1
    return cams


@pytest.mark.parametrize("mode,cross", [("per-modality", "shared"), ("cross-modality", "shared"),
                                        ("cross-modality", "union")])
def test_camera_aware_sampling_draws_other_cameras_than_the_anchor(mode, cross):
    labels, modality = make_labels()
    cams = _cameras(labels, modality)
    kw = dict(modality=modality, num_instances=K, clusters_per_batch=P, iters=40, seed=3,
              epoch=1, mode=mode, cross_sampler=cross)
    rows, _ = epoch_batch_arrays(labels, cameras=cams, **kw)
    blocks = rows.reshape(-1, K)  # (iters * 2P, K): the anchor first, then K - 1 others
    assert (labels[blocks] == labels[blocks[:, :1]]).all()
    assert (modality[blocks] == modality[blocks[:, :1]]).all()
    anchors, others = blocks[:, :1], blocks[:, 1:]
    single_camera = np.array([
        not ((labels == labels[a]) & (modality == modality[a]) & (cams != cams[a])).any()
        for a in anchors[:, 0]])
    assert single_camera.any() and not single_camera.all()  # both cases are exercised
    multi = ~single_camera
    assert (cams[others[multi]] != cams[anchors[multi]]).all()  # never the anchor's camera
    if single_camera.any():  # one camera only: the other members instead, never the anchor
        assert (others[single_camera] != anchors[single_camera]).all()
    # deterministic in (seed, epoch, labels, cameras); camera-blind draws differ
    again, _ = epoch_batch_arrays(labels.copy(), cameras=cams.copy(), **kw)
    assert np.array_equal(rows, again)
    blind, _ = epoch_batch_arrays(labels, **kw)
    assert not np.array_equal(rows, blind)
    other_epoch, _ = epoch_batch_arrays(labels, cameras=cams, **{**kw, "epoch": 2})
    assert not np.array_equal(rows, other_epoch)


def test_camera_aware_pool_without_replacement_and_singletons():
    # one visible cluster of 5 members: camera 1 for rows 0-1, camera 2 for rows 2-4; one IR
    # singleton (row 5)
    labels = np.array([0, 0, 0, 0, 0, 0])
    modality = np.array([0, 0, 0, 0, 0, 1])
    cams = np.array([1, 1, 2, 2, 2, 3])
    rows, _ = epoch_batch_arrays(labels, modality=modality, cameras=cams, num_instances=3,
                                 clusters_per_batch=1, iters=30, seed=0, epoch=0)
    vis, ir = rows[:, :3], rows[:, 3:]
    assert (ir == 5).all()  # the singleton repeats its anchor
    for anchor, a, b in vis:
        pool = {2, 3, 4} if anchor in (0, 1) else {0, 1}
        assert {a, b} <= pool and a != b  # K - 1 = 2 distinct members of the other camera(s)
    assert set(vis[:, 0].tolist()) == {0, 1, 2, 3, 4}  # every member serves as an anchor


def test_unusable_labels_raise():
    labels, modality = make_labels()
    no_ir = np.where(modality == 1, -1, labels)
    with pytest.raises(DmdlError, match="infrared"):
        epoch_batches(no_ir, modality=modality, iters=2, seed=0, epoch=0)
    disjoint = np.where(modality == 1, np.where(labels >= 0, labels + 100, -1), labels)
    with pytest.raises(DmdlError, match="both modalities"):
        epoch_batches(disjoint, modality=modality, iters=2, seed=0, epoch=0,
                      mode="cross-modality")
    with pytest.raises(ValueError):
        epoch_batches(labels, modality=modality, iters=2, seed=0, epoch=0, mode="bogus")
    assert epoch_batches(labels, modality=modality, iters=0, seed=0, epoch=0) == []


# ---------------------------------------------------------------------------------------------
# ViewDataset fed by the sampler
# ---------------------------------------------------------------------------------------------
def write_cache(path, n=300, h=32, w=16):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(n, h, w, 3), dtype=np.uint8)
    images.tofile(path)
    return images


def test_dataset_reads_rows_and_is_deterministic(tmp_path):
    labels, modality = make_labels()
    images = write_cache(tmp_path / "cache.u8")
    ds = ViewDataset(tmp_path / "cache.u8", modality, AugmentConfig(), shape=images.shape)
    assert len(ds) == 300
    assert torch.equal(ds.image(17), torch.from_numpy(images[17]).permute(2, 0, 1))
    view_a, view_b = ds[(17, 12345, 0)], ds[(17, 12345, 1)]
    assert view_a["row"] == 17 and view_a["modality"] == int(modality[17]) and view_b["view"] == 1
    assert view_a["image"].dtype == torch.uint8 and view_a["image"].shape == (3, 32, 16)
    # an item is the view of the key's two views, whichever of them is asked for
    both = make_views(ds.image(17), int(modality[17]), AugmentConfig(),
                      torch.Generator().manual_seed(12345))
    assert torch.equal(view_a["image"], both[0]) and torch.equal(view_b["image"], both[1])
    assert torch.equal(view_a["image"], ds[(17, 12345, 0)]["image"])
    assert not torch.equal(view_a["image"], ds[(17, 54321, 0)]["image"])
    with pytest.raises(ValueError, match="view"):
        ds[(17, 12345, 2)]
    # Pickling for a worker ships no pixels and re-opens the file lazily.
    blob = pickle.dumps(ds)
    assert len(blob) < images.nbytes // 10
    clone = pickle.loads(blob)
    assert torch.equal(clone[(17, 12345, 1)]["image"], view_b["image"])
    # The same from an np.memmap handed in directly.
    mm = np.memmap(tmp_path / "cache.u8", dtype=np.uint8, mode="r", shape=images.shape)
    ds_mm = ViewDataset(mm, modality, AugmentConfig())
    assert len(pickle.dumps(ds_mm)) < images.nbytes // 10
    assert torch.equal(pickle.loads(pickle.dumps(ds_mm))[(17, 12345, 0)]["image"],
                       view_a["image"])


def test_dataset_rejects_short_cache(tmp_path):
    write_cache(tmp_path / "cache.u8", n=10)
    with pytest.raises(DmdlError, match="prepare-data"):
        ViewDataset(tmp_path / "cache.u8", np.zeros(20, np.int64), AugmentConfig(),
                    shape=(20, 32, 16, 3))


def test_dataloader_resume_reproduces_batches(tmp_path):
    labels, modality = make_labels()
    images = write_cache(tmp_path / "cache.u8")
    ds = ViewDataset(tmp_path / "cache.u8", modality, AugmentConfig(), shape=images.shape)
    batches = epoch_batches(labels, modality=modality, num_instances=2, clusters_per_batch=2,
                            iters=4, seed=0, epoch=0)
    steps = [[(row, seed, view) for view in (0, 1) for row, seed in keys] for keys in batches]

    def run(start):
        loader = DataLoader(ds, batch_sampler=ResumableBatchSampler(steps, start=start),
                            collate_fn=collate_items, num_workers=0)
        return list(loader)

    full = run(0)
    assert len(full) == 4
    b0 = full[0]
    assert b0["images"].shape == (16, 3, 32, 16) and b0["images"].dtype == torch.uint8
    assert b0["row"].tolist() == [r for r, _ in batches[0]] * 2
    assert b0["modality"].tolist() == [0, 0, 0, 0, 1, 1, 1, 1] * 2
    assert b0["view"].tolist() == [0] * 8 + [1] * 8
    resumed = run(2)
    assert len(resumed) == 2
    for got, want in zip(resumed, full[2:]):
        for key in ("images", "row", "modality", "view"):
            assert torch.equal(got[key], want[key])
