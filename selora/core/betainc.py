"""The regularised incomplete beta function and the Beta law's tail, in pure Python (no scipy).

Used by the signal test's null law (:mod:`selora.core.signal`) and by Student's t in :mod:`selora.stats`.
"""

from __future__ import annotations

import math

_EPS, _TINY, _MAX_TERMS = 1e-15, 1e-300, 10_000


def _beta_fraction(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz; Numerical Recipes ``betacf``)."""
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > _TINY else _TINY)
    h = d
    for m in range(1, _MAX_TERMS + 1):
        m2 = 2 * m
        for coef in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + coef * d
            d = 1.0 / (d if abs(d) > _TINY else _TINY)
            c = 1.0 + coef / c
            c = c if abs(c) > _TINY else _TINY
            h *= d * c
        if abs(d * c - 1.0) < _EPS:
            return h
    raise ArithmeticError(f"incomplete beta: the continued fraction did not converge (a={a}, b={b}, x={x})")


def betainc(a: float, b: float, x: float, y: float) -> float:
    """Regularised incomplete beta ``I_x(a, b)`` for ``x`` in [0, 1] given with ``y = 1 - x`` (exact)."""
    if x <= 0.0:
        return 0.0
    if y <= 0.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log(y))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _beta_fraction(a, b, x) / a
    return 1.0 - front * _beta_fraction(b, a, y) / b


def beta_sf(u: float, a: float, b: float) -> float:
    """``P(X >= u)`` for ``X ~ Beta(a, b)`` (a, b > 0): ``I_{1 - u}(b, a)``; agrees with ``scipy.stats.beta.sf``."""
    if not (a > 0 and b > 0 and math.isfinite(a) and math.isfinite(b)):
        raise ValueError(f"beta_sf: expected finite shape parameters > 0, got a={a}, b={b}")
    if u <= 0.0:
        return 1.0
    if u >= 1.0:
        return 0.0
    return betainc(b, a, 1.0 - u, u)
