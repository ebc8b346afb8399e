"""WaDi distillation (§4): LoRaD student + VSD against a LoRaD fake score on ONE frozen
base; config, prompts, losses, the adapter-training recipe and its EMA, the training
step, the run loop with its logs, signals and ranks, resumable checkpoints and export.
(The switchable adapters on the shared base are :mod:`wadi_cli.lorad.multi_adapter`.)

The names below are imported on first use (PEP 562), for start-up time: ``wadi distill
--help`` builds its flags from :mod:`wadi_cli.distill.config`, which imports no torch, and
importing that submodule runs this file first.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

#: The submodules that define the public names, cheapest first.
_MODULES = (
    "config",
    "plan",
    "data",
    "losses",
    "checkpoint",
    "export",
    "ema",
    "topology",
    "recipe",
    "run",
    "trainer",
)

__all__ = [
    "FORMATS",
    "SMOKE_PROMPTS",
    "Checkpoint",
    "DistillConfig",
    "EMA",
    "AdapterRecipe",
    "Distiller",
    "PromptStream",
    "RunSummary",
    "StepResult",
    "Topology",
    "TrainingDiverged",
    "config_for_run",
    "distill",
    "export_run",
    "fake_score_loss",
    "find_checkpoint",
    "generator_loss",
    "guided_eps",
    "list_checkpoints",
    "load_checkpoint",
    "load_prompts",
    "parameter_plan",
    "read_config_file",
    "read_prompt_file",
    "resolve_config",
    "run_student_file",
    "run_weights",
    "vsd_gradient",
]


def __getattr__(name: str) -> Any:
    if name not in __all__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    for module in _MODULES:
        found = getattr(importlib.import_module(f"{__name__}.{module}"), name, None)
        if found is not None:
            globals()[name] = found
            return found
    raise AttributeError(name)  # pragma: no cover - every public name is defined above


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])


if TYPE_CHECKING:
    from wadi_cli.distill.checkpoint import Checkpoint, find_checkpoint, list_checkpoints, load_checkpoint
    from wadi_cli.distill.config import DistillConfig, read_config_file, resolve_config
    from wadi_cli.distill.data import SMOKE_PROMPTS, PromptStream, load_prompts, read_prompt_file
    from wadi_cli.distill.ema import EMA
    from wadi_cli.distill.export import FORMATS, export_run, run_student_file, run_weights
    from wadi_cli.distill.losses import fake_score_loss, generator_loss, guided_eps, vsd_gradient
    from wadi_cli.distill.plan import parameter_plan
    from wadi_cli.distill.recipe import AdapterRecipe, TrainingDiverged
    from wadi_cli.distill.run import RunSummary, config_for_run, distill
    from wadi_cli.distill.topology import Topology
    from wadi_cli.distill.trainer import Distiller, StepResult
