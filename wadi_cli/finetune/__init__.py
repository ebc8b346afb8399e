"""DreamBooth fine-tuning with a LoRaD adapter (``wadi finetune``): the config and its
recipes (:mod:`~wadi_cli.finetune.config`), the images (:mod:`~wadi_cli.finetune.images`),
the loss (:mod:`~wadi_cli.finetune.losses`), the recipe (:mod:`~wadi_cli.finetune.trainer`)
and the run (:mod:`~wadi_cli.finetune.run`, on the training loop of ``wadi distill``).

Names are imported on first use (PEP 562): ``wadi finetune --help`` needs the config only.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_WHERE = {
    "FinetuneConfig": "config",
    "resolve_finetune_config": "config",
    "FineTuner": "trainer",
    "FinetuneStep": "trainer",
    "finetune": "run",
    "finetune_config_for_run": "run",
}
__all__ = [
    "FineTuner",
    "FinetuneConfig",
    "FinetuneStep",
    "finetune",
    "finetune_config_for_run",
    "resolve_finetune_config",
]


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    found = getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    globals()[name] = found
    return found


if TYPE_CHECKING:
    from wadi_cli.finetune.config import FinetuneConfig, resolve_finetune_config
    from wadi_cli.finetune.run import finetune, finetune_config_for_run
    from wadi_cli.finetune.trainer import FineTuner, FinetuneStep
