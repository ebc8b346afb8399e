"""The DreamBooth loss (wadi_cli.finetune.losses) and the noisy latents it is computed on,
against float64 element-by-element references written from the formulas."""

from __future__ import annotations

import math

import pytest
import torch

from wadi_cli.diffusion import add_noise
from wadi_cli.finetune.losses import denoising_loss, denoising_target, dreambooth_loss


def _draw(seed: int = 3) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(3, 2, 2, 2, generator=g, dtype=torch.float64)
    eps = torch.randn(3, 2, 2, 2, generator=g, dtype=torch.float64)
    ab = torch.tensor([0.91, 0.37, 0.0047], dtype=torch.float64)
    return x0, eps, ab


def test_noisy_latents_are_the_forward_process_element_by_element():
    x0, eps, ab = _draw()
    x_t = add_noise(x0, eps, ab)
    for i in range(3):
        a, s = math.sqrt(float(ab[i])), math.sqrt(1.0 - float(ab[i]))
        for j, (x, e) in enumerate(zip(x0[i].flatten().tolist(), eps[i].flatten().tolist(), strict=True)):
            assert float(x_t[i].flatten()[j]) == pytest.approx(a * x + s * e, rel=1e-14, abs=1e-15)


def test_targets_of_each_prediction_type():
    x0, eps, ab = _draw()
    assert torch.equal(denoising_target(x0, eps, ab, "epsilon"), eps)
    assert torch.equal(denoising_target(x0, eps, ab, "sample"), x0)
    v = denoising_target(x0, eps, ab, "v_prediction")
    for i in range(3):
        a, s = math.sqrt(float(ab[i])), math.sqrt(1.0 - float(ab[i]))
        for j, (x, e) in enumerate(zip(x0[i].flatten().tolist(), eps[i].flatten().tolist(), strict=True)):
            assert float(v[i].flatten()[j]) == pytest.approx(a * e - s * x, rel=1e-13, abs=1e-15)
    # and v is consistent with the schedule: x0 = sqrt(ab) x_t - sqrt(1 - ab) v
    x_t = add_noise(x0, eps, ab)
    back = ab.sqrt().view(-1, 1, 1, 1) * x_t - (1 - ab).sqrt().view(-1, 1, 1, 1) * v
    assert torch.allclose(back, x0, atol=1e-12)


def test_dreambooth_loss_is_instance_plus_lambda_prior():
    g = torch.Generator().manual_seed(5)
    pred = torch.randn(5, 3, 2, 2, generator=g, dtype=torch.float64)
    target = torch.randn(5, 3, 2, 2, generator=g, dtype=torch.float64)
    lam = 0.37

    def mse(rows: range) -> float:
        values = [
            (float(p) - float(t)) ** 2
            for r in rows
            for p, t in zip(pred[r].flatten(), target[r].flatten(), strict=True)
        ]
        return sum(values) / len(values)

    total, inst, prior = dreambooth_loss(pred, target, 2, lam)
    assert float(inst) == pytest.approx(mse(range(2)), rel=1e-13)
    assert prior is not None and float(prior) == pytest.approx(mse(range(2, 5)), rel=1e-13)
    assert float(total) == pytest.approx(mse(range(2)) + lam * mse(range(2, 5)), rel=1e-13)
    alone, inst2, none = dreambooth_loss(pred, target, 5, lam)
    assert none is None and float(alone) == float(inst2) == pytest.approx(mse(range(5)), rel=1e-13)
    assert float(denoising_loss(pred, target)) == pytest.approx(mse(range(5)), rel=1e-13)
