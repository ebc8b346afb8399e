"""Adapter files (save / load / validation) and merging on state dicts, checked against
an independent float64 reference (explicit per-pair loop with Python's math)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from wadi_cli.errors import BadInputError, MismatchError
from wadi_cli.io import open_checkpoint
from wadi_cli.lorad import (
    LoRaDConfig,
    apply_adapter,
    get_adapter_state_dict,
    get_base_state_dict,
    inject_lorad,
    load_adapter,
    merge_adapter_into_state_dict,
    parse_dtype,
    save_adapter,
)


def loop_rotate(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Slow obvious float64 reference: θ_ik = Σ_j A_ij B_jk, then rotate pair k of row i."""
    w = weight.double().tolist()
    a, b = a.double().tolist(), b.double().tolist()
    out = [row[:] for row in w]
    for i, row in enumerate(w):
        for k in range(len(row) // 2):
            th = sum(a[i][j] * b[j][k] for j in range(len(b)))
            c, s = math.cos(th), math.sin(th)
            out[i][2 * k] = c * row[2 * k] - s * row[2 * k + 1]
            out[i][2 * k + 1] = s * row[2 * k] + c * row[2 * k + 1]
    return torch.tensor(out, dtype=torch.float64)


def make_adapter(shapes: dict[str, tuple[int, int]], rank: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for path, (m, n) in shapes.items():
        out[f"{path}.lorad_A"] = torch.randn(m, rank, generator=g) * 0.5
        out[f"{path}.lorad_B"] = torch.randn(rank, n // 2, generator=g) * 0.5
    return out


SHAPES = {"down_blocks.0.attn.to_q": (6, 8), "mid_block.ff.proj": (4, 10)}


def make_base(dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    base = {f"{p}.weight": torch.randn(m, n, generator=g).to(dtype) for p, (m, n) in SHAPES.items()}
    base["down_blocks.0.attn.to_q.bias"] = torch.randn(6, generator=g).to(dtype)
    base["conv_in.weight"] = torch.randn(3, 2, 3, 3, generator=g).to(dtype)
    base["position_ids"] = torch.arange(7)
    return base


def test_save_load_round_trip_with_metadata(tmp_path):
    tensors = make_adapter(SHAPES, 3)
    cfg = LoRaDConfig(rank=3, role="student", backbone="sd15", base_model="some/model")
    path = save_adapter(tmp_path / "sub" / "adapter.safetensors", tensors, cfg, extra_metadata={"step": "12"})
    loaded, got = load_adapter(path)
    assert set(loaded) == set(tensors) and all(torch.equal(loaded[k], tensors[k]) for k in tensors)
    assert got == LoRaDConfig(3, "student", tuple(SHAPES), "sd15", "some/model")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert meta["adapter"] == "lorad" and meta["rank"] == "3" and meta["role"] == "student"
    assert meta["backbone"] == "sd15" and meta["base_model"] == "some/model" and meta["step"] == "12"
    assert json.loads(meta["targets"]) == list(SHAPES) and "wadi_version" in meta
    assert not [p for p in path.parent.iterdir() if p.name != "adapter.safetensors"]  # no temp files


def test_save_stores_fp32_and_checks_config(tmp_path):
    tensors = {k: v.half() for k, v in make_adapter(SHAPES, 2).items()}
    loaded, _ = load_adapter(save_adapter(tmp_path / "a.safetensors", tensors, LoRaDConfig(rank=2)))
    assert all(v.dtype == torch.float32 for v in loaded.values())
    with pytest.raises(BadInputError, match="rank 2 but the config says 4"):
        save_adapter(tmp_path / "b.safetensors", tensors, LoRaDConfig(rank=4))
    with pytest.raises(BadInputError, match="differ"):
        save_adapter(tmp_path / "c.safetensors", tensors, LoRaDConfig(rank=2, targets=("x.y",)))
    with pytest.raises(BadInputError, match="reserved"):
        save_adapter(tmp_path / "d.safetensors", tensors, LoRaDConfig(rank=2), extra_metadata={"rank": "9"})
    assert not (tmp_path / "b.safetensors").exists()


@pytest.mark.parametrize(
    "mutate,message",
    [
        (lambda t: {**t, "down_blocks.0.attn.to_q.weight": torch.zeros(6, 8)}, "not a LoRaD adapter"),
        (lambda t: {k: v for k, v in t.items() if k != "mid_block.ff.proj.lorad_B"}, "without lorad_B"),
        (lambda t: {**t, "mid_block.ff.proj.lorad_A": torch.zeros(4, 2)}, r"not \[m, r\]"),
        (lambda t: {**t, **make_adapter({"mid_block.ff.proj": (4, 10)}, 5)}, "mixes ranks"),
        (lambda t: {**t, "mid_block.ff.proj.lorad_B": torch.zeros(3, 5, 1)}, r"not \[m, r\]"),
        (lambda t: {}, "no tensors"),
    ],
)
def test_load_rejects_malformed_adapters(tmp_path, mutate, message):
    path = tmp_path / "bad.safetensors"
    save_file(mutate(make_adapter(SHAPES, 3)), str(path))
    with pytest.raises(BadInputError, match=message):
        load_adapter(path)


def test_load_rejects_inconsistent_metadata(tmp_path):
    tensors = make_adapter(SHAPES, 3)
    save_file(tensors, str(tmp_path / "r.safetensors"), metadata={"rank": "4"})
    with pytest.raises(BadInputError, match="metadata says rank 4"):
        load_adapter(tmp_path / "r.safetensors")
    save_file(tensors, str(tmp_path / "t.safetensors"), metadata={"targets": json.dumps(["a"])})
    with pytest.raises(BadInputError, match="targets"):
        load_adapter(tmp_path / "t.safetensors")
    save_file(tensors, str(tmp_path / "o.safetensors"), metadata={"role": "teacher"})
    with pytest.raises(BadInputError, match="role"):
        load_adapter(tmp_path / "o.safetensors")
    save_file(tensors, str(tmp_path / "plain.safetensors"))  # no metadata at all: fine
    assert load_adapter(tmp_path / "plain.safetensors")[1].rank == 3
    with pytest.raises(BadInputError):
        load_adapter(tmp_path / "missing.safetensors")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_merge_matches_loop_reference_and_passes_others_through(dtype):
    base, adapter = make_base(dtype), make_adapter(SHAPES, 4)
    merged = merge_adapter_into_state_dict(base, adapter)
    assert list(merged) == list(base)
    tol = {torch.float64: 1e-12, torch.float32: 2e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
    for path in SHAPES:
        w = base[f"{path}.weight"]
        ref = loop_rotate(w, adapter[f"{path}.lorad_A"], adapter[f"{path}.lorad_B"])
        got = merged[f"{path}.weight"]
        assert got.dtype == dtype
        torch.testing.assert_close(got.double(), ref, rtol=tol, atol=tol * ref.abs().max().item())
    for key in ("down_blocks.0.attn.to_q.bias", "conv_in.weight", "position_ids"):
        assert merged[key].dtype == base[key].dtype and torch.equal(merged[key], base[key])


def test_merge_dtype_cast_prefix_and_1x1_conv():
    base, adapter = make_base(), make_adapter(SHAPES, 2)
    half = merge_adapter_into_state_dict(base, adapter, dtype=torch.float16)
    assert half["conv_in.weight"].dtype == torch.float16 and half["position_ids"].dtype == torch.int64
    full = merge_adapter_into_state_dict(base, adapter)
    torch.testing.assert_close(
        half["mid_block.ff.proj.weight"].float(), full["mid_block.ff.proj.weight"], rtol=1e-3, atol=1e-3
    )
    prefixed = {f"unet.{k}": v for k, v in base.items()}
    auto = merge_adapter_into_state_dict(prefixed, adapter)
    assert all(torch.equal(auto[f"unet.{k}"], full[k]) for k in base)
    with pytest.raises(MismatchError):
        merge_adapter_into_state_dict(prefixed, adapter, prefix="")
    conv = dict(base)
    conv["mid_block.ff.proj.weight"] = base["mid_block.ff.proj.weight"][:, :, None, None]
    out = merge_adapter_into_state_dict(conv, adapter)
    assert out["mid_block.ff.proj.weight"].shape == (4, 10, 1, 1)
    torch.testing.assert_close(out["mid_block.ff.proj.weight"][:, :, 0, 0], full["mid_block.ff.proj.weight"])


def test_merge_errors_list_unmatched_and_bad_shapes():
    base = make_base()
    many = make_adapter({f"up_blocks.{i}.lin": (2, 2) for i in range(7)}, 1)
    with pytest.raises(MismatchError, match=r"7 adapter module.*up_blocks.0.lin.*\(\+2\)"):
        merge_adapter_into_state_dict(base, {**make_adapter(SHAPES, 1), **many})
    wrong = make_adapter({"mid_block.ff.proj": (4, 12)}, 1)
    with pytest.raises(MismatchError, match=r"mid_block.ff.proj.weight \(4, 10\)"):
        merge_adapter_into_state_dict(base, wrong)


def test_merge_on_lazy_tensor_source_equals_dict(tmp_path):
    base, adapter = make_base(), make_adapter(SHAPES, 3)
    save_file(base, str(tmp_path / "base.safetensors"))
    with open_checkpoint(tmp_path / "base.safetensors") as src:
        lazy = merge_adapter_into_state_dict(src, adapter)
    eager = merge_adapter_into_state_dict(base, adapter)
    assert set(lazy) == set(eager) and all(torch.equal(lazy[k], eager[k]) for k in eager)


def test_merge_equals_live_layer_effective_weight():
    """State-dict merge (no network) == what the wrapped model computes."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 4))
    plain = {k: v.clone() for k, v in model.state_dict().items()}
    inject_lorad(model, ["0", "2"], rank=3)
    with torch.no_grad():
        for layer in (model[0], model[2]):
            layer.lorad_A.normal_()
    merged = merge_adapter_into_state_dict(plain, get_adapter_state_dict(model))
    live = get_base_state_dict(model, merged=True)
    assert set(merged) == set(live)
    for k in merged:
        torch.testing.assert_close(merged[k], live[k], rtol=0, atol=1e-6)


def test_parse_dtype():
    assert parse_dtype("fp16") is torch.float16 and parse_dtype("BF16") is torch.bfloat16
    assert parse_dtype(None) is None and parse_dtype(torch.float32) is torch.float32
    with pytest.raises(BadInputError, match="fp16, bf16 or fp32"):
        parse_dtype("int8")


def test_config_validation():
    with pytest.raises(BadInputError, match="positive"):
        LoRaDConfig(rank=0)
    with pytest.raises(BadInputError, match="role"):
        LoRaDConfig(rank=1, role="teacher")
    with pytest.raises(BadInputError, match="not one string"):
        LoRaDConfig(rank=1, targets="a.b")  # type: ignore[arg-type]
    with pytest.raises(BadInputError, match="duplicates"):
        LoRaDConfig(rank=1, targets=("a", "a"))
    assert LoRaDConfig(rank=2, targets=["a", "b"]).targets == ("a", "b")  # type: ignore[arg-type]


def test_apply_adapter_wraps_loads_and_merges():
    torch.manual_seed(0)
    src = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 4))
    plain = {k: v.clone() for k, v in src.state_dict().items()}
    inject_lorad(src, ["2"], rank=2)
    with torch.no_grad():
        src[2].lorad_A.normal_()
    tensors = get_adapter_state_dict(src)
    x = torch.randn(3, 8)
    dst = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 4))
    dst.load_state_dict(plain)
    assert apply_adapter(dst, tensors) == ["2"]
    assert torch.equal(dst(x), src(x))
    fused = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 4))
    fused.load_state_dict(plain)
    apply_adapter(fused, tensors, merge=True)
    assert type(fused[2]) is nn.Linear
    torch.testing.assert_close(fused(x), src(x), rtol=1e-5, atol=1e-5)
    wrong = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 5))
    with pytest.raises(MismatchError):
        apply_adapter(wrong, tensors)
    assert type(wrong[2]) is nn.Linear  # rolled back


def test_merge_warns_once_about_an_absurd_adapter_and_still_merges(tmp_path):
    """B scaled by 1e30: finite angles of ~1e32 degrees, a finite merge (rotations keep
    norms), one warning naming the threshold; the shipped student (largest angle 256°,
    checked against the float64 angles A@B computed here) merges silently."""
    import math
    import warnings

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from wadi_cli.errors import WadiWarning
    from wadi_cli.lorad import merge_adapter_file
    from wadi_cli.lorad.merge_checks import ABSURD_ANGLE_DEG, largest_angles
    from wadi_cli.tiny import TINY_PIPELINE_DIR
    from wadi_cli.tiny import TINY_STUDENT_PATH as TINY_STUDENT

    base = Path(TINY_PIPELINE_DIR) / "unet" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(str(TINY_STUDENT))
    with safe_open(str(TINY_STUDENT), "pt") as f:
        meta = f.metadata()
    ref = max(
        math.degrees(float((t.double() @ tensors[k[:-1] + "B"].double()).abs().max()))
        for k, t in tensors.items()
        if k.endswith(".lorad_A")
    )
    assert max(largest_angles(tensors).values()) == pytest.approx(ref, rel=1e-5)
    assert ref < ABSURD_ANGLE_DEG
    absurd = {k: v * 1e30 if k.endswith(".lorad_B") else v for k, v in tensors.items()}
    save_file(absurd, str(tmp_path / "absurd.safetensors"), metadata=meta)
    for adapter, expected in ((TINY_STUDENT, 0), (tmp_path / "absurd.safetensors", 1)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            merge_adapter_file(base, adapter, tmp_path / "m.safetensors", overwrite=True)
        said = [str(w.message) for w in caught if issubclass(w.category, WadiWarning)]
        assert len(said) == expected, said
    assert "rotates weights by up to" in said[0] and "3600 degrees" in said[0]
