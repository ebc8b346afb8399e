"""Row decomposition: planted norm scalings, rotation angles (tiny to near pi), conv
reshaping, zero and non-finite rows, low-precision inputs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from _helpers_analysis import planted_pair, reference_residual

from wadi_cli.analysis.decompose import (
    as_matrix,
    chord_to_angle,
    decompose_rows,
    layer_kind,
    matrix_shape,
)


def test_planted_norm_scaling_is_recovered_and_direction_unchanged():
    scales = torch.linspace(0.5, 1.5, 24, dtype=torch.float64)
    t, s = planted_pair(24, 40, scales=scales)
    dec = decompose_rows(t, s)
    np.testing.assert_allclose(
        dec.norm_rel_change().numpy(), (scales - 1).abs().numpy(), rtol=1e-12, atol=1e-14
    )
    assert float(dec.direction_chord().max()) < 1e-14
    assert float(dec.angle_rad().max()) < 1e-14


@pytest.mark.parametrize("angle", [1e-9, 1e-6, 1e-3, 0.3, 1.5, 3.0, math.pi - 1e-6])
def test_planted_rotation_angle_is_exact_even_when_tiny(angle):
    angles = torch.full((16,), angle, dtype=torch.float64)
    t, s = planted_pair(16, 33, angles=angles, seed=3)
    dec = decompose_rows(t, s)
    got = dec.angle_rad().numpy()
    np.testing.assert_allclose(got, angle, rtol=1e-6 if angle > 1e-8 else 1e-4)
    # rotations keep the row norm
    assert float(dec.norm_rel_change().max()) < 1e-13
    np.testing.assert_allclose(dec.direction_chord().numpy(), 2 * np.sin(angle / 2), rtol=1e-6)


def test_tiny_angle_beats_arccos_of_the_cosine():
    """The naive arccos(cos) loses angles below ~1e-8 rad; the chord form does not."""
    angles = torch.full((8,), 3e-9, dtype=torch.float64)
    t, s = planted_pair(8, 20, angles=angles, seed=5)
    cos = torch.nn.functional.cosine_similarity(t, s, dim=1).clamp(-1, 1)
    naive = torch.arccos(cos)
    assert float((naive - 3e-9).abs().max()) > 1e-9  # arccos is way off
    got = decompose_rows(t, s).angle_rad()
    np.testing.assert_allclose(got.numpy(), 3e-9, rtol=1e-4)


def test_mixed_rotation_and_scaling_per_row():
    gen = torch.Generator().manual_seed(0)
    angles = torch.rand(30, generator=gen, dtype=torch.float64) * 0.5
    scales = 1 + 0.1 * torch.randn(30, generator=gen, dtype=torch.float64)
    t, s = planted_pair(30, 17, angles=angles, scales=scales, seed=1)
    dec = decompose_rows(t, s)
    np.testing.assert_allclose(dec.angle_rad().numpy(), angles.numpy(), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(dec.norm_rel_change().numpy(), (scales - 1).abs().numpy(), rtol=1e-9)


def test_residual_matches_float64_reference():
    gen = torch.Generator().manual_seed(2)
    t, s = planted_pair(20, 45, angles=torch.rand(20, generator=gen) * 0.2, scales=1 + 0.05 * torch.rand(20))
    ref = reference_residual(t, s)
    dec64 = decompose_rows(t, s, residual_dtype=torch.float64)
    np.testing.assert_allclose(dec64.residual.numpy(), ref, rtol=0, atol=1e-14)
    dec32 = decompose_rows(t, s)  # default float32 residual
    assert dec32.residual.dtype == torch.float32
    np.testing.assert_allclose(dec32.residual.numpy(), ref, rtol=0, atol=1e-7)
    np.testing.assert_allclose(dec64.chord.numpy(), np.linalg.norm(ref, axis=1), rtol=1e-12)


def test_conv_is_reshaped_to_out_by_in_kh_kw():
    angles = torch.linspace(0.01, 0.4, 12, dtype=torch.float64)
    scales = torch.linspace(0.9, 1.1, 12, dtype=torch.float64)
    t, s = planted_pair(12, 5 * 3 * 3, angles=angles, scales=scales, shape=(12, 5, 3, 3))
    assert t.shape == (12, 5, 3, 3)
    assert matrix_shape(tuple(t.shape)) == (12, 45)
    assert as_matrix(t).shape == (12, 45)
    dec = decompose_rows(t, s)
    assert dec.residual.shape == (12, 45)
    np.testing.assert_allclose(dec.angle_rad().numpy(), angles.numpy(), rtol=1e-9)
    np.testing.assert_allclose(dec.norm_rel_change().numpy(), (scales - 1).abs().numpy(), rtol=1e-9)


def test_zero_and_nonfinite_rows_are_counted_and_excluded():
    t, s = planted_pair(10, 8, angles=torch.full((10,), 0.2, dtype=torch.float64), seed=4)
    t, s = t.clone(), s.clone()
    t[0] = 0.0  # zero teacher row: no norm change, no direction
    s[1] = 0.0  # zero student row: norm change 1, no direction
    s[2, 3] = float("nan")
    t[3, 0] = float("inf")
    dec = decompose_rows(t, s)
    assert dec.rows == 10
    assert dec.rows_nonfinite == 2
    assert dec.rows_zero == 2
    assert dec.norm_rel_change().numel() == 7  # rows 1, 4..9
    np.testing.assert_allclose(sorted(dec.norm_rel_change().numpy())[-1], 1.0)
    assert dec.angle_rad().numel() == 6
    np.testing.assert_allclose(dec.angle_rad().numpy(), 0.2, rtol=1e-9)
    assert torch.isfinite(dec.residual).all()
    assert float(dec.residual[:4].abs().max()) == 0.0


def test_all_rows_bad_gives_empty_statistics_not_a_crash():
    t = torch.full((4, 6), float("nan"))
    dec = decompose_rows(t, t.clone())
    assert dec.rows_nonfinite == 4
    assert dec.norm_rel_change().numel() == 0 and dec.angle_rad().numel() == 0
    assert float(dec.residual.abs().sum()) == 0.0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_inputs_match_float64_reference(dtype):
    t, s = planted_pair(16, 64, angles=torch.full((16,), 0.25, dtype=torch.float64), seed=6)
    t, s = t.to(dtype), s.to(dtype)
    dec = decompose_rows(t, s)
    ref = decompose_rows(t.to(torch.float64), s.to(torch.float64))  # same rounded data, float64
    np.testing.assert_allclose(dec.angle_rad().numpy(), ref.angle_rad().numpy(), rtol=1e-6)
    np.testing.assert_allclose(
        dec.norm_rel_change().numpy(), ref.norm_rel_change().numpy(), rtol=1e-4, atol=1e-8
    )


@pytest.mark.parametrize("angle", [1e-6, 1e-4])
def test_tiny_changes_of_float32_weights_keep_relative_accuracy(angle):
    """float32 passes, yet the error is relative to the change, not to the weights."""
    scales = torch.full((16,), 1 + 3e-6, dtype=torch.float64)
    t, s = planted_pair(16, 300, angles=torch.full((16,), angle, dtype=torch.float64), scales=scales, seed=8)
    t, s = t.float(), s.float()
    ref_r = reference_residual(t, s)  # float64 on the same float32 data
    ref_angle = 2 * np.arctan2(np.linalg.norm(ref_r, axis=1), np.sqrt(4 - np.linalg.norm(ref_r, axis=1) ** 2))
    tn, sn = t.double().norm(dim=1).numpy(), s.double().norm(dim=1).numpy()
    dec = decompose_rows(t, s)
    np.testing.assert_allclose(dec.angle_rad().numpy(), ref_angle, rtol=1e-5)
    np.testing.assert_allclose(dec.norm_rel_change().numpy(), np.abs(sn - tn) / tn, rtol=1e-4)
    np.testing.assert_allclose(dec.residual.numpy(), ref_r, rtol=0, atol=1e-6 * angle)


def test_chord_to_angle_matches_arccos_for_moderate_angles():
    theta = np.linspace(0.01, 3.1, 50)
    got = chord_to_angle(torch.from_numpy(2 * np.sin(theta / 2))).numpy()
    np.testing.assert_allclose(got, theta, rtol=1e-12)


def test_chunking_does_not_change_results(monkeypatch):
    import wadi_cli.analysis.decompose as mod

    t, s = planted_pair(37, 29, angles=torch.rand(37, dtype=torch.float64), seed=7)
    whole = decompose_rows(t, s, residual_dtype=torch.float64)
    monkeypatch.setattr(mod, "_CHUNK_ELEMENTS", 29 * 5)  # 5 rows per chunk, ragged tail
    chunked = decompose_rows(t, s, residual_dtype=torch.float64)
    assert torch.equal(whole.residual, chunked.residual)
    assert torch.equal(whole.chord, chunked.chord)


def test_layer_kind():
    assert layer_kind("a.to_q.weight", (4, 4)) == "linear"
    assert layer_kind("conv_in.weight", (4, 4, 3, 3)) == "conv"
    assert layer_kind("x.conv1d.weight", (4, 4, 3)) == "conv"
    assert layer_kind("text.token_embedding.weight", (100, 8)) == "other"
    assert layer_kind("time_embedding.linear_1.weight", (8, 4)) == "linear"
