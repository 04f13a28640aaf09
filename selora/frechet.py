"""The Fréchet distance between two Gaussians (Heusel et al. 2017), and between two feature sets.

``d^2 = |mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2)``, in float64 torch. It is what FID
computes on Inception-v3 features (torchmetrics, :func:`selora.metrics.inception_fid`) and what the
offline proxy computes on its own features (:func:`selora.proxies.fid_proxy`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

__all__ = ["frechet_distance", "frechet_distance_features", "gaussian_stats", "same_distribution_distances"]


def _features(name: str, x: Tensor | Sequence) -> Tensor:
    f = torch.as_tensor(x).detach().to("cpu", torch.float64)
    if f.dim() != 2 or f.shape[0] < 2:
        raise ValueError(f"{name}: expected features of shape (N >= 2, D), got {tuple(f.shape)}")
    if not torch.isfinite(f).all():
        raise ValueError(f"{name}: features contain NaN or inf")
    return f


def gaussian_stats(features: Tensor) -> tuple[Tensor, Tensor]:
    """Mean ``(D,)`` and unbiased covariance ``(D, D)`` (float64) of ``features`` ``(N, D)``."""
    f = _features("features", features)
    mu = f.mean(0)
    centred = f - mu
    return mu, centred.T @ centred / (f.shape[0] - 1)


def _psd_sqrt(S: Tensor) -> Tensor:
    """Symmetric square root of a symmetric PSD matrix (tiny negative eigenvalues clipped to 0)."""
    w, V = torch.linalg.eigh(S)
    return (V * w.clamp_min(0).sqrt()) @ V.T


def frechet_distance(mu1: Tensor, sigma1: Tensor, mu2: Tensor, sigma2: Tensor) -> float:
    """Squared Fréchet (2-Wasserstein) distance between N(mu1, sigma1) and N(mu2, sigma2).

    ``mu*``: ``(D,)``; ``sigma*``: ``(D, D)`` symmetric PSD (singular is fine, e.g. N < D samples).
    ``tr((S1 S2)^1/2)`` is computed as ``sum sqrt(eig(S1^1/2 S2 S1^1/2))``, a symmetric PSD matrix,
    so no complex ``sqrtm`` and no ``+ eps I`` fudge is needed. Computed in float64.
    """
    args = {"mu1": mu1, "sigma1": sigma1, "mu2": mu2, "sigma2": sigma2}
    t = {k: torch.as_tensor(v).detach().to("cpu", torch.float64) for k, v in args.items()}
    d = t["mu1"].shape[0] if t["mu1"].dim() == 1 else -1
    for k, v in t.items():
        want = (d,) if k.startswith("mu") else (d, d)
        if d < 1 or tuple(v.shape) != want:
            raise ValueError(f"{k}: expected shape {want} (D from mu1), got {tuple(v.shape)}")
        if not torch.isfinite(v).all():
            raise ValueError(f"{k}: contains NaN or inf")
    s1, s2 = ((t[k] + t[k].T) / 2 for k in ("sigma1", "sigma2"))
    root1 = _psd_sqrt(s1)
    middle = root1 @ s2 @ root1
    tr_covmean = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp_min(0).sqrt().sum()
    diff = t["mu1"] - t["mu2"]
    return max(float(diff @ diff + torch.trace(s1) + torch.trace(s2) - 2 * tr_covmean), 0.0)  # >= 0; clip round-off


def frechet_distance_features(features1: Tensor, features2: Tensor) -> float:
    """Fréchet distance between the Gaussians fitted to two feature sets ``(N1, D)`` and ``(N2, D)``."""
    f1, f2 = _features("features1", features1), _features("features2", features2)
    if f1.shape[1] != f2.shape[1]:
        raise ValueError(f"features2: expected {f1.shape[1]} feature columns like features1, got {f2.shape[1]}")
    return frechet_distance(*gaussian_stats(f1), *gaussian_stats(f2))


def same_distribution_distances(
    rows: Tensor,
    n: int,
    draws: int,
    generator: torch.Generator,
    distance: Callable[[Tensor, Tensor], float] = frechet_distance_features,
) -> Tensor:
    """``distance`` between two DISJOINT random subsets of ``n`` of ``rows`` ``(N >= 2n, ...)``, ``draws``
    times (subsets drawn with ``generator``): ``(draws,)`` float64. ``rows``: features ``(N, D)`` for
    the default :func:`frechet_distance_features`, or images for an image metric such as
    :func:`selora.metrics.frechet_metric`.

    Both subsets come from one distribution, so the true distance is 0: the values are the estimator's
    small-sample bias (and spread) at set size ``n``, the floor a method scored on ``n`` images cannot
    go below. On features the mean term alone contributes ``E|mu1 - mu2|^2 = 2 tr(S) / n``.
    """
    if n < 2 or 2 * n > rows.shape[0]:
        raise ValueError(f"n={n}: expected 2 <= n <= N / 2 = {rows.shape[0] // 2} (two disjoint subsets)")
    if draws < 1:
        raise ValueError(f"draws={draws}: expected at least 1")
    out = []
    for _ in range(draws):
        order = torch.randperm(rows.shape[0], generator=generator)
        out.append(distance(rows[order[:n]], rows[order[n : 2 * n]]))
    return torch.tensor(out, dtype=torch.float64)
