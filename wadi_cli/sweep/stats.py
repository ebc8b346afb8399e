"""Means, 95 % intervals over seeds and paired differences: the statistics of a sweep table.

With ``n`` seeds ``x_1 … x_n`` of one cell, the interval is Student's t interval

    mean ± t_{1−α/2, n−1} · s / √n,     s² = Σ (x_i − mean)² / (n − 1)

and a paired difference (cell − baseline, matched by seed) is the same interval over the
per-seed differences ``d_i = x_i − b_i`` (seeds only one side has are left out). With one
value there is no interval (``nan``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

#: The confidence level of every interval of a sweep.
LEVEL = 0.95


@dataclass(frozen=True)
class Interval:
    """``mean`` and its t interval ``[low, high]`` over ``n`` values (``nan`` bounds for n < 2)."""

    n: int
    mean: float
    low: float
    high: float

    @property
    def half_width(self) -> float:
        """``(high − low) / 2``."""
        return (self.high - self.low) / 2

    def covers_zero(self) -> bool:
        """Whether 0 lies in the interval (a difference the data cannot tell from none)."""
        return self.low <= 0.0 <= self.high


def t_quantile(p: float, dof: int) -> float:
    """The ``p`` quantile of Student's t with ``dof`` degrees of freedom."""
    from scipy.stats import t

    return float(t.ppf(p, dof))


def t_interval(values: Sequence[float], level: float = LEVEL) -> Interval:
    """The mean of ``values`` and its two-sided t interval at ``level``."""
    n = len(values)
    if n == 0:
        return Interval(0, math.nan, math.nan, math.nan)
    mean = math.fsum(values) / n
    if n < 2:
        return Interval(1, mean, math.nan, math.nan)
    var = math.fsum((v - mean) ** 2 for v in values) / (n - 1)
    half = t_quantile(0.5 + level / 2, n - 1) * math.sqrt(var / n)
    return Interval(n, mean, mean - half, mean + half)


def paired_difference(
    cell: Mapping[int, float], baseline: Mapping[int, float], level: float = LEVEL
) -> Interval:
    """``cell − baseline`` over the seeds both have (seed → value), with its t interval."""
    seeds = sorted(set(cell) & set(baseline))
    return t_interval([cell[s] - baseline[s] for s in seeds], level)


def paired_detectable(
    cell: Mapping[int, float], baseline: Mapping[int, float], level: float = LEVEL, power: float = 0.8
) -> float:
    """:func:`detectable_difference` of the pairing :func:`paired_difference` makes: its seeds
    and the standard deviation of its per-seed differences."""
    seeds = sorted(set(cell) & set(baseline))
    d = [cell[s] - baseline[s] for s in seeds]
    if len(d) < 2:
        return math.nan
    mean = math.fsum(d) / len(d)
    sd = math.sqrt(math.fsum((x - mean) ** 2 for x in d) / (len(d) - 1))
    return detectable_difference(len(d), sd, level, power)


def paired_t_power(n: int, sd: float, delta: float, level: float = LEVEL) -> float:
    """The probability that a two-sided paired t test at ``1 − level`` over ``n`` seeds
    (differences with standard deviation ``sd``) rejects "no difference" when the true
    difference is ``delta``: P(|T| > t_crit), T noncentral t (n − 1 dof, noncentrality
    ``delta·√n / sd``)."""
    from scipy.stats import nct

    crit = t_quantile(0.5 + level / 2, n - 1)
    nc = delta * math.sqrt(n) / sd
    power = float(nct.sf(crit, n - 1, nc) + nct.cdf(-crit, n - 1, nc))
    return power if not math.isnan(power) else _power_by_quadrature(n - 1, crit, nc)


def _power_by_quadrature(dof: int, crit: float, nc: float) -> float:
    """P(|Z + nc| > crit·W), W = √(χ²_dof / dof): the same power as one integral over W, for
    the (few-seed, large-noncentrality) corner where scipy's noncentral t returns nan."""
    from scipy import integrate
    from scipy.stats import chi, norm

    root = math.sqrt(dof)

    def density(w: float) -> float:
        return float(chi.pdf(w * root, dof) * root * (norm.sf(crit * w - nc) + norm.cdf(-crit * w - nc)))

    value, _ = integrate.quad(density, 0.0, 1.0 + 40.0 / math.sqrt(2 * dof), points=[1.0], limit=200)
    return min(1.0, value)


def seeds_needed(sd: float, delta: float, level: float = LEVEL, power: float = 0.8) -> int:
    """The fewest seeds (paired differences with standard deviation ``sd``) for which a
    two-sided t test at ``1 − level`` detects a true difference ``delta`` with probability
    ``power`` (:func:`paired_t_power`)."""
    if sd <= 0 or delta <= 0:
        raise ValueError("sd and delta must be positive")
    for n in range(2, 100_000):
        if paired_t_power(n, sd, delta, level) >= power:
            return n
    raise ValueError("more than 100,000 seeds")


def detectable_difference(n: int, sd: float, level: float = LEVEL, power: float = 0.8) -> float:
    """The smallest true difference that ``n`` paired seeds with difference standard deviation
    ``sd`` detect with probability ``power`` (two-sided t test at ``1 − level``): what a design
    whose interval covers 0 could still have seen. ``nan`` for n < 2 or sd = 0."""
    from scipy.optimize import brentq

    if n < 2 or not sd > 0:
        return math.nan
    hi = sd
    while paired_t_power(n, sd, hi, level) < power:
        hi *= 2.0
    return float(brentq(lambda d: paired_t_power(n, sd, d, level) - power, 0.0, hi, xtol=1e-10 * sd))
