"""A signal test for expansion (this book's criterion, not the paper's): does the new column's MEAN
per-sample gradient stand above what sampling noise alone would give?

The paper's FI-Ratio (Eq. 5) compares mean SQUARED per-sample gradients, which noise fills as much
as signal (chapter 4: ratio ~ 1 + ||K||^2 / ||A||_F^2). Here, from the per-sample gradients the
hooks already compute (:func:`selora.core.fisher.per_sample_grads`), take for each sample i the gradient
of the new B column restricted to what the current rank cannot already do (the complement of the
rank-r tangent space ``{X A + B Y}``, flattened to ``d = out * k``):

    g_i = (I - P_B) (dL_i/dB_new - dL_i/dB M^T)        (N, d),   M = K A^+   (k, r)

``dL_i/dB M^T`` removes the part of ``K x`` inside A's row space (``K P_A x = M u``), ``I - P_B``
the part of the output inside B's column space. With ``S = sum_i g_i`` and ``Q = sum_i ||g_i||^2``
the statistic is

    R = ||S||^2 / Q = N ||mean_i g_i||^2 / mean_i ||g_i||^2        in [0, N]

On pure noise (``E g = 0``, i.i.d. samples) ``E ||S||^2 = E Q``: R is about 1 whatever the scale,
and for Gaussian g with ``nu`` effective dimensions (Satterthwaite: ``nu = (tr C)^2 / tr C^2``, C the
covariance of g; exact when C is isotropic) ``R / N ~ Beta(nu/2, nu (N-1)/2)``. A mean gradient
``mu`` adds ``(N - 1) rho`` with ``rho = ||mu||^2 / E||g||^2``: ``E R ~ 1 + (N - 1) rho``. A layer is
expanded when the p-value ``P(Beta >= R/N)`` is at most ``alpha``: on noise this happens at rate
``alpha`` per test (:func:`false_expansion_rate` for a fixed threshold on R).

Everything is summable across micro-batches and DDP ranks: per layer the row
``[Q, sum_i ||g_i||^4, sum_{i != j} (g_i . g_j)^2, pairs, S (d,)]`` adds up, and R is formed only
after the sum (``||S||^2`` is not additive). ``nu`` is estimated from pairs within each group.
The controller runs this test as :class:`selora.core.criteria.SignalTest`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from selora.core.betainc import beta_sf

#: Scalar columns of a layer's signal row, before its summed gradient S (d,).
SIGNAL_SCALARS = 4


def complement_grads(
    dB: torch.Tensor, dB_new: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, K: torch.Tensor
) -> torch.Tensor:
    """Per-sample new-column gradients outside the rank-r tangent space (module docstring), ``(N, out * k)``.

    Args: ``dB`` ``(N, out, r)`` and ``dB_new`` ``(N, out, k)`` per-sample gradients (same scaling),
    ``lora_A`` ``(r, in)``, ``lora_B`` ``(out, r)``, candidate rows ``K`` ``(k, in)``.
    A zero ``B`` (a fresh adapter) spans nothing, so nothing is removed on the output side.
    """
    dtype = dB_new.dtype
    A, B, Kd = lora_A.detach().to(dtype), lora_B.detach().to(dtype), K.to(dtype)
    M = Kd @ torch.linalg.pinv(A)  # (k, r): K P_A = M A
    g = dB_new - dB @ M.T  # (N, out, k)
    U, s, _ = torch.linalg.svd(B, full_matrices=False)  # (out, r)
    keep = s > s.max() * max(B.shape) * torch.finfo(dtype).eps if s.numel() else s > 0
    U = U[:, keep]
    g = g - U @ (U.T @ g)  # (I - P_B) g, broadcast over samples
    return g.reshape(g.shape[0], -1)


def signal_row(g: torch.Tensor) -> torch.Tensor:
    """``[Q, sum ||g_i||^4, sum_{i != j} (g_i . g_j)^2, N (N - 1), S (d,)]`` ``(4 + d,)`` from ``g`` ``(N, d)``."""
    q = g.pow(2).sum(1)  # (N,)
    gram = g @ g.T  # (N, N)
    cross = gram.pow(2).sum() - q.pow(2).sum()
    n = g.shape[0]
    head = torch.stack([q.sum(), q.pow(2).sum(), cross, g.new_tensor(float(n * (n - 1)))])
    return torch.cat([head, g.sum(0)])


@dataclass(frozen=True)
class SignalScore:
    """One layer's signal test: ``statistic`` R, effective dimension ``dof`` (nu), ``samples`` N and
    ``p_value`` ``P(R_noise >= R)``; all ``nan`` (p-value 1) when the layer saw fewer than 2 samples or no gradient."""

    statistic: float
    dof: float
    samples: float
    p_value: float


def effective_dof(q: float, q4: float, cross: float, pairs: float, samples: float, dim: int) -> float:
    """``nu = (tr C)^2 / tr C^2`` from unbiased pair estimates, clamped to ``[1, dim]``:
    ``(tr C)^2 ~ (Q^2 - sum ||g||^4) / (N (N - 1))``, ``tr C^2 ~ sum_{i != j} (g_i . g_j)^2 / pairs``."""
    if cross <= 0 or pairs <= 0:
        return float(dim)
    tr2 = (q * q - q4) / (samples * (samples - 1))
    return min(max(tr2 / (cross / pairs), 1.0), float(dim))


def noise_sf(x: float, dof: float, samples: float) -> float:
    """``P(R >= x)`` for R on pure noise: ``R / N ~ Beta(nu / 2, nu (N - 1) / 2)`` (module docstring)."""
    if x <= 0:
        return 1.0
    if x >= samples:
        return 0.0
    return beta_sf(x / samples, dof / 2, dof * (samples - 1) / 2)


def false_expansion_rate(threshold: float, dof: float, samples: float) -> float:
    """The predicted rate at which a pure-noise layer passes ``R >= threshold`` on one test."""
    return noise_sf(threshold, dof, samples)


def critical_value(alpha: float, dof: float, samples: float) -> float:
    """The R above which the test fires at level ``alpha`` (``noise_sf(R) = alpha``), by bisection."""
    if not 0 < alpha < 1:
        raise ValueError(f"alpha={alpha}: expected a probability in (0, 1)")
    lo, hi = 0.0, float(samples)
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        lo, hi = (mid, hi) if noise_sf(mid, dof, samples) > alpha else (lo, mid)
    return hi


def signal_score(row: torch.Tensor, samples: float) -> SignalScore:
    """Score a summed :func:`signal_row` ``(4 + d,)`` (possibly all-reduced) of ``samples`` samples."""
    q, q4, cross, pairs = (float(v) for v in row[:SIGNAL_SCALARS].tolist())
    S = row[SIGNAL_SCALARS:].double()
    if samples < 2 or not q > 0:
        return SignalScore(math.nan, math.nan, float(samples), 1.0)
    stat = float(S.pow(2).sum()) / q
    dof = effective_dof(q, q4, cross, pairs, samples, S.numel())
    return SignalScore(stat, dof, float(samples), noise_sf(stat, dof, samples))
