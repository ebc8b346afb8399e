"""``wadi merge BASE LORA.safetensors``: add a plain LoRA's weight change to a checkpoint
(on state dicts; the network is never built).

The inverse of :mod:`wadi_cli.distill.export_lora`: for every layer of the LoRA file,

    W  ←  W + s · up · down,     s = alpha / r  (kohya; r = down's rank, 1 without alpha)
                                 s = 1          (PEFT / diffusers names, no alpha)

with a Conv's ``down`` ``(r, in, kh, kw)`` and ``up`` ``(out, r, 1, 1)`` read as the
matrices ``r × (in·kh·kw)`` and ``out × r`` (computed in float64, cast back to the base's
dtype). Two key layouts are read: kohya / AUTOMATIC1111 (``lora_unet_<module with _>``
``.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``) and PEFT / diffusers
(``unet.<module>.lora_A.weight`` / ``.lora_B.weight``, ``transformer.`` for PixArt). A
kohya name's underscores are resolved against the base's own module names. Every LoRA
layer must match a weight of the base with a fitting shape, else nothing is written.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from wadi_cli.errors import BadInputError, MismatchError
from wadi_cli.io import open_checkpoint, provenance_metadata, require_finite, save_safetensors
from wadi_cli.io.metadata import ALPHA_BAR_T_METADATA
from wadi_cli.io.tensor_map import Tensors, as_tensor_map

KOHYA_PREFIX = "lora_unet_"
KOHYA_SUFFIXES = (".lora_down.weight", ".lora_up.weight")
PEFT_SUFFIXES = (".lora_A.weight", ".lora_B.weight")
PEFT_PREFIXES = ("unet.", "transformer.")


def is_lora(keys: Iterable[str]) -> bool:
    """Whether tensor names ``keys`` are those of a plain LoRA file (kohya or PEFT names)."""
    return any(k.endswith(KOHYA_SUFFIXES + PEFT_SUFFIXES) for k in keys)


@dataclass(frozen=True)
class LoraLayer:
    """One layer of a LoRA file: the key stem it was stored under, its factors and scale."""

    stem: str
    down: torch.Tensor
    up: torch.Tensor
    scale: float

    def delta(self) -> torch.Tensor:
        """``scale · up · down`` as an ``out × (in·kh·kw)`` float64 matrix."""
        r = self.down.shape[0]
        up = self.up.to(torch.float64).reshape(self.up.shape[0], r)
        down = self.down.to(torch.float64).reshape(r, -1)
        return self.scale * (up @ down)


def lora_layers(tensors: Mapping[str, torch.Tensor]) -> dict[str, LoraLayer]:
    """The layers of a LoRA file by key stem (``lora_unet_…`` or ``unet.<module>``)."""
    stems: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        for part, suffix in zip(("down", "up", "down", "up"), KOHYA_SUFFIXES + PEFT_SUFFIXES, strict=True):
            if key.endswith(suffix):
                stems.setdefault(key[: -len(suffix)], {})[part] = value
        if key.endswith(".alpha"):
            stems.setdefault(key[: -len(".alpha")], {})["alpha"] = value
    layers: dict[str, LoraLayer] = {}
    for stem, parts in stems.items():
        if "down" not in parts or "up" not in parts:
            have = "only an alpha" if set(parts) == {"alpha"} else f"only its {next(iter(parts))} factor"
            raise BadInputError(f"LoRA layer {stem!r} has {have}")
        down, up = parts["down"], parts["up"]
        r = down.shape[0]
        if up.ndim < 2 or up.shape[1] != r or (up.ndim == 4 and tuple(up.shape[2:]) != (1, 1)):
            raise MismatchError(
                f"LoRA layer {stem!r}: up {tuple(up.shape)} does not fit down {tuple(down.shape)} (rank {r})"
            )
        scale = float(parts["alpha"]) / r if "alpha" in parts else 1.0
        layers[stem] = LoraLayer(stem, down, up, scale)
    return layers


def _module_of(stem: str, modules: Mapping[str, str]) -> str | None:
    """The base weight key of a LoRA layer stem, or ``None``. ``modules`` maps kohya
    names (``lora_unet_down_blocks_0_…``) and PEFT names (``down_blocks.0.…``) to keys."""
    if stem.startswith(KOHYA_PREFIX):
        return modules.get(stem)
    for prefix in PEFT_PREFIXES:
        if stem.startswith(prefix):
            return modules.get(stem[len(prefix) :])
    return modules.get(stem)


def _base_modules(keys: Iterable[str], prefix: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for key in keys:
        if key.startswith(prefix) and key.endswith(".weight"):
            module = key[len(prefix) : -len(".weight")]
            out[module] = key
            out[KOHYA_PREFIX + module.replace(".", "_")] = key
    return out


def merge_lora_into_state_dict(
    base: Tensors,
    lora: Mapping[str, torch.Tensor],
    *,
    dtype: torch.dtype | None = None,
    prefix: str | None = None,
) -> tuple[dict[str, torch.Tensor], int]:
    """``base`` with every LoRA layer's ``s · up · down`` added to its weight (float64 sum,
    cast to the base tensor's dtype, or ``dtype``); every other tensor passes through.
    Returns the state dict and the number of layers merged. A LoRA layer that matches no
    weight, or whose ΔW does not fit the weight's shape, raises :class:`MismatchError`."""
    src = as_tensor_map(base)
    keys = list(src.keys())
    layers = lora_layers(lora)
    if not layers:
        raise BadInputError("the LoRA file holds no lora_down/lora_up (or lora_A/lora_B) tensors")
    modules = _base_modules(keys, prefix or "")
    targets = {stem: _module_of(stem, modules) for stem in layers}
    unmatched = sorted(stem for stem, key in targets.items() if key is None)
    if unmatched:
        raise MismatchError(
            f"{len(unmatched)} of the {len(layers)} LoRA layers match no weight of the base "
            f"(e.g. {unmatched[0]!r}); is it a LoRA of another model (or of the text encoder)?"
        )
    deltas: dict[str, torch.Tensor] = {}
    for stem, key in targets.items():
        assert key is not None
        shape = tuple(src.shape(key))
        delta = layers[stem].delta()
        if delta.shape[0] != shape[0] or delta.numel() != torch.Size(shape).numel():
            raise MismatchError(
                f"LoRA layer {stem!r} changes a {tuple(delta.shape)} matrix, but {key} is {shape}"
            )
        if key in deltas:
            raise MismatchError(f"two LoRA layers change {key} (e.g. {stem!r})")
        deltas[key] = delta.reshape(shape)
    out: dict[str, torch.Tensor] = {}
    for key in keys:
        tensor = src.get(key)
        if key in deltas:
            tensor = (tensor.to(torch.float64) + deltas[key]).to(tensor.dtype)
        out[key] = tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
    return out, len(deltas)


def merge_lora_file(
    base: str | os.PathLike[str],
    lora: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    dtype: torch.dtype | None = None,
    prefix: str | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Merge the LoRA file ``lora`` into the checkpoint ``base`` and write one safetensors
    file ``out`` atomically (diffusers names, provenance metadata, the LoRA's recorded ᾱ_T).
    Nothing is written on error. Returns a summary like ``wadi merge``'s."""
    out_path = Path(out)
    if out_path.is_dir():
        raise BadInputError(f"{out_path} is a folder; --out must be a .safetensors file path")
    if out_path.exists() and not overwrite:
        raise BadInputError(f"{out_path} already exists (pass --overwrite to replace it)")
    with open_checkpoint(lora) as src:
        tensors = {k: src.get(k) for k in list(src.keys())}
        alpha = src.metadata().get(ALPHA_BAR_T_METADATA)
    for name, tensor in tensors.items():
        require_finite(lora, name, tensor)
    with open_checkpoint(base) as src:
        merged, count = merge_lora_into_state_dict(src, tensors, dtype=dtype, prefix=prefix)
    recipe = {
        "operation": "merge_lora",
        "format": "merged",
        "base": str(base),
        "lora": str(lora),
        "dtype": str(dtype).removeprefix("torch.") if dtype else "unchanged",
        "merged_layers": count,
    }
    meta = provenance_metadata(config=recipe, sources=[str(base), str(lora)])
    if alpha:
        meta[ALPHA_BAR_T_METADATA] = alpha
    save_safetensors(merged, out_path, meta)
    ranks = sorted(
        {int(t.shape[0]) for k, t in tensors.items() if k.endswith((".lora_down.weight", ".lora_A.weight"))}
    )
    return {
        "out": str(out_path),
        "merged_layers": count,
        "tensors": len(merged),
        "rank": ranks[-1] if len(ranks) == 1 else f"{ranks[0]}-{ranks[-1]}",
        "role": "lora",
        "dtype": recipe["dtype"],
        "format": "merged",
    }
