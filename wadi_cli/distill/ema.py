"""The exponential moving average of the student's trainable tensors.

Shaped like diffusers' ``EMAModel`` (``decay``, ``optimization_step``, shadow tensors;
:meth:`EMA.step`, :meth:`EMA.copy_to`, :meth:`EMA.to`, :meth:`EMA.state_dict`,
:meth:`EMA.load_state_dict`), but keyed by NAME: the shadow holds the same keys as the
student's adapter file (or full state dict), so it is saved as ``ema.safetensors`` in the
adapter file format and exported like any adapter. The decay is constant (no warm-up).

This module is the one place where the EMA is updated (:meth:`EMA.step`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from wadi_cli.errors import MismatchError
from wadi_cli.io.tensor_map import KeyDiff


class EMA:
    """``shadow ← decay · shadow + (1 − decay) · current`` after every optimizer step of
    the student, in float32 (whatever the student's storage dtype)."""

    def __init__(self, tensors: Mapping[str, Tensor], decay: float) -> None:
        self.decay = float(decay)
        self.optimization_step = 0
        self.shadow: dict[str, Tensor] = {k: v.detach().clone().float() for k, v in tensors.items()}

    @torch.no_grad()
    def step(self, tensors: Mapping[str, Tensor]) -> None:
        """Fold the student's current ``tensors`` (same keys as the shadow) into the average."""
        decay = self.decay
        for k, v in tensors.items():
            self.shadow[k].mul_(decay).add_(v.float(), alpha=1 - decay)
        self.optimization_step += 1

    @torch.no_grad()
    def copy_to(self, tensors: Mapping[str, Tensor]) -> None:
        """Write the average into ``tensors`` in place (keys must match; each keeps its dtype)."""
        diff = KeyDiff.between(tensors, self.shadow)
        if diff:
            raise MismatchError(f"EMA does not fit: {diff.describe('missing', 'unexpected', 'model', 'EMA')}")
        for k, t in tensors.items():
            t.copy_(self.shadow[k].to(device=t.device, dtype=t.dtype))

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> EMA:
        """Move (and/or cast) the shadow tensors; returns ``self``."""
        self.shadow = {k: v.to(device=device, dtype=dtype) for k, v in self.shadow.items()}
        return self

    def weights(self) -> dict[str, Tensor]:
        """A copy of the average."""
        return {k: v.clone() for k, v in self.shadow.items()}

    def state_dict(self) -> dict[str, Any]:
        """``decay``, ``optimization_step`` and the ``shadow`` tensors (by name, not copied)."""
        return {"decay": self.decay, "optimization_step": self.optimization_step, "shadow": self.shadow}

    def load_state_dict(self, state: Mapping[str, Any], device: torch.device | str | None = None) -> None:
        """Inverse of :meth:`state_dict` (the tensors are copied, in float32, to ``device``)."""
        self.decay = float(state["decay"])
        self.optimization_step = int(state["optimization_step"])
        self.shadow = {k: v.detach().clone().float().to(device) for k, v in state["shadow"].items()}
