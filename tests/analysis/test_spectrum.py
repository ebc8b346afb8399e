"""Residual spectra: Gram eigenvalues vs numpy float64 SVD, planted singular values and
ranks, and the summaries checked against slow, obvious implementations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from _helpers_analysis import matrix_with_singular_values, planted_low_rank_pair, reference_residual

from wadi_cli.analysis.decompose import decompose_rows
from wadi_cli.analysis.spectrum import (
    effective_rank,
    gram_lower,
    rank_at_share,
    spectrum_stats,
    squared_singular_values,
)


@pytest.mark.parametrize("shape", [(40, 130), (130, 40), (64, 64)])
@pytest.mark.parametrize("method", ["gram", "exact"])
def test_planted_singular_values_are_recovered(shape, method):
    sv = np.array([5.0, 3.0, 2.0, 1.0, 0.5, 0.25])
    r = matrix_with_singular_values(*shape, sv, seed=1)
    for dtype in (torch.float32, torch.float64):
        sq = squared_singular_values(r.to(dtype), method)
        assert len(sq) == min(shape)
        assert np.all(np.diff(sq) <= 0)
        tol = 1e-6 if dtype == torch.float32 else 1e-10
        np.testing.assert_allclose(np.sqrt(sq[:6]), sv, rtol=tol * 10)
        # null directions: the float32 Gram resolves energies down to ~1e-7 of sigma_1^2
        assert sq[6:].max(initial=0) < (1e-6 if dtype == torch.float32 else 1e-14) * sq[0]


@pytest.mark.parametrize("shape", [(200, 700), (700, 200), (300, 300)])
def test_gram_top_k_within_1_percent_of_numpy_svd_on_random_residuals(shape):
    gen = torch.Generator().manual_seed(0)
    r = torch.randn(shape, generator=gen)
    # a decaying spectrum, like real residuals
    r = r * torch.logspace(0, -3, shape[1], dtype=torch.float32)
    ref = np.linalg.svd(r.double().numpy(), compute_uv=False)
    got = np.sqrt(squared_singular_values(r, "gram"))
    k = 64
    assert np.max(np.abs(got[:k] - ref[:k]) / ref[:k]) < 1e-2
    assert np.max(np.abs(got[:k] - ref[:k]) / ref[:k]) < 1e-4  # in practice far below 1%
    np.testing.assert_allclose((got**2).sum(), (ref**2).sum(), rtol=1e-5)


def test_planted_residual_rank_is_found():
    t, s, rank = planted_low_rank_pair(60, 90, teacher_rank=3, extra_rank=4, seed=2)
    dec = decompose_rows(t, s)
    ref = np.linalg.svd(reference_residual(t, s), compute_uv=False)
    assert np.sum(ref > 1e-10 * ref[0]) == rank  # the reference confirms the plant
    for method in ("gram", "exact"):
        sq = squared_singular_values(dec.residual, method)
        stats = spectrum_stats(sq, k=rank)
        assert stats.rank99 <= rank
        assert stats.energy_at_k == pytest.approx(1.0, abs=1e-6)
        np.testing.assert_allclose(np.sqrt(sq[:rank]), ref[:rank], rtol=1e-5)
        assert stats.rank90 == rank_at_share(ref**2, 0.90)
        assert stats.rank99 == rank_at_share(ref**2, 0.99)


def test_gram_lower_matches_full_product():
    r = torch.randn(300, 50, dtype=torch.float64)
    full = r @ r.T
    for blocks in (1, 2, 3, 4, 8):
        g = gram_lower(r, blocks)
        assert torch.allclose(torch.tril(g), torch.tril(full), rtol=1e-12, atol=1e-12)


def _slow_rank(sq_desc: np.ndarray, share: float) -> int:
    total = sum(sq_desc)
    acc = 0.0
    for i, x in enumerate(sq_desc):
        acc += x
        if acc >= share * total * (1 - 1e-12):
            return i + 1
    return len(sq_desc)


def test_rank_and_energy_against_slow_loops():
    rng = np.random.default_rng(0)
    for _ in range(20):
        sq = np.sort(rng.exponential(size=rng.integers(1, 80)) ** 3)[::-1]
        for share in (0.9, 0.93, 0.99):
            assert rank_at_share(sq, share) == _slow_rank(sq, share)
        stats = spectrum_stats(sq, k=5)
        assert stats.energy_at_k == pytest.approx(sum(sq[:5]) / sum(sq), rel=1e-12)
        assert stats.rank93 == _slow_rank(sq, 0.93)
        sv = np.sqrt(sq)
        p = sv / sv.sum()
        slow_er = math.exp(-sum(x * math.log(x) for x in p if x > 0))
        assert stats.effective_rank == pytest.approx(slow_er, rel=1e-10)
        assert stats.top_singular_values == pytest.approx(list(np.sqrt(sq[:8])), rel=1e-12)


def test_known_rank_answers():
    # flat spectrum of rank r: effective rank r; rank90 = ceil(0.9 r)
    sq = np.array([1.0] * 10 + [0.0] * 5)
    assert effective_rank(sq) == pytest.approx(10.0)
    assert rank_at_share(sq, 0.90) == 9
    assert rank_at_share(sq, 0.93) == 10
    assert rank_at_share(sq, 0.99) == 10
    # one dominant direction
    sq = np.array([99.0, 1.0])
    assert rank_at_share(sq, 0.90) == 1 and rank_at_share(sq, 0.99) == 1 and rank_at_share(sq, 0.995) == 2


def test_zero_residual_has_no_spectrum():
    stats = spectrum_stats(squared_singular_values(torch.zeros(5, 7)), k=3)
    assert stats.energy == 0.0
    assert math.isnan(stats.energy_at_k) and math.isnan(stats.effective_rank)
    assert (stats.rank90, stats.rank93, stats.rank99) == (0, 0, 0)
    assert stats.top_singular_values == [0.0] * 5


def test_bad_arguments():
    with pytest.raises(ValueError):
        squared_singular_values(torch.zeros(3, 3), "randomized")
    with pytest.raises(ValueError):
        squared_singular_values(torch.zeros(3))
    with pytest.raises(ValueError):
        spectrum_stats(np.ones(3), k=0)


@pytest.mark.gpu
def test_gram_on_cuda_matches_cpu():
    r = torch.randn(300, 900)
    cpu = squared_singular_values(r, "gram")
    gpu = squared_singular_values(r.cuda(), "gram")
    np.testing.assert_allclose(gpu, cpu, rtol=1e-4, atol=1e-6 * cpu[0])
