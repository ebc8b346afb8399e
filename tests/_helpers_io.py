"""Fixtures for the IO tests: tiny U-Net configs, an independent diffusers -> original SD
(LDM) name mapping written from the LDM layout (not from diffusers' converter), and
hand-made safetensors files."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch

LDM_PREFIX = "model.diffusion_model."

# Three levels so that every LDM layout case appears: a resnet with a skip connection,
# a down block without downsampler, and an up block whose upsampler follows attention
# (``output_blocks.N.2.conv``) next to one without attention (``output_blocks.N.1.conv``).
TINY_UNET = {
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [32, 32, 64],
    "layers_per_block": 1,
    "cross_attention_dim": 32,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
}

_TOP = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}


def _resnet(rest: list[str]) -> str:
    return ".".join([_RESNET.get(rest[0], rest[0]), *rest[1:]])


def diffusers_to_ldm(name: str, config: dict) -> str:
    """Original SD name (without the ``model.diffusion_model.`` prefix) of a diffusers U-Net key.

    LDM numbers input blocks 1.. as (L+1) slots per level (L resnet[+attention] slots,
    then the downsampler); output blocks as L+1 slots per level, the upsampler sitting
    after the last slot's resnet (index 1) or attention (index 2).
    """
    L = config["layers_per_block"]
    p = name.split(".")
    for dk, lk in _TOP.items():
        if name.startswith(dk + "."):
            return lk + name[len(dk) :]
    if p[0] == "mid_block":
        slot = {"resnets.0": 0, "attentions.0": 1, "resnets.1": 2}[f"{p[1]}.{p[2]}"]
        rest = p[3:]
        return f"middle_block.{slot}." + (_resnet(rest) if p[1] == "resnets" else ".".join(rest))
    b, kind, j, rest = int(p[1]), p[2], int(p[3]), p[4:]
    if p[0] == "down_blocks":
        if kind == "downsamplers":  # rest = ["conv", "weight"]
            return f"input_blocks.{1 + b * (L + 1) + L}.0.op." + ".".join(rest[1:])
        slot = 1 + b * (L + 1) + j
    else:
        if kind == "upsamplers":
            has_attn = config["up_block_types"][b].startswith("CrossAttn")
            return f"output_blocks.{b * (L + 1) + L}.{2 if has_attn else 1}." + ".".join(rest)
        slot = b * (L + 1) + j
    block = "input_blocks" if p[0] == "down_blocks" else "output_blocks"
    if kind == "resnets":
        return f"{block}.{slot}.0." + _resnet(rest)
    return f"{block}.{slot}.1." + ".".join(rest)


def tiny_unet_state_dict(config: dict = TINY_UNET, seed: int = 0) -> dict[str, torch.Tensor]:
    """State dict of a tiny UNet2DConditionModel with distinct random values in every tensor."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    model = UNet2DConditionModel(**config)
    return {k: torch.randn_like(v) for k, v in model.state_dict().items()}


def meta_unet_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Key -> shape of a U-Net built on the meta device (no memory, no weights)."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        model = UNet2DConditionModel.from_config(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def ldm_named(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    return {LDM_PREFIX + diffusers_to_ldm(k, config): v for k, v in state.items()}


def write_raw_safetensors(path: Path, header: dict, data: bytes, header_len: int | None = None) -> Path:
    """Write a safetensors file byte by byte (to plant specific corruptions)."""
    raw = json.dumps(header).encode()
    n = len(raw) if header_len is None else header_len
    path.write_bytes(struct.pack("<Q", n) + raw + data)
    return path


class NotATensor:
    """A picklable custom object: loading a file holding one needs full unpickling."""

    def __init__(self) -> None:
        self.value = 42
