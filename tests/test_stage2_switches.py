"""Stage 2's reference switches on constructed tensors: which memory rows move, update order."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from dmdl_cli.data.index import INFRARED, VISIBLE
from dmdl_cli.recipe import Recipe
from dmdl_cli.runtime import Runtime
from dmdl_cli.clustering.association import adopter
from dmdl_cli.training.cross import FUSED, CrossModalityStage
from dmdl_cli.training.labelling import make_memory
from dmdl_cli.training.objectives import sample_order, update_batch


def _moved_rows(epoch: int, cross: bool, method: str = "nearest-alternating") -> dict[str, set[int]]:
    """Run one memory update on a constructed batch; return the rows of each memory that moved.

    Unified ids 0..2: the visible memory holds ids 0, 1, 2 (rows 0..2), the infrared memory ids
    0 and 1 (rows 0, 1). The batch: visible samples of ids 0 and 2, infrared samples of id 1.
    """
    recipe = Recipe()
    recipe.stage2.cross_memory_update = cross
    recipe.association.method = method
    stage = recipe.stage2
    g = torch.Generator().manual_seed(epoch)
    vis_ids, ir_ids = torch.tensor([0, 1, 2]), torch.tensor([0, 1])
    memories = {VISIBLE: make_memory(F.normalize(torch.randn(3, 4, generator=g), dim=1).numpy(), stage),
                INFRARED: make_memory(F.normalize(torch.randn(2, 4, generator=g), dim=1).numpy(), stage),
                FUSED: make_memory(F.normalize(torch.randn(3, 4, generator=g), dim=1).numpy(), stage)}
    before = {k: m.features.clone() for k, m in memories.items()}
    row_of_id = {VISIBLE: torch.tensor([0, 1, 2]), INFRARED: torch.tensor([0, 1, -1])}
    state = SimpleNamespace(memories=memories, row_of_id=row_of_id,
                            ids_t={VISIBLE: vis_ids, INFRARED: ir_ids})
    runtime = Runtime(torch.device("cpu"), None, False)
    t = SimpleNamespace(recipe=recipe, stage=stage, runtime=runtime, epoch=epoch, epoch_state=state)
    labels = torch.tensor([0, 2, 1, 1])  # (B,) per view
    modality = torch.tensor([VISIBLE, VISIBLE, INFRARED, INFRARED])
    fa = F.normalize(torch.randn(4, 4, generator=g), dim=1)
    fb = F.normalize(torch.randn(4, 4, generator=g), dim=1)
    CrossModalityStage.update_memories(t, fa, fb, labels, modality, labels, labels)
    return {name: {r for r in range(before[k].shape[0]) if not torch.equal(before[k][r], memories[k].features[r])}
            for name, k in (("vis", VISIBLE), ("ir", INFRARED), ("fused", FUSED))}


def test_adopting_modality_alternates_with_the_association():
    assert [adopter("nearest-alternating", e) for e in range(4)] == [VISIBLE, INFRARED, VISIBLE, INFRARED]


@pytest.mark.parametrize("epoch", [0, 2])
def test_even_epochs_visible_samples_also_move_infrared_rows(epoch):
    moved = _moved_rows(epoch, cross=True)
    assert moved["vis"] == {0, 2}  # own: ids 0 and 2; the IR samples (id 1) do not touch it
    assert moved["ir"] == {0, 1}  # own: id 1; cross: the visible id 0 (id 2 has no IR row)
    assert moved["fused"] == {0, 1, 2}


@pytest.mark.parametrize("epoch", [1, 3])
def test_odd_epochs_infrared_samples_also_move_visible_rows(epoch):
    moved = _moved_rows(epoch, cross=True)
    assert moved["vis"] == {0, 1, 2}  # own: ids 0, 2; cross: the infrared id 1
    assert moved["ir"] == {1}  # visible samples leave the infrared memory alone


@pytest.mark.parametrize("epoch", [0, 1])
def test_without_cross_update_each_modality_moves_its_own_memory(epoch):
    moved = _moved_rows(epoch, cross=False)
    assert moved["vis"] == {0, 2} and moved["ir"] == {1}


@pytest.mark.parametrize("epoch", [0, 1])
def test_hungarian_has_no_adopting_modality_so_no_cross_update(epoch):
    moved = _moved_rows(epoch, cross=True, method="hungarian")
    assert moved["vis"] == {0, 2} and moved["ir"] == {1}


def test_update_order_is_visible_then_infrared_view_a_then_b():
    labels = torch.tensor([10, 11, 20, 21])
    modality = torch.tensor([VISIBLE, VISIBLE, INFRARED, INFRARED])
    fa = torch.arange(4.0).unsqueeze(1)  # feature value = batch position, view A
    fb = 100 + torch.arange(4.0).unsqueeze(1)  # view B
    feat, lab, mod = update_batch(fa, fb, labels, modality)
    assert feat.squeeze(1).tolist() == [0, 1, 100, 101, 2, 3, 102, 103]
    feat, _, _ = update_batch(fa, fb, labels, modality, first=INFRARED)
    assert feat.squeeze(1).tolist() == [2, 3, 102, 103, 0, 1, 100, 101]
    # two ranks holding the interleaved halves of the global batch give the same order
    slots = torch.tensor([0, 2, 0, 2, 1, 3, 1, 3])  # rank 0 [A, B], rank 1 [A, B]
    view = torch.tensor([0, 0, 1, 1, 0, 0, 1, 1])
    mod = torch.tensor([VISIBLE, INFRARED, VISIBLE, INFRARED, VISIBLE, INFRARED, VISIBLE, INFRARED])
    order = sample_order(mod, view, slots)
    assert [(int(mod[i]), int(view[i]), int(slots[i])) for i in order] == [
        (0, 0, 0), (0, 0, 1), (0, 1, 0), (0, 1, 1), (1, 0, 2), (1, 0, 3), (1, 1, 2), (1, 1, 3)]


def test_k1_alternation_clusters_the_adopting_modality_with_k1_adopting(monkeypatch):
    import numpy as np

    from dmdl_cli.recipe import load_recipe
    from dmdl_cli.clustering import modalities
    from dmdl_cli.training.cross import clustering_k1

    recipe = load_recipe("recipes/sysu.yaml")
    assert clustering_k1(recipe, 0) == {VISIBLE: 15} and clustering_k1(recipe, 1) == {INFRARED: 15}
    assert clustering_k1(load_recipe("recipes/regdb.yaml"), 0) is None
    hungarian = load_recipe("recipes/sysu.yaml", overrides=["association.method=hungarian"])
    assert clustering_k1(hungarian, 0) is None and clustering_k1(hungarian, 1) is None
    seen = []

    def fake_cluster(feats, *, k1, **kwargs):
        seen.append(k1)
        return np.zeros(len(feats), np.int64), {}

    monkeypatch.setattr(modalities, "cluster_features", fake_cluster)
    feats = np.eye(4, dtype=np.float32)
    modalities.cluster_modalities(recipe.cluster, feats, np.arange(4), np.array([0, 0, 1, 1]),
                                  k1=clustering_k1(recipe, 1))
    assert seen == [30, 15]  # visible k1 = 30, infrared (adopting on odd epochs) 15


def test_stage2_triplet_adds_the_all_modality_term_only_with_the_cross_sampler():
    from dmdl_cli.training.losses import batch_hard_triplet, cross_modal_triplet, modality_triplet

    g = torch.Generator().manual_seed(0)
    feat = torch.randn(8, 3, generator=g)
    labels = torch.tensor([0, 0, 1, 1, 0, 0, 1, 1])
    modality = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    stage = Recipe().stage2
    per_mod = modality_triplet(feat, labels, modality, 0.3)
    every = batch_hard_triplet(feat, labels, 0.3)
    assert per_mod.item() > 0 and every.item() > 0
    assert CrossModalityStage.triplet(stage, feat, labels, modality, False).item() == pytest.approx(per_mod.item())
    assert CrossModalityStage.triplet(stage, feat, labels, modality, True).item() == pytest.approx(
        per_mod.item() + every.item())
    stage.triplet_all_modalities = False
    assert CrossModalityStage.triplet(stage, feat, labels, modality, True).item() == pytest.approx(per_mod.item())
    stage.triplet = "joint"  # dmdl's earlier form
    assert CrossModalityStage.triplet(stage, feat, labels, modality, False).item() == pytest.approx(every.item())
    assert CrossModalityStage.triplet(stage, feat, labels, modality, True).item() == pytest.approx(
        cross_modal_triplet(feat, labels, modality, 0.3).item())
