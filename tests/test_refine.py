"""CBT label refinement: normalised losses, per-cluster GMM confidence, refined targets."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.mixture import GaussianMixture

from dmdl_cli.training.refine import gmm_confidence, refined_targets, sample_losses


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
