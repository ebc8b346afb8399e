"""Model-level LoRaD: inject / remove / merge, parameter selection, state-dict naming,
and the identity-at-init property on a small real UNet2DConditionModel."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from wadi_cli.backbones import get_backbone
from wadi_cli.errors import BadInputError, MismatchError
from wadi_cli.lorad import (
    LoRaDLinear,
    count_trainable,
    get_adapter_state_dict,
    get_base_state_dict,
    inject_lorad,
    load_adapter_state_dict,
    lorad_layers,
    lorad_parameters,
    mark_only_lorad_trainable,
    merge_lorad,
    remove_lorad,
    unmerge_lorad,
)


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.to_q = nn.Linear(8, 6)
        self.to_k = nn.Linear(8, 6, bias=False)
        self.conv = nn.Conv2d(2, 2, 1)
        self.out = nn.Sequential(nn.Linear(6, 10), nn.GELU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.to_q(x) * self.to_k(x))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([Block(), Block()])
        self.head = nn.Linear(10, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for b in self.blocks:
            x = self.head(b(x))
        return x


TARGETS = ["blocks.0.to_q", "blocks.0.to_k", "blocks.1.out.0", "head"]


def randomise(model: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lorad_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def test_inject_replaces_targets_and_is_identity():
    torch.manual_seed(0)
    model = Net()
    x = torch.randn(3, 8)
    before = model(x)
    names = inject_lorad(model, TARGETS, rank=3, init_seed=7)
    assert names == TARGETS
    assert list(lorad_layers(model)) == sorted(
        TARGETS, key=lambda n: [m for m, _ in model.named_modules()].index(n)
    )
    assert all(isinstance(model.get_submodule(n), LoRaDLinear) for n in TARGETS)
    assert isinstance(model.blocks[1].to_q, nn.Linear) and not isinstance(model.blocks[1].to_q, LoRaDLinear)
    assert torch.equal(model(x), before)
    assert all(
        not p.requires_grad for layer in lorad_layers(model).values() for p in layer.base_layer.parameters()
    )


def test_parameter_selection_and_counts():
    model = Net()
    inject_lorad(model, TARGETS, rank=3)
    params = lorad_parameters(model)
    layers = lorad_layers(model)
    assert len(params) == 2 * len(TARGETS)
    expected_ids = {id(getattr(ly, p)) for ly in layers.values() for p in ("lorad_A", "lorad_B")}
    assert {id(p) for p in params} == expected_ids
    # r · (m + n/2) per layer, from the shapes written above
    shapes = {"blocks.0.to_q": (6, 8), "blocks.0.to_k": (6, 8), "blocks.1.out.0": (10, 6), "head": (8, 10)}
    assert count_trainable(model) == sum(3 * (m + n // 2) for m, n in shapes.values())
    assert count_trainable(params[:2]) == 3 * 6 + 3 * 4
    trainable = mark_only_lorad_trainable(model)
    assert {id(p) for p in trainable} == expected_ids
    assert {id(p) for p in model.parameters() if p.requires_grad} == expected_ids


def test_init_seed_is_deterministic():
    m1, m2, m3 = Net(), Net(), Net()
    inject_lorad(m1, TARGETS, 2, init_seed=5)
    inject_lorad(m2, TARGETS, 2, init_seed=5)
    inject_lorad(m3, TARGETS, 2, init_seed=6)
    b1, b2, b3 = (get_adapter_state_dict(m)["head.lorad_B"] for m in (m1, m2, m3))
    assert torch.equal(b1, b2) and not torch.equal(b1, b3)


def test_inject_errors_leave_model_untouched():
    model = Net()
    with pytest.raises(BadInputError, match="not found.*blocks.9.to_q"):
        inject_lorad(model, ["head", "blocks.9.to_q"], 2)
    with pytest.raises(BadInputError, match="plain nn.Linear.*blocks.0.conv"):
        inject_lorad(model, ["head", "blocks.0.conv"], 2)
    assert not lorad_layers(model)
    inject_lorad(model, ["head"], 2)
    with pytest.raises(BadInputError, match="LoRaDLinear"):
        inject_lorad(model, ["head"], 2)
    with pytest.raises(BadInputError, match="no target"):
        inject_lorad(Net(), [], 2)


def test_remove_merge_and_unmerge():
    torch.manual_seed(1)
    model = Net()
    plain = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(4, 8)
    original = model(x)
    inject_lorad(model, TARGETS, 2)
    randomise(model)
    adapted = model(x)
    assert (adapted - original).abs().max() > 1e-3  # the adapter does change the output
    merge_lorad(model)
    torch.testing.assert_close(model(x), adapted, rtol=1e-5, atol=1e-5)
    unmerge_lorad(model)
    torch.testing.assert_close(model.blocks[0].to_q.base_layer.weight, plain["blocks.0.to_q.weight"])
    remove_lorad(model, merge=True)
    assert not lorad_layers(model) and set(model.state_dict()) == set(plain)
    torch.testing.assert_close(model(x), adapted, rtol=1e-5, atol=1e-5)

    model2 = Net()
    model2.load_state_dict(plain)
    inject_lorad(model2, TARGETS, 2)
    randomise(model2)
    merge_lorad(model2)
    remove_lorad(model2, merge=False)  # unmerges before unwrapping
    for k, v in model2.state_dict().items():
        torch.testing.assert_close(v, plain[k], rtol=1e-6, atol=1e-6)


def test_state_dict_translation():
    torch.manual_seed(2)
    model = Net()
    plain_keys = set(model.state_dict())
    x = torch.randn(2, 8)
    inject_lorad(model, TARGETS, 4)
    randomise(model, 3)
    assert "blocks.0.to_q.base_layer.weight" in model.state_dict()
    adapter = get_adapter_state_dict(model)
    assert set(adapter) == {f"{t}.{p}" for t in TARGETS for p in ("lorad_A", "lorad_B")}
    assert adapter["head.lorad_A"].shape == (8, 4) and adapter["head.lorad_B"].shape == (4, 5)
    base = get_base_state_dict(model)
    assert set(base) == plain_keys
    assert torch.equal(base["head.weight"], model.head.base_layer.weight)
    merged = get_base_state_dict(model, merged=True)
    fresh = Net()
    fresh.load_state_dict(merged, strict=True)
    torch.testing.assert_close(fresh(x), model(x), rtol=1e-5, atol=1e-5)
    assert not any(layer.merged for layer in lorad_layers(model).values())  # model untouched


def test_load_adapter_state_dict_strict_and_shapes():
    src, dst = Net(), Net()
    dst.load_state_dict(src.state_dict())
    inject_lorad(src, TARGETS, 2)
    inject_lorad(dst, TARGETS, 2)
    randomise(src)
    tensors = get_adapter_state_dict(src)
    assert load_adapter_state_dict(dst, tensors) == ([], [])
    x = torch.randn(2, 8)
    assert torch.equal(dst(x), src(x))
    partial = {k: v for k, v in tensors.items() if not k.startswith("head")}
    with pytest.raises(MismatchError, match=r"2 missing key\(s\) \(e\.g\. head.lorad_A, head.lorad_B\)"):
        load_adapter_state_dict(dst, partial)
    with pytest.raises(MismatchError, match="1 unexpected key"):
        load_adapter_state_dict(dst, {**tensors, "nope.lorad_A": torch.zeros(1, 2)})
    assert load_adapter_state_dict(dst, partial, strict=False) == (["head.lorad_A", "head.lorad_B"], [])
    with pytest.raises(MismatchError, match="shape mismatch"):
        load_adapter_state_dict(dst, {**tensors, "head.lorad_A": torch.zeros(8, 3)})
    merge_lorad(dst)
    with pytest.raises(BadInputError, match="merged"):
        load_adapter_state_dict(dst, tensors)


TINY_UNET = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(32, 64),
    layers_per_block=1,
    cross_attention_dim=32,
    attention_head_dim=4,
    norm_num_groups=16,
    use_linear_projection=True,
)


def test_unet_identity_at_init_on_real_target_rules():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**TINY_UNET).eval()
    sd15 = get_backbone("sd15")
    student = sd15.target_modules(unet, "student")
    fake = sd15.target_modules(unet, "fake")
    linears = [n for n, m in unet.named_modules() if isinstance(m, nn.Linear)]
    # independent restatement of WaDi §2's rules
    assert student == [n for n in linears if n.split(".")[0] in ("down_blocks", "mid_block", "up_blocks")]
    assert fake == [n for n in student if not any(s in n for s in ("proj_in", "proj_out", "time_emb_proj"))]
    assert any("time_emb_proj" in n for n in student) and any("proj_in" in n for n in student)
    x = torch.randn(2, 4, 8, 8)
    t = torch.tensor([999, 10])
    c = torch.randn(2, 5, 32)
    with torch.no_grad():
        before = unet(x, t, c).sample
        inject_lorad(unet, student, rank=4, init_seed=0)
        assert sd15.target_modules(unet, "student") == student  # names stable after injection
        after = unet(x, t, c).sample
        assert torch.equal(after, before)
        randomise(unet)
        adapted = unet(x, t, c).sample
        assert (adapted - before).abs().max() > 1e-3
        merge_lorad(unet)
        torch.testing.assert_close(unet(x, t, c).sample, adapted, rtol=1e-4, atol=1e-4)
    assert count_trainable(unet) == sum(
        4 * (m.out_features + m.in_features // 2) for m in (unet.get_submodule(n) for n in student)
    )
