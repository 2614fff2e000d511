"""Cluster memory updates and the loss functions, against hand computations."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dmdl_cli.training.losses import (
    batch_hard_triplet,
    contrastive_loss,
    cross_modal_triplet,
    mmd_multi_kernel,
)
from dmdl_cli.recipe import recipe_from_dict
from dmdl_cli.training.memory import ClusterMemory, confidence_momentum
from dmdl_cli.training.objectives import alignment

R2 = 1.0 / math.sqrt(2.0)
BATCH_MEAN = {"temp": 0.05, "momentum": 0.2, "rule": "batch-mean"}  # the memory has no defaults


def _memory() -> ClusterMemory:
    return ClusterMemory.from_centroids(torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 0.0]]),
                                        temp=0.5, momentum=0.5, rule="batch-mean")


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
    a, b = (ClusterMemory.from_centroids(base, **BATCH_MEAN) for _ in range(2))
    perm = torch.randperm(32, generator=g)
    a.update(feat, labels, momentum=mu)
    b.update(feat[perm], labels[perm], momentum=mu[perm])
    torch.testing.assert_close(a.features, b.features)
    torch.testing.assert_close(a.features.norm(dim=1), torch.ones(5))
    c = ClusterMemory.from_centroids(base, **BATCH_MEAN)
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
    fresh = ClusterMemory(2, 3, **BATCH_MEAN)
    fresh.load_state_dict(mem.state_dict())
    assert torch.equal(fresh.features, mem.features)
    other = ClusterMemory(4, 7, **BATCH_MEAN)  # different shape: resized on load
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


# The unbiased MMD (the reference's DAN_new) on a hand case: x = (0,0), (1,0), (0,1) and
# y = (1,1), (2,1), (1,2). Squared distances: within x (and within y) 1, 1, 2; across the nine
# pairs x1: 2, 5, 5; x2: 1, 2, 4; x3: 1, 4, 2. Base bandwidth s = mean over the 30 ordered
# distinct pairs = 2 (4 + 4 + 26) / 30 = 34/15, so with a = exp(-15/34) = 0.64327918 each kernel
# exp(-d2 / (s 2^(i - K//2))) is a^(d2 2^(K//2 - i)). With k(d2) the kernels' sum and the cross
# sum C = 2 k(1) + 3 k(2) + 2 k(4) + 2 k(5):
#   U = 2 * 2 (2 k(1) + k(2)) / (3 * 2) - 2 C / 9
#   V = 2 (3 k(0) + 2 (2 k(1) + k(2))) / 9 - 2 C / 9
# K = 1: k(1) = 0.64327918, k(2) = 0.41380810, k(4) = 0.17123714, k(5) = 0.11015329,
#   C = 3.09076351 -> U = 0.44674130, V = 0.73554875
# K = 5 (multiplier 2): k(0) = 5, k(1) = 2.92594198, k(2) = 2.05969344, k(4) = 1.25850637,
#   k(5) = 1.03042973, C = 16.60883649 -> U = 1.58353238, V = 3.15873740
_HAND_X = [[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]]
_HAND_Y = [[1.0, 1.0], [2.0, 1.0], [1.0, 2.0]]


@pytest.mark.parametrize("kernels, u, v", [(1, 0.44674130, 0.73554875),
                                           (5, 1.58353238, 3.15873740)])
def test_mmd_unbiased_and_biased_hand_case(kernels, u, v):
    x, y = torch.tensor(_HAND_X), torch.tensor(_HAND_Y)
    got_u = mmd_multi_kernel(x, y, num_kernels=kernels, kernel_mul=2.0, unbiased=True)
    got_v = mmd_multi_kernel(x, y, num_kernels=kernels, kernel_mul=2.0)
    assert got_u.item() == pytest.approx(u, abs=1e-6)
    assert got_v.item() == pytest.approx(v, abs=1e-6)


def _dan_new_loop(x: np.ndarray, y: np.ndarray, kernel_num: int, kernel_mul: float) -> float:
    """The reference's DAN_new written as plain loops in float64 (an independent check)."""
    z = np.concatenate([x, y]).astype(np.float64)
    n, b = len(z), len(x)
    d2 = [[float(((z[i] - z[j]) ** 2).sum()) for j in range(n)] for i in range(n)]
    base = sum(map(sum, d2)) / (n * n - n) / kernel_mul ** (kernel_num // 2)
    widths = [base * kernel_mul ** i for i in range(kernel_num)]
    k = [[sum(math.exp(-d2[i][j] / w) for w in widths) for j in range(n)] for i in range(n)]
    within = sum(k[i][j] for i in range(b) for j in range(b) if i != j)
    within += sum(k[i][j] for i in range(b, n) for j in range(b, n) if i != j)
    cross = sum(k[i][j] + k[j][i] for i in range(b) for j in range(b, n))
    return within / (b * (b - 1)) - cross / (b * b)


def test_mmd_unbiased_equals_a_loop_over_the_reference_formula():
    g = torch.Generator().manual_seed(3)
    for b, d, kernels, mul in ((6, 4, 5, 2.0), (4, 7, 3, 1.5), (2, 3, 5, 2.0)):
        x = torch.randn(b, d, generator=g) * 4.0  # un-normalised, like BN-neck features
        y = torch.randn(b, d, generator=g) * 4.0 + 1.0
        got = mmd_multi_kernel(x, y, num_kernels=kernels, kernel_mul=mul, unbiased=True).item()
        assert got == pytest.approx(_dan_new_loop(x.numpy(), y.numpy(), kernels, mul), abs=1e-5)
    with pytest.raises(ValueError, match="2 samples"):
        mmd_multi_kernel(torch.zeros(1, 2), torch.ones(1, 2), unbiased=True)


def test_mmd_unbiased_is_zero_on_average_over_splits_and_the_biased_one_is_not():
    # One pooled set of 6 points: the bandwidth depends on the pooled set only, so averaged over
    # all 20 ways of splitting it into x and y (3 + 3), the U-statistic is exactly 0; the
    # V-statistic averages to a positive value (its diagonal terms).
    g = torch.Generator().manual_seed(5)
    pool = torch.randn(6, 3, generator=g)
    us, vs = [], []
    for idx in itertools.combinations(range(6), 3):
        rest = [i for i in range(6) if i not in idx]
        us.append(mmd_multi_kernel(pool[list(idx)], pool[rest], unbiased=True).item())
        vs.append(mmd_multi_kernel(pool[list(idx)], pool[rest]).item())
    assert abs(sum(us) / len(us)) < 1e-6
    assert min(us) < 0 < max(us)  # an unbiased estimate of 0 takes both signs
    assert sum(vs) / len(vs) > 0.5 and min(vs) >= 0.0
    # Independent draws of two samples of one distribution: the U-statistic averages to ~0
    # (within 4 standard errors), the V-statistic stays far above it.
    def draws(unbiased: bool) -> torch.Tensor:
        return torch.tensor([mmd_multi_kernel(torch.randn(8, 4, generator=g),
                                              torch.randn(8, 4, generator=g),
                                              unbiased=unbiased).item() for _ in range(300)])

    u, w = draws(True), draws(False)
    stderr = u.std().item() / math.sqrt(len(u))
    assert abs(u.mean().item()) < 4 * stderr, (u.mean().item(), stderr)
    assert w.mean().item() > u.mean().item() + 20 * stderr


def test_alignment_reads_bn_neck_features_as_cbt_mmd_says():
    g = torch.Generator().manual_seed(2)
    b = 6
    modality = torch.tensor([0, 0, 0, 1, 1, 1])
    view_a = torch.randn(b, 5, generator=g)
    scale = torch.rand(b, 1, generator=g) * 3 + 0.5
    bn = torch.cat([view_a, view_a * scale]).requires_grad_(True)  # (2B, D): views A, B
    ref = recipe_from_dict({"cbt": {"mmd": "unbiased-bn-neck"}})
    old = recipe_from_dict({"cbt": {"mmd": "biased-normalised"}})
    # the same directions at other lengths: nothing to align once normalised
    assert alignment(bn, modality, old).item() == pytest.approx(0.0, abs=1e-6)
    got = alignment(bn, modality, ref)
    want = sum(mmd_multi_kernel(bn[:b][modality == m], bn[b:][modality == m], unbiased=True)
               for m in (0, 1))
    assert got.item() == pytest.approx(want.item(), abs=1e-6) and abs(got.item()) > 1e-3
    got.backward()
    assert torch.isfinite(bn.grad).all() and bn.grad.abs().sum() > 0
    # the earlier form, unchanged: the V-statistic of the L2-normalised views
    other = torch.randn(2 * b, 5, generator=g)
    f = F.normalize(other, dim=1)
    want_old = sum(mmd_multi_kernel(f[:b][modality == m], f[b:][modality == m]) for m in (0, 1))
    assert alignment(other, modality, old).item() == pytest.approx(want_old.item(), abs=1e-7)


# ------------------------------------------------------------------ reference switches (issue 15)
def test_per_sample_update_matches_a_hand_loop_and_differs_from_batch_mean():
    g = torch.Generator().manual_seed(1)
    feat = F.normalize(torch.randn(40, 8, generator=g), dim=1)
    labels = torch.randint(-1, 6, (40,), generator=g)  # repeats of rows and outliers
    mu = 0.2 + 0.8 * torch.rand(40, generator=g)
    base = F.normalize(torch.randn(6, 8, generator=g), dim=1)
    seq = ClusterMemory.from_centroids(base, temp=0.05, momentum=0.2, rule="per-sample")
    seq.update(feat, labels, momentum=mu)
    hand = base.clone()
    for x, y, m in zip(feat, labels.tolist(), mu):  # the reference's loop, sample by sample
        if y < 0:
            continue
        hand[y] = m * hand[y] + (1 - m) * x
        hand[y] /= hand[y].norm()
    torch.testing.assert_close(seq.features, hand, rtol=1e-6, atol=1e-6)
    mean = ClusterMemory.from_centroids(base, **BATCH_MEAN)
    mean.update(feat, labels, momentum=mu)
    assert (mean.features - seq.features).abs().max() > 1e-2  # the two rules differ
    # order matters for per-sample (it does not for batch-mean)
    rev = ClusterMemory.from_centroids(base, temp=0.05, momentum=0.2, rule="per-sample")
    rev.update(feat.flip(0), labels.flip(0), momentum=mu.flip(0))
    assert (rev.features - seq.features).abs().max() > 1e-3


def test_per_sample_hand_case_two_samples_of_one_row():
    mem = ClusterMemory.from_centroids(torch.tensor([[0.0, 1.0]]), temp=0.05, momentum=0.5,
                                       rule="per-sample")
    mem.update(torch.tensor([[1.0, 0.0], [0.0, -1.0]]), torch.tensor([0, 0]))
    # (0,1) -> normalise(0.5 (0,1) + 0.5 (1,0)) = (R2, R2) -> normalise(0.5 (R2, R2) + 0.5 (0,-1))
    second = torch.tensor([0.5 * R2, 0.5 * R2 - 0.5])
    torch.testing.assert_close(mem.features[0], second / second.norm())


def test_reduce_over_modalities_hand_case():
    from dmdl_cli.training.losses import reduce_over_modalities

    values = torch.tensor([1.0, 3.0, 2.0, 10.0, 20.0, 30.0])
    modality = torch.tensor([0, 0, 0, 1, 1, 1])
    # sum-modalities: mean(1, 3, 2) + mean(10, 20, 30) = 2 + 20; mean: 66 / 6
    assert reduce_over_modalities(values, modality, "sum-modalities").item() == pytest.approx(22.0)
    assert reduce_over_modalities(values, modality, "mean").item() == pytest.approx(11.0)
    valid = torch.tensor([True, False, True, False, False, False])
    assert reduce_over_modalities(values, modality, "sum-modalities", valid).item() == pytest.approx(1.5)


def test_stage2_loss_terms_against_a_hand_computed_case():
    """L_intra on hard targets and mu * L_CAI summed over the modalities' batch means."""
    from dmdl_cli.model.cai import cai_log_prob
    from dmdl_cli.training.losses import reduce_over_modalities, sample_cross_entropy

    f = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])  # vis, vis, ir, ir
    modality = torch.tensor([0, 0, 1, 1])
    mem_v = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # unified ids 0, 1
    mem_i = torch.tensor([[1.0, 0.0]])  # unified id 0 only
    temp = 1.0
    e = math.e
    # hard-target L_intra: visible samples against M_v (labels 0, 1), IR against M_i (label 0)
    ce_v = -math.log(e / (e + 1))  # both visible samples: own logit 1, other 0
    intra = (sample_cross_entropy(f[:2] @ mem_v.T / temp, torch.tensor([0, 1])).mean()
             + sample_cross_entropy(f[2:] @ mem_i.T / temp, torch.tensor([0, 0])).mean())
    assert intra.item() == pytest.approx(ce_v + 0.0)  # IR: one row, log 1 = 0
    # CAI with P(m) = (1/2, 1/2), one-hot targets 0, 1, 0, 0
    log_p = cai_log_prob(f, [mem_v, mem_i], [torch.tensor([0, 1]), torch.tensor([0])],
                         torch.tensor([0.5, 0.5]), 2, temp)
    p_v0 = e / (e + 1)  # visible memory, feature (1, 0), id 0
    expected = torch.tensor([
        -math.log(0.5 * p_v0 + 0.5),          # f=(1,0), y=0: P_v(0)=e/(e+1), P_i(0)=1
        -math.log(0.5 * p_v0),                # f=(0,1), y=1: P_v(1)=e/(e+1), P_i(1)=0
        -math.log(0.5 * p_v0 + 0.5),          # f=(1,0), y=0
        -math.log(0.5 * (1 / (e + 1)) + 0.5),  # f=(0,1), y=0: P_v(0)=1/(e+1), P_i(0)=1
    ])
    targets = torch.tensor([0, 1, 0, 0])
    per_sample = -log_p.gather(1, targets[:, None]).squeeze(1)
    torch.testing.assert_close(per_sample, expected)
    summed = reduce_over_modalities(per_sample, modality, "sum-modalities")
    mean = reduce_over_modalities(per_sample, modality, "mean")
    assert summed.item() == pytest.approx(expected[:2].mean() + expected[2:].mean())
    assert summed.item() == pytest.approx(2 * mean.item())  # balanced halves: twice the batch mean
    mu = 0.5
    assert (intra + mu * summed).item() == pytest.approx(ce_v + 0.5 * float(expected[:2].mean() + expected[2:].mean()))


def test_modality_triplet_never_pairs_a_visible_with_an_infrared_image():
    from dmdl_cli.training.losses import modality_triplet

    # stage 1: per-modality labels in one id space; a visible and an infrared image of the same
    # person sit close together (rows 0 and 2), which a joint triplet treats as negatives
    feat = torch.tensor([[0.0, 0.0], [0.0, 1.0], [0.05, 0.0], [0.05, 1.0]])
    labels = torch.tensor([0, 0, 1, 1])  # visible cluster 0, infrared cluster 1
    modality = torch.tensor([0, 0, 1, 1])
    # per modality: each anchor's only positive is its modality partner and it has no negative
    # within its modality, so no anchor is valid: the term is 0
    assert modality_triplet(feat, labels, modality, 0.3).item() == 0.0
    # joint: anchor 0 has hardest positive 1.0 (row 1) and hardest negative 0.05 (row 2)
    joint = batch_hard_triplet(feat, labels, 0.3)
    assert joint.item() == pytest.approx(1.0 - 0.05 + 0.3, abs=1e-5)
    # with a second visible cluster, negatives come from the visible images only
    feat2 = torch.cat([feat, torch.tensor([[3.0, 0.0], [3.0, 1.0]])])
    labels2 = torch.cat([labels, torch.tensor([2, 2])])
    modality2 = torch.cat([modality, torch.tensor([0, 0])])
    # visible anchors 0,1 (cluster 0): d_ap = 1, nearest visible negative = 3 -> hinge 0;
    # anchors 4,5 (cluster 2) likewise; IR anchors have no IR negative: skipped
    assert modality_triplet(feat2, labels2, modality2, 0.3).item() == 0.0
    grads = torch.zeros(6, 2, requires_grad=True)
    loss = modality_triplet(feat2 + grads, labels2, modality2, margin=2.5, reduction="mean")
    loss.backward()
    assert grads.grad[2:4].abs().sum() == 0  # infrared images take part in no triplet here
    # hinge per valid anchor = 1 - 3 + 2.5 = 0.5 (anchors 0 and 4: d_an = 3; 1 and 5: sqrt(9) too)
    assert loss.item() == pytest.approx(0.5, abs=1e-5)
