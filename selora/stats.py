"""The statistics of the chapters and of ``python -m selora.evaluate``: means with their spread and
their t interval, Welch's two-sample t test (with its p-value and critical value), its equivalence
form (two one-sided tests against a margin fixed in advance), Spearman's rank correlation.

Hand-written on purpose (NumPy and ``math`` only): scipy is a test dependency, and the tests
compare every function here with ``scipy.stats``. The Student-t distribution is computed from the
regularised incomplete beta function (a continued fraction), its quantile by bisection; both agree
with scipy to a relative 1e-10 up to 1e5 degrees of freedom (beyond, ``lgamma`` cancellation costs digits).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from selora.core.betainc import betainc

__all__ = [
    "Equivalence",
    "WelchTest",
    "mean_and_se",
    "mean_interval",
    "mean_std",
    "paired_differences",
    "spearman",
    "student_t_cdf",
    "student_t_quantile",
    "welch_df",
    "welch_equivalence",
    "welch_interval",
    "welch_t",
    "welch_test",
]


# -- means ----------------------------------------------------------------------------------------
def mean_and_se(values: Sequence[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (sample std / sqrt(n)) of ``values`` (any shape, flattened); n >= 2."""
    v = np.asarray(values, dtype=np.float64).ravel()
    if v.size < 2:
        raise ValueError(f"values: need at least 2, got {v.size}")
    return float(v.mean()), float(v.std(ddof=1) / np.sqrt(v.size))


def mean_interval(values: Sequence[float], alpha: float = 0.05) -> tuple[float, float]:
    """The ``1 - alpha`` Student-t confidence interval ``(low, high)`` of the mean of ``values`` ``(n,)``:
    ``mean ± t_{1 - alpha/2, n - 1} · se``; agrees with ``scipy.stats.t.interval``."""
    _check_alpha(alpha)
    mean, se = mean_and_se(values)
    half = student_t_quantile(1 - alpha / 2, np.asarray(values).size - 1) * se
    return mean - half, mean + half


def mean_std(values: Sequence[float]) -> dict[str, Any]:
    """``{"mean", "std", "n"}`` of ``values`` ``(n,)``; ``std``: the sample standard deviation (None for one value)."""
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None
    return {"mean": mean, "std": std, "n": n}


def paired_differences(worse: torch.Tensor, better: torch.Tensor) -> np.ndarray:
    """Per-image ``worse - better`` in float64 ``(N,)`` (each input ``(N,)`` or ``(N, draws)``,
    averaged over draws first): the paired differences of two conditions on the same images, for
    :func:`mean_and_se` and :func:`mean_interval` (a paired t interval)."""
    if worse.shape != better.shape or worse.shape[0] < 2:
        raise ValueError(
            f"expected two tensors of one shape with >= 2 images, got {tuple(worse.shape)} and {tuple(better.shape)}"
        )
    return (worse.double() - better.double()).reshape(worse.shape[0], -1).mean(1).numpy()


# -- Welch's t test -------------------------------------------------------------------------------
def _groups(a: Sequence[float], b: Sequence[float], what: str) -> tuple[np.ndarray, np.ndarray]:
    """Two samples as float64 arrays ``(n_a,)``, ``(n_b,)``; each needs n >= 2."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.size < 2 or b.size < 2:
        raise ValueError(f"{what}: need at least 2 values per group, got {a.size} and {b.size}")
    return a, b


def _welch_se(a: np.ndarray, b: np.ndarray, what: str) -> float:
    """Standard error of mean(a) - mean(b) without assuming equal variances; > 0."""
    se = np.sqrt(a.var(ddof=1) / a.size + b.var(ddof=1) / b.size)
    if se == 0:
        raise ValueError(f"{what}: both groups are constant, t is undefined")
    return se


def welch_t(a: Sequence[float], b: Sequence[float]) -> float:
    """Welch's t statistic of mean(a) - mean(b) for independent samples ``(n_a,)``, ``(n_b,)``
    (each n >= 2, not both constant)."""
    a, b = _groups(a, b, "welch_t")
    return float((a.mean() - b.mean()) / _welch_se(a, b, "welch_t"))


def welch_df(a: Sequence[float], b: Sequence[float]) -> float:
    """Welch–Satterthwaite degrees of freedom of :func:`welch_t` for samples ``(n_a,)``, ``(n_b,)``:
    ``(va/na + vb/nb)^2 / ((va/na)^2 / (na - 1) + (vb/nb)^2 / (nb - 1))`` with sample variances v."""
    a, b = _groups(a, b, "welch_df")
    _welch_se(a, b, "welch_df")
    ua, ub = a.var(ddof=1) / a.size, b.var(ddof=1) / b.size
    return float((ua + ub) ** 2 / (ua**2 / (a.size - 1) + ub**2 / (b.size - 1)))


@dataclass(frozen=True)
class WelchTest:
    """Welch's two-sample t test of mean(a) = mean(b) (:func:`welch_test`).

    ``t``: :func:`welch_t`; ``df``: :func:`welch_df`; ``p``: two-sided p-value ``P(|T_df| >= |t|)``;
    ``critical``: ``t_{1 - alpha/2, df}``, the |t| above which the difference is significant at ``alpha``.
    """

    t: float
    df: float
    p: float
    critical: float


def _check_alpha(alpha: float) -> None:
    if not 0 < alpha < 1:
        raise ValueError(f"alpha={alpha}: expected a level in (0, 1)")


def welch_test(a: Sequence[float], b: Sequence[float], alpha: float = 0.05) -> WelchTest:
    """Welch's t test (two-sided, level ``alpha``) of two independent samples ``(n_a,)``, ``(n_b,)``;
    agrees with ``scipy.stats.ttest_ind(a, b, equal_var=False)``."""
    _check_alpha(alpha)
    t, df = welch_t(a, b), welch_df(a, b)
    return WelchTest(t=t, df=df, p=_t_two_sided(t, df), critical=student_t_quantile(1 - alpha / 2, df))


def welch_interval(a: Sequence[float], b: Sequence[float], alpha: float = 0.05) -> tuple[float, float]:
    """The ``1 - alpha`` confidence interval ``(low, high)`` of mean(a) - mean(b) (Welch, unequal variances):
    ``mean(a) - mean(b) ± t_{1 - alpha/2, df} · se`` for samples ``(n_a,)``, ``(n_b,)``."""
    _check_alpha(alpha)
    a, b = _groups(a, b, "welch_interval")
    diff = float(a.mean() - b.mean())
    half = student_t_quantile(1 - alpha / 2, welch_df(a, b)) * float(_welch_se(a, b, "welch_interval"))
    return diff - half, diff + half


@dataclass(frozen=True)
class Equivalence:
    """Welch's two one-sided tests (TOST) of ``|mean(a) - mean(b)| < margin`` (:func:`welch_equivalence`).

    ``p``: the larger of the two one-sided p-values (equivalence is shown at level alpha when
    ``p < alpha``); ``interval``: the ``1 - 2 alpha`` Welch interval of mean(a) - mean(b), inside
    ``(-margin, margin)`` exactly when ``p < alpha``; ``equivalent``: ``p < alpha``.
    """

    p: float
    interval: tuple[float, float]
    margin: float
    equivalent: bool


def welch_equivalence(a: Sequence[float], b: Sequence[float], margin: float, alpha: float = 0.05) -> Equivalence:
    """Is the difference of means smaller than ``margin`` (> 0, chosen BEFORE looking at the data)?

    Two one-sided Welch tests, H0: diff <= -margin and H0: diff >= +margin; both rejected at ``alpha``
    means the means are equivalent within ``margin``. Samples ``(n_a,)``, ``(n_b,)``. A "no difference"
    claim needs this, not a non-significant t: with few seeds a t test fails to reject almost anything.
    """
    _check_alpha(alpha)
    if not (math.isfinite(margin) and margin > 0):
        raise ValueError(f"margin={margin}: expected a finite difference > 0")
    a_arr, b_arr = _groups(a, b, "welch_equivalence")
    diff, se = float(a_arr.mean() - b_arr.mean()), float(_welch_se(a_arr, b_arr, "welch_equivalence"))
    df = welch_df(a, b)
    p_low = 1.0 - student_t_cdf((diff + margin) / se, df)  # H0: diff <= -margin
    p_high = student_t_cdf((diff - margin) / se, df)  # H0: diff >= margin
    p = max(p_low, p_high)
    return Equivalence(p=p, interval=welch_interval(a, b, 2 * alpha), margin=float(margin), equivalent=p < alpha)


# -- the Student-t distribution -------------------------------------------------------------------


def _check_df(df: float) -> float:
    if not (math.isfinite(df) and df > 0):
        raise ValueError(f"df={df}: expected finite degrees of freedom > 0")
    return float(df)


def _t_upper(t: float, df: float) -> float:
    """``P(T_df >= t)`` for ``t >= 0``: ``I_{df / (df + t^2)}(df / 2, 1 / 2) / 2``."""
    t2 = t * t
    return 0.5 * betainc(df / 2, 0.5, df / (df + t2), t2 / (df + t2))


def _t_two_sided(t: float, df: float) -> float:
    """Two-sided p-value ``P(|T_df| >= |t|)``."""
    return min(1.0, 2.0 * _t_upper(abs(t), _check_df(df)))


def student_t_cdf(t: float, df: float) -> float:
    """``P(T <= t)`` for Student's t with ``df`` > 0 degrees of freedom (not necessarily an integer)."""
    df = _check_df(df)
    upper = _t_upper(abs(float(t)), df)
    return upper if t < 0 else 1.0 - upper


def student_t_quantile(q: float, df: float) -> float:
    """The ``q``-quantile (``q`` in (0, 1)) of Student's t with ``df`` > 0 degrees of freedom.

    Bisection on the tail probability (accurate in both tails) until the bracket cannot shrink in float64.
    """
    df = _check_df(df)
    if not 0 < q < 1:
        raise ValueError(f"q={q}: expected a probability in (0, 1)")
    if q == 0.5:
        return 0.0
    tail = min(q, 1.0 - q)
    lo, hi = 0.0, 1.0
    while _t_upper(hi, df) > tail:
        lo, hi = hi, 2.0 * hi
    while True:
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        if _t_upper(mid, df) > tail:
            lo = mid
        else:
            hi = mid
    return hi if q > 0.5 else -hi


# -- rank correlation -----------------------------------------------------------------------------
def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman rank correlation of two equal-length sequences ``(n,)``, n >= 2 (ties get their average rank)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape or a.ndim != 1 or len(a) < 2:
        raise ValueError(f"spearman: expected two 1-d sequences of equal length >= 2, got {a.shape} and {b.shape}")

    def average_ranks(v: np.ndarray) -> np.ndarray:
        order = np.argsort(v, kind="mergesort")
        sorted_v = v[order]
        first = np.r_[True, sorted_v[1:] != sorted_v[:-1]]  # start of each run of equal values
        group = np.cumsum(first) - 1
        starts = np.r_[np.flatnonzero(first), len(v)]
        ranks = np.empty(len(v))
        ranks[order] = 0.5 * (starts[group] + starts[group + 1] - 1) + 1  # mean of the run's 1-based positions
        return ranks

    ra, rb = average_ranks(a), average_ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        raise ValueError("spearman: a sequence is constant, the correlation is undefined")
    return float(np.corrcoef(ra, rb)[0, 1])
