"""Backbone registry: adapter plans must equal WaDi §2's counts exactly (ground truth
from the paper / method.md), target rules as data, and the registry's fixed facts."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from wadi_cli.backbones import ALPHA_BAR_T, BACKBONES, TINY_PIPELINE_DIR, TargetRule, get_backbone
from wadi_cli.errors import BadInputError

# method.md §2 and the lead's verified counts: (role, rank) -> (layers, trainable)
EXPECTED = {
    "sd15": {
        ("student", 256): (182, 83_795_968),
        ("student", 64): (182, 20_948_992),
        ("fake", 32): (160, 9_378_816),
    },
    "sd21": {("student", 256): (214, 94_429_184), ("fake", 32): (160, 9_509_888)},
    "pixart": {("student", 128): (283, 81_219_584), ("fake", 32): (280, 20_127_744)},
    # SDXL: counted on the meta-built U-Net by test_targets_on_built_skeleton
    "sdxl": {("student", 128): (739, 265_297_920), ("fake", 32): (700, 64_491_520)},
}
BASE_PARAMS = {"sd15": 859_520_964, "sd21": 865_910_724, "pixart": 610_856_096, "sdxl": 2_567_463_684}


@pytest.mark.parametrize("name", ["sd15", "sd21", "pixart", "sdxl"])
def test_adapter_plan_matches_method_counts(name):
    b = get_backbone(name)
    default = b.adapter_plan()
    assert default["base_params"] == BASE_PARAMS[name]
    for (role, rank), (layers, trainable) in EXPECTED[name].items():
        plan = b.adapter_plan(rank=rank) if role == "student" else b.adapter_plan(fake_rank=rank)
        assert plan[role] == {"rank": rank, "layers": layers, "trainable_params": trainable}
    assert default["student"]["rank"] == b.student_rank and default["fake"]["rank"] == b.fake_rank


@pytest.mark.parametrize("name", ["sd15", "pixart", "sdxl"])
def test_targets_on_built_skeleton(name):
    b = get_backbone(name)
    model = b.build_denoiser("meta")
    assert sum(p.numel() for p in model.parameters()) == BASE_PARAMS[name]
    student, fake = b.target_modules(model, "student"), b.target_modules(model, "fake")
    assert student == b.target_modules(None, "student") and fake == b.target_modules(None, "fake")
    assert set(fake) < set(student)
    modules = dict(model.named_modules())
    assert all(type(modules[n]) is nn.Linear and modules[n].in_features % 2 == 0 for n in student)
    # independent count: r · (out + in/2) summed over the built modules
    r = b.student_rank
    total = sum(r * (modules[n].out_features + modules[n].in_features // 2) for n in student)
    assert total == EXPECTED[name][("student", r)][1]
    if name == "pixart":
        assert not any(n.startswith("adaln_single") for n in student)
        assert any(n.startswith("caption_projection") for n in student)
        assert all(n.startswith("transformer_blocks.") for n in fake)
    else:
        assert all(n.split(".")[0] in ("down_blocks", "mid_block", "up_blocks") for n in student)
        assert not any(s in n for n in fake for s in ("proj_in", "proj_out", "time_emb_proj"))


def test_target_rule_matching():
    rule = TargetRule(include_roots=("down_blocks", "mid_block"), exclude_substrings=("proj_in",))
    assert rule.matches("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q")
    assert not rule.matches("down_blocks.0.attentions.0.proj_in")
    assert not rule.matches("time_embedding.linear_1")
    assert not rule.matches("xdown_blocks.0.lin")  # roots compare whole components
    ex = TargetRule(exclude_roots=("adaln_single",))
    assert ex.matches("caption_projection.linear_1") and not ex.matches("adaln_single.linear")
    assert TargetRule().matches("anything")


def test_registry_facts():
    assert set(BACKBONES) == {"sd15", "sd21", "pixart", "sdxl", "tiny"}
    sd15, sd21, pixart = get_backbone("sd15"), get_backbone("SD21"), get_backbone("pixart")
    assert sd15.hub_id == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert sd21.hub_id == "stabilityai/stable-diffusion-2-1-base"
    assert pixart.hub_id == "PixArt-alpha/PixArt-XL-2-256x256"
    assert [b.release_file for b in (sd15, sd21, pixart)] == [
        "rotated_unet-sdv1-5.safetensors",
        "rotated_unet-sdv2-1.safetensors",
        "rotated_transformer.safetensors",
    ]
    assert {b.release_repo for b in (sd15, sd21, pixart)} == {"gudaochangsheng/WaDi"}
    assert (sd15.resolution, sd21.resolution, pixart.resolution) == (512, 512, 256)
    assert (pixart.text_encoder, pixart.text_max_length, sd15.text_max_length) == ("t5", 120, 77)
    assert ALPHA_BAR_T == 0.0047
    assert all(b.alpha_bar_T == ALPHA_BAR_T for b in BACKBONES.values() if b.name != "sdxl")
    assert all(b.prediction_type == "epsilon" and b.latent_channels == 4 for b in BACKBONES.values())
    assert (sd15.mixed_precision, pixart.mixed_precision, pixart.default_dtype) == (
        "fp16",
        "bf16",
        torch.bfloat16,
    )
    assert pixart.learned_sigma and not sd15.learned_sigma
    assert sd15.model_id(None) == sd15.hub_id and sd15.model_id("/my/path") == "/my/path"
    assert all(b.config_path.is_file() for b in (sd15, sd21, pixart))
    with pytest.raises(dataclasses.FrozenInstanceError):
        sd15.student_rank = 3  # type: ignore[misc]


def test_errors():
    with pytest.raises(BadInputError, match="sd15, sd21, pixart, sdxl, tiny"):
        get_backbone("sd3")
    b = get_backbone("sd15")
    with pytest.raises(BadInputError, match="role"):
        b.target_modules(None, "teacher")
    with pytest.raises(BadInputError, match="positive"):
        b.adapter_plan(rank=0)
    broken = dataclasses.replace(b, name="broken", config_path=b.config_path.parent / "missing.json")
    with pytest.raises(BadInputError, match="not there"):
        broken.build_denoiser()


def test_tiny_entry():
    tiny = get_backbone("tiny")
    assert tiny.hub_id == str(TINY_PIPELINE_DIR) and tiny.resolution == 32 and tiny.latent_size == 8
    assert tiny.config_path == TINY_PIPELINE_DIR / "unet" / "config.json"
    if not tiny.config_path.is_file():
        pytest.skip(f"tiny pipeline not shipped yet ({tiny.config_path} missing)")
    model = tiny.build_denoiser("cpu")
    plan = tiny.adapter_plan()
    student = tiny.target_modules(model, "student")
    modules = dict(model.named_modules())
    assert plan["student"]["layers"] == len(student) > 0
    assert plan["student"]["trainable_params"] == sum(
        tiny.student_rank * (modules[n].out_features + modules[n].in_features // 2) for n in student
    )
    assert plan["base_params"] == sum(p.numel() for p in model.parameters())


def test_lorad_config_from_backbone():
    b = get_backbone("sd15")
    cfg = b.lorad_config("fake")
    assert (cfg.rank, cfg.role, cfg.backbone, cfg.base_model) == (32, "fake", "sd15", b.hub_id)
    assert list(cfg.targets) == b.target_modules(None, "fake") and len(cfg.targets) == 160
    assert b.lorad_config("student", rank=64, model="/local/sd").base_model == "/local/sd"


def test_sdxl_entry():
    """SDXL: its hub layout (two text encoders), 1024 px, the fp16-safe VAE, no release, and
    the recipe's rank giving a student of about 10 % of the U-Net."""
    b = get_backbone("sdxl")
    assert b.hub_id == "stabilityai/stable-diffusion-xl-base-1.0" and b.resolution == 1024
    assert b.latent_size == 128 and b.prediction_type == "epsilon" and b.mixed_precision == "fp16"
    assert b.components[-2:] == ("text_encoder_2", "tokenizer_2")
    assert b.weighted_components == ("vae", "text_encoder", "text_encoder_2")
    assert b.fp16_vae_repo == "madebyollin/sdxl-vae-fp16-fix"
    assert b.release_repo is None and "not validated at full scale" in b.recipe_note
    plan = b.adapter_plan()
    share = plan["student"]["trainable_params"] / plan["base_params"]
    assert 0.09 < share < 0.11, share
    assert plan["student"] == {"rank": 128, "layers": 739, "trainable_params": 265_297_920}


def test_sdxl_alpha_bar_T_is_its_schedules_last_step():
    """ᾱ_T of SDXL: the last ``alphas_cumprod`` of diffusers' scheduler built from the real
    SDXL scheduler config (independent reference, float32 there), not the SD constant."""
    from diffusers import EulerDiscreteScheduler

    from wadi_cli.backbones.registry import scaled_linear_alpha_bar_last

    sched = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000
    )
    reference = float(sched.alphas_cumprod[-1])
    value = get_backbone("sdxl").alpha_bar_T
    assert value == pytest.approx(reference, rel=1e-5) and value != ALPHA_BAR_T
    # another schedule gives another value (the function reads its arguments)
    other = EulerDiscreteScheduler(beta_start=0.0001, beta_end=0.02, beta_schedule="scaled_linear")
    assert scaled_linear_alpha_bar_last(0.0001, 0.02, 1000) == pytest.approx(
        float(other.alphas_cumprod[-1]), rel=1e-5
    )
