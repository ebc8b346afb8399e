"""VSD losses (WaDi §4) against slow, obvious float64 references."""

from __future__ import annotations

import itertools

import pytest
import torch

from wadi_cli.distill.losses import fake_score_loss, generator_loss, guided_eps, regression_loss, vsd_gradient


def _data(seed: int = 0, shape=(3, 2, 4, 4)):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(shape, generator=g, dtype=torch.float64)
    e_real = torch.randn(shape, generator=g, dtype=torch.float64)
    e_fake = torch.randn(shape, generator=g, dtype=torch.float64)
    ab = torch.rand(shape[0], generator=g, dtype=torch.float64) * 0.9 + 0.05
    return x0, e_real, e_fake, ab


def test_guided_eps_matches_formula_elementwise():
    _, u, c, _ = _data(1)
    out = guided_eps(u, c, 1.5)
    for idx in itertools.islice(itertools.product(*map(range, u.shape)), 50):
        assert out[idx].item() == pytest.approx(
            u[idx].item() + 1.5 * (c[idx].item() - u[idx].item()), abs=1e-12
        )
    torch.testing.assert_close(guided_eps(u, c, 1.0), c, rtol=0, atol=1e-14)  # w = 1: conditional


def test_vsd_gradient_matches_slow_loop_and_zeroes_nans():
    _, er, ef, ab = _data(2)
    er[0, 0, 0, 0] = float("nan")
    g = vsd_gradient(er, ef, ab)
    for b, c, h, w in itertools.product(*map(range, er.shape)):
        if (b, c, h, w) == (0, 0, 0, 0):
            assert g[b, c, h, w].item() == 0.0
            continue
        ref = (1.0 - ab[b].item()) * (er[b, c, h, w].item() - ef[b, c, h, w].item())
        assert g[b, c, h, w].item() == pytest.approx(ref, abs=1e-12)
    assert not g.requires_grad


def test_generator_loss_gradient_is_g_over_numel():
    x0, er, ef, ab = _data(3)
    x0 = x0.clone().requires_grad_(True)
    g = vsd_gradient(er, ef, ab)
    loss = generator_loss(x0, g)
    (grad,) = torch.autograd.grad(loss, x0)
    torch.testing.assert_close(grad, g / x0.numel(), rtol=0, atol=1e-15)
    # value: ½ mean(g²), independent of x0
    ref = 0.5 * sum(v * v for v in g.flatten().tolist()) / g.numel()
    assert loss.item() == pytest.approx(ref, rel=1e-12)


def test_generator_loss_float32_gradient_matches_float64():
    x0, er, ef, ab = _data(4)
    g64 = vsd_gradient(er, ef, ab)
    x32 = x0.float().requires_grad_(True)
    (grad,) = torch.autograd.grad(generator_loss(x32, g64.float()), x32)
    torch.testing.assert_close(grad.double(), g64 / x0.numel(), rtol=1e-5, atol=1e-9)


def test_fake_score_loss_matches_slow_loop():
    _, pred, eps, ab = _data(5)
    loss = fake_score_loss(pred, eps, ab)
    total, n = 0.0, 0
    for b, c, h, w in itertools.product(*map(range, pred.shape)):
        s = ab[b].item() ** 0.5
        total += (s * pred[b, c, h, w].item() - s * eps[b, c, h, w].item()) ** 2
        n += 1
    assert loss.item() == pytest.approx(total / n, rel=1e-12)
    assert fake_score_loss(eps, eps, ab).item() == 0.0


def test_fake_score_loss_gradient_flows_to_prediction_only():
    _, pred, eps, ab = _data(6)
    pred = pred.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(fake_score_loss(pred, eps, ab), pred)
    ref = 2 * ab.reshape(-1, 1, 1, 1) * (pred.detach() - eps) / pred.numel()
    torch.testing.assert_close(grad, ref, rtol=1e-12, atol=1e-15)


def test_regression_loss_matches_slow_loop_in_at_least_float32():
    x0, target, _, _ = _data(7)
    total = sum((a - b) ** 2 for a, b in zip(x0.flatten().tolist(), target.flatten().tolist(), strict=True))
    assert regression_loss(x0, target).item() == pytest.approx(total / x0.numel(), rel=1e-12)
    assert regression_loss(x0, target.float()).dtype == torch.float64  # a float64 student stays float64
    assert regression_loss(x0.to(torch.bfloat16), target.float()).dtype == torch.float32
