"""CBT label refinement: normalised losses, per-cluster and global GMM confidence, refined
targets."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.mixture import GaussianMixture

from dmdl_cli.training.labelling import confidences
from dmdl_cli.training.refine import (
    global_gmm_confidence,
    gmm_confidence,
    refined_targets,
    sample_losses,
)


def _two_group_clusters(seed: int = 0):
    """Three clusters, each a low-loss majority and a high-loss minority, plus oddities."""
    rng = np.random.default_rng(seed)
    losses, labels = [], []
    for k, (n_lo, n_hi, lo, hi) in enumerate([(30, 10, 0.1, 0.8), (20, 20, 0.2, 0.9),
                                              (50, 5, 0.05, 0.6)]):
        losses += [rng.normal(lo, 0.04, n_lo), rng.normal(hi, 0.05, n_hi)]
        labels += [np.full(n_lo + n_hi, k)]
    losses, labels = np.concatenate(losses), np.concatenate(labels)
    perm = rng.permutation(len(losses))  # members interleaved across clusters
    return losses[perm], labels[perm]


def _sklearn_confidence(losses, labels, reg_covar):
    out = np.zeros(len(losses))
    for k in np.unique(labels[labels >= 0]):
        idx = np.flatnonzero(labels == k)
        gmm = GaussianMixture(2, reg_covar=reg_covar, tol=1e-10, max_iter=500, random_state=0)
        gmm.fit(losses[idx, None])
        out[idx] = gmm.predict_proba(losses[idx, None])[:, int(np.argmin(gmm.means_[:, 0]))]
    return out


def test_gmm_matches_sklearn_on_separated_clusters():
    losses, labels = _two_group_clusters()
    ours = gmm_confidence(losses, labels, iters=50, reg_covar=1e-4)
    ref = _sklearn_confidence(losses, labels, reg_covar=1e-4)
    assert ours.dtype == np.float32 and ours.shape == losses.shape
    np.testing.assert_allclose(ours, ref, atol=1e-4)
    # and it is the separation we planted: low group confident, high group not
    for k, thr in ((0, 0.45), (1, 0.55), (2, 0.33)):
        m = labels == k
        assert (ours[m][losses[m] < thr] > 0.99).all() and (ours[m][losses[m] > thr] < 0.01).all()


def test_gmm_special_cases_and_torch_io():
    losses, labels = _two_group_clusters(seed=1)
    losses = np.concatenate([losses, [0.3, 0.9, 0.5, 0.5, 0.5, 0.7, 0.1]])
    labels = np.concatenate([labels, [-1, 10, 11, 11, 11, 12, 12]])
    # outlier (-1) -> 0; singleton (10) -> 1; zero-variance cluster (11) -> 1;
    # cluster 12 has 2 members: fitted with min_size=2, exempt with min_size=3
    conf = gmm_confidence(torch.from_numpy(losses), torch.from_numpy(labels), min_size=2)
    assert isinstance(conf, torch.Tensor) and conf.dtype == torch.float32
    tail = conf[-7:].numpy()
    assert tail[0] == 0.0 and tail[1] == 1.0 and (tail[2:5] == 1.0).all()
    assert tail[6] > 0.99 and tail[5] < 0.01  # 0.1 is the low-loss member
    conf3 = gmm_confidence(losses, labels, min_size=3)
    assert (conf3[-2:] == 1.0).all()
    assert ((conf.numpy() >= 0) & (conf.numpy() <= 1)).all()
    # deterministic and independent of the cluster numbering
    relabelled = np.where(labels >= 0, 100 - labels, -1)
    np.testing.assert_array_equal(gmm_confidence(losses, relabelled, min_size=2), conf.numpy())


def _reference_global_confidence(losses, reg_covar):
    """The reference's RegDB stage 2: a global min-max, then one sklearn GaussianMixture."""
    c = ((losses - losses.min()) / (losses.max() - losses.min()))[:, None]
    gmm = GaussianMixture(2, reg_covar=reg_covar, tol=1e-10, max_iter=500, random_state=0).fit(c)
    return gmm.predict_proba(c)[:, int(np.argmin(gmm.means_[:, 0]))]


def test_global_gmm_is_one_mixture_over_all_samples_after_a_global_minmax():
    losses, labels = _two_group_clusters()
    # a fourth cluster of high losses only, in two groups (0.65 and 0.85)
    rng = np.random.default_rng(7)
    losses = np.concatenate([losses, rng.normal(0.65, 0.02, 20), rng.normal(0.85, 0.02, 10)])
    labels = np.concatenate([labels, np.full(30, 3)])
    raw = -1.0 + 0.5 * losses  # raw normalised losses lie in [-1, 0]; the min-max undoes the map
    ours = global_gmm_confidence(raw, labels, reg_covar=1e-4)
    assert ours.dtype == np.float32 and ours.shape == losses.shape
    np.testing.assert_allclose(ours, _reference_global_confidence(raw, 1e-4), atol=1e-4)
    # one threshold for every cluster: cluster 3's lower group is confident in its own
    # mixture, not against all samples
    per_cluster = gmm_confidence(losses, labels, reg_covar=1e-4)
    low3 = (labels == 3) & (losses < 0.75)
    assert (per_cluster[low3] > 0.99).all() and (ours[low3] < 0.01).all()
    order = np.argsort(losses)
    assert (np.diff(ours[order]) <= 1e-6).all()  # monotone in the loss across clusters


def test_global_gmm_leaves_outliers_out_of_the_minmax_and_the_fit():
    losses, labels = _two_group_clusters(seed=2)
    base = global_gmm_confidence(losses, labels)
    # outliers with extreme losses: the reference would rescale (and fit) with them; we do not
    with_outliers = global_gmm_confidence(np.concatenate([losses, [-5.0, 7.0]]),
                                          np.concatenate([labels, [-1, -1]]))
    np.testing.assert_array_equal(with_outliers[:-2], base)
    assert (with_outliers[-2:] == 0.0).all()
    # all losses equal: nothing to separate, every sample confident
    assert (global_gmm_confidence(np.full(5, 0.3), np.arange(5)) == 1.0).all()
    with pytest.raises(ValueError):
        global_gmm_confidence(losses, labels[:-1])


def test_confidences_choose_the_mixture_per_recipe():
    g = torch.Generator().manual_seed(4)
    cents = F.normalize(torch.randn(4, 8, generator=g), dim=1)
    labels = torch.arange(4).repeat_interleave(12)
    feats = F.normalize(cents[labels] + 0.6 * torch.randn(48, 8, generator=g), dim=1)
    f, c, y = feats.numpy(), cents.numpy(), labels.numpy()
    glob = confidences(f, c, y, 0.05, "global")
    raw = sample_losses(feats, cents, labels, 0.05, per_cluster_minmax=False).numpy()
    np.testing.assert_array_equal(glob, global_gmm_confidence(raw, y))
    per = confidences(f, c, y, 0.05)  # the default: today's per-cluster mixture
    scaled = sample_losses(feats, cents, labels, 0.05).numpy()  # per-cluster min-max
    np.testing.assert_array_equal(per, gmm_confidence(scaled, y))
    assert not np.array_equal(per, glob)
    with pytest.raises(ValueError, match="gmm"):
        confidences(f, c, y, 0.05, "bogus")


def test_sample_losses():
    feat = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [0.6, 0.8], [1.0, 0.0]])
    cent = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    labels = torch.tensor([0, 0, 1, 1, -1])
    raw = sample_losses(feat, cent, labels, temp=0.5, per_cluster_minmax=False, chunk=2)
    p = torch.softmax(feat[:4] @ cent.T / 0.5, dim=1)
    torch.testing.assert_close(raw[:4], -p[torch.arange(4), labels[:4]])
    assert torch.isnan(raw[4])
    scaled = sample_losses(feat, cent, labels, temp=0.5)
    # per cluster min-max: the best member 0, the worst 1
    torch.testing.assert_close(scaled[:4], torch.tensor([0.0, 1.0, 0.0, 1.0]))


def test_refined_targets():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 10, generator=g) * 5
    labels = torch.tensor([0, 3, 9, 2, 2, 5])
    conf = torch.tensor([1.0, 0.0, 0.5, 0.9, 0.2, 1.0])
    t = refined_targets(labels, conf, logits, topk=3)
    torch.testing.assert_close(t.sum(1), torch.ones(6))
    torch.testing.assert_close(t[0], F.one_hot(labels[0], 10).float())
    # c = 0: the softmax of the 3 largest logits, others exactly 0
    top_v, top_i = logits[1].topk(3)
    expected = torch.zeros(10)
    expected[top_i] = torch.softmax(top_v, dim=0)
    torch.testing.assert_close(t[1], expected)
    assert int((t[1] > 0).sum()) == 3
    # c = 0.5: halfway between
    top_v, top_i = logits[2].topk(3)
    mix = torch.zeros(10)
    mix[top_i] = torch.softmax(top_v, dim=0)
    torch.testing.assert_close(t[2], 0.5 * F.one_hot(labels[2], 10).float() + 0.5 * mix)
    # all ones -> exactly one-hot
    ones = refined_targets(labels, torch.ones(6), logits, topk=10)
    torch.testing.assert_close(ones, F.one_hot(labels, 10).float(), rtol=0, atol=0)
    # topk larger than C is clipped
    torch.testing.assert_close(refined_targets(labels, torch.zeros(6), logits, topk=50),
                               torch.softmax(logits, dim=1))
    with pytest.raises(ValueError):
        refined_targets(torch.tensor([-1]), torch.ones(1), logits[:1], topk=3)
