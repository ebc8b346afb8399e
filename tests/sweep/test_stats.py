"""Sweep statistics against scipy.stats and tabulated values, on planted data."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from wadi_cli.sweep.stats import (
    detectable_difference,
    paired_detectable,
    paired_difference,
    seeds_needed,
    t_interval,
)


def test_t_interval_matches_scipy_and_the_t_table():
    x = [18.32, 19.12, 16.9, 20.47]
    ci = t_interval(x)
    ref = stats.ttest_1samp(x, 0.0).confidence_interval(0.95)
    assert ci.n == 4 and math.isclose(ci.mean, np.mean(x), rel_tol=1e-15)
    assert math.isclose(ci.low, ref.low, rel_tol=1e-12) and math.isclose(ci.high, ref.high, rel_tol=1e-12)
    # by hand: t_{0.975, 3} = 3.182446305 (printed tables), s / sqrt(n)
    half = 3.182446305284263 * np.std(x, ddof=1) / 2.0
    assert math.isclose(ci.half_width, half, rel_tol=1e-9)
    one = t_interval([3.0])
    assert one.mean == 3.0 and math.isnan(one.low) and math.isnan(one.high)
    assert t_interval([]).n == 0


def test_paired_difference_pairs_by_seed_like_ttest_rel():
    rng = np.random.default_rng(3)
    seeds = [0, 1, 2, 3, 4, 5, 6, 7]
    base = {s: 20.0 + 3.0 * rng.standard_normal() for s in seeds}  # a large seed effect
    planted = 1.7  # the cell is worse by 1.7 on every seed, plus small noise
    cell = {s: base[s] + planted + 0.3 * rng.standard_normal() for s in reversed(seeds)}
    cell[99] = 0.0  # a seed the baseline lacks: left out
    d = paired_difference(cell, base)
    a, b = [cell[s] for s in seeds], [base[s] for s in seeds]
    ref = stats.ttest_rel(a, b).confidence_interval(0.95)
    assert d.n == 8
    assert math.isclose(d.low, ref.low, rel_tol=1e-12) and math.isclose(d.high, ref.high, rel_tol=1e-12)
    assert d.low < planted < d.high and not d.covers_zero()
    # unpaired, the seed spread hides the same difference
    assert t_interval(a).low < t_interval(b).high


@pytest.mark.parametrize(("dz", "n"), [(1.0, 10), (0.5, 34), (0.8, 15)])
def test_seeds_needed_matches_the_paired_t_power_tables(dz, n):
    """Cohen's / G*Power's paired-t sample sizes at α = 0.05 two-sided, power 0.8."""
    assert seeds_needed(sd=2.0, delta=2.0 * dz) == n


@pytest.mark.parametrize(("n", "sd"), [(8, 2.33), (4, 0.7), (20, 5.0)])
def test_detectable_difference_is_detected_with_power_0_8_by_simulation(n, sd):
    """Simulated paired t tests (numpy draws, scipy's t quantile only) at the returned
    difference reject 'no difference' 80 % of the time; a difference 20 % smaller, clearly less."""
    delta = detectable_difference(n, sd)
    rng = np.random.default_rng(11)
    crit = stats.t.ppf(0.975, n - 1)

    def rejected(true_delta: float) -> float:
        d = true_delta + sd * rng.standard_normal((40_000, n))
        t = d.mean(axis=1) / (d.std(axis=1, ddof=1) / math.sqrt(n))
        return float(np.mean(np.abs(t) > crit))

    assert rejected(delta) == pytest.approx(0.8, abs=0.01)  # 5 standard errors of 40,000 draws
    assert rejected(0.8 * delta) < 0.7
    assert seeds_needed(sd, delta * 1.001) == n and seeds_needed(sd, delta * 0.97) > n
    assert math.isnan(detectable_difference(1, sd)) and math.isnan(detectable_difference(5, 0.0))


def test_paired_detectable_uses_the_pairs_seeds_and_spread():
    cell = {0: 20.0, 1: 23.5, 2: 19.0, 3: 22.0, 7: 50.0}  # seed 7: the baseline lacks it
    base = {0: 19.0, 1: 21.0, 2: 19.5, 3: 20.0, 5: 0.0}
    diffs = [1.0, 2.5, -0.5, 2.0]
    expect = detectable_difference(4, float(np.std(diffs, ddof=1)))
    assert paired_detectable(cell, base) == pytest.approx(expect, rel=1e-12)
    assert math.isnan(paired_detectable({0: 1.0}, {0: 2.0}))


def test_power_with_two_seeds_where_scipys_noncentral_t_gives_nan():
    """scipy's nct returns nan for 1 dof at large noncentrality (here 17.7): the power then comes
    from one integral, which agrees with nct where nct works and with a simulation where it does not."""
    from wadi_cli.sweep.stats import _power_by_quadrature, paired_t_power

    crit = stats.t.ppf(0.975, 1)
    assert math.isnan(stats.nct.cdf(-crit, 1, 0.626 * math.sqrt(2) / 0.05))  # the corner itself
    for dof, nc in [(1, 0.5), (2, 3.0), (7, 2.9), (29, 2.7)]:
        c = stats.t.ppf(0.975, dof)
        ref = stats.nct.sf(c, dof, nc) + stats.nct.cdf(-c, dof, nc)
        assert _power_by_quadrature(dof, c, nc) == pytest.approx(ref, abs=1e-9)
    power = paired_t_power(2, 0.05, 0.626)
    rng = np.random.default_rng(5)
    d = 0.626 + 0.05 * rng.standard_normal((200_000, 2))
    t = d.mean(axis=1) / (d.std(axis=1, ddof=1) / math.sqrt(2))
    assert power == pytest.approx(float(np.mean(np.abs(t) > crit)), abs=0.005)
    assert 0 < detectable_difference(2, 0.05) < 1.0
