"""Relation inversion (``wadi invert``, ReVersion): one new token's embedding learned from
exemplar images on the frozen base model. The config and its recipes
(:mod:`~wadi_cli.invert.config`), the new token in the text encoder
(:mod:`~wadi_cli.diffusion.tokens`), the losses (:mod:`~wadi_cli.invert.losses`), the recipe
(:mod:`~wadi_cli.invert.trainer`) and the run (:mod:`~wadi_cli.invert.run`, on the training
loop of ``wadi distill``). The embedding file: :mod:`wadi_cli.io.embeddings`.

Names are imported on first use (PEP 562): ``wadi invert --help`` needs the config only.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_WHERE = {
    "InvertConfig": "config",
    "resolve_invert_config": "config",
    "Inverter": "trainer",
    "invert": "run",
    "invert_config_for_run": "run",
}
__all__ = ["InvertConfig", "Inverter", "invert", "invert_config_for_run", "resolve_invert_config"]


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    found = getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    globals()[name] = found
    return found


if TYPE_CHECKING:
    from wadi_cli.invert.config import InvertConfig, resolve_invert_config
    from wadi_cli.invert.run import invert, invert_config_for_run
    from wadi_cli.invert.trainer import Inverter
