"""The student's EMA (wadi_cli.distill.ema) against a closed form, and its state round trip."""

from __future__ import annotations

import pytest
import torch

from wadi_cli.distill.ema import EMA
from wadi_cli.errors import MismatchError


def test_steps_follow_the_closed_form_in_float32():
    """Starting at e0 and folding in a constant v n times: d^n·e0 + (1 − d^n)·v (float64
    reference); bf16 inputs are averaged in float32."""
    d, n = 0.7, 5
    e0 = {"a.lorad_A": torch.tensor([[1.0, -2.0]], dtype=torch.bfloat16), "b": torch.tensor([3.0])}
    v = {"a.lorad_A": torch.tensor([[0.5, 4.0]], dtype=torch.bfloat16), "b": torch.tensor([-1.0])}
    ema = EMA(e0, d)
    for _ in range(n):
        ema.step(v)
    assert ema.optimization_step == n
    for k in e0:
        want = d**n * e0[k].double() + (1 - d**n) * v[k].double()
        assert ema.shadow[k].dtype == torch.float32
        torch.testing.assert_close(ema.shadow[k].double(), want, rtol=1e-6, atol=1e-6)
    assert e0["b"].item() == 3.0  # the start tensors are copied, not averaged in place


def test_state_dict_round_trip_and_copy_to():
    ema = EMA({"w": torch.tensor([1.0, 2.0])}, 0.9)
    ema.step({"w": torch.tensor([3.0, -4.0])})
    state = ema.state_dict()
    other = EMA({"w": torch.zeros(2)}, 0.5)
    other.load_state_dict(state)
    assert (other.decay, other.optimization_step) == (0.9, 1)
    assert torch.equal(other.shadow["w"], ema.shadow["w"])
    other.step({"w": torch.zeros(2)})
    assert not torch.equal(other.shadow["w"], ema.shadow["w"])  # loaded tensors are copies
    target = {"w": torch.zeros(2, dtype=torch.float64)}
    ema.copy_to(target)
    assert target["w"].dtype == torch.float64
    torch.testing.assert_close(target["w"], torch.tensor([1.2, 1.4], dtype=torch.float64))
    weights = ema.weights()
    weights["w"].zero_()
    assert ema.shadow["w"].abs().sum() > 0


def test_copy_to_refuses_other_keys():
    ema = EMA({"w": torch.ones(2)}, 0.9)
    with pytest.raises(MismatchError, match="EMA does not fit"):
        ema.copy_to({"v": torch.zeros(2)})
