"""Label-free criteria (dmdl_cli/clustering/criteria.py) against hand-computed cases."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

from dmdl_cli.clustering.association import AssociationInput, ModalitySamples, associate
from dmdl_cli.clustering.criteria import (
    DIRECTIONS,
    EpochLabels,
    ModalityLabels,
    criterion_value,
    cross_modality,
    effective_rank,
    epoch_criteria,
    eps_robustness,
    label_agreement,
    label_alarms,
    linked_clusters,
    linked_pairs,
    membership_overlap,
    pair_stability,
)
from dmdl_cli.data.index import INFRARED, VISIBLE
from dmdl_cli.recipe import SELECT_CRITERIA

LABELS = np.array([0, 0, 1, 1, -1, 2, 2, 2])


def test_identical_labelings_agree_fully_and_permuted_ids_change_nothing():
    assert label_agreement(LABELS, LABELS) == {"label_ari": 1.0, "label_nmi": 1.0}
    permuted = np.array([5, 5, 3, 3, -1, 7, 7, 7])  # same partition, other ids
    assert label_agreement(LABELS, permuted) == label_agreement(LABELS, LABELS)
    other = np.array([0, 1, 0, 1, -1, 2, 2, 2])
    assert label_agreement(other, LABELS) == label_agreement(np.array([9, 4, 9, 4, -1, 0, 0, 0]), permuted)
    assert label_agreement(other, LABELS)["label_ari"] < 1.0


def test_outliers_are_singletons_each_with_an_id_of_its_own():
    # two outliers: as singletons they are different clusters, so "all outliers" is not one
    # cluster of 4 (which would agree with `together` perfectly)
    apart = np.array([-1, -1, -1, -1])
    together = np.array([0, 0, 0, 0])
    assert label_agreement(apart, apart)["label_ari"] == 1.0
    assert label_agreement(apart, together)["label_ari"] == 0.0
    ari = label_agreement(np.array([0, 0, -1, -1]), np.array([0, 0, 1, 2]))["label_ari"]
    assert ari == 1.0  # an outlier is the same as a singleton cluster
    assert label_agreement(np.array([0, 0, -1, -1]), np.array([0, 0, 1, 1]))["label_ari"] == \
        pytest.approx(adjusted_rand_score([0, 0, 1, 2], [0, 0, 1, 1]))


def test_membership_overlap_by_hand():
    other = np.array([0, 0, 0, 0, -1, 2, 2, -1])
    # i=0: {0,1} vs {0,1,2,3} -> 2/4; the outlier 4 stays alone -> 1; i=5: {5,6,7} vs {5,6} -> 2/3;
    # i=7: {5,6,7} vs {7} -> 1/3
    want = [0.5, 0.5, 0.5, 0.5, 1.0, 2 / 3, 2 / 3, 1 / 3]
    assert membership_overlap(LABELS, other) == pytest.approx(want)
    assert membership_overlap(LABELS, LABELS + 10 * (LABELS >= 0)) == pytest.approx(np.ones(8))


def test_eps_robustness_by_hand():
    tighter = np.array([0, 0, -1, -1, -1, 2, 2, 2])  # cluster 1 falls apart at eps - delta
    looser = np.array([0, 0, 0, 0, -1, 2, 2, 2])  # clusters 0 and 1 merge at eps + delta
    out = eps_robustness(LABELS, tighter, looser)
    # per image min(indep, comp): 0.5 0.5 0.5 0.5 (outlier) 0 1 1 1 -> 5/8
    assert out["eps_robustness"] == pytest.approx(5 / 8)
    assert out["independence"] == pytest.approx(5 / 7)  # over the 7 clustered images
    assert out["compactness"] == pytest.approx(6 / 7)
    assert out["eps_kept_share"] == pytest.approx(3 / 8)
    stable = eps_robustness(LABELS, LABELS, LABELS)
    assert stable["eps_robustness"] == pytest.approx(7 / 8)  # the outlier counts 0
    assert stable["independence"] == stable["compactness"] == 1.0
    nothing = eps_robustness(np.full(4, -1), np.full(4, -1), np.full(4, -1))
    assert nothing["eps_robustness"] == 0.0 and math.isnan(nothing["independence"])
    with pytest.raises(ValueError, match="same images"):
        eps_robustness(LABELS, LABELS[:5], LABELS)


def test_pair_stability_counts_sample_pairs_by_hand():
    vis, ir = np.array([0, 0, 1]), np.array([0, 1, 1])
    assert linked_pairs(vis, ir) == 2 * 1 + 1 * 2
    same = pair_stability(vis, ir, vis, ir)
    assert same == {"pairs_kept": 1.0, "pairs_jaccard": 1.0, "linked_pairs": 4}
    # renumbering the previous epoch's unified ids changes nothing
    assert pair_stability(vis, ir, vis + 7, ir + 7) == same
    # before: every visible image linked with infrared images 0 and 1 (6 pairs); now 3 of them
    # remain: (v0, r0), (v1, r0), (v2, r1); (v2, r2) is new, r2 was an outlier before
    out = pair_stability(vis, ir, np.array([3, 3, 3]), np.array([3, 3, -1]))
    assert out["pairs_kept"] == pytest.approx(3 / 6)
    assert out["pairs_jaccard"] == pytest.approx(3 / (4 + 6 - 3))
    none_before = pair_stability(vis, ir, np.array([-1, -1, -1]), np.array([0, 0, 0]))
    assert math.isnan(none_before["pairs_kept"]) and none_before["pairs_jaccard"] == 0.0


def test_pair_stability_matches_brute_force_on_random_labels():
    rng = np.random.default_rng(0)
    v, r, pv, pr = (rng.integers(-1, 6, n) for n in (40, 30, 40, 30))

    def pairs(a, b):
        return {(i, j) for i in range(len(a)) for j in range(len(b)) if a[i] >= 0 and a[i] == b[j]}

    now, before = pairs(v, r), pairs(pv, pr)
    out = pair_stability(v, r, pv, pr)
    assert out["linked_pairs"] == len(now)
    assert out["pairs_kept"] == pytest.approx(len(now & before) / len(before))
    assert out["pairs_jaccard"] == pytest.approx(len(now & before) / len(now | before))


def test_cross_modality_by_hand():
    vis = np.array([[1.0, 0.0], [0.0, 1.0]])
    ir = np.array([[1.0, 0.1], [0.2, 1.0], [-1.0, 0.0]])
    out = cross_modality(vis, ir)
    assert out["mutual_nn"] == 1.0  # v0<->i0 and v1<->i1 are mutual, over min(2, 3)
    sim = (vis @ (ir / np.linalg.norm(ir, axis=1, keepdims=True)).T)
    assert out["matching_cost"] == pytest.approx(np.mean(1 - sim[[0, 1], [0, 1]]))
    # both visible centroids nearest to i0, which prefers v0: one mutual pair of two
    assert cross_modality(vis, np.array([[1.0, 0.9]]))["mutual_nn"] == 1.0
    assert cross_modality(np.array([[1.0, 0.0], [1.0, 0.1]]), ir[:2])["mutual_nn"] == 0.5
    # the Hungarian matching linked: its cost is the matching cost
    linked = cross_modality(vis, ir, np.array([[True, False, False], [False, True, False]]))
    assert linked["association_cost"] == pytest.approx(linked["matching_cost"])
    many = cross_modality(vis, ir, np.array([[True, False, True], [False, False, False]]))
    assert many["association_cost"] == pytest.approx(np.mean(1 - sim[0, [0, 2]]))
    empty = cross_modality(np.zeros((0, 2)), ir, np.zeros((0, 3), bool))
    assert math.isnan(empty["mutual_nn"]) and math.isnan(empty["association_cost"])


def test_linked_clusters_from_sample_level_unified_ids():
    # visible clusters 0, 1, 2; infrared 0, 1. Unified ids per sample (a method may label
    # samples on their own: visible cluster 1 is split between ids 5 and 6)
    vis_labels, vis_unified = np.array([0, 0, 1, 1, 2, -1]), np.array([5, 5, 5, 6, -1, -1])
    ir_labels, ir_unified = np.array([0, 1, 1, -1]), np.array([6, 5, 7, -1])
    want = np.array([[False, True], [True, True], [False, False]])
    assert np.array_equal(linked_clusters(vis_labels, vis_unified, ir_labels, ir_unified, 3, 2), want)


def test_effective_rank_collapse_is_near_one_and_isotropic_is_full():
    rng = np.random.default_rng(0)
    direction = rng.standard_normal(64)
    collapsed = np.tile(direction, (500, 1))
    assert effective_rank(collapsed) == pytest.approx(1.0, abs=1e-3)
    rank_one = np.outer(rng.standard_normal(500), direction)  # scaled copies of one vector
    assert effective_rank(rank_one) == pytest.approx(1.0, abs=1e-3)
    assert effective_rank(np.eye(16)) == pytest.approx(16.0)
    iso = rng.standard_normal((2000, 32))
    assert 28 < effective_rank(iso) <= 32
    # three equal orthogonal directions: exactly 3
    three = np.repeat(np.eye(8)[:3], 50, axis=0)
    assert effective_rank(three) == pytest.approx(3.0)
    # subsampling is seeded: the same rows every time
    assert effective_rank(iso, samples=100, seed=1) == effective_rank(iso, samples=100, seed=1)


def test_label_alarms():
    assert label_alarms(LABELS) == {"clusters": 3, "largest_share": 3 / 8, "outlier_share": 1 / 8}
    assert label_alarms(np.full(5, -1)) == {"clusters": 0, "largest_share": 0.0, "outlier_share": 1.0}


def _unified(vis_labels, ir_labels, centroids_v, centroids_i, epoch):
    inp = AssociationInput(epoch, {
        VISIBLE: ModalitySamples(vis_labels, centroids_v[np.maximum(vis_labels, 0)], centroids_v),
        INFRARED: ModalitySamples(ir_labels, centroids_i[np.maximum(ir_labels, 0)], centroids_i)})
    labels = associate("nearest-alternating", inp).labels
    return labels[VISIBLE], labels[INFRARED]


def _epoch(vis_labels, ir_labels, centroids_v, centroids_i, epoch, stage2=True):
    mods = {VISIBLE: ModalityLabels(vis_labels, centroids_v, vis_labels, vis_labels),
            INFRARED: ModalityLabels(ir_labels, centroids_i, ir_labels, ir_labels)}
    if stage2:
        mods[VISIBLE].unified, mods[INFRARED].unified = _unified(
            vis_labels, ir_labels, centroids_v, centroids_i, epoch)
    return EpochLabels(mods)


def test_epoch_record_is_strict_json_with_combined_and_per_modality_values():
    rng = np.random.default_rng(0)
    feats = rng.standard_normal((14, 6))
    vis = np.array([0, 0, 0, 1, 1, 1, -1, 2])
    ir = np.array([0, 0, 1, 1, 1, -1])
    cv, ci = np.eye(6)[:3], np.eye(6)[:2] + 0.1
    first = epoch_criteria(_epoch(vis, ir, cv, ci, 0), None, feats, epoch=0)
    text = json.dumps(first, allow_nan=False)  # None, never NaN
    assert json.loads(text) == first
    assert first["kind"] == "criteria" and first["epoch"] == 0
    assert first["label_ari"] is None and first["pairs_kept"] is None  # no previous epoch
    assert first["visible"]["clusters"] == 3 and first["infrared"]["clusters"] == 2
    assert first["clusters"] == 5
    assert first["largest_share"] == max(3 / 8, 3 / 6)
    assert first["outlier_share"] == max(1 / 8, 1 / 6)
    assert first["eps_robustness"] == pytest.approx((7 / 8 + 5 / 6) / 2)
    assert first["linked_pairs"] == linked_pairs(*_unified(vis, ir, cv, ci, 0))
    assert first["association_cost"] is not None
    # the same labels again: stable; ids permuted in the previous epoch change nothing
    again = epoch_criteria(_epoch(vis, ir, cv, ci, 2), _epoch(vis, ir, cv, ci, 0), feats, epoch=1)
    assert again["label_ari"] == 1.0 and again["visible"]["label_nmi"] == 1.0
    assert again["pairs_kept"] == 1.0 and again["unified_ari"] == 1.0
    perm = np.array([2, 0, 1])
    permuted = _epoch(np.where(vis >= 0, perm[np.maximum(vis, 0)], -1), ir, cv[np.argsort(perm)], ci, 0)
    assert epoch_criteria(_epoch(vis, ir, cv, ci, 2), permuted, feats, epoch=1) == again
    # stage 1: no association, no pair criteria
    stage1 = epoch_criteria(_epoch(vis, ir, cv, ci, 0, stage2=False), None, feats, epoch=0)
    assert "pairs_kept" not in stage1 and "association_cost" not in stage1
    assert stage1["mutual_nn"] is not None and stage1["effective_rank"] > 1


def test_every_selectable_criterion_has_a_direction_and_is_in_the_record():
    assert set(SELECT_CRITERIA) - {"last"} == set(DIRECTIONS)
    assert criterion_value({"a": None}, "a") != criterion_value({"a": None}, "a")  # NaN
    assert criterion_value({"a": 2}, "a") == 2.0 and math.isnan(criterion_value({}, "a"))
