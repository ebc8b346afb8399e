"""An original-layout Stable Diffusion single file (a community fine-tune) as a base pipeline.

A1111 / ComfyUI checkpoints hold the U-Net under ``model.diffusion_model.``, the VAE under
``first_stage_model.`` and the text encoder under ``cond_stage_model.`` (SD 1.x: transformers'
CLIP names; SD 2.x: OpenCLIP's); SDXL's hold its two text encoders under
``conditioner.embedders.0.transformer.`` (CLIP ViT-L, transformers' names) and
``conditioner.embedders.1.model.`` (OpenCLIP ViT-bigG, OpenCLIP's names).
:func:`read_single_file` checks such a file against the architecture of the backbone's own
pipeline (its configs, which the caller reads from the backbone's folder: nothing is
downloaded) and returns the state dicts under diffusers names. The expected original
layout is wadi's writer tables (:mod:`wadi_cli.io.sd_single_file_write`) applied to the
architecture's meta tensors; the renames themselves are diffusers' converters (U-Net
through :func:`~wadi_cli.io.sd_single_file.ldm_unet_table`), so reading and writing are two
independent mappings that the tests run against each other.

Refused in one line, before any tensor is read: a file that is not safetensors, a file
without original SD keys, a file of another SD family (its text-encoder layout or its
cross-attention width differs from the backbone's), an SDXL file without its second text
encoder, and a file with missing or reshaped keys.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from wadi_cli.errors import CheckpointError, MismatchError
from wadi_cli.io.safetensors_reader import SafetensorsFile
from wadi_cli.io.sd_single_file import LDM_UNET_PREFIX, ldm_unet_table
from wadi_cli.io.sd_single_file_write import (
    CLIP_PREFIX,
    OPENCLIP_PREFIX,
    SDXL_CLIP_PREFIX,
    SDXL_OPENCLIP_PREFIX,
    TEXT_LAYOUTS,
    VAE_PREFIX,
    clip_to_ldm,
    openclip_to_ldm,
    unet_to_ldm,
    vae_to_ldm,
)

#: text-encoder layout -> (key prefix in the file, family words for messages)
LAYOUT_WORDS = {
    "clip": (CLIP_PREFIX, "SD 1.x (CLIP text encoder)"),
    "openclip": (OPENCLIP_PREFIX, "SD 2.x (OpenCLIP text encoder)"),
    "sdxl": ("conditioner.embedders.", "SDXL (two text encoders)"),
}
SINGLE_FILE_SUFFIX = ".safetensors"


def is_single_file_model(model: str | os.PathLike[str] | None) -> bool:
    """Whether ``--model`` names a file (a single-file checkpoint) rather than a pipeline
    folder or a hub id."""
    return model is not None and Path(model).expanduser().is_file()


def sha256_file(path: str | os.PathLike[str], block: int = 1 << 22) -> str:
    """Hex sha256 of a file's bytes (read in blocks)."""
    h = hashlib.sha256()
    with Path(path).open("rb") as fh:
        while chunk := fh.read(block):
            h.update(chunk)
    return h.hexdigest()


def file_fingerprint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """What a run records of a ``--model`` file: its name, size and sha256."""
    p = Path(path).expanduser()
    return {"file": p.name, "bytes": p.stat().st_size, "sha256": sha256_file(p)}


def model_file_record(model: str | os.PathLike[str] | None) -> dict[str, Any] | None:
    """:func:`file_fingerprint` of ``--model`` when it names a single file, else ``None``."""
    return file_fingerprint(model) if model is not None and is_single_file_model(model) else None


def _meta(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    return {k: torch.empty(s, device="meta") for k, s in shapes.items()}


def expected_layout(
    shapes: Mapping[str, Mapping[str, tuple[int, ...]]],
    unet_config: Mapping[str, Any],
    vae_levels: int,
    layout: str,
) -> dict[str, tuple[int, ...]]:
    """Original key -> shape of the file a pipeline of these diffusers ``shapes``
    (``{"unet"|"vae"|"text_encoder"[|"text_encoder_2"]: {name: shape}}``) is written as."""
    out = unet_to_ldm(_meta(shapes["unet"]), unet_config)
    out.update(vae_to_ldm(_meta(shapes["vae"]), vae_levels))
    text = _meta(shapes["text_encoder"])
    if layout == "sdxl":
        out.update(clip_to_ldm(text, SDXL_CLIP_PREFIX))
        out.update(openclip_to_ldm(_meta(shapes["text_encoder_2"]), SDXL_OPENCLIP_PREFIX))
    else:
        out.update(clip_to_ldm(text) if layout == "clip" else openclip_to_ldm(text))
    return {k: tuple(v.shape) for k, v in out.items()}


def _family_of(keys: Mapping[str, tuple[int, ...]]) -> tuple[str | None, int | None]:
    """(text-encoder layout, cross-attention width) of an original file, from names and shapes."""
    layout = next(
        (lay for lay, (prefix, _) in LAYOUT_WORDS.items() if any(k.startswith(prefix) for k in keys)), None
    )
    width = next(
        (
            s[-1]
            for k, s in sorted(keys.items())
            if k.startswith(LDM_UNET_PREFIX) and k.endswith("attn2.to_k.weight")
        ),
        None,
    )
    return layout, width


def check_family(
    path: Path, keys: Mapping[str, tuple[int, ...]], backbone: str, unet_config: Mapping[str, Any]
) -> None:
    """Refuse a single file of another family than ``backbone`` (sd15 / sd21 / sdxl), told
    apart by the text-encoder layout and the cross-attention width (768 / 1024 / 2048 for the
    real models; the miniatures' differ in layout)."""
    want_layout, want_width = TEXT_LAYOUTS[backbone], int(unet_config["cross_attention_dim"])
    layout, width = _family_of(keys)
    if layout is not None and layout != want_layout or width is not None and width != want_width:
        words = LAYOUT_WORDS[layout][1] if layout else "an SD"
        raise MismatchError(
            f"--model {path}: an {words} single file with cross-attention width {width}, "
            f"not a {backbone} checkpoint (width {want_width}, {LAYOUT_WORDS[want_layout][1]}); "
            f"pass the matching -b"
        )


def _check_keys(path: Path, have: Mapping[str, tuple[int, ...]], want: Mapping[str, tuple[int, ...]]) -> None:
    missing = sorted(set(want) - set(have))
    if missing:
        raise MismatchError(
            f"--model {path}: {len(missing)} of the {len(want)} tensors of the base pipeline are missing "
            f"(e.g. {missing[0]!r}); not a complete original-layout checkpoint"
        )
    wrong = sorted(k for k in want if tuple(have[k]) != tuple(want[k]))
    if wrong:
        k = wrong[0]
        raise MismatchError(
            f"--model {path}: {len(wrong)} tensors have other shapes than the base pipeline's "
            f"(e.g. {k!r}: file {list(have[k])}, expected {list(want[k])})"
        )


def read_single_file(
    path: str | os.PathLike[str],
    backbone: str,
    shapes: Mapping[str, Mapping[str, tuple[int, ...]]],
    unet_config: Mapping[str, Any],
    vae_config: Mapping[str, Any],
) -> dict[str, dict[str, torch.Tensor]]:
    """The U-Net, VAE and text-encoder state dicts (diffusers names) of the original-layout
    single file ``path``, checked against the backbone's architecture: ``shapes`` are the
    diffusers shapes of its ``unet`` / ``vae`` / ``text_encoder`` (built from its configs),
    ``unet_config`` / ``vae_config`` its configs. Tensors outside the pipeline (EMA copies,
    OpenCLIP's unused last layer) are ignored. Raises :class:`CheckpointError` /
    :class:`MismatchError` with one line."""
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_vae_checkpoint,
    )

    p = Path(path).expanduser()
    if backbone not in TEXT_LAYOUTS:
        raise CheckpointError(
            f"--model {p}: single files are read for sd15, sd21 and sdxl (original SD layout), "
            f"not {backbone!r}; "
            "pass a pipeline folder"
        )
    with SafetensorsFile(p) as f:  # a file that is not safetensors fails here, in one line
        have = {k: tuple(info.shape) for k, info in f.tensors.items()}
        if not any(k.startswith(LDM_UNET_PREFIX) for k in have):
            raise CheckpointError(
                f"--model {p}: no original Stable Diffusion keys (model.diffusion_model.*); "
                "a diffusers pipeline is passed as its folder"
            )
        check_family(p, have, backbone, unet_config)
        layout = TEXT_LAYOUTS[backbone]
        if layout == "sdxl" and not any(k.startswith(SDXL_OPENCLIP_PREFIX) for k in have):
            raise CheckpointError(
                f"--model {p}: an SDXL single file without its second text encoder "
                f"({SDXL_OPENCLIP_PREFIX}*, OpenCLIP ViT-bigG); not a complete SDXL checkpoint"
            )
        want = expected_layout(shapes, unet_config, len(vae_config["block_out_channels"]), layout)
        _check_keys(p, have, want)
        state = {k: f.get(k) for k in want}
    try:
        table = ldm_unet_table({k: have[k] for k in want}, config=unet_config)
    except CheckpointError as exc:
        raise CheckpointError(f"--model {p}: {exc}") from None
    unet = {new: state[old] for new, old in table.names.items()}
    vae = convert_ldm_vae_checkpoint(
        {k: v for k, v in state.items() if k.startswith(VAE_PREFIX)}, dict(vae_config)
    )
    if layout == "sdxl":
        first = _under(state, SDXL_CLIP_PREFIX)
        second = _openclip(
            _under(state, SDXL_OPENCLIP_PREFIX), shapes, "text_encoder_2", SDXL_OPENCLIP_PREFIX
        )
        return {
            "unet": unet,
            "vae": vae,
            "text_encoder": _model_names(convert_ldm_clip_checkpoint(first), shapes["text_encoder"]),
            "text_encoder_2": _model_names(second, shapes["text_encoder_2"]),
        }
    text_state = _under(state, "cond_stage_model.")
    text = convert_ldm_clip_checkpoint(text_state) if layout == "clip" else _openclip(text_state, shapes)
    return {"unet": unet, "vae": vae, "text_encoder": _model_names(text, shapes["text_encoder"])}


def _under(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if k.startswith(prefix)}


def _model_names(text: Mapping[str, torch.Tensor], shapes: Mapping[str, tuple[int, ...]]) -> dict:
    """The converted text encoder under the model's own names: transformers names the text
    model's tensors with or without ``text_model.`` (and a projection beside it); each key is
    taken as it is, with that lead or without it, whichever the model has."""
    out = {}
    for k, v in text.items():
        bare = k.removeprefix("text_model.")
        name = next((c for c in (k, "text_model." + bare, bare) if c in shapes), k)
        out[name] = v
    return out


def _openclip(
    state: dict[str, torch.Tensor],
    shapes: Mapping[str, Mapping[str, tuple[int, ...]]],
    part: str = "text_encoder",
    prefix: str = OPENCLIP_PREFIX,
) -> dict:
    """diffusers' OpenCLIP conversion (it needs the model's hidden width to split q/k/v)."""
    from types import SimpleNamespace

    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint

    hidden = next(s[0] for k, s in shapes[part].items() if k.endswith("final_layer_norm.weight"))
    model = SimpleNamespace(config=SimpleNamespace(hidden_size=hidden))
    return convert_open_clip_checkpoint(model, state, prefix=prefix)
