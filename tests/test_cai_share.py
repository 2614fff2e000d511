"""The CAI own-modality share diagnostic against a hand-computed case."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dmdl_cli.evaluation.cai_share import own_modality_share
from dmdl_cli.model.cai import cai_log_prob


def _case():
    e1, e2 = [1.0, 0.0], [0.0, 1.0]
    memories = [np.array([e1, e2]), np.array([e1])]  # visible rows: ids 0, 1; infrared: id 0
    ids = [np.array([0, 1]), np.array([0])]
    prior = np.array([0.6, 0.4])
    feats = np.array([e1, e2, e1, e2])
    labels = np.array([0, 1, -1, 0])
    modality = np.array([0, 1, 0, 1])
    return feats, memories, ids, prior, labels, modality


def test_share_matches_the_hand_computed_values():
    out = own_modality_share(*_case(), temp=1.0)
    e = math.e
    # sample 0 (visible, id 0): own 0.6 e/(e+1), other 0.4 * 1
    s0 = 0.6 * e / (e + 1) / (0.6 * e / (e + 1) + 0.4)
    # sample 1 (infrared, id 1): the infrared memory has no id-1 row -> own share 0
    s1 = 0.0
    # sample 3 (infrared, id 0): own 0.4 * 1, other 0.6 / (e + 1)
    s3 = 0.4 / (0.4 + 0.6 / (e + 1))
    assert out["samples"] == 3  # the outlier is left out
    assert out["share"] == pytest.approx((s0 + s1 + s3) / 3, abs=1e-12)
    assert out["share_per_modality"][0] == pytest.approx(s0, abs=1e-12)
    assert out["share_per_modality"][1] == pytest.approx((s1 + s3) / 2, abs=1e-12)
    assert out["own_row"] == pytest.approx(2 / 3)
    totals = [0.6 * e / (e + 1) + 0.4, 0.6 * e / (e + 1), 0.4 + 0.6 / (e + 1)]
    assert out["target_prob"] == pytest.approx(sum(totals) / 3, abs=1e-12)


def test_total_is_cai_probability_at_the_target():
    feats, memories, ids, prior, labels, modality = _case()
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(4, 2))
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    out = own_modality_share(feats, memories, ids, prior, labels, modality, temp=0.5)
    log_p = cai_log_prob(torch.tensor(feats, dtype=torch.float32),
                         [torch.tensor(m, dtype=torch.float32) for m in memories],
                         [torch.tensor(i) for i in ids], torch.tensor(prior, dtype=torch.float32),
                         num_ids=2, temp=0.5)
    keep = labels >= 0
    expected = torch.exp(log_p[torch.arange(4)[keep], torch.tensor(labels[keep])]).mean()
    assert out["target_prob"] == pytest.approx(float(expected), rel=1e-5)


def test_own_modality_only_gives_share_one_and_bad_shapes_raise():
    feats, memories, ids, prior, labels, modality = _case()
    out = own_modality_share(feats, memories, ids, np.array([1.0, 0.0]), np.array([0, 1, -1, 0]),
                             np.zeros(4, dtype=int))
    assert out["share"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="must agree"):
        own_modality_share(feats, memories[:1], ids, prior, labels, modality)
