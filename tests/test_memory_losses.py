"""Cluster memory updates and the loss functions, against hand computations."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dmdl_cli.training.losses import (
    batch_hard_triplet,
    contrastive_loss,
    cross_modal_triplet,
    mmd_multi_kernel,
)
from dmdl_cli.training.memory import ClusterMemory, confidence_momentum

R2 = 1.0 / math.sqrt(2.0)


def _memory() -> ClusterMemory:
    return ClusterMemory.from_centroids(torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 0.0]]),
                                        temp=0.5, momentum=0.5)


# ------------------------------------------------------------------------------- memory
def test_from_centroids_normalises_and_logits():
    mem = _memory()
    torch.testing.assert_close(mem.features, torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]))
    f = torch.tensor([[R2, R2], [0.0, -1.0]])
    expected = torch.tensor([[R2, R2, R2], [0.0, -1.0, 0.0]]) / 0.5
    torch.testing.assert_close(mem.logits(f), expected)
    torch.testing.assert_close(mem(f), expected)


def test_update_hand_case_with_two_samples_of_one_cluster():
    mem = _memory()
    feat = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.0, -1.0], [0.6, 0.8]])
    labels = torch.tensor([0, 1, 1, -1])  # the outlier (-1) is ignored
    mem.update(feat, labels)  # mu = 0.5
    # cluster 0: normalise(0.5 (1, 0) + 0.5 (0, 1)) = (1/sqrt2, 1/sqrt2)
    # cluster 1: normalise(0.5 (0, 1) + 0.5 mean((1, 0), (0, -1))) = normalise(0.25, 0.25)
    # cluster 2: untouched
    expected = torch.tensor([[R2, R2], [R2, R2], [1.0, 0.0]])
    torch.testing.assert_close(mem.features, expected)


def test_update_per_sample_momentum_hand_case():
    mem = _memory()
    feat = torch.tensor([[1.0, 0.0], [0.0, -1.0]])
    # two samples of cluster 1, mu = (0.2, 1.0): the second one does not pull.
    # m' = normalise(mean(mu) m + mean((1 - mu_i) f_i)) = normalise(0.6 (0, 1) + 0.5 * 0.8 (1, 0))
    #    = (0.4, 0.6) / 0.7211103 = (0.5547002, 0.8320503)
    mem.update(feat, torch.tensor([1, 1]), momentum=torch.tensor([0.2, 1.0]))
    torch.testing.assert_close(mem.features[1], torch.tensor([0.5547002, 0.8320503]))
    # a single sample follows the paper's rule exactly: m <- 0.2 m + 0.8 f, renormalised
    mem2 = _memory()
    f = torch.tensor([[0.6, 0.8]])
    mem2.update(f, torch.tensor([2]), momentum=0.2)
    torch.testing.assert_close(mem2.features[2], F.normalize(0.2 * torch.tensor([1.0, 0.0])
                                                             + 0.8 * f[0], dim=0))


def test_update_is_order_invariant_and_deterministic():
    g = torch.Generator().manual_seed(0)
    feat = F.normalize(torch.randn(32, 16, generator=g), dim=1)
    labels = torch.randint(0, 5, (32,), generator=g)
    mu = torch.rand(32, generator=g)
    base = F.normalize(torch.randn(5, 16, generator=g), dim=1)
    a, b = ClusterMemory.from_centroids(base), ClusterMemory.from_centroids(base)
    perm = torch.randperm(32, generator=g)
    a.update(feat, labels, momentum=mu)
    b.update(feat[perm], labels[perm], momentum=mu[perm])
    torch.testing.assert_close(a.features, b.features)
    torch.testing.assert_close(a.features.norm(dim=1), torch.ones(5))
    c = ClusterMemory.from_centroids(base)
    c.update(feat, labels, momentum=mu)
    assert torch.equal(a.features, c.features)


def test_update_does_not_track_gradients():
    mem = _memory()
    f = torch.tensor([[0.0, 1.0]], requires_grad=True)
    mem.update(f, torch.tensor([0]))
    assert not mem.features.requires_grad


def test_state_dict_round_trip_and_resize():
    mem = _memory()
    mem.update(torch.tensor([[0.0, 1.0]]), torch.tensor([2]))
    fresh = ClusterMemory(2, 3)
    fresh.load_state_dict(mem.state_dict())
    assert torch.equal(fresh.features, mem.features)
    other = ClusterMemory(4, 7)  # different shape: resized on load
    other.load_state_dict(mem.state_dict())
    assert torch.equal(other.features, mem.features) and other.num_features == 2


def test_confidence_momentum():
    mu = confidence_momentum(torch.tensor([1.0, 0.5, 0.2, 0.1]), base=0.2)
    torch.testing.assert_close(mu, torch.tensor([0.2, 0.4, 1.0, 1.0]))


# ------------------------------------------------------------------------------- losses
def test_contrastive_loss_int_and_soft():
    logits = torch.tensor([[0.0, math.log(3.0)], [2.0, -1.0]])
    target = torch.tensor([1, 0])
    torch.testing.assert_close(contrastive_loss(logits, target), F.cross_entropy(logits, target))
    onehot = F.one_hot(target, 2).float()
    torch.testing.assert_close(contrastive_loss(logits, onehot), F.cross_entropy(logits, target))
    # softmax of row 0 = (0.25, 0.75); t = (0.5, 0.5): -(0.5 ln 0.25 + 0.5 ln 0.75) = 0.8369882
    soft = torch.tensor([[0.5, 0.5]])
    assert contrastive_loss(logits[:1], soft).item() == pytest.approx(0.8369882, abs=1e-6)


# 1-D points with labels / modalities chosen so both triplet variants differ
X = torch.tensor([[0.0], [2.5], [1.0], [3.0], [10.0]])
LAB = torch.tensor([0, 0, 0, 1, 1])
MOD = torch.tensor([0, 0, 1, 1, 0])


def test_batch_hard_triplet_hand_case():
    # anchor: hardest pos / hardest neg -> hinge(margin 0.3)
    # 0: 2.5 / 3 -> 0     1: 2.5 / 0.5 -> 2.3    2: 1.5 / 2 -> 0
    # 3: 7 / 0.5 -> 6.8   4: 7 / 7.5 -> 0        mean = 9.1 / 5 = 1.82
    assert batch_hard_triplet(X, LAB, margin=0.3).item() == pytest.approx(1.82, abs=1e-5)


def test_cross_modal_triplet_hand_case():
    # positives only across modalities:
    # 0 (m0): pos {2} 1 / neg 3 -> 0      1 (m0): pos {2} 1.5 / neg 0.5 -> 1.3
    # 2 (m1): pos {0, 1} 1.5 / neg 2 -> 0  3 (m1): pos {4} 7 / neg 0.5 -> 6.8
    # 4 (m0): pos {3} 7 / neg 7.5 -> 0     mean = 8.1 / 5 = 1.62
    assert cross_modal_triplet(X, LAB, MOD, margin=0.3).item() == pytest.approx(1.62, abs=1e-5)


def test_triplet_skips_anchors_without_positive():
    x = torch.tensor([[0.0], [2.5], [1.0], [3.0], [10.0], [50.0]])
    lab = torch.tensor([0, 0, 0, 1, 1, 7])  # anchor 5 has no positive: skipped, still a negative
    assert batch_hard_triplet(x, lab).item() == pytest.approx(1.82, abs=1e-5)
    # no anchor has a cross-modal positive: 0, with a graph
    f = torch.randn(4, 3, requires_grad=True)
    loss = cross_modal_triplet(f, torch.tensor([0, 0, 1, 1]), torch.tensor([0, 0, 1, 1]))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(f.grad, torch.zeros_like(f))
    g = torch.randn(4, 3, requires_grad=True)
    batch_hard_triplet(g, torch.tensor([0, 0, 1, 1])).backward()
    assert torch.isfinite(g.grad).all()


def test_mmd_hand_case():
    # pooled set {0, 1}: base = mean squared distance over distinct pairs = 1,
    # bandwidths (0.25, 0.5, 1, 2, 4); k(x, x) = 5, k(x, y) = sum exp(-1 / s) = 1.9068618
    # MMD^2 = 5 + 5 - 2 * 1.9068618 = 6.1862764
    value = mmd_multi_kernel(torch.tensor([[0.0]]), torch.tensor([[1.0]]))
    assert value.item() == pytest.approx(6.1862764, abs=1e-5)


def test_mmd_zero_for_identical_sets_and_grows_with_shift():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 8, generator=g)
    assert abs(mmd_multi_kernel(x, x.clone()).item()) < 1e-5
    values = [mmd_multi_kernel(x, x + s).item() for s in (0.0, 0.25, 0.5, 1.0, 2.0)]
    assert all(b > a for a, b in zip(values, values[1:])), values
    y = torch.randn(16, 8, generator=g, requires_grad=True)
    loss = mmd_multi_kernel(x, y)
    assert loss.item() >= 0.0
    loss.backward()
    assert torch.isfinite(y.grad).all() and y.grad.abs().sum() > 0
