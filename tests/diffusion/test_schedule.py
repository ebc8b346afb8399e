"""Schedule maths against float64 references and planted ground truths."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from wadi_cli.diffusion import schedule as S
from wadi_cli.errors import BadInputError

ALPHA_BAR_T = 0.0047


def _data(seed=0, shape=(3, 4, 5, 5), dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=torch.float64).to(dtype) for _ in range(2)]


def test_one_step_formula_matches_float64_reference():
    z, eps = _data()
    got = S.one_step_x0(z, eps, ALPHA_BAR_T)
    zn, en = z.double().numpy(), eps.double().numpy()
    ref = (zn - math.sqrt(1 - ALPHA_BAR_T) * en) / math.sqrt(ALPHA_BAR_T)
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-5, atol=1e-4)


def test_true_eps_recovers_x0_exactly():
    x0, eps = _data(1, dtype=torch.float64)
    for ab in (ALPHA_BAR_T, 0.3, 0.999):
        x_t = S.add_noise(x0, eps, ab)
        ref_xt = math.sqrt(ab) * x0 + math.sqrt(1 - ab) * eps
        torch.testing.assert_close(x_t, ref_xt, rtol=0, atol=1e-12)
        torch.testing.assert_close(S.one_step_x0(x_t, eps, ab), x0, rtol=0, atol=1e-10)
        torch.testing.assert_close(S.eps_from_x0(x_t, x0, ab), eps, rtol=0, atol=1e-10)


def test_v_and_sample_prediction_conversions():
    x0, eps = _data(2, dtype=torch.float64)
    ab = 0.2
    a, s = math.sqrt(ab), math.sqrt(1 - ab)
    x_t = a * x0 + s * eps
    v = a * eps - s * x0  # the v-prediction target, written out independently
    torch.testing.assert_close(S.v_from_eps(x_t, eps, ab), v, rtol=0, atol=1e-12)
    torch.testing.assert_close(S.to_eps(v, x_t, ab, "v_prediction"), eps, rtol=0, atol=1e-12)
    torch.testing.assert_close(S.to_x0(v, x_t, ab, "v_prediction"), x0, rtol=0, atol=1e-12)
    torch.testing.assert_close(S.to_eps(x0, x_t, ab, "sample"), eps, rtol=0, atol=1e-10)
    torch.testing.assert_close(S.to_x0(eps, x_t, ab, "epsilon"), x0, rtol=0, atol=1e-10)
    torch.testing.assert_close(S.one_step_x0(x_t, v, ab, "v_prediction"), x0, rtol=0, atol=1e-12)


def test_per_sample_alpha_bar_matches_loop():
    x0, eps = _data(3, dtype=torch.float64)
    abs_ = torch.tensor([0.01, 0.5, 0.9], dtype=torch.float64)
    batched = S.add_noise(x0, eps, abs_)
    for i, ab in enumerate(abs_.tolist()):
        torch.testing.assert_close(batched[i], S.add_noise(x0[i : i + 1], eps[i : i + 1], ab)[0])


def test_fp16_inputs_are_computed_in_fp32():
    z, eps = _data(4, dtype=torch.float16)
    got = S.one_step_x0(z, eps, ALPHA_BAR_T)
    assert got.dtype == torch.float16
    ref = (z.double() - math.sqrt(1 - ALPHA_BAR_T) * eps.double()) / math.sqrt(ALPHA_BAR_T)
    # the only error is the final rounding to fp16 (relative 2^-11), not an fp16 pipeline
    torch.testing.assert_close(got.double(), ref, rtol=2**-10, atol=1e-3)


def test_alphas_cumprod_of_sd_schedule():
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    ac = S.alphas_cumprod_of(sched)
    betas = np.linspace(math.sqrt(0.00085), math.sqrt(0.012), 1000) ** 2
    ref = np.cumprod(1 - betas)
    assert ac.dtype == torch.float64
    np.testing.assert_allclose(ac.numpy(), ref, rtol=1e-5)
    assert abs(float(S.alpha_bar_at(ac, S.last_timestep(sched))) - 0.00466) < 5e-5  # method.md §3
    assert S.last_timestep(sched) == 999


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.5])
def test_bad_alpha_bar_refused(bad):
    z, eps = _data()
    with pytest.raises(BadInputError):
        S.one_step_x0(z, eps, bad)


def test_unknown_prediction_type_refused():
    z, eps = _data()
    with pytest.raises(BadInputError, match="prediction type"):
        S.to_x0(eps, z, 0.5, "flow")
