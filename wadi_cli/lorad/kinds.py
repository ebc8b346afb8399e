"""The adapter kinds a frozen ``nn.Linear`` can carry, as a table: kind name → constructor.

``lorad`` is the method (:class:`~wadi_cli.lorad.layer.LoRaDLinear`); ``lora`` and ``dora``
are peft's layers, the baselines of the paper's ablation (WaDi Table 2), and
``dora-frozen-norm`` is peft's DoRA with its magnitude vector frozen at the base weight's
row norms (only the direction trains). ``orthogonal`` multiplies every adapted weight by a
learned orthogonal matrix from torch's own maps (Table R4;
:class:`~wadi_cli.lorad.orthogonal.OrthogonalLinear`). Each constructor wraps the SAME
frozen ``base_layer`` (never a copy) and returns an adapter that is the identity at
init. A new kind is one function and one entry in :data:`ADAPTER_KINDS`; everything that
wires adapters (:mod:`wadi_cli.lorad.multi_adapter`) looks kinds up here. Options of a
kind (``orthogonal_map``) reach its constructor as keyword arguments.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from wadi_cli.errors import BadInputError
from wadi_cli.lorad.layer import LoRaDLinear
from wadi_cli.lorad.orthogonal import OrthogonalLinear

#: ``(base_layer, rank, label, generator, **options) -> adapter layer``; ``label`` names the
#: layer in errors.
AdapterFactory = Callable[..., nn.Module]
#: peft's names of the DoRA tensors that train when the magnitude is frozen.
DORA_DIRECTION_PARAMS: tuple[str, ...] = ("lora_A.default.weight", "lora_B.default.weight")


def _lorad(base: nn.Linear, rank: int, label: str, generator: torch.Generator | None) -> nn.Module:
    return LoRaDLinear(base, rank, name=label, generator=generator)


def _lora(base: nn.Linear, rank: int, label: str, generator: torch.Generator | None) -> nn.Module:
    return peft_linear(base, rank, False, generator)


def _dora(base: nn.Linear, rank: int, label: str, generator: torch.Generator | None) -> nn.Module:
    return peft_linear(base, rank, True, generator)


def _dora_frozen_norm(base: nn.Linear, rank: int, label: str, generator: torch.Generator | None) -> nn.Module:
    """peft's DoRA whose magnitude stays at its init, the base weight's row norms ``‖W_i‖``
    (B = 0): ``W'_i = ‖W_i‖ · (W + BA)_i / ‖(W + BA)_i‖``, so only directions change. The
    magnitude is neither trained nor saved (it is rebuilt from the base on load)."""
    layer = peft_linear(base, rank, True, generator)
    layer.lora_magnitude_vector["default"].weight.requires_grad_(False)
    layer.adapter_param_names = DORA_DIRECTION_PARAMS
    return layer


def _orthogonal(
    base: nn.Linear,
    rank: int,
    label: str,
    generator: torch.Generator | None,
    *,
    orthogonal_map: str = "cayley",
) -> nn.Module:
    """``W Q`` with ``Q`` from torch's ``orthogonal_map`` (dense ``n×n``: ``rank`` is not used;
    the init is the identity, so ``generator`` is not used either)."""
    return OrthogonalLinear(base, orthogonal_map)


#: Every adapter kind, in the order error messages list them.
ADAPTER_KINDS: dict[str, AdapterFactory] = {
    "lorad": _lorad,
    "lora": _lora,
    "dora": _dora,
    "dora-frozen-norm": _dora_frozen_norm,
    "orthogonal": _orthogonal,
}


def make_adapter(
    kind: str,
    base: nn.Linear,
    rank: int,
    *,
    label: str,
    generator: torch.Generator | None,
    options: Mapping[str, Any] | None = None,
) -> nn.Module:
    """An adapter of ``kind`` and ``rank`` on ``base`` (identity at init; ``B`` drawn from
    ``generator`` when given; ``options`` are the kind's keyword arguments, e.g.
    ``{"orthogonal_map": "cayley"}``)."""
    factory = ADAPTER_KINDS.get(kind)
    if factory is None:
        *head, last = ADAPTER_KINDS
        raise BadInputError(f"unknown adapter kind {kind!r}; expected {', '.join(head)} or {last}")
    return factory(base, rank, label, generator, **dict(options or {}))


def peft_linear(base: nn.Linear, rank: int, dora: bool, generator: torch.Generator | None) -> nn.Module:
    """peft's LoRA/DoRA Linear on ``base`` with ``alpha = rank`` (fp32 adapter tensors;
    init from ``generator``)."""
    try:
        from peft import LoraConfig  # optional dependency (the baselines extra)
        from peft.tuners.lora import Linear as PeftLoraLinear
    except ImportError:
        raise BadInputError(
            "--adapter lora/dora needs peft: pip install 'wadi-cli[baselines]' (or pip install peft)"
        ) from None

    config = LoraConfig(r=rank, lora_alpha=rank, use_dora=dora, lora_dropout=0.0)
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator)) if generator is not None else None
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        layer = PeftLoraLinear(base, "default", config, r=rank, lora_alpha=rank, use_dora=dora)
    for n, p in layer.named_parameters():
        if not n.startswith("base_layer."):
            p.data = p.data.float()
    return layer.eval()
