"""The adapter kinds a frozen ``nn.Linear`` can carry, as a table: kind name → constructor.

``lorad`` is the method (:class:`~wadi_cli.lorad.layer.LoRaDLinear`); ``lora`` and ``dora``
are peft's layers, the baselines of the paper's ablation. Each constructor wraps the SAME
frozen ``base_layer`` (never a copy) and returns an adapter that is the identity at
init. A new kind is one function and one entry in :data:`ADAPTER_KINDS`; everything that
wires adapters (:mod:`wadi_cli.lorad.multi_adapter`) looks kinds up here.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from wadi_cli.errors import BadInputError
from wadi_cli.lorad.layer import LoRaDLinear

#: ``(base_layer, rank, label, generator) -> adapter layer``; ``label`` names the layer in errors.
AdapterFactory = Callable[[nn.Linear, int, str, "torch.Generator | None"], nn.Module]


def _lorad(base: nn.Linear, rank: int, label: str, generator: torch.Generator | None) -> nn.Module:
    return LoRaDLinear(base, rank, name=label, generator=generator)


def _lora(base: nn.Linear, rank: int, label: str, generator: torch.Generator | None) -> nn.Module:
    return peft_linear(base, rank, False, generator)


def _dora(base: nn.Linear, rank: int, label: str, generator: torch.Generator | None) -> nn.Module:
    return peft_linear(base, rank, True, generator)


#: Every adapter kind, in the order error messages list them.
ADAPTER_KINDS: dict[str, AdapterFactory] = {"lorad": _lorad, "lora": _lora, "dora": _dora}


def make_adapter(
    kind: str, base: nn.Linear, rank: int, *, label: str, generator: torch.Generator | None
) -> nn.Module:
    """An adapter of ``kind`` and ``rank`` on ``base`` (identity at init; ``B`` drawn from
    ``generator`` when given)."""
    factory = ADAPTER_KINDS.get(kind)
    if factory is None:
        *head, last = ADAPTER_KINDS
        raise BadInputError(f"unknown adapter kind {kind!r}; expected {', '.join(head)} or {last}")
    return factory(base, rank, label, generator)


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
