"""The optimizer and gradient scaler of each trained role (one place builds both).

Every role gets AdamW (β, ε and weight decay from the config; bitsandbytes' 8-bit AdamW
with ``optimizer = "adamw8bit"``) and a ``GradScaler`` that is on only when the frozen
base is stored in fp16, where the tiny VSD gradients (``g / numel``) would underflow
unscaled. ``cfg`` is any config with the ``optimizer``, ``adam_beta1``, ``adam_beta2``,
``adam_eps`` and ``weight_decay`` fields (:class:`~wadi_cli.distill.config.DistillConfig`).
"""

from __future__ import annotations

from typing import Any

import torch

from wadi_cli.errors import BadInputError


def make_optimizer(cfg: Any, params: list[torch.nn.Parameter], lr: float) -> torch.optim.Optimizer:
    """AdamW (β, ε, weight decay from the config), or bitsandbytes' 8-bit AdamW."""
    kwargs = dict(
        lr=lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps, weight_decay=cfg.weight_decay
    )
    if cfg.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise BadInputError(
                "--optimizer adamw8bit needs bitsandbytes (pip install bitsandbytes)"
            ) from None
        return bnb.optim.AdamW8bit(params, **kwargs)
    return torch.optim.AdamW(params, **kwargs)


def make_grad_scaler(device: torch.device, base_dtype: torch.dtype) -> torch.amp.GradScaler:
    """Loss scaling for fp16 base weights (disabled, a no-op, otherwise)."""
    return torch.amp.GradScaler(device.type, enabled=base_dtype == torch.float16)
