"""Sampling: load a backbone's pipeline with one-step weights (the authors' release
format, a LoRaD adapter, or an exported folder), generate one-step or with the
multi-step teacher, write numbered PNGs + grid + JSON, and evaluate the tiny model."""

from wadi_cli.machine import resolve_device
from wadi_cli.sample.config import TEACHER_DEFAULTS, SampleConfig, read_prompts, resolve_dtype
from wadi_cli.sample.evaluate import evaluate_tiny
from wadi_cli.sample.generate import (
    Generation,
    decode,
    generate,
    initial_noise,
    one_step_latents,
    teacher_latents,
)
from wadi_cli.sample.loading import (
    LoadedPipeline,
    apply_weights,
    default_weights,
    detect_weights_kind,
    load_pipeline,
    load_state_strict,
    resolve_pipeline_source,
)
from wadi_cli.sample.output import check_output_dir, image_grid, save_samples
from wadi_cli.sample.run import sample_to_folder

__all__ = [
    "TEACHER_DEFAULTS",
    "Generation",
    "SampleConfig",
    "LoadedPipeline",
    "apply_weights",
    "check_output_dir",
    "decode",
    "default_weights",
    "evaluate_tiny",
    "detect_weights_kind",
    "generate",
    "image_grid",
    "initial_noise",
    "load_pipeline",
    "load_state_strict",
    "one_step_latents",
    "read_prompts",
    "resolve_device",
    "resolve_dtype",
    "resolve_pipeline_source",
    "sample_to_folder",
    "save_samples",
    "teacher_latents",
]
