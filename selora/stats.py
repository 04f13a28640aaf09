"""The statistics of the chapters and of ``python -m selora.evaluate``: means with their spread and
their t interval, Welch's two-sample t test (with its p-value and critical value), its equivalence
form (two one-sided tests against a margin fixed in advance), Spearman's rank correlation; and what
a "not shown" needs beside it: the power of Welch's and of the paired t test (the noncentral t) and
the smallest true difference a run of that size would have detected.

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
    "binomial_upper",
    "mean_and_se",
    "mean_interval",
    "mean_std",
    "minimum_detectable_difference",
    "noncentral_t_cdf",
    "paired_detectable_difference",
    "paired_differences",
    "paired_power",
    "spearman",
    "student_t_cdf",
    "student_t_quantile",
    "welch_df",
    "welch_equivalence",
    "welch_interval",
    "welch_power",
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


# -- power and the smallest detectable difference -------------------------------------------------
def _normal_cdf(x: float) -> float:
    """``Φ(x)``, the standard normal distribution function."""
    return 0.5 * math.erfc(-x / math.sqrt(2.0))


#: Poisson weights below this are left out of the noncentral-t series (their tail sums to less).
_NCT_WEIGHT_EPS = 1e-18


def _nct_series(x: float, y: float, df: float, nc: float) -> float:
    """``Σ_j [p_j I_x(j + 1/2, df/2) + q_j I_x(j + 1, df/2)]`` of :func:`noncentral_t_cdf`, summed from
    the Poisson mode outwards until the weights ``p_j + |q_j|`` fall below :data:`_NCT_WEIGHT_EPS`."""
    lam = 0.5 * nc * nc
    if lam == 0.0:
        return betainc(0.5, df / 2, x, y)  # p_0 = 1, q_j = 0

    def term(j: int) -> tuple[float, float]:
        log_w = -lam + j * math.log(lam)
        p = math.exp(log_w - math.lgamma(j + 1.0))
        q = math.copysign(math.exp(log_w - math.lgamma(j + 1.5) + math.log(abs(nc)) - 0.5 * math.log(2.0)), nc)
        weight = p + abs(q)
        value = p * betainc(j + 0.5, df / 2, x, y) + q * betainc(j + 1.0, df / 2, x, y) if weight > 0 else 0.0
        return value, weight

    mode = int(lam)
    total, j = 0.0, mode
    while True:  # upwards from the mode
        value, weight = term(j)
        total += value
        if weight < _NCT_WEIGHT_EPS:
            break
        j += 1
    for j in range(mode - 1, -1, -1):  # downwards
        value, weight = term(j)
        total += value
        if weight < _NCT_WEIGHT_EPS:
            break
    return total


def noncentral_t_cdf(t: float, df: float, nc: float) -> float:
    """``P(T <= t)`` for the noncentral t ``T = (Z + nc) / sqrt(V / df)`` (Z standard normal, V chi-square
    with ``df`` > 0 degrees of freedom, independent; ``nc`` the noncentrality).

    For ``t >= 0`` (Guenther 1978; Lenth 1989, algorithm AS 243), with ``x = t^2 / (t^2 + df)``:
    ``P(T <= t) = Φ(-nc) + 1/2 Σ_{j >= 0} [p_j I_x(j + 1/2, df/2) + q_j I_x(j + 1, df/2)]``,
    ``p_j = e^{-nc^2/2} (nc^2/2)^j / j!``, ``q_j = nc e^{-nc^2/2} (nc^2/2)^j / (sqrt(2) Γ(j + 3/2))``;
    for ``t < 0``, ``P(T <= t; nc) = 1 - P(T <= -t; -nc)``. ``nc = 0`` is Student's t. Accurate to an
    absolute ~1e-15 (tails far below that are not resolved relatively).
    """
    df = _check_df(df)
    t, nc = float(t), float(nc)
    if not (math.isfinite(t) and math.isfinite(nc)):
        raise ValueError(f"noncentral_t_cdf: expected finite t and nc, got t={t}, nc={nc}")
    if t < 0:
        return 1.0 - noncentral_t_cdf(-t, df, -nc)
    t2 = t * t
    cdf = _normal_cdf(-nc) + 0.5 * _nct_series(t2 / (t2 + df), df / (t2 + df), df, nc)
    return min(1.0, max(0.0, cdf))


def _two_sided_power(nc: float, df: float, c: float) -> float:
    """``P(|T| > c)`` for T noncentral t with ``df`` and ``nc``; ``c = t_{1 - alpha/2, df}`` for a level-alpha test."""
    return min(1.0, (1.0 - noncentral_t_cdf(c, df, nc)) + noncentral_t_cdf(-c, df, nc))


def _check_positive(**values: float) -> None:
    for name, v in values.items():
        if not (math.isfinite(v) and v > 0):
            raise ValueError(f"{name}={v}: expected a finite number > 0")


def _check_n(**values: int) -> None:
    for name, v in values.items():
        if int(v) != v or v < 2:
            raise ValueError(f"{name}={v}: expected a whole number >= 2")


def _welch_design(sd_a: float, sd_b: float, n_a: int, n_b: int) -> tuple[float, float]:
    """Standard error of mean(a) - mean(b) and Welch–Satterthwaite df at the TRUE spreads."""
    _check_positive(sd_a=sd_a, sd_b=sd_b)
    _check_n(n_a=n_a, n_b=n_b)
    ua, ub = sd_a**2 / n_a, sd_b**2 / n_b
    return math.sqrt(ua + ub), (ua + ub) ** 2 / (ua**2 / (n_a - 1) + ub**2 / (n_b - 1))


def welch_power(delta: float, sd_a: float, sd_b: float, n_a: int, n_b: int, alpha: float = 0.05) -> float:
    """Power of :func:`welch_test` (two-sided, level ``alpha``): the probability that it calls a true
    difference of means ``delta`` significant, for normal groups with true standard deviations
    ``sd_a``, ``sd_b`` and ``n_a``, ``n_b`` values.

    ``se = sqrt(sd_a^2 / n_a + sd_b^2 / n_b)``, ``ν`` the Welch–Satterthwaite df at the true spreads
    (:func:`welch_df`'s formula), ``power ≈ P(|T'| > t_{1 - alpha/2, ν})`` with ``T'`` noncentral t
    (``ν`` df, noncentrality ``delta / se``). An approximation (the test estimates ``ν`` and ``se``); exact
    for the pooled t when ``n_a = n_b`` and ``sd_a = sd_b``, where Welch's test, whose estimated ``ν`` is
    at most this one, has slightly less power. ``delta = 0`` gives ``alpha``.
    """
    _check_alpha(alpha)
    if not math.isfinite(delta):
        raise ValueError(f"delta={delta}: expected a finite difference")
    se, df = _welch_design(sd_a, sd_b, n_a, n_b)
    return _two_sided_power(delta / se, df, student_t_quantile(1 - alpha / 2, df))


def paired_power(delta: float, sd_diff: float, n: int, alpha: float = 0.05) -> float:
    """Power of the paired t test (two-sided, level ``alpha``; :func:`mean_interval` of the
    :func:`paired_differences` excluding 0): the probability that it calls a true mean difference
    ``delta`` significant when the ``n`` paired differences are normal with standard deviation ``sd_diff``.

    Exact: ``power = P(|T'| > t_{1 - alpha/2, n - 1})``, ``T'`` noncentral t with ``n - 1`` df and
    noncentrality ``delta sqrt(n) / sd_diff``.
    """
    _check_alpha(alpha)
    if not math.isfinite(delta):
        raise ValueError(f"delta={delta}: expected a finite difference")
    _check_positive(sd_diff=sd_diff)
    _check_n(n=n)
    return _two_sided_power(delta * math.sqrt(n) / sd_diff, n - 1, student_t_quantile(1 - alpha / 2, n - 1))


def _detectable_nc(df: float, alpha: float, power: float) -> float:
    """The noncentrality ``nc >= 0`` at which the two-sided test has ``power``; bisection (the power
    grows with ``nc``) until the bracket cannot shrink in float64 or is narrower than 1e-13 of it."""
    _check_alpha(alpha)
    if not alpha < power < 1:
        raise ValueError(f"power={power}: expected a probability in (alpha={alpha}, 1)")
    c = student_t_quantile(1 - alpha / 2, df)
    lo, hi = 0.0, 1.0
    while _two_sided_power(hi, df, c) < power:
        lo, hi = hi, 2.0 * hi
    while hi - lo > 1e-13 * hi:
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        if _two_sided_power(mid, df, c) < power:
            lo = mid
        else:
            hi = mid
    return hi


def minimum_detectable_difference(
    sd_a: float, sd_b: float, n_a: int, n_b: int, alpha: float = 0.05, power: float = 0.8
) -> float:
    """The smallest true difference of means that :func:`welch_test` (two-sided, level ``alpha``) calls
    significant with probability ``power``, for normal groups with standard deviations ``sd_a``,
    ``sd_b`` and ``n_a``, ``n_b`` values: the ``delta > 0`` with ``welch_power(delta, ...) = power``,
    i.e. ``delta = nc* · se`` where ``nc*`` solves ``P(|T'_{ν, nc*}| > t_{1 - alpha/2, ν}) = power`` (bisection).

    A "not shown" at these sizes says nothing about differences much below this one.
    """
    se, df = _welch_design(sd_a, sd_b, n_a, n_b)
    return _detectable_nc(df, alpha, power) * se


def paired_detectable_difference(sd_diff: float, n: int, alpha: float = 0.05, power: float = 0.8) -> float:
    """The smallest true mean difference that the paired t test (two-sided, level ``alpha``) calls
    significant with probability ``power``, for ``n`` normal paired differences with standard deviation
    ``sd_diff``: ``delta = nc* · sd_diff / sqrt(n)`` with ``paired_power(delta, sd_diff, n, alpha) = power``."""
    _check_positive(sd_diff=sd_diff)
    _check_n(n=n)
    return _detectable_nc(n - 1, alpha, power) * sd_diff / math.sqrt(n)


# -- counts ---------------------------------------------------------------------------------------
def binomial_upper(n: int, p: float, q: float) -> int:
    """The smallest ``k`` with ``P(X > k) <= q``, ``X ~ Binomial(n, p)`` (scipy's ``binom.ppf(1 - q, n, p)``):
    a count of events of rate ``p`` in ``n`` trials exceeds it with probability at most ``q``."""
    if int(n) != n or n < 1:
        raise ValueError(f"binomial_upper: n must be a whole number >= 1, got {n}")
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"binomial_upper: p must be a probability in [0, 1], got {p}")
    if not 0.0 < q < 1.0:
        raise ValueError(f"binomial_upper: q must be in (0, 1), got {q}")
    if p in (0.0, 1.0):
        return 0 if p == 0.0 else n
    j = np.arange(n + 1)
    log_pmf = (
        math.lgamma(n + 1)
        - np.array([math.lgamma(i + 1) + math.lgamma(n - i + 1) for i in j])
        + j * math.log(p)
        + (n - j) * math.log1p(-p)
    )
    above = np.r_[np.cumsum(np.exp(log_pmf)[::-1])[::-1][1:], 0.0]  # P(X > k), summed from the top
    return int(np.argmax(above <= q))


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
