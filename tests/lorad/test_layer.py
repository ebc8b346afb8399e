"""LoRaD layer invariants against an independent float64 reference (WaDi §2).

The reference builds, for every row, the explicit n×n block-diagonal rotation matrix
and multiplies, in float64 numpy: a different formulation from the pair-slicing code
under test."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _helpers_lorad import CountMatmuls, f64, reference_rotate
from torch import nn
from torch.func import functional_call

from wadi_cli.errors import BadInputError
from wadi_cli.lorad import LoRaDConfig, LoRaDLinear, load_adapter, lorad_theta, rotate_weight, save_adapter
from wadi_cli.lorad.model import get_adapter_state_dict, inject_lorad, load_adapter_state_dict

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(6, 8), (5, 2), (16, 34)]  # (out m, in n)
RANKS = [1, 4]
# Relative tolerance of one rounding to the base dtype.
EPS = {torch.float32: 2e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3, torch.float64: 1e-12}


def make_layer(
    m: int, n: int, rank: int, dtype: torch.dtype, seed: int = 0, random_a: bool = True
) -> LoRaDLinear:
    torch.manual_seed(seed)
    base = nn.Linear(n, m).to(dtype)
    layer = LoRaDLinear(base, rank, name="blk.lin", generator=torch.Generator().manual_seed(seed))
    if random_a:
        with torch.no_grad():
            layer.lorad_A.normal_(0.0, 0.7)
    return layer


@pytest.mark.parametrize("m,n", SHAPES)
def test_rotate_weight_matches_reference_fp64(m, n):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(m, n, dtype=torch.float64, generator=g)
    th = torch.randn(m, n // 2, dtype=torch.float64, generator=g) * 3
    np.testing.assert_allclose(
        f64(rotate_weight(w, th)), reference_rotate(f64(w), f64(th)), rtol=0, atol=1e-12
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,n", SHAPES)
@pytest.mark.parametrize("rank", RANKS)
class TestInvariants:
    def test_adapter_params_fp32_and_identity_at_init(self, dtype, m, n, rank):
        layer = make_layer(m, n, rank, dtype, random_a=False)
        assert layer.lorad_A.dtype == layer.lorad_B.dtype == torch.float32
        assert tuple(layer.lorad_A.shape) == (m, rank) and tuple(layer.lorad_B.shape) == (rank, n // 2)
        assert torch.count_nonzero(layer.lorad_A) == 0 and torch.count_nonzero(layer.lorad_B) > 0
        bound = (6.0 / (rank + n // 2)) ** 0.5  # Xavier-uniform bound
        assert layer.lorad_B.abs().max() <= bound
        x = torch.randn(3, n).to(dtype)
        assert torch.equal(layer(x), layer.base_layer(x))  # bit-identical at step 0

    def test_effective_weight_and_norms_vs_reference(self, dtype, m, n, rank):
        layer = make_layer(m, n, rank, dtype)
        w = f64(layer.base_layer.weight)
        ref = reference_rotate(w, f64(layer.lorad_A) @ f64(layer.lorad_B))
        got = f64(layer.effective_weight(torch.float64))  # rotation computed in fp32, not rounded to dtype
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5 * np.abs(w).max())
        # Row norms and every pair norm are preserved (independent of the reference).
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), np.linalg.norm(w, axis=1), rtol=1e-5)
        pair = lambda a: np.hypot(a[:, 0::2], a[:, 1::2])  # noqa: E731
        np.testing.assert_allclose(pair(got), pair(w), rtol=1e-5, atol=1e-7)
        # Returned in the base dtype by default: one rounding of the fp32 result.
        stored = layer.effective_weight()
        assert stored.dtype == dtype
        np.testing.assert_allclose(f64(stored), ref, rtol=EPS[dtype], atol=EPS[dtype] * np.abs(w).max())

    def test_forward_and_merged_match_reference_output(self, dtype, m, n, rank):
        layer = make_layer(m, n, rank, dtype)
        x = torch.randn(4, 3, n).to(dtype)
        w = reference_rotate(f64(layer.base_layer.weight), f64(layer.lorad_A) @ f64(layer.lorad_B))
        ref = f64(x) @ w.T + f64(layer.base_layer.bias)
        scale = np.abs(f64(x)).sum(-1, keepdims=True) * np.abs(w).max() + 1
        adapted = layer(x)
        assert adapted.dtype == dtype
        tol = 4 * EPS[dtype] * scale
        assert (np.abs(f64(adapted) - ref) < tol).all()
        layer.merge()
        assert layer.merged
        merged = layer(x)
        assert (np.abs(f64(merged) - ref) < tol).all()
        assert (np.abs(f64(merged) - f64(adapted)) < tol).all()

    def test_unmerge_after_merge_is_identity(self, dtype, m, n, rank):
        layer = make_layer(m, n, rank, dtype)
        before = layer.base_layer.weight.detach().clone()
        layer.merge()
        assert not torch.equal(layer.base_layer.weight, before)
        layer.merge()  # idempotent
        layer.unmerge()
        assert not layer.merged
        after = layer.base_layer.weight
        assert after.dtype == dtype
        # merged weight was rounded once to dtype, then rotated back (rounded again)
        tol = 3 * EPS[dtype] * before.abs().max().item()
        assert np.abs(f64(after) - f64(before)).max() <= tol

    def test_save_load_round_trip(self, dtype, m, n, rank, tmp_path):
        layer = make_layer(m, n, rank, dtype)
        model = nn.Sequential(nn.Module())
        model[0].lin = layer
        tensors = get_adapter_state_dict(model)
        assert set(tensors) == {"0.lin.lorad_A", "0.lin.lorad_B"}
        path = save_adapter(tmp_path / "a.safetensors", tensors, LoRaDConfig(rank=rank, role="fake"))
        loaded, cfg = load_adapter(path)
        assert cfg.rank == rank and cfg.role == "fake" and cfg.targets == ("0.lin",)
        fresh = nn.Sequential(nn.Module())
        fresh[0].lin = LoRaDLinear(layer.base_layer, rank)  # same frozen base, new adapter
        assert not torch.equal(fresh[0].lin.lorad_A, layer.lorad_A)
        load_adapter_state_dict(fresh, loaded)
        x = torch.randn(2, n).to(dtype)
        assert torch.equal(fresh[0].lin(x), layer(x))


@pytest.mark.parametrize("m,n,rank", [(3, 4, 2), (4, 6, 1)])
def test_gradcheck_A_and_B_fp64(m, n, rank):
    layer = make_layer(m, n, rank, torch.float64)
    a = layer.lorad_A.detach().double().requires_grad_(True)
    b = layer.lorad_B.detach().double().requires_grad_(True)
    x = torch.randn(5, n, dtype=torch.float64)

    def f(a_, b_):
        return functional_call(layer, {"lorad_A": a_, "lorad_B": b_}, (x,))

    assert torch.autograd.gradcheck(f, (a, b))
    # also at A = 0 (where training starts: dL/dA is non-zero, dL/dB is zero)
    assert torch.autograd.gradcheck(f, (torch.zeros_like(a, requires_grad=True), b))


def test_gradcheck_rotate_weight_in_weight_and_theta():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(3, 6, dtype=torch.float64, generator=g, requires_grad=True)
    th = torch.randn(3, 3, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(rotate_weight, (w, th))


def naive_rotate(w: torch.Tensor, th: torch.Tensor) -> torch.Tensor:
    """Plain-autograd version (no custom backward) for comparing gradients."""
    c, s = torch.cos(th), torch.sin(th)
    w0, w1 = w[:, 0::2], w[:, 1::2]
    return torch.stack((c * w0 - s * w1, s * w0 + c * w1), -1).flatten(1)


@pytest.mark.parametrize("dtype", DTYPES)
def test_gradients_match_plain_autograd_fp64(dtype):
    layer = make_layer(8, 10, 3, dtype)
    x = torch.randn(4, 10).to(dtype)
    layer(x).float().pow(2).sum().backward()
    assert layer.lorad_A.grad.dtype == torch.float32 and layer.base_layer.weight.grad is None
    a = layer.lorad_A.detach().double().requires_grad_(True)
    b = layer.lorad_B.detach().double().requires_grad_(True)
    w = naive_rotate(layer.base_layer.weight.double(), a @ b)
    y = F.linear(x.double(), w, layer.base_layer.bias.double())
    y.pow(2).sum().backward()
    tol = 50 * EPS[dtype]
    for got, ref in ((layer.lorad_A.grad, a.grad), (layer.lorad_B.grad, b.grad)):
        np.testing.assert_allclose(f64(got), f64(ref), rtol=tol, atol=tol * ref.abs().max().item())


@pytest.mark.parametrize("bad_in", [7, 1])
def test_odd_in_features_refused_with_layer_name(bad_in):
    with pytest.raises(BadInputError, match=rf"down_blocks\.0\.proj.*in_features={bad_in} is odd"):
        LoRaDLinear(nn.Linear(bad_in, 4), 2, name="down_blocks.0.proj")
    model = nn.Module()
    model.proj = nn.Linear(bad_in, 4)
    with pytest.raises(BadInputError, match="odd"):
        inject_lorad(model, ["proj"], 2)
    assert isinstance(model.proj, nn.Linear)  # nothing replaced
    with pytest.raises(BadInputError, match="even"):
        rotate_weight(torch.zeros(2, bad_in), torch.zeros(2, bad_in // 2))


def test_bad_rank_and_theta_shape_refused():
    with pytest.raises(BadInputError, match="rank"):
        LoRaDLinear(nn.Linear(4, 4), 0)
    with pytest.raises(BadInputError, match="nn.Linear"):
        LoRaDLinear(nn.Conv2d(4, 4, 1), 2)  # type: ignore[arg-type]
    with pytest.raises(BadInputError, match=r"\[m, n/2\]"):
        rotate_weight(torch.zeros(3, 4), torch.zeros(3, 4))


@pytest.mark.parametrize("dtype", DTYPES)
def test_one_matmul_with_the_input_per_forward(dtype, monkeypatch):
    layer = make_layer(12, 16, 4, dtype)

    def forbidden(*a, **k):
        raise AssertionError("the base layer's forward must not run")

    monkeypatch.setattr(layer.base_layer, "forward", forbidden)
    x = torch.randn(2, 5, 16).to(dtype)
    with CountMatmuls() as counter:
        layer(x)
    # exactly two matmuls: Θ = A B ([12,4]@[4,8]) and x W'ᵀ; only the latter touches x
    assert len(counter.calls) == 2, counter.calls
    with_x = [c for c in counter.calls if any(s[-1] == 16 and len(s) and s[0] == 10 for s in c[1])]
    assert len(with_x) == 1, counter.calls
    layer.merge()
    with CountMatmuls() as counter:
        layer(x)
    assert len(counter.calls) == 1, counter.calls


def test_autocast_keeps_adapter_maths_fp32():
    layer = make_layer(6, 8, 2, torch.float32)
    x = torch.randn(3, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer.theta().dtype == torch.float32
        y = layer(x)
    assert y.dtype == torch.bfloat16
    ref = F.linear(x, layer.effective_weight(), layer.base_layer.bias)
    torch.testing.assert_close(y.float(), ref, rtol=2e-2, atol=2e-2)


def test_lorad_theta_is_A_at_B():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 3, generator=g), torch.randn(3, 4, generator=g)
    np.testing.assert_allclose(f64(lorad_theta(a, b)), f64(a) @ f64(b), rtol=1e-6, atol=1e-6)
    assert lorad_theta(a.half(), b.half()).dtype == torch.float32
