"""ReVersion's steering loss and relation-focal timestep sampling against independent
references: a float64 loop over the InfoNCE sum, closed forms, and a histogram of draws."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from wadi_cli.errors import BadInputError
from wadi_cli.invert.losses import relation_focal_probabilities, sample_timesteps, steering_loss


def _reference_steer(r, pos, neg, tau):
    """−log(Σ_pos exp(cos/τ) / Σ_all exp(cos/τ)) as a plain float64 loop."""

    def cos(a, b):
        return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))

    top = sum(math.exp(cos(r, p) / tau) for p in pos)
    bottom = top + sum(math.exp(cos(r, n) / tau) for n in neg)
    return -math.log(top / bottom)


def test_steering_loss_matches_a_float64_loop():
    g = torch.Generator().manual_seed(3)
    r, pos, neg = torch.randn(7, generator=g), torch.randn(3, 7, generator=g), torch.randn(5, 7, generator=g)
    want = _reference_steer(r.double().numpy(), pos.double().numpy(), neg.double().numpy(), 0.13)
    got = steering_loss(r.double(), pos.double(), neg.double(), 0.13)
    assert got.dtype == torch.float64 and abs(float(got) - want) < 1e-12
    got32 = steering_loss(r, pos, neg, 0.13)  # float32 path
    assert abs(float(got32) - want) < 1e-4


def test_steering_loss_closed_forms_and_gradient_only_to_the_token():
    # r orthogonal to every word: all logits 0, L = log((P + N) / P)
    r = torch.tensor([1.0, 0.0, 0.0])
    pos = torch.tensor([[0.0, 2.0, 0.0], [0.0, 0.0, 3.0]])
    neg = torch.tensor([[0.0, -1.0, 0.0], [0.0, 0.0, -4.0], [0.0, 1.0, 1.0]])
    assert float(steering_loss(r, pos, neg, 0.07)) == pytest.approx(math.log(5 / 2), abs=1e-6)
    # no negatives: the positives are the whole denominator, L = 0
    assert float(steering_loss(torch.randn(4), torch.randn(2, 4), torch.zeros(0, 4), 0.07)) == pytest.approx(
        0.0
    )
    # the gradient pulls r toward the positive: one step along −∇ raises cos(r, p)
    r = torch.tensor([0.3, 1.0, 0.2], requires_grad=True)
    p, n = torch.randn(1, 3), torch.randn(4, 3)
    p.requires_grad_(True)
    steering_loss(r, p, n, 0.5).backward()
    assert p.grad is None and r.grad is not None
    cos = torch.nn.functional.cosine_similarity
    step, r, p = 0.05 * r.grad.detach(), r.detach(), p.detach()
    assert float(cos((r - step).reshape(1, -1), p)) > float(cos(r.reshape(1, -1), p))
    with pytest.raises(BadInputError):
        steering_loss(r, torch.zeros(0, 3), n, 0.5)


def test_relation_focal_probabilities_closed_form():
    T, alpha = 1000, 0.3
    p = relation_focal_probabilities(T, alpha).numpy()
    f = np.array([(1 - alpha * math.cos(math.pi * t / T)) / T for t in range(T)])
    assert np.allclose(p, f / f.sum(), rtol=0, atol=1e-15) and abs(p.sum() - 1) < 1e-12
    # the paper's claim: high-noise steps are favoured, by (1 + α)/(1 − α) at the ends
    assert p[-1] / p[0] == pytest.approx((1 - alpha * math.cos(math.pi * (T - 1) / T)) / (1 - alpha))
    assert np.all(np.diff(p) > 0)
    assert np.allclose(relation_focal_probabilities(T, 0.0).numpy(), 1 / T)
    with pytest.raises(BadInputError):
        relation_focal_probabilities(T, 1.5)


def test_sampled_timesteps_follow_the_density():
    """A histogram of 400k draws in 20 bins against the density's bin masses: every bin within
    5 standard errors (binomial), and the mean within 5 standard errors of E[t]."""
    T, alpha, n = 1000, 0.6, 400_000
    p = relation_focal_probabilities(T, alpha)
    t = sample_timesteps(p, n, torch.Generator().manual_seed(11)).numpy()
    assert t.min() >= 0 and t.max() <= T - 1
    counts = np.bincount(t // 50, minlength=20) / n
    masses = p.numpy().reshape(20, 50).sum(axis=1)
    se = np.sqrt(masses * (1 - masses) / n)
    assert np.all(np.abs(counts - masses) < 5 * se), np.abs(counts - masses) / se
    ts = np.arange(T)
    mean, var = (
        float((p.numpy() * ts).sum()),
        float((p.numpy() * ts**2).sum()) - float((p.numpy() * ts).sum()) ** 2,
    )
    assert abs(t.mean() - mean) < 5 * math.sqrt(var / n)
    assert t.mean() > (T - 1) / 2 + 30  # skewed toward the noisy end (uniform: 499.5)
