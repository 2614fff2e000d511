"""CAI: backdoor-adjusted prediction P(y | do(x)) = sum_m P(y | x, m) P(m)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dmdl_cli.model.cai import cai_log_prob, cai_loss, modality_prior


def _hand_case():
    # D = 2, temp = 1, f = (1, 0), 3 unified ids.
    feat = torch.tensor([[1.0, 0.0]])
    vis = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # ids 0, 1 -> logits (1, 0)
    ir = torch.tensor([[0.0, 1.0], [-1.0, 0.0], [0.0, 1.0]])  # ids 2, 2, 1 -> logits (0, -1, 0)
    ids = [torch.tensor([0, 1]), torch.tensor([2, 2, 1])]
    prior = torch.tensor([0.75, 0.25])
    return feat, [vis, ir], ids, prior


def test_hand_computed_case():
    feat, mems, ids, prior = _hand_case()
    log_p = cai_log_prob(feat, mems, ids, prior, num_ids=3, temp=1.0)
    # visible: softmax(1, 0) = (e/(e+1), 1/(e+1)) = (0.7310586, 0.2689414) on ids (0, 1)
    # IR: softmax(0, -1, 0) = (1, 1/e, 1) / (2 + 1/e) = (0.4223188, 0.1553624, 0.4223188);
    #     rows 0 and 1 share id 2 -> id 2: 0.5776812, id 1: 0.4223188, id 0: 0
    # P(do) = 0.75 * (0.7310586, 0.2689414, 0) + 0.25 * (0, 0.4223188, 0.5776812)
    #       = (0.5482939, 0.3072858, 0.1444203)
    expected = torch.log(torch.tensor([[0.5482939, 0.3072858, 0.1444203]]))
    torch.testing.assert_close(log_p, expected, rtol=0, atol=1e-6)
    target = torch.tensor([[0.5, 0.5, 0.0]])
    # -(0.5 ln 0.5482939 + 0.5 ln 0.3072858) = 0.8904604
    assert cai_loss(log_p, target).item() == pytest.approx(0.8904604, abs=1e-6)


def test_probabilities_sum_to_one_and_gradient_flows():
    g = torch.Generator().manual_seed(0)
    feat = F.normalize(torch.randn(4, 8, generator=g), dim=1).requires_grad_(True)
    mems = [F.normalize(torch.randn(5, 8, generator=g), dim=1),
            F.normalize(torch.randn(3, 8, generator=g), dim=1)]
    ids = [torch.tensor([0, 1, 2, 3, 3]), torch.tensor([4, 0, 4])]
    prior = torch.tensor([0.6, 0.4])
    log_p = cai_log_prob(feat, mems, ids, prior, num_ids=5, temp=0.05)
    torch.testing.assert_close(log_p.exp().sum(1), torch.ones(4))
    target = torch.softmax(torch.randn(4, 5, generator=g), dim=1)
    loss = cai_loss(log_p, target)
    loss.backward()
    assert torch.isfinite(feat.grad).all() and feat.grad.abs().sum() > 0


def test_single_modality_prior_reduces_to_softmax_and_absent_ids_are_floored():
    g = torch.Generator().manual_seed(1)
    feat = F.normalize(torch.randn(3, 6, generator=g), dim=1)
    vis = F.normalize(torch.randn(4, 6, generator=g), dim=1)
    ir = F.normalize(torch.randn(2, 6, generator=g), dim=1)
    ids = [torch.tensor([0, 1, 2, 3]), torch.tensor([4, 5])]
    # id 6 belongs to no modality; P(IR) = 0 makes ids 4, 5 unreachable too
    log_p = cai_log_prob(feat, [vis, ir], ids, torch.tensor([1.0, 0.0]), num_ids=7, temp=0.05,
                         eps=1e-12)
    torch.testing.assert_close(log_p[:, :4], torch.log_softmax(feat @ vis.T / 0.05, dim=1))
    torch.testing.assert_close(log_p[:, 4:], torch.full((3, 3), math.log(1e-12)))
    # a zero target on a floored id contributes nothing (no NaN)
    t = torch.zeros(3, 7)
    t[:, 0] = 1.0
    assert cai_loss(log_p, t).item() == pytest.approx(-log_p[:, 0].mean().item())


def test_extreme_logits_stay_exact_in_log_space():
    # temp 1e-3: probabilities of e^-2000 underflow in float32, their log must not
    feat = torch.tensor([[1.0, 0.0]])
    vis = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [-1.0, 0.0]])
    log_p = cai_log_prob(feat, [vis], [torch.tensor([0, 1, 1])], torch.tensor([1.0]),
                         num_ids=2, temp=1e-3)
    assert log_p[0, 0].item() == pytest.approx(0.0, abs=1e-6)
    # id 1 = two rows of logit -1000 vs one of +1000: log(2) - 2000
    assert log_p[0, 1].item() == pytest.approx(math.log(2.0) - 2000.0, rel=1e-6)


def test_modality_prior():
    labels = np.array([0, 1, -1, 2, 0, -1])
    modality = np.array([0, 0, 1, 1, 1, 0])
    torch.testing.assert_close(modality_prior(labels, modality), torch.tensor([0.5, 0.5]))
    prior = modality_prior(torch.tensor([3, 3, 3, -1]), torch.tensor([0, 0, 1, 1]))
    torch.testing.assert_close(prior, torch.tensor([2 / 3, 1 / 3]))
    with pytest.raises(ValueError):
        modality_prior(np.array([-1, -1]), np.array([0, 1]))
