"""The ``orthogonal`` and ``dora-frozen-norm`` adapter kinds against independent references:
torch's orthogonal maps re-derived by hand in numpy/scipy (float64), row norms kept by the
merged weight, the frozen DoRA magnitude, and parameter counts counted by hand."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import scipy.linalg
import torch
from torch import nn

from wadi_cli.backbones.registry import adapter_params
from wadi_cli.errors import BadInputError
from wadi_cli.lorad.kinds import DORA_DIRECTION_PARAMS
from wadi_cli.lorad.multi_adapter import (
    adapter_parameters,
    adapter_state_dict,
    add_switchable_adapter,
    load_adapter_tensors,
    merged_state_dict,
    switchable_layers,
    use_adapter,
)
from wadi_cli.lorad.orthogonal import ORTHOGONAL_MAPS, OrthogonalLinear

SHAPES = {"a": (8, 6), "b.0": (4, 8), "b.2": (6, 4)}  # (out, in) of Net's Linears


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 8)
        self.b = nn.Sequential(nn.Linear(8, 4), nn.GELU(), nn.Linear(4, 6))

    def forward(self, x):
        return self.b(self.a(x))


def _reference_q(x: np.ndarray, orthogonal_map: str) -> np.ndarray:
    """Q from the trained square matrix X, as torch documents its maps (float64, by hand):
    skew A = L − Lᵀ from the strict lower triangle L; matrix_exp: expm(A); cayley:
    (I − A/2)⁻¹ (I + A/2); householder: H_1 ⋯ H_n with H_i = I − τ_i v_i v_iᵀ,
    v_i = e_i + (column i of L), τ_i = 2 / ‖v_i‖², each column times the sign of X_ii."""
    n = x.shape[0]
    low = np.tril(x, -1)
    if orthogonal_map == "matrix_exp":
        return scipy.linalg.expm(low - low.T)
    if orthogonal_map == "cayley":
        a, eye = low - low.T, np.eye(n)
        return np.linalg.solve(eye - a / 2, eye + a / 2)
    q = np.eye(n)
    for i in range(n):
        v = np.eye(n)[:, i] + low[:, i]
        q = q @ (np.eye(n) - 2.0 / (v @ v) * np.outer(v, v))
    return q * np.trunc(np.diag(x))[None, :]


def _randomise_original(layer: OrthogonalLinear, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    p = layer.rotation.parametrizations.weight.original
    with torch.no_grad():  # the diagonal keeps its −1 (householder's signs)
        p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype).tril(-1) * 0.37)


@pytest.mark.parametrize("orthogonal_map", ORTHOGONAL_MAPS)
def test_orthogonal_map_matches_the_hand_reference_and_keeps_row_norms(orthogonal_map):
    torch.manual_seed(1)
    base = nn.Linear(6, 5).double()
    layer = OrthogonalLinear(base, orthogonal_map).double()
    x = torch.randn(3, 6, dtype=torch.float64)
    torch.testing.assert_close(layer.orthogonal_matrix(), torch.eye(6, dtype=torch.float64))  # identity
    torch.testing.assert_close(layer(x), base(x))
    _randomise_original(layer, 7)
    original = layer.rotation.parametrizations.weight.original.detach().numpy()
    q_ref = _reference_q(original, orthogonal_map)
    q = layer.orthogonal_matrix().detach()
    np.testing.assert_allclose(q.numpy(), q_ref, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(q_ref.T @ q_ref, np.eye(6), atol=1e-12)  # orthogonal
    assert np.abs(q_ref - np.eye(6)).max() > 0.1  # and not the identity
    w = base.weight.detach().numpy()
    merged = w @ q_ref
    np.testing.assert_allclose(np.linalg.norm(merged, axis=1), np.linalg.norm(w, axis=1), rtol=1e-12)
    want = x.numpy() @ merged.T + base.bias.detach().numpy()
    np.testing.assert_allclose(layer(x).detach().numpy(), want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("orthogonal_map", ORTHOGONAL_MAPS)
def test_orthogonal_kind_trains_exports_and_reloads(orthogonal_map):
    """On the shared base: counts n² per layer, an AdamW step moves Q and keeps it orthogonal,
    the probed merged weight is W·Q with row norms kept, and the tensors reload exactly."""
    torch.manual_seed(2)
    teacher = Net().double()
    net, fresh = copy.deepcopy(teacher), copy.deepcopy(teacher)
    options = {"orthogonal_map": orthogonal_map}
    add_switchable_adapter(net, "student", list(SHAPES), 3, kind="orthogonal", options=options)
    net.double()  # the adapter too (built fp32): float64 references
    params = adapter_parameters(net, "student")
    assert sum(p.numel() for p in params) == 6 * 6 + 8 * 8 + 4 * 4
    assert sum(adapter_params("orthogonal", 3, *s) for s in SHAPES.values()) == 116
    opt = torch.optim.AdamW(params, lr=0.05, weight_decay=0.0)
    x = torch.randn(7, 6, dtype=torch.float64)
    with use_adapter(net, "student"):
        for _ in range(3):
            loss = (net(x) - 1.5).pow(2).mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
    merged = merged_state_dict(net, "student")
    for path, layer in switchable_layers(net).items():
        q = layer.adapters["student"].orthogonal_matrix().detach()
        assert (q - torch.eye(q.shape[0], dtype=q.dtype)).abs().max() > 1e-3  # trained
        torch.testing.assert_close(q.T @ q, torch.eye(q.shape[0], dtype=q.dtype), atol=1e-12, rtol=0)
        w = layer.base_layer.weight.detach()
        torch.testing.assert_close(merged[f"{path}.weight"], w @ q, atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(merged[f"{path}.weight"].norm(dim=1), w.norm(dim=1), atol=0, rtol=1e-12)
    plain = Net().double()
    plain.load_state_dict(merged, strict=True)
    with use_adapter(net, "student"):
        torch.testing.assert_close(plain(x), net(x), atol=1e-12, rtol=1e-12)
    saved = adapter_state_dict(net, "student")
    assert sorted(saved) == sorted(f"{p}.rotation.parametrizations.weight.original" for p in SHAPES)
    add_switchable_adapter(fresh, "student", list(SHAPES), 3, kind="orthogonal", options=options)
    fresh.double()
    load_adapter_tensors(fresh, "student", saved)
    with use_adapter(fresh, "student"), use_adapter(net, "student"):
        assert torch.equal(fresh(x), net(x))


def test_orthogonal_map_is_checked():
    with pytest.raises(
        BadInputError, match="--orthogonal-map must be one of matrix_exp, cayley, householder"
    ):
        OrthogonalLinear(nn.Linear(4, 4), "qr")


def test_dora_frozen_norm_keeps_its_magnitude_and_moves_directions():
    """The magnitude stays at the base rows' norms after AdamW steps (not trained, not saved);
    A/B move; the merged rows have exactly the base norms (float64); counts r(m + n)."""
    torch.manual_seed(4)
    net = Net().double()
    add_switchable_adapter(net, "student", list(SHAPES), 2, init_seed=3, kind="dora-frozen-norm")
    net.double()  # the adapter too (built fp32): float64 references
    layers = switchable_layers(net)
    norms = {p: layer.base_layer.weight.detach().norm(dim=1).clone() for p, layer in layers.items()}
    magnitude = {
        p: layer.adapters["student"].lora_magnitude_vector["default"].weight for p, layer in layers.items()
    }
    for p in SHAPES:  # the magnitude starts at the base row norms (fp32 in peft's layer)
        torch.testing.assert_close(magnitude[p].detach().double(), norms[p], rtol=1e-6, atol=0)
    before = {p: m.detach().clone() for p, m in magnitude.items()}
    params = adapter_parameters(net, "student")
    assert sum(p.numel() for p in params) == sum(2 * (m + n) for m, n in SHAPES.values()) == 72
    assert sum(adapter_params("dora-frozen-norm", 2, *s) for s in SHAPES.values()) == 72
    assert sorted(adapter_state_dict(net, "student")) == sorted(
        f"{p}.{n}" for p in SHAPES for n in DORA_DIRECTION_PARAMS
    )
    direction = [p.detach().clone() for p in params]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=0.05, weight_decay=0.01)
    x = torch.randn(7, 6, dtype=torch.float64)
    with use_adapter(net, "student"):
        for _ in range(3):
            (net(x) - 0.8).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
    for p in SHAPES:
        assert torch.equal(magnitude[p].detach(), before[p])
        assert magnitude[p].grad is None
    assert all((p.detach() - d).abs().max() > 1e-3 for p, d in zip(params, direction, strict=True))
    merged = merged_state_dict(net, "student")
    for p, layer in layers.items():
        w = merged[f"{p}.weight"]
        assert (w - layer.base_layer.weight).abs().max() > 1e-3  # directions moved
        torch.testing.assert_close(w.norm(dim=1), magnitude[p].detach().double(), rtol=1e-12, atol=0)
