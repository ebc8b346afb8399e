"""Writing a diffusers pipeline folder from its parts: ``from_pretrained``-ready, and no more.

The folder holds ``model_index.json``, the denoiser (its config and the given weights)
and the components a pipeline runs with (vae, text_encoder, tokenizer, scheduler),
each copied from where it came from with ONE copy of its weights: never the safety
checker, the feature extractor, pickle copies, the root single-file checkpoints or a
second precision. Variant weights (``*.fp16.safetensors``, ``model.fp16-0000N-of-…``)
are written under the plain names (and sharded indexes rewritten), so the folder loads
without ``variant=``.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from wadi_cli.errors import CheckpointError
from wadi_cli.io.hub_files import CONFIG_SUFFIXES, folder_weights
from wadi_cli.io.safetensors_writer import save_safetensors

#: Pipeline class per denoiser family, used when the source has no ``model_index.json``.
PIPELINE_CLASSES = {"unet": "StableDiffusionPipeline", "dit": "PixArtAlphaPipeline"}
_LIBRARIES = {
    "vae": "diffusers",
    "scheduler": "diffusers",
    "text_encoder": "transformers",
    "tokenizer": "transformers",
    "text_encoder_2": "transformers",
    "tokenizer_2": "transformers",
}


def _link_or_copy(src: Path, dest: Path) -> None:
    """Hard-link when possible (hub cache blobs: no second copy on disk), else copy."""
    real = src.resolve()
    try:
        os.link(real, dest)
    except OSError:
        shutil.copyfile(real, dest)


def _plain_name(name: str, variant: str | None) -> str:
    """``diffusion_pytorch_model.fp16.safetensors`` → ``diffusion_pytorch_model.safetensors``;
    ``model.fp16-00001-of-00002.safetensors`` → ``model-00001-of-00002.safetensors``;
    ``model.safetensors.index.fp16.json`` → ``model.safetensors.index.json``."""
    if not variant:
        return name
    tag = f".{variant}"
    if name.endswith(f".index{tag}.json"):
        return name[: -len(f"{tag}.json")] + ".json"
    return name.replace(tag, "", 1)


def copy_component(src: Path, dest: Path, variant: str | None) -> list[str]:
    """Copy one component folder: its config/vocabulary files and one copy of its
    weights (``variant`` preferred), renamed to the plain names. Returns the names written."""
    if not src.is_dir():
        raise CheckpointError(f"{src}: no such component folder")
    dest.mkdir(parents=True, exist_ok=True)
    names = sorted(p.name for p in src.iterdir() if p.is_file() and not p.name.startswith("."))
    weights, found = folder_weights(names, variant)
    written = []
    for name in names:
        if name in weights or ".index" in name or not name.endswith(CONFIG_SUFFIXES):
            continue
        _link_or_copy(src / name, dest / name)
        written.append(name)
    for name in weights:
        new = _plain_name(name, found)
        if name.endswith(".json"):  # a shard index: its weight map names the renamed shards
            index = json.loads((src / name).read_text(encoding="utf-8"))
            index["weight_map"] = {k: _plain_name(v, found) for k, v in index["weight_map"].items()}
            (dest / new).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        else:
            _link_or_copy(src / name, dest / new)
        written.append(new)
    return written


def _index(root: Path) -> dict[str, Any]:
    path = root / "model_index.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}


def pipeline_index(
    components_root: Path, family: str, subfolder: str, denoiser_class: str, components: Sequence[str]
) -> dict[str, Any]:
    """``model_index.json`` of the written folder: the source's classes for the copied
    components, the denoiser, and ``null`` for every component that is not copied."""
    source = _index(components_root)
    index: dict[str, Any] = {"_class_name": source.get("_class_name") or PIPELINE_CLASSES[family]}
    for key, value in source.items():
        if key.startswith("_") or key in components or key in ("unet", "transformer"):
            continue
        if isinstance(value, list) and len(value) == 2:
            index[key] = [None, None]  # not copied (safety checker, feature extractor, ...)
        elif not isinstance(value, list | dict):  # pipeline settings (SDXL's force_zeros_for_empty_prompt)
            index[key] = value
    for name in components:
        entry = source.get(name)
        index[name] = list(entry) if isinstance(entry, list) and entry[0] else [_LIBRARIES[name], None]
    index[subfolder] = ["diffusers", denoiser_class]
    if index["_class_name"] == "StableDiffusionPipeline":
        index["requires_safety_checker"] = False
    missing = [n for n in components if index[n][1] is None]
    if missing:
        classes = _default_classes(components_root, missing)
        for name in missing:
            index[name][1] = classes[name]
    return index


def _default_classes(root: Path, names: Sequence[str]) -> dict[str, str]:
    """Class names of components whose source has no ``model_index.json``, from their configs."""
    out = {}
    for name in names:
        cfg_file = "scheduler_config.json" if name == "scheduler" else "config.json"
        cfg = {}
        if (root / name / cfg_file).is_file():
            cfg = json.loads((root / name / cfg_file).read_text(encoding="utf-8"))
        if name.startswith("tokenizer"):
            tok = root / name / "tokenizer_config.json"
            cfg = json.loads(tok.read_text(encoding="utf-8")) if tok.is_file() else {}
            out[name] = cfg.get("tokenizer_class") or "AutoTokenizer"
        elif name.startswith("text_encoder"):
            out[name] = (cfg.get("architectures") or ["AutoModel"])[0]
        else:
            out[name] = cfg.get("_class_name") or ("AutoencoderKL" if name == "vae" else "DDPMScheduler")
    return out


def write_pipeline_folder(
    dest: Path,
    *,
    denoiser_root: Path,
    subfolder: str,
    denoiser_class: str,
    denoiser_state: Mapping[str, torch.Tensor],
    components_root: Path,
    components: Sequence[str],
    family: str,
    variant: str | None = None,
    metadata: Mapping[str, str] | None = None,
    component_roots: Mapping[str, Path] | None = None,
) -> Path:
    """Write a complete pipeline into the (empty, temporary) folder ``dest``: the
    denoiser's config from ``denoiser_root/subfolder`` with ``denoiser_state`` as its
    weights, and ``components`` copied from ``components_root`` (or from the folder
    ``component_roots`` names for one: SDXL's fp16-safe VAE)."""
    roots = dict(component_roots or {})
    for name in components:
        copy_component(roots.get(name, components_root / name), dest / name, variant)
    (dest / subfolder).mkdir(parents=True, exist_ok=True)
    config = denoiser_root / subfolder / "config.json"
    if not config.is_file():
        raise CheckpointError(f"{denoiser_root / subfolder}: no config.json")
    shutil.copyfile(config.resolve(), dest / subfolder / "config.json")
    save_safetensors(denoiser_state, dest / subfolder / "diffusion_pytorch_model.safetensors", metadata)
    index = pipeline_index(components_root, family, subfolder, denoiser_class, components)
    (dest / "model_index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return dest
