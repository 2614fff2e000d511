"""Stage 2's in-place memory gradient against a replay of the reference's autograd functions.

The reference (priester3/DMDL, ``clustercontrast/models/cm_causal_softtopk.py`` and
``clustercontrast/trainers.py``) computes its memory logits with an autograd function whose
``backward`` first computes the input gradient against the memory buffer and then moves the
buffer's rows, sample by sample. Its trainer runs the memory forward for the infrared batch, then
for the visible batch, and backpropagates once. The replay below is our own re-implementation of
that order from reading the code, run by torch's real autograd engine on constructed tensors; no
reference code is imported or copied. ``identity_terms`` with ``stage2.memory_gradient:
in-place`` must give the same gradients, in both epoch parities, with and without CAI.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dmdl_cli.clustering.association import adopter
from dmdl_cli.data.index import INFRARED, VISIBLE
from dmdl_cli.recipe import load_recipe
from dmdl_cli.training.cross import FUSED, Stage2Epoch, identity_terms, late_memories
from dmdl_cli.training.labelling import make_memory

D, KEYS, TEMP, MOMENTUM, MU = 6, 5, 0.05, 0.2, 0.5  # feature size, keys per modality
TOLERANCE = 1e-6


class ReplayMemory(torch.autograd.Function):
    """The reference's memory function, re-implemented: logits ``x @ M.T``; the backward reads
    the buffer as it is *then*, and afterwards moves the rows of each sample's id in place
    (``m <- 0.2 m + 0.8 x``, renormalised), in the sample order of the call."""

    order: list[str] = []

    @staticmethod
    def forward(ctx, x, ids, memory, row_ids, name):
        ctx.memory, ctx.row_ids, ctx.name = memory, row_ids, name
        ctx.save_for_backward(x, ids)
        return x @ memory.T

    @staticmethod
    def backward(ctx, grad):
        x, ids = ctx.saved_tensors
        ReplayMemory.order.append(ctx.name)
        grad_x = grad @ ctx.memory
        with torch.no_grad():
            for xi, yi in zip(x, ids):
                rows = torch.nonzero(ctx.row_ids == yi).squeeze(-1)
                ctx.memory[rows] = MOMENTUM * ctx.memory[rows] + (1.0 - MOMENTUM) * xi
                ctx.memory[rows] /= ctx.memory[rows].norm()
        return grad_x, None, None, None, None


def replay_call(f, ids, target, mode, i2r, mem, row_ids, num_ids, prior, fused, cai):
    """One memory call of the reference's stage-2 trainer for one modality's two-view batch
    ``f (2n, D)`` (views A then B) with unified ``ids (2n,)`` and CAI targets ``target``."""
    x = F.normalize(f, dim=1)
    own = "ir" if mode == INFRARED else "v"
    logits = {}
    for m, name in ((VISIBLE, "v"), (INFRARED, "ir")):
        # a modality's samples move their own memory; with i2r (odd epochs) the infrared ones
        # also move the visible memory, else the visible ones also move the infrared memory;
        # against a memory they do not move the reference takes a copy
        moves = m == mode or (i2r and mode == INFRARED) or (not i2r and mode == VISIBLE)
        if moves:
            logits[m] = ReplayMemory.apply(x, ids, mem[m], row_ids[m], f"{own}->{name}") / TEMP
        else:
            logits[m] = x @ mem[m].clone().T / TEMP
    own_logits = logits[mode]
    local = torch.searchsorted(row_ids[mode], ids)  # row of each sample's id in its own memory
    intra = F.cross_entropy(own_logits, local)
    if cai:
        mix = torch.zeros(len(f), num_ids)
        for m in (VISIBLE, INFRARED):
            scattered = torch.zeros(len(f), num_ids)
            scattered[:, row_ids[m]] = logits[m].softmax(dim=1)
            mix = mix + scattered * prior[m]
        identity = MU * -(target * torch.log(mix)).sum(dim=1).mean()
    else:
        identity = F.cross_entropy(x @ fused.T / TEMP, ids)  # likelihood on the fused memory
    return intra + identity


def setup(epoch: int, seed: int = 0):
    """Memories, unified ids and a two-view batch of KEYS visible then KEYS infrared keys.

    Even epochs: the visible clusters adopted infrared ids (the infrared memory holds every
    unified id, the visible one a subset); odd epochs the other way round."""
    g = torch.Generator().manual_seed(seed + 10 * epoch)
    if epoch % 2 == 0:
        row_ids = {VISIBLE: torch.tensor([0, 1, 3]), INFRARED: torch.tensor([0, 1, 2, 3])}
    else:
        row_ids = {VISIBLE: torch.tensor([0, 1, 2, 3, 4]), INFRARED: torch.tensor([0, 1, 2, 4])}
    num_ids = int(max(int(r.max()) for r in row_ids.values())) + 1
    mem = {m: F.normalize(torch.randn(len(row_ids[m]), D, generator=g), dim=1) for m in row_ids}
    fused = F.normalize(torch.randn(num_ids, D, generator=g), dim=1)
    labels = torch.cat([row_ids[m][torch.randint(len(row_ids[m]), (KEYS,), generator=g)]
                        for m in (VISIBLE, INFRARED)])  # (B,) unified ids, B = 2 KEYS
    modality = torch.tensor([VISIBLE] * KEYS + [INFRARED] * KEYS)
    bn = torch.randn(4 * KEYS, D, generator=g)  # (2B, D) BN-neck features, views A then B
    prior = torch.tensor([0.6, 0.4])
    return row_ids, num_ids, mem, fused, labels, modality, bn, prior


def ours(epoch: int, cai: bool, gradient: str):
    """Our stage-2 identity terms on the constructed batch: (loss, d loss / d bn, targets)."""
    row_ids, num_ids, mem, fused, labels, modality, bn, prior = setup(epoch)
    recipe = load_recipe("recipes/sysu.yaml", overrides=[f"stage2.memory_gradient={gradient}"])
    stage = recipe.stage2
    assert (stage.memory_update, stage.momentum, stage.temp) == ("per-sample", MOMENTUM, TEMP)
    memories = {m: make_memory(mem[m].numpy(), stage) for m in (VISIBLE, INFRARED)}
    memories[FUSED] = make_memory(fused.numpy(), stage)
    row_of_id = {}
    for m in (VISIBLE, INFRARED):
        table = torch.full((num_ids,), -1, dtype=torch.long)
        table[row_ids[m]] = torch.arange(len(row_ids[m]))
        row_of_id[m] = table
    state = Stage2Epoch(epoch, np.zeros(0, np.int64), np.zeros(0, np.float32), memories,
                        ids={m: row_ids[m].numpy() for m in row_ids}, num_ids=num_ids,
                        ids_t=row_ids, prior_t=prior, row_of_id=row_of_id)
    bn = bn.clone().requires_grad_(True)
    feat = F.normalize(bn, dim=1)
    b = labels.shape[0]
    conf = torch.ones(b)
    late = late_memories(state, feat[:b], feat[b:], labels, modality,
                         adopter(recipe.association.method, epoch), stage, cai)
    terms = identity_terms(stage, cai, state, feat, labels, modality, conf, False, late)
    loss = terms.intra + (MU * terms.cai if cai else terms.fused)
    loss.backward()
    return loss.detach(), bn.grad, terms


def replay(epoch: int, cai: bool):
    """The reference's order on the same batch: the infrared call, then the visible one."""
    row_ids, num_ids, mem, fused, labels, modality, bn, prior = setup(epoch)
    mem = {m: t.clone() for m, t in mem.items()}
    bn = bn.clone().requires_grad_(True)
    b = labels.shape[0]
    onehot = F.one_hot(labels, num_ids).float()
    i2r = bool(epoch % 2)
    ReplayMemory.order = []
    loss = bn.new_zeros(())
    for m in (INFRARED, VISIBLE):
        keys = torch.nonzero(modality == m).squeeze(1)
        rows = torch.cat([keys, b + keys])  # the modality's [view A; view B] rows
        ids = torch.cat([labels[keys], labels[keys]])
        target = torch.cat([onehot[keys], onehot[keys]])
        loss = loss + replay_call(bn[rows], ids, target, m, i2r, mem, row_ids, num_ids, prior,
                                  fused, cai)
    loss.backward()
    return loss.detach(), bn.grad, list(ReplayMemory.order), mem


@pytest.mark.parametrize("epoch", [0, 1, 2, 3])
@pytest.mark.parametrize("cai", [True, False])
def test_in_place_gradient_equals_the_reference_replay(epoch, cai):
    want_loss, want_grad, order, _ = replay(epoch, cai)
    loss, grad, _ = ours(epoch, cai, "in-place")
    assert float(loss) == pytest.approx(float(want_loss), rel=TOLERANCE)  # float32 sums of ~30
    assert torch.allclose(grad, want_grad, atol=TOLERANCE, rtol=0), (grad - want_grad).abs().max()
    # the backward order the replay ran: the visible call's nodes first
    if cai:
        assert order == (["v->ir", "v->v", "ir->ir"] if epoch % 2 == 0 else ["v->v", "ir->ir", "ir->v"])
    else:  # the other-modality logits reach no loss term: their nodes never run
        assert order == ["v->v", "ir->ir"]


def _cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.cosine_similarity(a, b, dim=1)


@pytest.mark.parametrize("epoch", [0, 1])
def test_in_place_changes_only_infrared_gradients_and_only_with_cai(epoch):
    _, fixed, _ = ours(epoch, True, "fixed")
    _, in_place, _ = ours(epoch, True, "in-place")
    _, modality = setup(epoch)[4:6]
    infrared = torch.cat([modality, modality]) == INFRARED
    assert torch.equal(fixed[~infrared], in_place[~infrared])  # visible gradients: forward rows
    assert (_cosines(fixed[infrared], in_place[infrared]) < 1 - 1e-4).any()  # a real difference
    _, fixed_off, _ = ours(epoch, False, "fixed")
    _, in_place_off, _ = ours(epoch, False, "in-place")
    assert torch.equal(fixed_off, in_place_off)


def test_the_replayed_memories_end_where_ours_move_them():
    # after the step the reference's buffers hold what its backward moved; our post-step
    # update moves the same rows in the same order (visible before infrared, view A before B)
    from types import SimpleNamespace

    from dmdl_cli.training.cross import CrossModalityStage

    for epoch in (0, 1):
        _, _, _, moved = replay(epoch, True)
        _, _, terms = ours(epoch, True, "in-place")
        row_ids, num_ids, mem, fused, labels, modality, bn, prior = setup(epoch)
        recipe = load_recipe("recipes/sysu.yaml")
        stage = recipe.stage2
        memories = {m: make_memory(mem[m].numpy(), stage) for m in (VISIBLE, INFRARED)}
        memories[FUSED] = make_memory(fused.numpy(), stage)
        row_of_id = {}
        for m in (VISIBLE, INFRARED):
            table = torch.full((num_ids,), -1, dtype=torch.long)
            table[row_ids[m]] = torch.arange(len(row_ids[m]))
            row_of_id[m] = table
        state = SimpleNamespace(memories=memories, row_of_id=row_of_id)
        t = SimpleNamespace(recipe=recipe, stage=stage, epoch=epoch, epoch_state=state)
        feat = F.normalize(bn, dim=1)
        b = labels.shape[0]
        CrossModalityStage.update_memories(t, feat[:b], feat[b:], labels, modality, labels, labels)
        for m in (VISIBLE, INFRARED):
            assert torch.allclose(memories[m].features, moved[m], atol=1e-6), (epoch, m)
