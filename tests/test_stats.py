"""selora.stats against scipy.stats (a test-only dependency): means and standard errors, Welch's t
test with its degrees of freedom, p-value, critical value and interval, the Student-t distribution,
Spearman's rank correlation; and the errors on input they cannot handle."""

from __future__ import annotations

import math
import statistics

import numpy as np
import pytest
import scipy.stats
import torch

from selora import stats
from selora.core.betainc import beta_sf


def samples(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Two independent samples of random sizes (2..12), means and spreads."""
    rng = np.random.default_rng(seed)
    a = rng.normal(rng.normal(), rng.uniform(0.1, 3), rng.integers(2, 13))
    b = rng.normal(rng.normal(), rng.uniform(0.1, 3), rng.integers(2, 13))
    return a, b


def test_welch_t_matches_its_formula_and_rejects_degenerate_input():
    a, b = [1.0, 2.0, 3.0], [4.0, 6.0, 8.0, 10.0]
    se = (np.var(a, ddof=1) / 3 + np.var(b, ddof=1) / 4) ** 0.5
    assert stats.welch_t(a, b) == pytest.approx((2.0 - 7.0) / se)
    assert stats.welch_t(b, a) == pytest.approx(-stats.welch_t(a, b))
    with pytest.raises(ValueError, match="at least 2 values"):
        stats.welch_t([1.0], b)
    with pytest.raises(ValueError, match="constant"):
        stats.welch_t([1.0, 1.0], [2.0, 2.0])


def test_mean_and_se():
    mean, se = stats.mean_and_se([1.0, 2.0, 3.0, 6.0])
    assert mean == pytest.approx(3.0)
    assert se == pytest.approx(float(np.std([1, 2, 3, 6], ddof=1)) / 2)
    with pytest.raises(ValueError, match="at least 2"):
        stats.mean_and_se([1.0])


def test_paired_differences_average_the_draws_of_each_image():
    worse = torch.tensor([[1.0, 3.0], [2.0, 2.0], [5.0, 5.0]])
    better = torch.zeros(3, 2)
    diff = stats.paired_differences(worse, better)  # per-image means 2, 2, 5
    assert diff.dtype == np.float64 and diff.tolist() == [2.0, 2.0, 5.0]
    assert stats.paired_differences(worse[:, 0], better[:, 0]).tolist() == [1.0, 2.0, 5.0]
    with pytest.raises(ValueError, match=">= 2 images"):
        stats.paired_differences(worse[:1], better[:1])


def test_spearman_matches_scipy_with_ties():
    from scipy.stats import spearmanr

    rng = np.random.default_rng(0)
    for _ in range(20):
        a = rng.integers(0, 4, 12).astype(float)  # many ties
        b = a + rng.normal(0, 1.5, 12)
        if a.std() == 0:
            continue
        assert stats.spearman(a, b) == pytest.approx(spearmanr(a, b).statistic, abs=1e-12)
    assert stats.spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="constant"):
        stats.spearman([1, 1, 1], [1, 2, 3])
    with pytest.raises(ValueError, match="equal length"):
        stats.spearman([1, 2], [1, 2, 3])


def test_mean_and_se_and_mean_std_match_scipy_and_statistics():
    for seed in range(10):
        values = samples(seed)[0]
        mean, se = stats.mean_and_se(values)
        assert mean == pytest.approx(float(np.mean(values)), rel=1e-12)
        assert se == pytest.approx(float(scipy.stats.sem(values)), rel=1e-12)
        summary = stats.mean_std(list(values))
        assert summary["n"] == len(values)
        assert summary["mean"] == pytest.approx(statistics.mean(values), rel=1e-12)
        assert summary["std"] == pytest.approx(statistics.stdev(values), rel=1e-12)
    assert stats.mean_std([1.0, 2.0, 3.0]) == {"mean": 2.0, "std": 1.0, "n": 3}
    assert stats.mean_std([4.0]) == {"mean": 4.0, "std": None, "n": 1}


def test_mean_interval_matches_scipy_t_interval():
    for seed in range(10):
        values = samples(seed)[0]
        for alpha in (0.05, 0.1, 0.32):
            low, high = stats.mean_interval(values, alpha)
            ref = scipy.stats.t.interval(1 - alpha, len(values) - 1, loc=np.mean(values), scale=scipy.stats.sem(values))
            assert (low, high) == pytest.approx(ref, rel=1e-9, abs=1e-12)
    with pytest.raises(ValueError, match="alpha"):
        stats.mean_interval([1.0, 2.0, 4.0], alpha=1.5)


def test_welch_test_matches_scipy_ttest_ind_unequal_variances():
    for seed in range(20):
        a, b = samples(seed)
        ref = scipy.stats.ttest_ind(a, b, equal_var=False)
        for alpha in (0.05, 0.01, 0.2):
            test = stats.welch_test(a, b, alpha)
            assert test.t == pytest.approx(ref.statistic, rel=1e-12) and test.t == stats.welch_t(a, b)
            assert test.df == pytest.approx(ref.df, rel=1e-12) and test.df == stats.welch_df(a, b)
            assert test.p == pytest.approx(ref.pvalue, rel=1e-10)
            assert test.critical == pytest.approx(scipy.stats.t.ppf(1 - alpha / 2, ref.df), rel=1e-10)
            assert (test.p < alpha) == (abs(test.t) > test.critical)
            low, high = stats.welch_interval(a, b, alpha)
            ci = ref.confidence_interval(1 - alpha)
            assert (low, high) == pytest.approx((ci.low, ci.high), rel=1e-10, abs=1e-12)


def test_welch_df_is_the_welch_satterthwaite_formula():
    a, b = [1.0, 2.0, 3.0], [4.0, 6.0, 8.0, 10.0]
    ua, ub = np.var(a, ddof=1) / 3, np.var(b, ddof=1) / 4
    assert stats.welch_df(a, b) == pytest.approx((ua + ub) ** 2 / (ua**2 / 2 + ub**2 / 3))
    assert stats.welch_df([1.0, 2.0, 4.0], [5.0, 5.0]) == pytest.approx(2.0)  # one constant group: n - 1 of the other
    assert stats.welch_test([1.0, 2.0, 4.0], [5.0, 5.0]).df == pytest.approx(2.0)


def test_student_t_cdf_and_quantile_match_scipy():
    for df in (0.5, 1.0, 2.0, 2.7, 4.0, 9.5, 30.0, 250.0, 1e4):
        for x in (-40.0, -3.0, -1.0, -0.2, 0.0, 0.2, 1.0, 2.5, 8.0, 40.0):
            assert stats.student_t_cdf(x, df) == pytest.approx(scipy.stats.t.cdf(x, df), rel=1e-10)
        for q in (1e-9, 1e-4, 0.01, 0.025, 0.1, 0.4, 0.5, 0.6, 0.9, 0.975, 0.99, 0.9999):
            assert stats.student_t_quantile(q, df) == pytest.approx(scipy.stats.t.ppf(q, df), rel=1e-10, abs=1e-14)
    assert stats.student_t_quantile(0.975, 1.0) == pytest.approx(math.tan(math.pi * 0.475), rel=1e-12)  # Cauchy


def test_welch_and_t_errors():
    with pytest.raises(ValueError, match="welch_df: need at least 2 values per group"):
        stats.welch_df([1.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="constant"):
        stats.welch_test([1.0, 1.0], [2.0, 2.0])
    with pytest.raises(ValueError, match="constant"):
        stats.welch_interval([3.0, 3.0, 3.0], [2.0, 2.0])
    for alpha in (0.0, 1.0, -0.1):
        with pytest.raises(ValueError, match=f"alpha={alpha}"):
            stats.welch_test([1.0, 2.0], [2.0, 4.0], alpha)
        with pytest.raises(ValueError, match=f"alpha={alpha}"):
            stats.welch_interval([1.0, 2.0], [2.0, 4.0], alpha)
    for q in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError, match=f"q={q}"):
            stats.student_t_quantile(q, 3.0)
    for df in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="df="):
            stats.student_t_cdf(0.5, df)
        with pytest.raises(ValueError, match="df="):
            stats.student_t_quantile(0.5, df)


def test_spearman_matches_scipy_on_random_inputs_without_ties():
    rng = np.random.default_rng(1)
    for n in (2, 3, 7, 40):
        a, b = rng.normal(size=n), rng.normal(size=n)
        assert stats.spearman(a, b) == pytest.approx(scipy.stats.spearmanr(a, b).statistic, abs=1e-12)
    with pytest.raises(ValueError, match="equal length >= 2"):
        stats.spearman([1.0], [2.0])
    with pytest.raises(ValueError, match="1-d"):
        stats.spearman(np.zeros((2, 2)), np.zeros((2, 2)))


def test_paired_differences_give_scipys_paired_interval():
    g = torch.Generator().manual_seed(0)
    worse, better = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g)
    diff = stats.paired_differences(worse, better)
    a, b = (worse.double().mean(1).numpy(), better.double().mean(1).numpy())
    assert stats.mean_and_se(diff)[1] == pytest.approx(float(scipy.stats.sem(a - b)), rel=1e-12)
    paired = scipy.stats.ttest_rel(a, b).confidence_interval(0.95)
    assert stats.mean_interval(diff) == pytest.approx((paired.low, paired.high), rel=1e-9)
    with pytest.raises(ValueError, match="one shape"):
        stats.paired_differences(worse, better[:, :2])


def test_welch_equivalence_is_two_one_sided_scipy_tests():
    """TOST: the larger p of scipy's one-sided Welch tests of a - margin against b and a + margin against b;
    equivalence exactly when the 1 - 2 alpha interval lies inside the margin."""
    seen = set()
    for seed in range(30):
        a, b = samples(seed)
        margin = float(np.abs(np.mean(a) - np.mean(b))) * (0.5 + seed / 10)
        ref_low = scipy.stats.ttest_ind(np.asarray(a) + margin, b, equal_var=False, alternative="greater").pvalue
        ref_high = scipy.stats.ttest_ind(np.asarray(a) - margin, b, equal_var=False, alternative="less").pvalue
        for alpha in (0.05, 0.2):
            eq = stats.welch_equivalence(a, b, margin, alpha)
            assert eq.p == pytest.approx(max(ref_low, ref_high), rel=1e-9, abs=1e-14)
            assert eq.interval == pytest.approx(stats.welch_interval(a, b, 2 * alpha), rel=1e-12)
            inside = -margin < eq.interval[0] and eq.interval[1] < margin
            assert eq.equivalent == (eq.p < alpha) == inside
            seen.add(eq.equivalent)
    assert seen == {True, False}, "the samples exercise both outcomes"
    with pytest.raises(ValueError, match="margin=0"):
        stats.welch_equivalence([1.0, 2.0], [1.0, 3.0], 0)


def test_beta_sf_matches_scipy():
    rng = np.random.default_rng(0)
    for _ in range(200):
        a, b, u = float(rng.uniform(0.1, 300)), float(rng.uniform(0.1, 3000)), float(rng.uniform(0, 1))
        assert beta_sf(u, a, b) == pytest.approx(scipy.stats.beta.sf(u, a, b), rel=1e-9, abs=1e-300)
    assert beta_sf(0.0, 2, 3) == 1.0 and beta_sf(1.0, 2, 3) == 0.0
    with pytest.raises(ValueError, match="a=0"):
        beta_sf(0.5, 0, 1)


# -- power and the smallest detectable difference --------------------------------------------------
def scipy_two_sided_power(nc: float, df: float, alpha: float) -> float:
    """P(|T'| > t_{1 - alpha/2, df}) for T' ~ noncentral t(df, nc), all from scipy; the lower tail as
    P(T'(-nc) > c), which scipy computes where its nct.cdf(-c, df, nc) returns nan."""
    c = scipy.stats.t.ppf(1 - alpha / 2, df)
    return float(scipy.stats.nct.sf(c, df, nc) + scipy.stats.nct.sf(c, df, -nc))


def test_noncentral_t_cdf_matches_scipy_nct():
    """Tolerance: an absolute 1e-12 everywhere, the distribution's body (1e-6 < P < 1 - 1e-6) also to a
    relative 1e-8 of the nearer tail. The series is summed in float64 to weights below 1e-18, each
    incomplete beta to ~1e-15 relative; measured worst absolute error on this grid 5e-14, worst
    relative error in the body 3e-10 (the margin covers platform libm differences). Tails far below
    1e-12 are not resolved relatively (documented): for t < 0 the value is 1 minus a number near 1."""
    for df in (1.0, 2.0, 2.7, 4.0, 9.5, 30.0, 300.0):
        for nc in (-8.0, -3.0, -1.0, -0.3, 0.0, 0.4, 1.0, 2.5, 5.0, 8.0, 15.0):
            for t in (-20.0, -4.0, -2.0, -0.5, 0.0, 0.5, 1.0, 2.0, 4.0, 8.0, 20.0):
                ref = float(scipy.stats.nct.cdf(t, df, nc))
                if not math.isfinite(ref):  # scipy gives nan at a few extreme points
                    continue
                got = stats.noncentral_t_cdf(t, df, nc)
                assert abs(got - ref) <= 1e-12, (t, df, nc, got, ref)
                if 1e-6 < ref < 1 - 1e-6:
                    assert abs(got - ref) <= 1e-8 * min(ref, 1 - ref), (t, df, nc, got, ref)
    for df in (1.0, 3.0, 40.0):  # nc = 0 is Student's t
        for t in (-3.0, -0.7, 0.0, 1.5, 6.0):
            assert stats.noncentral_t_cdf(t, df, 0.0) == pytest.approx(stats.student_t_cdf(t, df), abs=1e-15)


def test_welch_and_paired_power_match_scipy_nct():
    """Against the same formula from scipy (nct, t.ppf): relative 1e-9, absolute 1e-12 — the noncentral
    cdf's absolute 1e-12 above, plus scipy's own quantile (relative ~1e-15)."""
    for delta in (0.0, 0.3, -1.0, 2.0, 3.07, 6.0):
        for sd_a, sd_b, n_a, n_b in ((1.0, 1.0, 3, 3), (1.0, 2.0, 3, 3), (0.5, 3.0, 3, 5), (2.0, 1.0, 10, 4)):
            se = math.sqrt(sd_a**2 / n_a + sd_b**2 / n_b)
            ua, ub = sd_a**2 / n_a, sd_b**2 / n_b
            df = (ua + ub) ** 2 / (ua**2 / (n_a - 1) + ub**2 / (n_b - 1))
            for alpha in (0.05, 0.01, 0.2):
                ref = scipy_two_sided_power(delta / se, df, alpha)
                got = stats.welch_power(delta, sd_a, sd_b, n_a, n_b, alpha)
                assert got == pytest.approx(ref, rel=1e-9, abs=1e-12), (delta, sd_a, sd_b, n_a, n_b, alpha)
        for sd, n in ((1.0, 3), (0.2, 3), (2.0, 12)):
            ref = scipy_two_sided_power(delta * math.sqrt(n) / sd, n - 1, 0.05)
            assert stats.paired_power(delta, sd, n) == pytest.approx(ref, rel=1e-9, abs=1e-12)
    assert stats.welch_power(0.0, 1.0, 2.0, 3, 4, 0.05) == pytest.approx(0.05, abs=1e-12)  # no effect: the level
    assert stats.welch_power(1.5, 1.0, 2.0, 3, 4) == pytest.approx(stats.welch_power(-1.5, 1.0, 2.0, 3, 4), abs=1e-14)


def test_paired_power_is_the_simulated_rejection_rate():
    """Exact for normal differences: the paired t test's rejection rate over 40 000 simulated experiments
    (scipy's ttest_1samp) lies within 4.5 binomial standard errors of paired_power (one false alarm in
    ~150 000 draws of the fixed seed's kind)."""
    rng = np.random.default_rng(7)
    runs = 40_000
    for delta, sd, n in ((1.0, 1.0, 3), (2.0, 1.0, 3), (0.5, 0.4, 5)):
        diffs = rng.normal(delta, sd, (runs, n))
        rate = float((scipy.stats.ttest_1samp(diffs, 0.0, axis=1).pvalue < 0.05).mean())
        power = stats.paired_power(delta, sd, n)
        assert abs(rate - power) < 4.5 * math.sqrt(power * (1 - power) / runs), (delta, sd, n, rate, power)


def test_welch_power_bounds_the_simulated_welch_rejection_rate():
    """welch_power is an approximation (noncentral t at the true df): the real Welch test estimates its
    df and se and rejects less often. Over 40 000 simulated experiments per design the rate lies below
    the approximation (plus 4.5 binomial standard errors) and at most 0.12 under it — measured: 0.105
    under it at 3 + 3 values with equal spreads and delta = the 80 % detectable difference, ~0.02 with
    unequal spreads or 5+ values."""
    rng = np.random.default_rng(8)
    runs = 40_000
    for sd_a, sd_b, n_a, n_b, delta in ((1, 1, 3, 3, 3.07), (1, 1, 3, 3, 1.5), (1, 2, 3, 3, 3.0), (2, 1, 10, 4, 2.0)):
        a, b = rng.normal(delta, sd_a, (runs, n_a)), rng.normal(0.0, sd_b, (runs, n_b))
        rate = float((scipy.stats.ttest_ind(a, b, axis=1, equal_var=False).pvalue < 0.05).mean())
        power = stats.welch_power(delta, sd_a, sd_b, n_a, n_b)
        band = 4.5 * math.sqrt(power * (1 - power) / runs)
        assert power - 0.12 < rate < power + band, (sd_a, sd_b, n_a, n_b, delta, rate, power)


def test_detectable_differences_solve_the_power_equation():
    """The bisection's root has the stated power (absolute 1e-9: the bracket is 1e-13 of the root and the
    power's slope is below 1 per unit of noncentrality) and agrees with scipy's brentq on scipy's power
    (relative 1e-8)."""
    from scipy.optimize import brentq

    for sd_a, sd_b, n_a, n_b in ((1.0, 1.0, 3, 3), (1.0, 2.0, 3, 5), (0.3, 0.3, 30, 30)):
        se = math.sqrt(sd_a**2 / n_a + sd_b**2 / n_b)
        ua, ub = sd_a**2 / n_a, sd_b**2 / n_b
        df = (ua + ub) ** 2 / (ua**2 / (n_a - 1) + ub**2 / (n_b - 1))
        for alpha, power in ((0.05, 0.8), (0.05, 0.5), (0.01, 0.9)):
            mdd = stats.minimum_detectable_difference(sd_a, sd_b, n_a, n_b, alpha, power)
            assert stats.welch_power(mdd, sd_a, sd_b, n_a, n_b, alpha) == pytest.approx(power, abs=1e-9)
            gap = lambda nc, df=df, a=alpha, p=power: scipy_two_sided_power(nc, df, a) - p  # noqa: E731
            ref = se * brentq(gap, 0.0, 50.0, xtol=1e-14)
            assert mdd == pytest.approx(ref, rel=1e-8)
    # pooled-t textbook value: 3 + 3 values detect d = 3.07 sd with 80 % power at 5 %
    assert stats.minimum_detectable_difference(1.0, 1.0, 3, 3) == pytest.approx(3.07, abs=0.005)
    for sd, n in ((1.0, 3), (0.25, 8)):
        mdd = stats.paired_detectable_difference(sd, n)
        assert stats.paired_power(mdd, sd, n) == pytest.approx(0.8, abs=1e-9)
        ref = sd / math.sqrt(n) * brentq(lambda nc, n=n: scipy_two_sided_power(nc, n - 1, 0.05) - 0.8, 0.0, 50.0)
        assert mdd == pytest.approx(ref, rel=1e-8)


def test_power_functions_reject_bad_input():
    with pytest.raises(ValueError, match="sd_a=0"):
        stats.welch_power(1.0, 0.0, 1.0, 3, 3)
    with pytest.raises(ValueError, match="n_b=1"):
        stats.welch_power(1.0, 1.0, 1.0, 3, 1)
    with pytest.raises(ValueError, match="n=2.5"):
        stats.paired_power(1.0, 1.0, 2.5)
    with pytest.raises(ValueError, match="sd_diff=-1"):
        stats.paired_power(1.0, -1.0, 3)
    with pytest.raises(ValueError, match="delta=inf"):
        stats.welch_power(math.inf, 1.0, 1.0, 3, 3)
    with pytest.raises(ValueError, match="delta=nan"):
        stats.paired_power(math.nan, 1.0, 3)
    with pytest.raises(ValueError, match="alpha=1.0"):
        stats.paired_power(1.0, 1.0, 3, alpha=1.0)
    for power in (0.05, 0.01, 1.0):
        with pytest.raises(ValueError, match=f"power={power}"):
            stats.minimum_detectable_difference(1.0, 1.0, 3, 3, alpha=0.05, power=power)
    with pytest.raises(ValueError, match="sd_diff=nan"):
        stats.paired_detectable_difference(math.nan, 3)
    with pytest.raises(ValueError, match="df="):
        stats.noncentral_t_cdf(1.0, 0.0, 1.0)
    with pytest.raises(ValueError, match="finite t and nc"):
        stats.noncentral_t_cdf(math.inf, 3.0, 1.0)


def test_binomial_upper_matches_scipy_binom_ppf():
    # chapter 9's pure-noise bound: the smallest k with P(X > k) <= q for X ~ Binomial(n, p)
    for n, p, q in [(400, 0.01, 1e-3), (400, 0.05, 1e-3), (20, 0.5, 0.05), (1000, 0.001, 1e-6), (7, 0.3, 0.2)]:
        k = stats.binomial_upper(n, p, q)
        assert k == int(scipy.stats.binom.ppf(1 - q, n, p)), (n, p, q)
        assert scipy.stats.binom.sf(k, n, p) <= q < scipy.stats.binom.sf(k - 1, n, p)
    assert stats.binomial_upper(10, 0.0, 0.01) == 0
    with pytest.raises(ValueError, match="binomial_upper: p"):
        stats.binomial_upper(10, 1.5, 0.01)
    with pytest.raises(ValueError, match="binomial_upper: q"):
        stats.binomial_upper(10, 0.5, 0.0)
    with pytest.raises(ValueError, match="n must be"):
        stats.binomial_upper(0, 0.5, 0.1)
