"""Original Stable Diffusion single files (``model.diffusion_model.*`` keys) → diffusers names.

The renaming is diffusers' own (``convert_ldm_unet_checkpoint``), run LAZILY: instead of
tensors we hand it placeholder objects that carry only the original key and shape, and
read back which diffusers name received which placeholder. The result is a name table;
tensors are read later, one at a time, by the caller. For SD 1.x/2.x U-Nets the
conversion only renames (no reshaping, splitting or concatenation); we assert that every
placeholder came through untouched and exactly once, and refuse otherwise. diffusers is
imported where the mapping runs (start-up time: every command imports :mod:`wadi_cli.io`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from typing import Any

import torch

from wadi_cli.errors import CheckpointError
from wadi_cli.io.tensor_map import KeyDiff

LDM_UNET_PREFIX = "model.diffusion_model."
EMA_PREFIX = "model_ema."
# diffusers' model-type label -> shipped U-Net config (wadi_cli/configs/<name>/unet).
SUPPORTED_TYPES = {"v1": "sd15", "v2": "sd21"}
VERSION_LABELS = {"v1": "SD v1", "v2": "SD v2"}


@dataclass(frozen=True)
class _Placeholder:
    """Stands in for a tensor during the name conversion: knows its key and shape only."""

    key: str
    shape: tuple[int, ...]

    def __getattr__(self, attr: str) -> Any:  # any tensor op means the conversion is not a rename
        if attr.startswith("__"):
            raise AttributeError(attr)
        raise _NotARename(f"the conversion used tensor.{attr} on {self.key!r}")


class _NotARename(Exception):
    pass


@dataclass(frozen=True)
class LdmUnetTable:
    """Result of mapping an original SD file: diffusers name -> original key, and what was seen."""

    names: dict[str, str]
    model_type: str  # diffusers' label: "v1" or "v2" (or "custom" when a config was given)
    ignored: int  # tensors outside the U-Net (VAE, text encoder, EMA copy, ...)
    ema: bool  # whether the EMA copy was used

    @property
    def label(self) -> str:
        return VERSION_LABELS.get(self.model_type, "SD-style (custom config)")


def is_ldm_checkpoint(keys: Mapping[str, object] | list[str]) -> bool:
    """True when a checkpoint uses original SD naming (any key under ``model.diffusion_model.``)."""
    return any(k.startswith(LDM_UNET_PREFIX) for k in keys)


def shipped_unet_config(name: str) -> dict[str, Any]:
    """Load a shipped U-Net architecture config (``sd15`` or ``sd21``) as a dict."""
    text = resources.files("wadi_cli").joinpath("configs", name, "unet", "config.json").read_text()
    return json.loads(text)


def infer_model_type(shapes: Mapping[str, tuple[int, ...]]) -> str:
    """diffusers' model-type label ("v1", "v2", "xl_base", ...) from key names and shapes only."""
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    return infer_diffusers_model_type({k: _Placeholder(k, tuple(s)) for k, s in shapes.items()})


def expected_unet_shapes(config: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """Name -> shape of the diffusers U-Net ``config`` describes (built on the meta device)."""
    from diffusers import UNet2DConditionModel

    try:
        with torch.device("meta"):
            model = UNet2DConditionModel.from_config(dict(config))
    except (TypeError, ValueError, KeyError, AttributeError) as exc:
        raise CheckpointError(f"invalid U-Net config ({type(exc).__name__}: {exc})") from None
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _verify(
    names: dict[str, str], shapes: Mapping[str, tuple[int, ...]], config: Mapping[str, Any], which: str
) -> None:
    """Strict check of the mapped names and shapes against the architecture (a wrong config
    otherwise maps every tensor to a plausible but wrong name)."""
    diff = KeyDiff.between(expected_unet_shapes(config), {n: tuple(shapes[raw]) for n, raw in names.items()})
    if diff:
        what = diff.describe("missing", "unexpected", "expected", "file")
        raise CheckpointError(f"the U-Net does not match {which}: {what}")


def _ema_key(key: str) -> str:
    # diffusers' convention: "model_ema." + the key after "model." with its dots removed
    return EMA_PREFIX + "".join(key.split(".")[1:])


def _convert(placeholders: dict[str, _Placeholder], config: Mapping[str, Any], ema: bool) -> dict[str, Any]:
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
    from diffusers.utils import logging as dlogging

    level = dlogging.get_verbosity()
    dlogging.set_verbosity_error()  # its EMA warnings name flags of diffusers' scripts, not ours
    try:
        return convert_ldm_unet_checkpoint(placeholders, dict(config), extract_ema=ema)
    except _NotARename as exc:
        raise CheckpointError(f"cannot map this checkpoint lazily: {exc}") from None
    except (KeyError, IndexError, TypeError, ValueError) as exc:
        raise CheckpointError(
            f"the U-Net keys do not match the expected architecture ({type(exc).__name__}: {exc})"
        ) from None
    finally:
        dlogging.set_verbosity(level)


def ldm_unet_table(
    shapes: Mapping[str, tuple[int, ...]],
    config: Mapping[str, Any] | None = None,
    ema: bool = False,
    verify: bool = True,
) -> LdmUnetTable:
    """Map an original SD checkpoint's U-Net keys to diffusers names, without reading tensors.

    ``shapes`` maps every key of the file to its shape. ``config`` is the diffusers U-Net
    config the checkpoint follows; by default it is picked from the inferred type
    (v1 -> shipped sd15 config, v2 -> shipped sd21 config). ``ema=True`` takes the EMA
    copy (``model_ema.*``) instead of the raw weights when the file has both.
    ``verify`` checks the mapped names and shapes against the U-Net built from
    ``config`` on the meta device (strict: no missing, unexpected or reshaped tensor).
    Raises :class:`CheckpointError` without the file name (the caller adds it).
    """
    model_type, which = "custom", "the given config"
    if config is None:
        model_type = infer_model_type(shapes)
        if model_type not in SUPPORTED_TYPES:
            raise CheckpointError(
                f"original checkpoint of type {model_type!r} is not supported "
                "(wadi maps SD v1.x and v2.x U-Nets); convert it to a diffusers folder first"
            )
        config = shipped_unet_config(SUPPORTED_TYPES[model_type])
        which = f"the shipped {SUPPORTED_TYPES[model_type]} config (detected {VERSION_LABELS[model_type]})"
    unet_keys = [k for k in shapes if k.startswith(LDM_UNET_PREFIX)]
    has_ema = sum(k.startswith(EMA_PREFIX) for k in shapes) > 100
    if ema and not has_ema:
        raise CheckpointError("asked for EMA weights, but the file has no model_ema.* copy")
    placeholders = {k: _Placeholder(k, tuple(s)) for k, s in shapes.items()}
    converted = _convert(placeholders, config, ema)
    names: dict[str, str] = {}
    used: set[str] = set()
    for new, value in converted.items():
        if not isinstance(value, _Placeholder):
            if value is None and ema:
                raise CheckpointError(f"EMA copy incomplete: no EMA tensor for {new!r}")
            raise CheckpointError(f"conversion produced a modified tensor for {new!r}; cannot map lazily")
        if value.key in used:
            raise CheckpointError(f"original key {value.key!r} mapped to two diffusers names")
        used.add(value.key)
        names[new] = value.key
    expected = {_ema_key(k) for k in unet_keys} if ema else set(unet_keys)
    missed = sorted(expected - used)
    if missed:
        raise CheckpointError(
            f"{len(missed)} U-Net tensors have no diffusers name (e.g. {missed[0]!r}); "
            "the checkpoint does not match the expected architecture"
        )
    if verify:
        _verify(names, shapes, config, which)
    return LdmUnetTable(names=names, model_type=model_type, ignored=len(shapes) - len(names), ema=ema)
