"""Diffusers names → the original Stable Diffusion single-file layout (ComfyUI, AUTOMATIC1111).

One ``.safetensors`` file with the U-Net under ``model.diffusion_model.``, the VAE under
``first_stage_model.`` and the text encoder under ``cond_stage_model.`` (SD 1.x: the
transformers CLIP text model under ``cond_stage_model.transformer.``; SD 2.x: OpenCLIP's
layout under ``cond_stage_model.model.``, with q/k/v joined into ``in_proj``). The renames
are data tables applied per module; the U-Net mapping is checked by running it back
through diffusers' own converter (:func:`wadi_cli.io.sd_single_file.ldm_unet_table`).

SDXL (the layout of ``sd_xl_base_1.0.safetensors``): ``conditioner.embedders.0.transformer.``
holds the CLIP ViT-L text model as transformers names it, ``conditioner.embedders.1.model.``
the OpenCLIP ViT-bigG text tower in OpenCLIP's names with its ``text_projection`` (the
transpose of transformers' ``text_projection.weight``: OpenCLIP multiplies ``x @ P``), and
the U-Net's added-condition embedding is ``label_emb.0.{0,2}``.

SD 2.x text encoders: diffusers keeps the 23 layers SD2 uses (it reads the penultimate
layer of OpenCLIP ViT-H); the file holds those 23, without OpenCLIP's last layer and
``text_projection``, which SD2 never uses (loaders that build the full 24-layer model
report them as missing and run as usual).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from wadi_cli.errors import BadInputError, CheckpointError
from wadi_cli.io.checkpoints import open_checkpoint
from wadi_cli.io.safetensors_writer import save_safetensors
from wadi_cli.io.sd_single_file import LDM_UNET_PREFIX, ldm_unet_table

VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer.text_model."  # SD 1.x
OPENCLIP_PREFIX = "cond_stage_model.model."  # SD 2.x
SDXL_CLIP_PREFIX = "conditioner.embedders.0.transformer.text_model."
SDXL_OPENCLIP_PREFIX = "conditioner.embedders.1.model."
#: backbone -> text encoder layout of its original checkpoints
TEXT_LAYOUTS = {"sd15": "clip", "sd21": "openclip", "sdxl": "sdxl"}

# ---- data tables: diffusers module name -> original module name ---------------------------
UNET_TOP = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
UNET_ADDED = {"add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}  # SDXL
UNET_MID = {"resnets.0": "middle_block.0", "attentions.0": "middle_block.1", "resnets.1": "middle_block.2"}
VAE_TOP = {"conv_in": "conv_in", "conv_out": "conv_out", "conv_norm_out": "norm_out"}
VAE_RESNET = {"conv_shortcut": "nin_shortcut"}  # norm1/conv1/norm2/conv2 keep their names
VAE_MID = {"resnets.0": "mid.block_1", "attentions.0": "mid.attn_1", "resnets.1": "mid.block_2"}
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
OPENCLIP_TOP = {
    "embeddings.token_embedding.weight": "token_embedding.weight",
    "embeddings.position_embedding.weight": "positional_embedding",
    "final_layer_norm.weight": "ln_final.weight",
    "final_layer_norm.bias": "ln_final.bias",
}
OPENCLIP_LAYER = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
    "self_attn.out_proj": "attn.out_proj",
}
OPENCLIP_QKV = ("q_proj", "k_proj", "v_proj")  # joined, in this order, into attn.in_proj_*


def _rename(rest: str, table: Mapping[str, str]) -> str:
    """Rename the leading module of ``rest`` through ``table`` (longest match first)."""
    for old in sorted(table, key=len, reverse=True):
        if rest == old or rest.startswith(old + "."):
            return table[old] + rest[len(old) :]
    return rest


def unet_module_map(config: Mapping[str, Any]) -> dict[str, tuple[str, Mapping[str, str] | None]]:
    """``{diffusers module prefix: (original prefix, rename table of what follows)}`` of a
    U-Net ``config``. The original layout numbers ``input_blocks`` 1.. in slots of
    ``layers_per_block + 1`` per level (resnets[+attentions], then the downsampler) and
    ``output_blocks`` in slots of ``layers_per_block + 1`` (the upsampler sits after the
    last slot's resnet, or its attention)."""
    per = int(config["layers_per_block"])
    levels = len(config["block_out_channels"])
    down, up = config["down_block_types"], config["up_block_types"]
    out: dict[str, tuple[str, Mapping[str, str] | None]] = {k: (v, None) for k, v in UNET_TOP.items()}
    if config.get("addition_embed_type") == "text_time":
        out.update({k: (v, None) for k, v in UNET_ADDED.items()})
    for b in range(levels):
        for j in range(per):
            slot = 1 + b * (per + 1) + j
            out[f"down_blocks.{b}.resnets.{j}"] = (f"input_blocks.{slot}.0", UNET_RESNET)
            if down[b].startswith("CrossAttn"):
                out[f"down_blocks.{b}.attentions.{j}"] = (f"input_blocks.{slot}.1", None)
        if b < levels - 1:
            out[f"down_blocks.{b}.downsamplers.0.conv"] = (
                f"input_blocks.{1 + b * (per + 1) + per}.0.op",
                None,
            )
        for j in range(per + 1):
            out[f"up_blocks.{b}.resnets.{j}"] = (f"output_blocks.{b * (per + 1) + j}.0", UNET_RESNET)
            if up[b].startswith("CrossAttn"):
                out[f"up_blocks.{b}.attentions.{j}"] = (f"output_blocks.{b * (per + 1) + j}.1", None)
        if b < levels - 1:
            seat = 2 if up[b].startswith("CrossAttn") else 1
            out[f"up_blocks.{b}.upsamplers.0"] = (f"output_blocks.{b * (per + 1) + per}.{seat}", None)
    for k, v in UNET_MID.items():
        out[f"mid_block.{k}"] = (v, UNET_RESNET if k.startswith("resnets") else None)
    return out


def _by_prefix(name: str, modules: Mapping[str, tuple[str, Mapping[str, str] | None]]) -> str:
    for prefix in sorted(modules, key=len, reverse=True):
        if name.startswith(prefix + "."):
            target, table = modules[prefix]
            rest = name[len(prefix) + 1 :]
            return f"{target}.{_rename(rest, table) if table else rest}"
    raise CheckpointError(f"no original SD name for U-Net tensor {name!r}")


def unet_to_ldm(state: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The U-Net tensors under their original names, checked against diffusers' converter."""
    modules = unet_module_map(config)
    out = {LDM_UNET_PREFIX + _by_prefix(k, modules): v for k, v in state.items()}
    table = ldm_unet_table({k: tuple(v.shape) for k, v in out.items()}, config=config)
    back = {diff: orig for diff, orig in table.names.items()}
    wrong = [k for k in state if back.get(k) != LDM_UNET_PREFIX + _by_prefix(k, modules)]
    if wrong or len(back) != len(state):
        raise CheckpointError(
            f"U-Net names do not survive the round trip through diffusers (e.g. {wrong[:1]})"
        )
    return out


def vae_to_ldm(state: Mapping[str, torch.Tensor], levels: int) -> dict[str, torch.Tensor]:
    """The VAE under ``first_stage_model.``: decoder levels are numbered in reverse, mid
    attention projections become 1×1 convolutions."""
    modules: dict[str, tuple[str, Mapping[str, str] | None]] = {}
    for part in ("encoder", "decoder"):
        for k, v in VAE_TOP.items():
            modules[f"{part}.{k}"] = (f"{part}.{v}", None)
        for k, v in VAE_MID.items():
            modules[f"{part}.mid_block.{k}"] = (
                f"{part}.{v}",
                VAE_ATTENTION if "attentions" in k else VAE_RESNET,
            )
    for i in range(levels):
        modules[f"encoder.down_blocks.{i}.downsamplers.0"] = (f"encoder.down.{i}.downsample", None)
        modules[f"decoder.up_blocks.{i}.upsamplers.0"] = (f"decoder.up.{levels - 1 - i}.upsample", None)
        for j in range(8):  # more resnets per level than any VAE has
            modules[f"encoder.down_blocks.{i}.resnets.{j}"] = (f"encoder.down.{i}.block.{j}", VAE_RESNET)
            modules[f"decoder.up_blocks.{i}.resnets.{j}"] = (
                f"decoder.up.{levels - 1 - i}.block.{j}",
                VAE_RESNET,
            )
    for k in ("quant_conv", "post_quant_conv"):
        modules[k] = (k, None)
    out = {}
    for name, tensor in state.items():
        new = _by_prefix(name, modules)
        if ".mid.attn_1." in new and new.endswith(".weight") and tensor.ndim == 2:
            tensor = tensor.reshape(*tensor.shape, 1, 1)
        out[VAE_PREFIX + new] = tensor
    return out


def clip_to_ldm(state: Mapping[str, torch.Tensor], prefix: str = CLIP_PREFIX) -> dict[str, torch.Tensor]:
    """SD 1.x: the transformers CLIP text model as is, under ``cond_stage_model.transformer.``
    (SDXL's first encoder: under ``prefix``)."""
    return {
        prefix + k.removeprefix("text_model."): v for k, v in state.items() if not k.endswith("position_ids")
    }


def openclip_to_ldm(
    state: Mapping[str, torch.Tensor], prefix: str = OPENCLIP_PREFIX
) -> dict[str, torch.Tensor]:
    """SD 2.x: OpenCLIP's names under ``prefix``; each layer's q/k/v projections joined into
    ``in_proj``; a projection (SDXL's second encoder) becomes OpenCLIP's ``text_projection``."""
    plain = {k.removeprefix("text_model."): v for k, v in state.items() if not k.endswith("position_ids")}
    out: dict[str, torch.Tensor] = {}
    for name, tensor in plain.items():
        if name in OPENCLIP_TOP:
            out[prefix + OPENCLIP_TOP[name]] = tensor
            continue
        if name == "text_projection.weight":  # nn.Linear (proj, width) -> OpenCLIP's (width, proj)
            out[prefix + "text_projection"] = tensor.t().contiguous()
            continue
        parts = name.split(".")
        if parts[:2] != ["encoder", "layers"] or len(parts) < 5:
            raise CheckpointError(f"no OpenCLIP name for text encoder tensor {name!r}")
        layer, rest = parts[2], ".".join(parts[3:])
        base = f"{prefix}transformer.resblocks.{layer}."
        if rest.startswith("self_attn.") and rest.split(".")[1] in OPENCLIP_QKV:
            kind = rest.rsplit(".", 1)[1]  # weight | bias
            if rest.startswith("self_attn.q_proj."):
                joined = [plain[f"encoder.layers.{layer}.self_attn.{p}.{kind}"] for p in OPENCLIP_QKV]
                out[f"{base}attn.in_proj_{kind}"] = torch.cat(joined)
            continue
        out[base + _rename(rest, OPENCLIP_LAYER)] = tensor
    return out


def check_single_file_backbone(backbone: str) -> str:
    """The text-encoder layout of ``backbone``'s original checkpoints, or one error line."""
    if backbone not in TEXT_LAYOUTS:
        names = ", ".join(TEXT_LAYOUTS)
        raise BadInputError(
            f"--format single-file writes the original Stable Diffusion layout ({names}), not {backbone!r}"
        )
    return TEXT_LAYOUTS[backbone]


def single_file_state(
    unet: Mapping[str, torch.Tensor],
    unet_config: Mapping[str, Any],
    components_root: str | os.PathLike[str],
    backbone: str,
    vae_folder: str | os.PathLike[str] | None = None,
) -> dict[str, torch.Tensor]:
    """U-Net tensors (diffusers names, of the architecture ``unet_config``) + the VAE (from
    ``vae_folder`` when given: SDXL's fp16-safe VAE) and text encoder(s) of the base
    pipeline at ``components_root``, all under their original Stable Diffusion names."""

    layout = check_single_file_backbone(backbone)
    root = Path(components_root)
    vae_dir = Path(vae_folder) if vae_folder is not None else root / "vae"
    vae_cfg = json.loads((vae_dir / "config.json").read_text(encoding="utf-8"))
    with open_checkpoint(vae_dir) as src:
        vae = dict(src.items())
    with open_checkpoint(root / "text_encoder") as src:
        text = dict(src.items())
    out = unet_to_ldm(unet, unet_config)
    out.update(vae_to_ldm(vae, len(vae_cfg["block_out_channels"])))
    if layout == "sdxl":
        if not (root / "text_encoder_2").is_dir():
            raise CheckpointError(
                f"{root}: an SDXL single file needs text_encoder_2/ (its second text encoder)"
            )
        with open_checkpoint(root / "text_encoder_2") as src:
            text_2 = dict(src.items())
        out.update(clip_to_ldm(text, SDXL_CLIP_PREFIX))
        out.update(openclip_to_ldm(text_2, SDXL_OPENCLIP_PREFIX))
    else:
        out.update(clip_to_ldm(text) if layout == "clip" else openclip_to_ldm(text))
    return out


def save_single_file(
    path: str | os.PathLike[str],
    unet: Mapping[str, torch.Tensor],
    unet_config: Mapping[str, Any],
    components_root: str | os.PathLike[str] | None,
    backbone: str,
    metadata: Mapping[str, str] | None = None,
    vae_folder: str | os.PathLike[str] | None = None,
) -> int:
    """Write the single file atomically; returns its number of tensors."""

    if components_root is None:
        raise BadInputError("--format single-file needs the base pipeline's VAE and text encoder")
    state = single_file_state(unet, unet_config, components_root, backbone, vae_folder)
    save_safetensors(state, path, metadata)
    return len(state)
