"""BatchNorm groups of a training step (``train.bn_groups``, ``training/forward.py``).

``reference`` must normalise what the reference's ``nn.DataParallel`` over ``train.bn_slices``
GPUs normalises: each GPU's replica forwards visible chunk g and infrared chunk g of the two
tensors ``[view A; view B]`` the trainer hands it, and only replica 0's running statistics
survive. The test below builds exactly that with one deep copy of the network per slice.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from dmdl_cli.data.index import INFRARED, VISIBLE
from dmdl_cli.errors import DmdlError
from dmdl_cli.model.backbone import build_model
from dmdl_cli.runtime import Runtime
from dmdl_cli.training.forward import GroupedForward, forward_plan, frozen_running_stats, global_features

pytestmark = pytest.mark.usefixtures("one_torch_thread")

KEYS = 4  # keys per modality: P x K = 2 x 2
SLICES = 4
CPU = Runtime(torch.device("cpu"), None, False)


def batch_modality() -> np.ndarray:
    return np.array([VISIBLE] * KEYS + [INFRARED] * KEYS)  # the sampler's layout


def test_reference_plan_cuts_each_modality_like_torch_chunk():
    plan = forward_plan(batch_modality(), mode="reference", slices=SLICES)
    b = 2 * KEYS
    # visible items [A0..A3, B0..B3] = [0, 1, 2, 3, 8, 9, 10, 11]; infrared [4..7, 12..15]
    vis = torch.tensor([0, 1, 2, 3, 8, 9, 10, 11]).chunk(SLICES)
    ir = torch.tensor([4, 5, 6, 7, 12, 13, 14, 15]).chunk(SLICES)
    want = np.concatenate([np.concatenate([v.numpy(), i.numpy()]) for v, i in zip(vis, ir)])
    assert plan.items[0].tolist() == want.tolist()
    assert plan.groups == ((4, 4, 4, 4),) and plan.stats == ((True, False, False, False),)
    assert plan.keys(0).tolist() == (want % b).tolist() and plan.views(0).tolist() == (want // b).tolist()
    # two ranks hold whole groups: rank 0 view A, rank 1 view B here
    two = forward_plan(batch_modality(), mode="reference", slices=SLICES, world=2)
    assert np.concatenate(two.items).tolist() == want.tolist()
    assert two.groups == ((4, 4), (4, 4)) and two.stats == ((True, False), (False, False))
    assert set(two.views(0).tolist()) == {0} and set(two.views(1).tolist()) == {1}
    with pytest.raises(DmdlError, match="train.bn_slices"):
        forward_plan(batch_modality(), mode="reference", slices=SLICES, world=3)


def test_uneven_slices_follow_torch_chunk():
    # 3 keys per modality: 6 items each, chunk(4) gives 3 pieces of 2 -> 3 groups
    plan = forward_plan(np.array([VISIBLE] * 3 + [INFRARED] * 3), mode="reference", slices=4)
    assert plan.groups == ((4, 4, 4),)


def test_joint_plan_is_the_whole_batch_or_each_ranks_keys():
    one = forward_plan(batch_modality(), mode="joint", slices=SLICES)
    assert one.items[0].tolist() == list(range(2 * 2 * KEYS)) and one.groups == ((16,),)
    two = forward_plan(batch_modality(), mode="joint", slices=SLICES, world=2)
    assert two.items[0].tolist() == [0, 2, 4, 6, 8, 10, 12, 14]
    assert two.items[1].tolist() == [1, 3, 5, 7, 9, 11, 13, 15]


def _images(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(4 * KEYS, 3, 64, 32, generator=g)  # (2B, 3, H, W) items: views A, then B


def _stats(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()
            if k.endswith(("running_mean", "running_var", "num_batches_tracked"))}


def test_reference_groups_equal_one_network_copy_per_slice():
    torch.manual_seed(0)
    model = build_model("resnet18").train()
    replicas = [copy.deepcopy(model) for _ in range(SLICES)]
    images = _images()
    weights = torch.randn(4 * KEYS, model.feat_dim, generator=torch.Generator().manual_seed(1))

    # The reference: visible images [A; B] and infrared [A; B] as two tensors, chunked per GPU;
    # replica g forwards torch.cat((visible chunk g, infrared chunk g)).
    modality = batch_modality()
    b = 2 * KEYS
    vis_items = np.concatenate([np.flatnonzero(modality == VISIBLE) + v * b for v in (0, 1)])
    ir_items = np.concatenate([np.flatnonzero(modality == INFRARED) + v * b for v in (0, 1)])
    out = torch.zeros(4 * KEYS, model.feat_dim)
    for g, (vis, ir) in enumerate(zip(np.array_split(vis_items, SLICES), np.array_split(ir_items, SLICES))):
        rows = np.concatenate([vis, ir])
        _, bn = replicas[g](images[rows])
        out = out.index_put((torch.from_numpy(rows),), bn)
    (out * weights).sum().backward()

    plan = forward_plan(modality, mode="reference", slices=SLICES)
    _, bn = GroupedForward(model)(images[plan.items[0]], plan.groups[0], plan.stats[0])
    ours = global_features(bn, plan, CPU)  # (2B, D) in item order
    (ours * weights).sum().backward()

    assert torch.allclose(ours, out, atol=1e-5), (ours - out).abs().max()
    # running statistics: those of replica 0 only (the others are DataParallel's discarded copies)
    assert all(torch.equal(v, _stats(replicas[0])[k]) for k, v in _stats(model).items())
    assert any(not torch.equal(v, _stats(replicas[1])[k]) for k, v in _stats(model).items())
    # gradients: the sum over the replicas (DataParallel reduces them onto the module)
    for (name, p), *copies in zip(model.named_parameters(), *(r.parameters() for r in replicas)):
        if not p.requires_grad:  # the BN neck's bias
            continue
        want = sum(c.grad for c in copies)
        assert torch.allclose(p.grad, want, atol=1e-4, rtol=1e-4), name


def test_joint_forward_is_the_plain_forward():
    torch.manual_seed(0)
    model = build_model("resnet18").train()
    twin = copy.deepcopy(model)
    images = _images()
    plan = forward_plan(batch_modality(), mode="joint", slices=SLICES)
    _, ours = GroupedForward(model)(images, plan.groups[0], plan.stats[0])
    _, plain = twin(images)
    assert torch.equal(global_features(ours, plan, CPU), plain)
    assert all(torch.equal(v, _stats(twin)[k]) for k, v in _stats(model).items())


def test_frozen_running_stats_leaves_the_buffers_and_restores_the_layers():
    torch.manual_seed(0)
    model = build_model("resnet18").train()
    before = _stats(model)
    with frozen_running_stats(model):
        model(_images())
    assert all(torch.equal(v, before[k]) for k, v in _stats(model).items())
    assert all(m.track_running_stats for m in model.modules()
               if isinstance(m, torch.nn.modules.batchnorm._BatchNorm))
    model(_images())
    assert any(not torch.equal(v, before[k]) for k, v in _stats(model).items())
