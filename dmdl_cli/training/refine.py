"""CBT label refinement (docs/method.md section 4, "Labels").

(a) **Per-member confidence.** For each sample the *normalised loss* is
``l_i = - softmax(f_i . centroids / tau)[y_i]`` — "normalised" because a softmax probability is
bounded (in ``[-1, 0]``) where a cross-entropy is not (:func:`sample_losses`). Optionally (and by
default) it is then min-max rescaled to ``[0, 1]`` within each cluster, so every cluster's
mixture is fitted on the same scale and the variance floor ``reg_covar`` means the same thing
everywhere (the mixture itself is otherwise unchanged by an affine rescaling of a cluster).
Per cluster a two-component 1-D Gaussian mixture is fitted to these losses by EM
(:func:`gmm_confidence`); a member's confidence ``c_i`` is the posterior of the low-loss
component. The fit runs for all clusters at once (segment sums with ``np.bincount``), with a
fixed number of EM iterations and a deterministic initialisation.

With ``confidence_gmm: global`` (:func:`global_gmm_confidence`, the reference's RegDB stage 2)
the losses are min-max rescaled once over all labelled samples and one mixture is fitted to
them all. The reference also scores its outliers there (label -1 indexes its last identity
column, so they enter the min-max and the fit); dmdl leaves outliers out of both.

(b) **Refined target** (:func:`refined_targets`): ``t = c onehot(y) + (1 - c) P_topk``, with
``P_topk`` the softmax of the other view's top-k memory logits (the rest at -inf).
"""
from __future__ import annotations

import numpy as np
import torch
from scipy.special import expit

__all__ = ["global_gmm_confidence", "gmm_confidence", "refined_targets", "sample_losses"]


def sample_losses(
    feat: torch.Tensor,
    centroids: torch.Tensor,
    labels: torch.Tensor,
    temp: float = 0.05,
    *,
    per_cluster_minmax: bool = True,
    chunk: int = 4096,
) -> torch.Tensor:
    """Normalised loss of every sample w.r.t. its own cluster, ``(N,)`` float32.

    ``l_i = - softmax_c(f_i . centroids_c / temp)[y_i]`` in ``[-1, 0]``; with
    ``per_cluster_minmax`` each cluster's losses are rescaled to ``[0, 1]``
    (``(l - min) / (max - min)``; a cluster whose losses are all equal maps to 0).
    Outliers (``y_i < 0``) get NaN. ``feat`` ``(N, D)`` and ``centroids`` ``(C, D)``
    L2-normalised, ``labels`` ``(N,)`` in ``[-1, C)``. Runs on ``feat``'s device, ``chunk`` rows
    at a time (no ``N x C`` matrix is held in full).
    """
    feat = torch.as_tensor(feat)
    device = feat.device
    cent = torch.as_tensor(centroids).to(device=device, dtype=torch.float32)
    labels = torch.as_tensor(labels).to(device=device, dtype=torch.long)
    n = feat.shape[0]
    if labels.shape != (n,):
        raise ValueError(f"labels {tuple(labels.shape)} for {n} features")
    if n and int(labels.max()) >= cent.shape[0]:
        raise ValueError(f"label {int(labels.max())} >= {cent.shape[0]} centroids")
    out = torch.full((n,), float("nan"), dtype=torch.float32, device=device)
    with torch.no_grad(), torch.autocast(device_type=device.type, enabled=False):
        for s in range(0, n, chunk):
            f = feat[s : s + chunk].float()
            y = labels[s : s + chunk]
            prob = torch.softmax(f @ cent.T / temp, dim=1)  # (chunk, C)
            own = prob.gather(1, y.clamp(min=0).unsqueeze(1)).squeeze(1)
            out[s : s + chunk] = torch.where(y >= 0, -own, torch.full_like(own, float("nan")))
        if per_cluster_minmax:
            valid = labels >= 0
            seg, loss = labels[valid], out[valid]
            num = cent.shape[0]
            lo = torch.full((num,), float("inf"), device=device)
            hi = torch.full((num,), float("-inf"), device=device)
            lo = lo.scatter_reduce(0, seg, loss, reduce="amin", include_self=True)
            hi = hi.scatter_reduce(0, seg, loss, reduce="amax", include_self=True)
            rng = (hi - lo)[seg]
            scaled = torch.where(rng > 0, (loss - lo[seg]) / rng.clamp(min=1e-30),
                                 torch.zeros_like(loss))
            out[valid] = scaled
    return out


def gmm_confidence(
    losses,
    labels,
    *,
    iters: int = 50,
    min_size: int = 2,
    reg_covar: float = 5e-4,
):
    """Posterior of the low-loss component of a per-cluster 2-component 1-D GMM, ``(N,)``.

    For every cluster k (samples with ``labels == k``) fit ``pi_0 N(mu_0, s_0) + pi_1 N(mu_1,
    s_1)`` to the losses by EM, all clusters at once:

    * init: hard split at the cluster's mid-range ``(min + max) / 2`` (the component means
      start near the cluster's min and max), then an M-step;
    * ``iters`` iterations of E-step ``r_ij ∝ pi_j N(l_i | mu_j, s_j)`` and M-step
      ``N_j = sum r_ij``, ``mu_j = sum r_ij l_i / N_j``,
      ``s_j = sum r_ij (l_i - mu_j)^2 / N_j + reg_covar``, ``pi_j = N_j / n_k``
      (``reg_covar`` is in the losses' units: squared, for losses min-max scaled to [0, 1]);
    * confidence = ``r_i,low`` with low = the component of smaller final mean.

    Clusters with fewer than ``min_size`` members (singletons always) and degenerate clusters
    (all losses equal) get confidence 1; outliers (label < 0) get 0. Deterministic; float64
    numpy internally. Returns the same kind as ``losses`` (numpy float32, or a float32 tensor
    on the same device).
    """
    as_torch = isinstance(losses, torch.Tensor)
    device = losses.device if as_torch else None
    x_all = np.asarray(torch.as_tensor(losses).detach().cpu(), dtype=np.float64)
    y_all = np.asarray(torch.as_tensor(labels).detach().cpu(), dtype=np.int64)
    if x_all.shape != y_all.shape or x_all.ndim != 1:
        raise ValueError(f"losses {x_all.shape} and labels {y_all.shape} must be equal (N,)")
    conf = np.zeros(x_all.shape, dtype=np.float64)
    valid = y_all >= 0
    if valid.any():
        _, seg = np.unique(y_all[valid], return_inverse=True)  # compact cluster index (n,)
        x = x_all[valid]
        conf[valid] = _em_low_posterior(x, seg, iters=iters, min_size=min_size,
                                        reg_covar=reg_covar)
    conf = conf.astype(np.float32)
    if as_torch:
        return torch.from_numpy(conf).to(device)
    return conf


def global_gmm_confidence(losses, labels, *, iters: int = 50, reg_covar: float = 5e-4
                          ) -> np.ndarray:
    """Posterior of the low-loss component of ONE 2-component 1-D GMM over every labelled
    sample, ``(N,)`` float32 numpy.

    ``losses (N,)`` raw normalised losses (:func:`sample_losses` with
    ``per_cluster_minmax=False``), ``labels (N,)`` with ``-1`` outliers. The losses of the
    labelled samples are min-max rescaled to ``[0, 1]`` together (all equal: all 0), then fitted
    as one cluster by :func:`gmm_confidence` (same EM, initialisation and ``reg_covar``).
    Outliers take no part in the rescaling nor the fit and get 0.
    """
    x = np.asarray(torch.as_tensor(losses).detach().cpu(), dtype=np.float64)
    y = np.asarray(torch.as_tensor(labels).detach().cpu(), dtype=np.int64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"losses {x.shape} and labels {y.shape} must be equal (N,)")
    valid = y >= 0
    scaled = np.zeros_like(x)
    if valid.any():
        lo, hi = x[valid].min(), x[valid].max()
        scaled[valid] = (x[valid] - lo) / (hi - lo) if hi > lo else 0.0
    return gmm_confidence(scaled, np.where(valid, 0, -1), iters=iters, reg_covar=reg_covar)


def _em_low_posterior(x: np.ndarray, seg: np.ndarray, *, iters: int, min_size: int,
                      reg_covar: float) -> np.ndarray:
    """Vectorised EM over segments; ``x`` (n,) float64, ``seg`` (n,) in [0, K)."""
    k = int(seg.max()) + 1
    count = np.bincount(seg, minlength=k).astype(np.float64)  # (K,)
    lo = np.full(k, np.inf)
    hi = np.full(k, -np.inf)
    np.minimum.at(lo, seg, x)
    np.maximum.at(hi, seg, x)
    scale = np.maximum(np.abs(lo), np.abs(hi))
    degenerate = (hi - lo) <= 1e-12 * np.maximum(scale, 1.0)
    fixed = (count < max(min_size, 2)) | degenerate  # (K,) clusters that get confidence 1
    tiny = 10 * np.finfo(np.float64).eps

    def segsum(w: np.ndarray) -> np.ndarray:
        return np.bincount(seg, weights=w, minlength=k)

    def m_step(r0: np.ndarray):
        r1 = 1.0 - r0
        n0, n1 = segsum(r0) + tiny, segsum(r1) + tiny  # (K,)
        mu0, mu1 = segsum(r0 * x) / n0, segsum(r1 * x) / n1
        v0 = segsum(r0 * (x - mu0[seg]) ** 2) / n0 + reg_covar
        v1 = segsum(r1 * (x - mu1[seg]) ** 2) / n1 + reg_covar
        return (n0 / count, mu0, v0), (n1 / count, mu1, v1)

    def e_step(c0, c1) -> np.ndarray:
        def log_pdf(c):
            pi, mu, var = c
            return (np.log(pi[seg]) - 0.5 * np.log(2 * np.pi * var[seg])
                    - 0.5 * (x - mu[seg]) ** 2 / var[seg])
        return expit(log_pdf(c0) - log_pdf(c1))  # r0 = p0 / (p0 + p1)

    r0 = (x <= 0.5 * (lo + hi)[seg]).astype(np.float64)  # hard split at mid-range
    c0, c1 = m_step(r0)
    for _ in range(iters):
        r0 = e_step(c0, c1)
        c0, c1 = m_step(r0)
    r0 = e_step(c0, c1)
    low_is_0 = (c0[1] <= c1[1])[seg]
    out = np.where(low_is_0, r0, 1.0 - r0)
    out[fixed[seg]] = 1.0
    return np.clip(out, 0.0, 1.0)


def refined_targets(labels: torch.Tensor, conf: torch.Tensor, other_view_logits: torch.Tensor,
                    topk: int) -> torch.Tensor:
    """``t = c onehot(y) + (1 - c) softmax(topk(z))``, ``(B, C)`` rows summing to 1, no grad.

    ``labels`` ``(B,)`` in ``[0, C)``; ``conf`` ``(B,)`` confidences in ``[0, 1]`` (clamped);
    ``other_view_logits`` ``(B, C)`` the other view's memory logits ``z`` (already divided by
    the temperature); ``softmax(topk(z))`` keeps the ``topk`` largest logits of each row and
    sets the rest to -inf. With ``c = 1`` the target is one-hot.
    """
    z = other_view_logits.detach().float()
    b, c = z.shape
    labels = labels.to(device=z.device, dtype=torch.long)
    if labels.shape != (b,):
        raise ValueError(f"labels {tuple(labels.shape)} for logits {tuple(z.shape)}")
    if b and (int(labels.min()) < 0 or int(labels.max()) >= c):
        raise ValueError(f"labels must lie in [0, {c})")
    k = max(1, min(int(topk), c))
    vals, idx = z.topk(k, dim=1)  # (B, k)
    p_topk = torch.zeros_like(z).scatter_(1, idx, torch.softmax(vals, dim=1))  # (B, C)
    cw = torch.as_tensor(conf, device=z.device).detach().float().clamp(0.0, 1.0).view(-1, 1)
    onehot = torch.zeros_like(z).scatter_(1, labels.unsqueeze(1), 1.0)
    return cw * onehot + (1.0 - cw) * p_topk
