"""Switchable adapters: one frozen base network serving several roles (WaDi §4: teacher,
student and fake score).

The student and the fake score model are the teacher plus a LoRaD adapter each (different
targets and ranks). Instead of three networks, every targeted Linear is wrapped once in a
:class:`MultiAdapterLinear` that holds one adapter per role (a
:class:`~wadi_cli.lorad.LoRaDLinear`, or another kind of :mod:`wadi_cli.lorad.kinds`), all
sharing the SAME frozen ``base_layer``. :func:`use_adapter` selects which one
runs (``None`` = the teacher). Each forward does exactly one matmul: the plain base
weight, or the rotated weight of the active adapter (the maths stays in
:mod:`wadi_cli.lorad`).

Adapter tensors export to the standard LoRaD file format: ``<module path>.lorad_A/B``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from wadi_cli.errors import BadInputError, MismatchError
from wadi_cli.io.tensor_map import KeyDiff, preview
from wadi_cli.lorad.kinds import make_adapter
from wadi_cli.lorad.model import set_submodule


class MultiAdapterLinear(nn.Module):
    """A frozen ``nn.Linear`` plus named adapters (LoRaD, LoRA or DoRA); ``active`` picks
    the one applied.

    ``active is None`` or an adapter this layer does not hold → the base Linear itself.
    """

    def __init__(self, base_layer: nn.Linear) -> None:
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise BadInputError(f"expected an nn.Linear, got {type(base_layer).__name__}")
        self.base_layer = base_layer.requires_grad_(False)
        self.adapters = nn.ModuleDict()
        self.active: str | None = None

    def add_adapter(
        self,
        name: str,
        rank: int,
        *,
        label: str,
        generator: torch.Generator | None,
        kind: str = "lorad",
        options: Mapping[str, Any] | None = None,
    ) -> None:
        """Add an adapter ``name`` of ``rank`` (identity at init) on the shared base: any kind
        of :data:`~wadi_cli.lorad.kinds.ADAPTER_KINDS` (LoRaD; peft's LoRA / DoRA, the
        baselines of the paper's ablation; DoRA with a frozen norm; torch's orthogonal maps) with
        the kind's ``options``."""
        if name in self.adapters:
            raise BadInputError(f"{label}: adapter {name!r} already present")
        self.adapters[name] = make_adapter(
            kind, self.base_layer, rank, label=label, generator=generator, options=options
        )

    def adapter_tensors(self, name: str) -> dict[str, nn.Parameter]:
        """The trainable tensors of adapter ``name`` by their name inside the adapter."""
        sub = self.adapters[name]
        names = getattr(sub, "adapter_param_names", None)  # any kind that names its trained tensors
        if names is not None:
            return {p: sub.get_parameter(p) for p in names}
        return {n: p for n, p in sub.named_parameters() if not n.startswith("base_layer.")}

    @torch.no_grad()
    def effective_weight(self, name: str | None) -> Tensor:
        """The weight this layer applies with adapter ``name`` active, probed as
        ``W = (f(I) − b)ᵀ`` (exact for any adapter that keeps the layer linear in x)."""
        w = self.base_layer.weight
        eye = torch.eye(
            w.shape[1], dtype=torch.float32 if w.dtype != torch.float64 else w.dtype, device=w.device
        )
        previous, self.active = self.active, name
        try:
            y = self(eye.to(w.dtype)).to(eye.dtype)
        finally:
            self.active = previous
        b = self.base_layer.bias
        if b is not None:
            y = y - b.to(y.dtype)
        return y.T.contiguous().to(w.dtype)

    def forward(self, x: Tensor) -> Tensor:
        # nn.ModuleDict has no .get()
        layer = self.adapters[self.active] if self.active in self.adapters else self.base_layer  # noqa: SIM401
        return layer(x)


def switchable_layers(model: nn.Module) -> dict[str, MultiAdapterLinear]:
    """Every switchable layer of ``model`` keyed by the path of the Linear it wraps."""
    return {n: m for n, m in model.named_modules() if isinstance(m, MultiAdapterLinear)}


def add_switchable_adapter(
    model: nn.Module,
    name: str,
    targets: Iterable[str],
    rank: int,
    *,
    init_seed: int | None = None,
    kind: str = "lorad",
    options: Mapping[str, Any] | None = None,
) -> list[str]:
    """Give the Linears ``targets`` of ``model`` an adapter ``name`` of ``kind`` (LoRaD by
    default; ``options``: the kind's keyword arguments) and ``rank``, wrapping each Linear in
    a :class:`MultiAdapterLinear` the first time. With ``init_seed`` the ``B`` matrices come
    from one CPU generator in target order."""
    names = list(dict.fromkeys(targets))
    if not names:
        raise BadInputError(f"adapter {name!r}: no target modules")
    layers = switchable_layers(model)
    bad = []
    for path in names:
        if path in layers:
            continue
        try:
            module = model.get_submodule(path)
        except AttributeError:
            bad.append(f"{path} (missing)")
            continue
        if not isinstance(module, nn.Linear):
            bad.append(f"{path} ({type(module).__name__})")
    if bad:
        raise BadInputError(f"adapter {name!r}: targets must be nn.Linear modules: {preview(bad, 5)}")
    generator = torch.Generator().manual_seed(init_seed) if init_seed is not None else None
    for path in names:
        layer = layers.get(path)
        if layer is None:
            layer = MultiAdapterLinear(model.get_submodule(path))
            set_submodule(model, path, layer)
        layer.add_adapter(name, rank, label=path, generator=generator, kind=kind, options=options)
    return names


@contextlib.contextmanager
def use_adapter(model: nn.Module, name: str | None) -> Iterator[None]:
    """Within the block every switchable layer applies adapter ``name`` (``None``: the
    teacher, i.e. no adapter); the previous selection is restored afterwards."""
    layers = list(switchable_layers(model).values())
    previous = [layer.active for layer in layers]
    for layer in layers:
        layer.active = name
    try:
        yield
    finally:
        for layer, prev in zip(layers, previous, strict=True):
            layer.active = prev


def adapter_parameters(model: nn.Module, name: str) -> list[nn.Parameter]:
    """The trainable tensors of adapter ``name`` in module order (from each LoRaD layer's
    ``adapter_param_names``, never by name matching)."""
    out = []
    for layer in switchable_layers(model).values():
        if name in layer.adapters:
            out.extend(layer.adapter_tensors(name).values())
    return out


def adapter_state_dict(model: nn.Module, name: str) -> dict[str, Tensor]:
    """Adapter ``name`` as ``{<linear path>.lorad_A: [m, r], <linear path>.lorad_B: [r, n/2]}``
    (detached; the format of :func:`wadi_cli.lorad.save_adapter`)."""
    out: dict[str, Tensor] = {}
    for path, layer in switchable_layers(model).items():
        if name in layer.adapters:
            for p, tensor in layer.adapter_tensors(name).items():
                out[f"{path}.{p}"] = tensor.detach()
    return out


def merged_state_dict(model: nn.Module, name: str) -> dict[str, Tensor]:
    """The plain network's state dict with every weight that adapter ``name`` changes
    replaced by its effective weight (probed, see :meth:`MultiAdapterLinear.effective_weight`).
    Used to export the LoRA / DoRA baselines; LoRaD merges exactly on state dicts."""
    layers = switchable_layers(model)
    out: dict[str, Tensor] = {}
    for key, value in model.state_dict().items():
        path, _, leaf = key.rpartition(".")
        owner = next((p for p in layers if path == f"{p}.base_layer"), None)
        if owner is not None:
            out[f"{owner}.{leaf}"] = value
        elif not any(path.startswith(f"{p}.adapters") for p in layers):
            out[key] = value
    for path, layer in layers.items():
        if name in layer.adapters:
            out[f"{path}.weight"] = layer.effective_weight(name)
    return out


def adapter_targets(model: nn.Module, name: str) -> list[str]:
    """Module paths that hold adapter ``name``."""
    return [p for p, layer in switchable_layers(model).items() if name in layer.adapters]


@torch.no_grad()
def load_adapter_tensors(model: nn.Module, name: str, tensors: Mapping[str, Tensor]) -> None:
    """Copy ``tensors`` (adapter file format) into adapter ``name``; keys and shapes must
    match exactly (:class:`MismatchError` lists what differs)."""
    params = {}
    for path, layer in switchable_layers(model).items():
        if name in layer.adapters:
            params.update({f"{path}.{p}": t for p, t in layer.adapter_tensors(name).items()})
    diff = KeyDiff.between(params, tensors)
    if diff:
        what = diff.describe("missing key(s)", "unexpected key(s)", "model", "file")
        raise MismatchError(f"adapter {name!r} does not fit: {what}")
    for k, p in params.items():
        p.copy_(tensors[k].to(device=p.device, dtype=p.dtype))
