"""The parameter plan of a run (printed by ``wadi distill --dry-run``): layers and
trainable parameters per adapter, counted from the denoiser's Linear shapes (the shipped
shape table, or a weightless meta-device build for another architecture)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from wadi_cli.backbones import Backbone, get_backbone
from wadi_cli.backbones.registry import adapter_params
from wadi_cli.backbones.skeletons import skeleton
from wadi_cli.distill.config import DistillConfig
from wadi_cli.errors import BadInputError
from wadi_cli.tiny.arch import UNET_CONFIG


def _denoiser_config(cfg: DistillConfig, backbone: Backbone) -> dict[str, Any]:
    """The denoiser's architecture config: the ``--model`` folder's when it is local, else
    the shipped one, else (tiny without its shipped pipeline) the tiny spec."""
    if cfg.model is not None:
        local = Path(cfg.model).expanduser() / backbone.denoiser_subfolder / "config.json"
        if local.is_file():
            return json.loads(local.read_text())
    if backbone.config_path.is_file():
        return backbone.denoiser_config()
    if backbone.name == "tiny":
        return dict(UNET_CONFIG)
    raise BadInputError(f"backbone {backbone.name}: no architecture config to plan with")


def parameter_plan(cfg: DistillConfig) -> dict[str, Any]:
    """Layers and trainable parameters of the student and fake adapters (``r · (out +
    in/2)`` per adapted Linear), plus the frozen base size."""

    backbone = get_backbone(cfg.backbone)
    shapes, base_params = skeleton(backbone, _denoiser_config(cfg, backbone))
    plan: dict[str, Any] = {
        "backbone": backbone.name,
        "denoiser": backbone.denoiser_class,
        "base_params": base_params,
    }
    for role, rank in (("student", cfg.rank), ("fake", cfg.fake_rank)):
        targets = [n for n in shapes if backbone.rule(role).matches(n)]
        kind = cfg.adapter if role == "student" else "lorad"
        if kind == "full":
            plan[role] = {"rank": None, "layers": len(shapes), "trainable_params": plan["base_params"]}
            continue
        trainable = sum(adapter_params(kind, rank, *shapes[t]) for t in targets)
        plan[role] = {
            "rank": None if kind == "orthogonal" else rank,
            "layers": len(targets),
            "trainable_params": trainable,
        }
        if kind == "orthogonal":
            plan[role]["orthogonal_map"] = cfg.orthogonal_map
    plan["alpha_bar_T"] = cfg.alpha_bar_T
    return plan
