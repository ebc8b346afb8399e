"""The pipeline runtime every command shares: find and load a backbone's base pipeline
(:mod:`~wadi_cli.pipeline.base`), put one-step weights into it (the authors' release format,
a LoRaD adapter, or an exported folder; :mod:`~wadi_cli.pipeline.loading`) as a frozen
:class:`LoadedPipeline` whose one-step ᾱ_T is decided once (:mod:`~wadi_cli.pipeline.alpha_bar`),
and generate with the one-step sampler or the multi-step teacher
(:mod:`~wadi_cli.pipeline.generation`). The command-line options of sampling are declared once,
in :class:`~wadi_cli.pipeline.options.SamplingOptions`.

The names below load on first use: the CLI reads :mod:`~wadi_cli.pipeline.options` to build
its flags, and ``wadi sample --help`` must not import torch for that."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from wadi_cli.pipeline.alpha_bar import AlphaBarT, decide_alpha_bar_T, weights_alpha_bar_T
    from wadi_cli.pipeline.base import PipelineSource, weights_variant
    from wadi_cli.pipeline.generation import Generation, decode, generate, images_from_noise, initial_noise
    from wadi_cli.pipeline.loaded import LoadedPipeline, check_weights_or_teacher
    from wadi_cli.pipeline.loading import (
        apply_weights,
        default_weights,
        detect_weights_kind,
        get_backbone_spec,
        load_pipeline,
        load_state_strict,
        resolve_pipeline_source,
    )
    from wadi_cli.pipeline.one_step import one_step_latents
    from wadi_cli.pipeline.options import SamplingOptions
    from wadi_cli.pipeline.settings import SampleConfig, resolve_dtype
    from wadi_cli.pipeline.teacher import teacher_latents, teacher_scheduler

_HOMES = {
    "AlphaBarT": "alpha_bar",
    "decide_alpha_bar_T": "alpha_bar",
    "weights_alpha_bar_T": "alpha_bar",
    "PipelineSource": "base",
    "weights_variant": "base",
    "Generation": "generation",
    "decode": "generation",
    "generate": "generation",
    "images_from_noise": "generation",
    "initial_noise": "generation",
    "LoadedPipeline": "loaded",
    "check_weights_or_teacher": "loaded",
    "apply_weights": "loading",
    "default_weights": "loading",
    "detect_weights_kind": "loading",
    "get_backbone_spec": "loading",
    "load_pipeline": "loading",
    "load_state_strict": "loading",
    "resolve_pipeline_source": "loading",
    "one_step_latents": "one_step",
    "SamplingOptions": "options",
    "SampleConfig": "settings",
    "resolve_dtype": "settings",
    "teacher_latents": "teacher",
    "teacher_scheduler": "teacher",
}

__all__ = [
    "AlphaBarT",
    "Generation",
    "LoadedPipeline",
    "PipelineSource",
    "SampleConfig",
    "SamplingOptions",
    "apply_weights",
    "check_weights_or_teacher",
    "decide_alpha_bar_T",
    "decode",
    "default_weights",
    "detect_weights_kind",
    "generate",
    "images_from_noise",
    "get_backbone_spec",
    "initial_noise",
    "load_pipeline",
    "load_state_strict",
    "one_step_latents",
    "resolve_dtype",
    "resolve_pipeline_source",
    "teacher_latents",
    "teacher_scheduler",
    "weights_alpha_bar_T",
    "weights_variant",
]


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)
