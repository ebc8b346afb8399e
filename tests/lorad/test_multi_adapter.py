"""One base, two switchable LoRaD adapters: teacher / student / fake selection, one matmul
per forward, and the export format (``<path>.lorad_A/B``) merging back exactly."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from wadi_cli.errors import BadInputError, MismatchError
from wadi_cli.lorad import LoRaDLinear, merge_adapter_into_state_dict
from wadi_cli.lorad.multi_adapter import (
    MultiAdapterLinear,
    adapter_parameters,
    adapter_state_dict,
    adapter_targets,
    add_switchable_adapter,
    load_adapter_tensors,
    merged_state_dict,
    use_adapter,
)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 8)
        self.b = nn.Sequential(nn.Linear(8, 4), nn.GELU(), nn.Linear(4, 6))

    def forward(self, x):
        return self.b(self.a(x))


def _randomise(model: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, LoRaDLinear):
                layer.lorad_A.copy_(torch.randn(layer.lorad_A.shape, generator=g) * 0.3)


def _setup(dtype=torch.float64):
    torch.manual_seed(0)
    net = Net().to(dtype)
    plain = Net().to(dtype)
    plain.load_state_dict(net.state_dict())
    add_switchable_adapter(net, "student", ["a", "b.0", "b.2"], 3, init_seed=1)
    add_switchable_adapter(net, "fake", ["a", "b.2"], 2, init_seed=2)
    _randomise(net, 7)
    return net, plain


def test_teacher_mode_is_the_base_and_adapters_differ():
    net, plain = _setup()
    x = torch.randn(5, 6, dtype=torch.float64)
    with use_adapter(net, None):
        torch.testing.assert_close(net(x), plain(x), rtol=0, atol=0)
    with use_adapter(net, "student"):
        ys = net(x)
    with use_adapter(net, "fake"):
        yf = net(x)
    assert not torch.allclose(ys, plain(x)) and not torch.allclose(yf, ys)
    assert all(layer.active is None for layer in net.modules() if isinstance(layer, MultiAdapterLinear))


def test_active_adapter_equals_merged_reference_in_float64():
    """Student output == the plain network with every student weight replaced by R(AB)W,
    computed independently from the exported tensors."""
    net, plain = _setup()
    x = torch.randn(5, 6, dtype=torch.float64)
    for name in ("student", "fake"):
        tensors = adapter_state_dict(net, name)
        ref = Net().to(torch.float64)
        ref.load_state_dict(merge_adapter_into_state_dict(plain.state_dict(), tensors))
        with use_adapter(net, name):
            # Θ = AB is formed in fp32 inside the layer (fp32 adapters), in fp64 by the merge
            torch.testing.assert_close(net(x), ref(x), rtol=1e-6, atol=1e-7)


def test_export_keys_targets_and_parameter_counts():
    net, _ = _setup()
    assert sorted(adapter_state_dict(net, "student")) == sorted(
        f"{p}.lorad_{s}" for p in ("a", "b.0", "b.2") for s in "AB"
    )
    assert adapter_targets(net, "fake") == ["a", "b.2"]
    # r · (out + in/2) per layer
    assert sum(p.numel() for p in adapter_parameters(net, "student")) == 3 * ((8 + 3) + (4 + 4) + (6 + 2))
    assert sum(p.numel() for p in adapter_parameters(net, "fake")) == 2 * ((8 + 3) + (6 + 2))
    assert all(p.dtype == torch.float32 for p in adapter_parameters(net, "student"))


def test_gradients_reach_only_the_active_adapter():
    net, _ = _setup(torch.float32)
    for p in adapter_parameters(net, "student") + adapter_parameters(net, "fake"):
        p.requires_grad_(True)
    with use_adapter(net, "student"):
        net(torch.randn(4, 6)).square().sum().backward()
    assert all(p.grad is not None for p in adapter_parameters(net, "student"))
    assert all(p.grad is None for p in adapter_parameters(net, "fake"))
    assert all(p.grad is None for n, p in net.named_parameters() if "lorad" not in n)


def test_one_matmul_per_adapted_layer_per_forward():
    net, _ = _setup(torch.float32)
    calls = []
    real = torch.nn.functional.linear

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    x = torch.randn(4, 6)
    for name in (None, "student", "fake"):
        calls.clear()
        with use_adapter(net, name), pytest.MonkeyPatch.context() as mp:
            mp.setattr(torch.nn.functional, "linear", counting)
            import wadi_cli.lorad.layer as layer_mod

            mp.setattr(layer_mod.F, "linear", counting)
            net(x)
        assert len(calls) == 3, name  # three Linears, one matmul each


def test_load_adapter_tensors_round_trip_and_mismatch():
    net, _ = _setup()
    saved = {k: v.clone() for k, v in adapter_state_dict(net, "student").items()}
    other, _ = _setup()
    _randomise(other, 99)
    load_adapter_tensors(other, "student", saved)
    for k, v in adapter_state_dict(other, "student").items():
        assert torch.equal(v, saved[k])
    with pytest.raises(MismatchError):
        load_adapter_tensors(other, "fake", saved)


def test_bad_targets_are_refused():
    with pytest.raises(BadInputError):
        add_switchable_adapter(Net(), "student", ["nope"], 2)
    with pytest.raises(BadInputError):
        add_switchable_adapter(Net(), "student", ["b.1"], 2)


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_peft_baselines_on_the_shared_base(kind):
    """LoRA / DoRA students (peft) next to a LoRaD fake on one base: identity at init,
    trainable counts, and the probed merged weights reproduce the adapted forward."""
    torch.manual_seed(0)
    net = Net().to(torch.float64)
    plain = Net().to(torch.float64)
    plain.load_state_dict(net.state_dict())
    add_switchable_adapter(net, "student", ["a", "b.0", "b.2"], 2, init_seed=1, kind=kind)
    add_switchable_adapter(net, "fake", ["a"], 2, init_seed=2)
    x = torch.randn(5, 6, dtype=torch.float64)
    with use_adapter(net, "student"):
        torch.testing.assert_close(net(x), plain(x), rtol=1e-6, atol=1e-6)  # B = 0 at init
    shapes = [(8, 6), (4, 8), (6, 4)]
    expected = sum(2 * (m + n) + (m if kind == "dora" else 0) for m, n in shapes)
    params = adapter_parameters(net, "student")
    assert sum(p.numel() for p in params) == expected and all(p.dtype == torch.float32 for p in params)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=g) * 0.2)
    ref = Net().to(torch.float64)
    ref.load_state_dict(merged_state_dict(net, "student"), strict=True)
    with use_adapter(net, "student"):
        y = net(x)
    assert not torch.allclose(y, plain(x))
    torch.testing.assert_close(ref(x), y, rtol=1e-5, atol=1e-6)
    # the same seed gives the same initialisation
    torch.manual_seed(5)
    again = Net().to(torch.float64)
    add_switchable_adapter(again, "student", ["a", "b.0", "b.2"], 2, init_seed=1, kind=kind)
    torch.manual_seed(5)
    fresh = Net().to(torch.float64)
    add_switchable_adapter(fresh, "student", ["a", "b.0", "b.2"], 2, init_seed=1, kind=kind)
    for k, v in adapter_state_dict(again, "student").items():
        assert torch.equal(v, adapter_state_dict(fresh, "student")[k])


def test_a_new_kind_is_one_entry_in_the_kind_table(monkeypatch):
    """Adapter kinds are looked up in lorad.kinds.ADAPTER_KINDS: a kind added there is wired,
    selected, exported and refused by name like the shipped ones."""
    from wadi_cli.lorad import kinds

    class Scale(nn.Module):  # y = base(x) · (1 + s), s = 0 at init
        adapter_param_names = ("scale_s",)

        def __init__(self, base: nn.Linear) -> None:
            super().__init__()
            self.base_layer = base
            self.scale_s = nn.Parameter(torch.zeros(base.out_features))

        def forward(self, x):
            return self.base_layer(x) * (1 + self.scale_s)

    monkeypatch.setitem(kinds.ADAPTER_KINDS, "scale", lambda base, rank, label, g: Scale(base))
    torch.manual_seed(3)
    net = Net()
    x = torch.randn(2, 6)
    teacher = net(x)
    add_switchable_adapter(net, "student", ["a", "b.2"], rank=1, kind="scale")
    assert sorted(adapter_state_dict(net, "student")) == ["a.scale_s", "b.2.scale_s"]
    with torch.no_grad():
        adapter_parameters(net, "student")[0].fill_(0.25)
    with use_adapter(net, "student"):
        got = net(x)
    want = net.b(net.a.base_layer(x) * 1.25)
    torch.testing.assert_close(got, want)
    assert not torch.allclose(got, teacher)
    with pytest.raises(
        BadInputError,
        match="unknown adapter kind .nope.; expected lorad, lora, dora, dora-frozen-norm, orthogonal or sc",
    ):
        add_switchable_adapter(net, "fake", ["a"], rank=1, kind="nope")
