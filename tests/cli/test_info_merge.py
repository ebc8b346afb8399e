"""``wadi info`` and ``wadi merge`` through Typer's CliRunner."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from typer.testing import CliRunner

from wadi_cli.cli.main import app
from wadi_cli.lorad import LoRaDConfig, get_adapter_state_dict, inject_lorad, save_adapter

runner = CliRunner()


@pytest.mark.parametrize(
    "args,role,expected",
    [
        (["--backbone", "sd15"], "student", {"rank": 256, "layers": 182, "trainable_params": 83_795_968}),
        (
            ["--backbone", "sd15", "--rank", "64"],
            "student",
            {"rank": 64, "layers": 182, "trainable_params": 20_948_992},
        ),
        (["--backbone", "sd15"], "fake", {"rank": 32, "layers": 160, "trainable_params": 9_378_816}),
        (["--backbone", "sd21"], "student", {"rank": 256, "layers": 214, "trainable_params": 94_429_184}),
        (["-b", "pixart"], "student", {"rank": 128, "layers": 283, "trainable_params": 81_219_584}),
    ],
)
def test_info_json_counts(args, role, expected):
    result = runner.invoke(app, ["info", *args, "--json"])
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    assert plan[role] == expected
    assert set(plan["student"]) == set(plan["fake"]) == {"rank", "layers", "trainable_params"}
    assert plan["alpha_bar_T"] == 0.0047


def test_info_table_and_listing():
    result = runner.invoke(app, ["info", "--backbone", "sd15", "--fake-rank", "16"])
    assert result.exit_code == 0, result.output
    assert "83,795,968" in result.stdout and "rank 16" in result.stdout and "0.0047" in result.stdout
    listing = runner.invoke(app, ["info"])
    names = ("sd15", "sd21", "pixart", "sdxl", "tiny")
    assert listing.exit_code == 0 and all(n in listing.stdout for n in names)
    rows = json.loads(runner.invoke(app, ["info", "--json"]).stdout)
    assert [r["backbone"] for r in rows] == ["sd15", "sd21", "pixart", "sdxl", "tiny"]


def test_info_bad_input_is_one_line_exit_2():
    result = runner.invoke(app, ["info", "--backbone", "sd3"])
    assert result.exit_code == 2
    assert "unknown backbone 'sd3'" in result.stderr and "Traceback" not in result.output
    assert len(result.stderr.strip().splitlines()) == 1
    bad_rank = runner.invoke(app, ["info", "--backbone", "sd15", "--rank", "0"])
    assert bad_rank.exit_code == 2 and "positive" in bad_rank.stderr
    no_backbone = runner.invoke(app, ["info", "--rank", "3"])
    assert no_backbone.exit_code == 2 and "need --backbone" in no_backbone.stderr


def reference_merge(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """float64, per pair with Python's math."""
    w64, th = w.double(), a.double() @ b.double()
    out = w64.clone()
    for i in range(w.shape[0]):
        for k in range(w.shape[1] // 2):
            c, s = math.cos(th[i, k].item()), math.sin(th[i, k].item())
            out[i, 2 * k] = c * w64[i, 2 * k] - s * w64[i, 2 * k + 1]
            out[i, 2 * k + 1] = s * w64[i, 2 * k] + c * w64[i, 2 * k + 1]
    return out


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.down_blocks = nn.ModuleList([nn.Linear(8, 6), nn.Linear(6, 4)])
        self.conv_in = nn.Conv2d(3, 4, 3)


@pytest.fixture()
def files(tmp_path):
    torch.manual_seed(0)
    model = Tiny()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    base["counter"] = torch.arange(5)
    save_file(base, str(tmp_path / "base.safetensors"))
    inject_lorad(model, ["down_blocks.0", "down_blocks.1"], rank=3, init_seed=0)
    with torch.no_grad():
        for name in ("down_blocks.0", "down_blocks.1"):
            model.get_submodule(name).lorad_A.normal_()
    adapter = get_adapter_state_dict(model)
    # a toy, not a registered backbone: no recorded backbone (see the backbone test below)
    save_adapter(tmp_path / "adapter.safetensors", adapter, LoRaDConfig(rank=3, backbone=None))
    return tmp_path, model, base, adapter


def test_merge_refuses_an_adapter_of_another_backbone(files):
    """Bases not built like the adapter's recorded backbone: a target that is a 1×1 conv
    (LoRaD adapts Linear layers only), and, for a U-Net backbone, proj_in/proj_out that are
    convs where its config has Linear projections (tiny's does). One line, exit 2, nothing
    written; --any-backbone merges anyway; an adapter with no recorded backbone is not checked."""
    tmp, _, base, adapter = files
    out = tmp / "m.safetensors"
    conv = dict(base, **{"down_blocks.0.weight": base["down_blocks.0.weight"][:, :, None, None]})
    proj = dict(base, **{"up_blocks.0.attentions.1.proj_in.weight": torch.zeros(4, 4, 1, 1)})
    save_file(conv, str(tmp / "conv.safetensors"))
    save_file(proj, str(tmp / "proj.safetensors"))
    save_adapter(tmp / "tiny.safetensors", adapter, LoRaDConfig(rank=3, backbone="tiny"))
    for bad, words in (
        ("conv", "down_blocks.0.weight is a conv (6, 8, 1, 1)"),
        ("proj", "proj_in.weight is a conv"),
    ):
        args = ["merge", str(tmp / f"{bad}.safetensors"), str(tmp / "tiny.safetensors"), "--out", str(out)]
        r = runner.invoke(app, args)
        assert r.exit_code == 2 and "made for backbone 'tiny'" in r.stderr and words in r.stderr, r.output
        assert "--any-backbone" in r.stderr and len(r.stderr.strip().splitlines()) == 1 and not out.exists()
        assert runner.invoke(app, [*args, "--any-backbone"]).exit_code == 0 and out.is_file()
        out.unlink()
    args = ["merge", str(tmp / "proj.safetensors"), str(tmp / "adapter.safetensors"), "--out", str(out)]
    assert runner.invoke(app, args).exit_code == 0  # no recorded backbone: nothing to compare with


def test_merge_writes_rotated_weights(files):
    tmp, model, base, adapter = files
    out = tmp / "merged.safetensors"
    result = runner.invoke(
        app,
        [
            "merge",
            str(tmp / "base.safetensors"),
            str(tmp / "adapter.safetensors"),
            "--out",
            str(out),
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["merged_layers"] == 2 and summary["tensors"] == len(base)
    merged = load_file(str(out))
    assert set(merged) == set(base)
    for name in ("down_blocks.0", "down_blocks.1"):
        ref = reference_merge(base[f"{name}.weight"], adapter[f"{name}.lorad_A"], adapter[f"{name}.lorad_B"])
        torch.testing.assert_close(merged[f"{name}.weight"].double(), ref, rtol=0, atol=2e-6)
        live = model.get_submodule(name).effective_weight()
        torch.testing.assert_close(merged[f"{name}.weight"], live, rtol=0, atol=1e-6)
    for key in ("down_blocks.0.bias", "conv_in.weight", "counter"):
        assert torch.equal(merged[key], base[key]) and merged[key].dtype == base[key].dtype
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert "wadi_version" in meta and "adapter.safetensors" in meta["wadi_sources"]
    assert json.loads(meta["wadi_config"])["rank"] == 3


def test_merge_dtype_and_overwrite(files):
    tmp, _, base, _ = files
    out = tmp / "half.safetensors"
    args = ["merge", str(tmp / "base.safetensors"), str(tmp / "adapter.safetensors"), "-o", str(out)]
    assert runner.invoke(app, [*args, "--dtype", "fp16"]).exit_code == 0
    merged = load_file(str(out))
    assert merged["conv_in.weight"].dtype == torch.float16 and merged["counter"].dtype == torch.int64
    again = runner.invoke(app, [*args, "--dtype", "fp16"])
    assert again.exit_code == 2 and "already exists" in again.stderr
    assert runner.invoke(app, [*args, "--overwrite"]).exit_code == 0
    assert load_file(str(out))["conv_in.weight"].dtype == torch.float32
    bad = runner.invoke(app, [*args, "--overwrite", "--dtype", "int4"])
    assert bad.exit_code == 2 and "fp16, bf16 or fp32" in bad.stderr


def test_merge_unmatched_keys_exit_2_and_nothing_written(files):
    tmp, _, _, adapter = files
    extra = {
        **adapter,
        "up_blocks.7.lin.lorad_A": torch.zeros(4, 3),
        "up_blocks.7.lin.lorad_B": torch.zeros(3, 2),
    }
    save_adapter(tmp / "extra.safetensors", extra, LoRaDConfig(rank=3))
    out = tmp / "never.safetensors"
    before = sorted(p.name for p in tmp.iterdir())
    result = runner.invoke(
        app, ["merge", str(tmp / "base.safetensors"), str(tmp / "extra.safetensors"), "--out", str(out)]
    )
    assert result.exit_code == 2
    assert "up_blocks.7.lin" in result.stderr and "Traceback" not in result.output
    assert len(result.stderr.strip().splitlines()) == 1
    assert not out.exists() and sorted(p.name for p in tmp.iterdir()) == before
    missing = runner.invoke(
        app, ["merge", str(tmp / "nope.safetensors"), str(tmp / "adapter.safetensors"), "--out", str(out)]
    )
    assert missing.exit_code == 2 and not out.exists()


def test_help_has_examples():
    for cmd in ("info", "merge"):
        result = runner.invoke(app, [cmd, "--help"])
        assert result.exit_code == 0 and "Examples" in result.stdout and f"wadi {cmd}" in result.stdout
