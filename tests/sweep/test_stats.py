"""Sweep statistics against scipy.stats and tabulated values, on planted data."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from wadi_cli.sweep.stats import paired_difference, seeds_needed, t_interval


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
