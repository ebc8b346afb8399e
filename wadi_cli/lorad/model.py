"""Model-level LoRaD operations: inject, remove, merge, select trainable parameters, and
translate between a wrapped model and adapter / base state dicts.

Names: an adapter tensor is keyed ``<module path>.lorad_A`` / ``.lorad_B`` where the
module path is the ORIGINAL Linear's path in the base model (so ``<path>.weight`` is the
weight it rotates). Inside a wrapped model that Linear lives at ``<path>.base_layer``;
:func:`get_base_state_dict` strips that level again.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import Tensor, nn

from wadi_cli.errors import BadInputError, MismatchError
from wadi_cli.io.tensor_map import KeyDiff, preview
from wadi_cli.lorad.layer import LoRaDLinear

#: The key endings of adapter tensors (``<module path>.lorad_A`` / ``.lorad_B``): the one
#: place they are spelled, from the layer's parameter names.
ADAPTER_SUFFIXES: tuple[str, ...] = tuple(f".{p}" for p in LoRaDLinear.adapter_param_names)
A_SUFFIX, B_SUFFIX = ADAPTER_SUFFIXES


def is_adapter(keys: Iterable[str]) -> bool:
    """Whether tensor names ``keys`` are those of a LoRaD adapter file (any key ends in
    ``.lorad_A`` / ``.lorad_B``; :func:`~wadi_cli.lorad.adapter_paths` checks the rest)."""
    return any(k.endswith(ADAPTER_SUFFIXES) for k in keys)


def set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    """Put ``module`` at the dotted ``path`` of ``model`` (replacing what is there)."""
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, child, module)


def lorad_layers(model: nn.Module) -> dict[str, LoRaDLinear]:
    """Every LoRaD layer of ``model``, keyed by the module path of the Linear it wraps."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRaDLinear)}


def inject_lorad(
    model: nn.Module, targets: Iterable[str], rank: int, *, init_seed: int | None = None
) -> list[str]:
    """Replace each named ``nn.Linear`` of ``model`` by a :class:`LoRaDLinear` of ``rank``.

    The replaced Linears are frozen; other parameters are left as they are (see
    :func:`mark_only_lorad_trainable`). With ``init_seed`` the ``B`` matrices are drawn
    from one CPU generator in target order, so the same seed and targets give the same
    adapter on every device. All targets are checked before anything is replaced.

    Returns:
        The module paths that were wrapped, in the order given.
    """
    names = list(dict.fromkeys(targets))
    if not names:
        raise BadInputError("inject_lorad: no target modules given")
    missing, wrong = [], []
    for name in names:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            missing.append(name)
            continue
        if isinstance(module, LoRaDLinear) or not isinstance(module, nn.Linear):
            wrong.append(f"{name} ({type(module).__name__})")
    if missing:
        raise BadInputError(f"LoRaD targets not found in the model: {preview(sorted(missing), 5)}")
    if wrong:
        raise BadInputError(f"LoRaD targets must be plain nn.Linear modules: {preview(sorted(wrong), 5)}")
    odd = [n for n in names if model.get_submodule(n).in_features % 2]
    if odd:
        raise BadInputError(
            f"LoRaD needs an even in_features; these targets have an odd one: {preview(sorted(odd), 5)}"
        )
    generator = torch.Generator().manual_seed(init_seed) if init_seed is not None else None
    for name in names:
        layer = LoRaDLinear(model.get_submodule(name), rank, name=name, generator=generator)
        set_submodule(model, name, layer)
    return names


def remove_lorad(model: nn.Module, merge: bool) -> None:
    """Unwrap every LoRaD layer back to its plain Linear; with ``merge=True`` the rotation
    is written into the weight first, otherwise the base weight is restored (unmerged)."""
    for name, layer in lorad_layers(model).items():
        if merge:
            layer.merge()
        else:
            layer.unmerge()
        set_submodule(model, name, layer.base_layer)


def merge_lorad(model: nn.Module) -> None:
    """Merge every LoRaD layer in place (keeps the wrappers; see :func:`remove_lorad`)."""
    for layer in lorad_layers(model).values():
        layer.merge()


def unmerge_lorad(model: nn.Module) -> None:
    """Undo :func:`merge_lorad`."""
    for layer in lorad_layers(model).values():
        layer.unmerge()


def lorad_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The adapter parameters, taken from each layer's ``adapter_param_names`` (never
    selected by name matching), in module order."""
    return [
        getattr(layer, pname) for layer in lorad_layers(model).values() for pname in layer.adapter_param_names
    ]


def count_trainable(model_or_params: nn.Module | Iterable[nn.Parameter]) -> int:
    """Number of adapter parameters of a model (LoRaD parameters only), or the total
    size of an iterable of parameters."""
    params = lorad_parameters(model_or_params) if isinstance(model_or_params, nn.Module) else model_or_params
    return sum(p.numel() for p in params)


def mark_only_lorad_trainable(model: nn.Module) -> list[nn.Parameter]:
    """Freeze every parameter except the LoRaD ones; returns the trainable list."""
    model.requires_grad_(False)
    params = lorad_parameters(model)
    for p in params:
        p.requires_grad_(True)
    return params


@torch.no_grad()
def adapters_to_fp32(model: nn.Module) -> None:
    """Put adapter parameters back in fp32 (e.g. after ``model.half()`` cast everything)."""
    for p in lorad_parameters(model):
        if p.dtype != torch.float32:
            p.data = p.data.float()


def get_adapter_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """``{<linear path>.lorad_A: [m, r], <linear path>.lorad_B: [r, n/2]}`` (detached)."""
    out: dict[str, Tensor] = {}
    for name, layer in lorad_layers(model).items():
        for pname in layer.adapter_param_names:
            out[f"{name}.{pname}"] = getattr(layer, pname).detach()
    return out


@torch.no_grad()
def load_adapter_state_dict(
    model: nn.Module, tensors: Mapping[str, Tensor], strict: bool = True
) -> tuple[list[str], list[str]]:
    """Copy adapter tensors into the model's LoRaD layers (cast to the parameters' dtype).

    With ``strict`` every layer must get both tensors and every key must be used;
    otherwise a :class:`MismatchError` lists the missing and unexpected keys. Shapes are
    always checked. Layers must not be merged.

    Returns:
        ``(missing, unexpected)`` key lists (empty when strict succeeded).
    """
    layers = lorad_layers(model)
    expected = {f"{n}.{p}": (layer, p) for n, layer in layers.items() for p in layer.adapter_param_names}
    diff = KeyDiff.between({k: getattr(layer, p) for k, (layer, p) in expected.items()}, tensors)
    if diff.shapes or (strict and not diff.same_keys):
        what = diff.describe("missing key(s)", "unexpected key(s)", "model", "file")
        raise MismatchError(f"adapter does not fit the model: {what}")
    merged = [k for k in diff.common if expected[k][0].merged]
    if merged:
        raise BadInputError(
            f"cannot load into merged LoRaD layers (unmerge first): {preview(sorted(merged), 5)}"
        )
    for key, (layer, pname) in expected.items():
        if key in tensors:
            param = getattr(layer, pname)
            param.copy_(tensors[key].to(device=param.device, dtype=param.dtype))
    return sorted(diff.only_a), sorted(diff.only_b)


def get_base_state_dict(model: nn.Module, *, merged: bool = False) -> dict[str, Tensor]:
    """The model's state dict under the base model's names (``<path>.base_layer.x`` ->
    ``<path>.x``), without adapter tensors. With ``merged=True`` every adapted weight is
    its rotated ``R(Θ) W`` (in the base dtype), computed without modifying the model, so
    the result loads strictly into the plain base architecture (the release's format)."""
    layers = lorad_layers(model)
    rename = {f"{n}.base_layer.": f"{n}." for n in layers}
    out: dict[str, Tensor] = {}
    for key, value in model.state_dict().items():
        if key.endswith(ADAPTER_SUFFIXES) and key.rpartition(".")[0] in layers:
            continue
        prefix = key.rpartition(".")[0] + "."
        if prefix in rename:
            key = rename[prefix] + key.rpartition(".")[2]
        out[key] = value
    if merged:
        with torch.no_grad():
            for name, layer in layers.items():
                out[f"{name}.weight"] = layer.effective_weight(layer.base_layer.weight.dtype).detach()
    return out
