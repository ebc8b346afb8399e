"""Backbone registry (sd15, sd21, pixart, tiny): hub ids, shipped architecture configs,
LoRaD target rules and ranks, resolutions, text encoders and ``ALPHA_BAR_T``."""

from wadi_cli.backbones.registry import (
    ALPHA_BAR_T,
    BACKBONES,
    CONFIGS_DIR,
    TINY_PIPELINE_DIR,
    Backbone,
    TargetRule,
    get_backbone,
    linear_names,
)

__all__ = [
    "ALPHA_BAR_T",
    "BACKBONES",
    "CONFIGS_DIR",
    "TINY_PIPELINE_DIR",
    "Backbone",
    "TargetRule",
    "get_backbone",
    "linear_names",
]
