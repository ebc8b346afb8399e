"""Driving a DreamBooth fine-tune: the checks before any work, the base model, the class
images (generated once by the base model and cached in the run folder), then the shared
training loop of ``wadi distill`` (:func:`wadi_cli.distill.run.run_loop`: checkpoints,
resume, logs, lock, Ctrl-C / SIGTERM, ranks).

Run folder layout: that of :mod:`wadi_cli.distill.checkpoint` (``checkpoints/step-*`` with
``student.safetensors`` and no fake score), plus ``class_images/`` with prior preservation.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image

from wadi_cli.distill.checkpoint import (
    check_run_dir,
)
from wadi_cli.distill.lock import check_run_lock
from wadi_cli.distill.phases import PhaseCallback, Phases
from wadi_cli.distill.run import (
    RunSummary,
    checkpoint_to_resume,
    load_base,
    open_run,
    run_loop,
    saved_run_config,
)
from wadi_cli.distill.topology import barrier, launch_rank
from wadi_cli.finetune.config import FinetuneConfig, resolve_finetune_config
from wadi_cli.finetune.images import cached_class_images, read_image_folder, to_resolution, write_class_images
from wadi_cli.finetune.trainer import FineTuner

if TYPE_CHECKING:
    from wadi_cli.distill.checkpoint import Checkpoint
    from wadi_cli.pipeline import LoadedPipeline

#: The ``.wadi`` marker kind of a fine-tune's run folder.
RUN_KIND = "finetune-run"


def prepare(
    cfg: FinetuneConfig, out: str | os.PathLike[str], resume: str | None
) -> tuple[Path, list[Image.Image], list[Image.Image] | None, Checkpoint | None]:
    """Checks before any model loads (nothing is created): run folder, lock, the instance
    (and given class) images, checkpoint compatibility. Returns the run folder, the decoded
    images and the checkpoint to resume from."""
    if launch_rank() == 0:
        check_run_lock(out)
    run = check_run_dir(out, resume is not None)
    instance = read_image_folder(cfg.instance_images or "", "--instance-images")
    klass = None
    if cfg.prior and cfg.class_images is not None:
        klass = read_image_folder(cfg.class_images, "--class-images")
    return run, instance, klass, checkpoint_to_resume(run, resume, cfg, resolve_finetune_config)


@torch.no_grad()
def generate_class_images(pipe: LoadedPipeline, cfg: FinetuneConfig, phases: Phases) -> np.ndarray:
    """``cfg.num_class_images`` images of the class prompt by the base model's teacher (the
    sampling recipe's steps and CFG), image ``i`` from noise seeded ``seed · 1,000,003 + i``."""
    from wadi_cli.backbones.recipes import teacher_defaults
    from wadi_cli.diffusion import TextCondition
    from wadi_cli.pipeline import decode, initial_noise
    from wadi_cli.pipeline.teacher import teacher_latents

    steps, guidance = teacher_defaults(cfg.backbone)
    n = cfg.num_class_images
    cond1 = pipe.prompt_encoder([cfg.class_prompt or ""]).to(pipe.device)
    out = []
    what = f"generating {n:,} class images ({steps}-step teacher, cached in the run folder)"
    with phases.phase(what, total=n) as advance:
        for start in range(0, n, 8):
            seeds = [cfg.seed * 1_000_003 + i for i in range(start, min(n, start + 8))]
            z = initial_noise(seeds, pipe.latent_shape, pipe.device).to(pipe.dtype)
            cond = TextCondition.cat([cond1] * len(seeds))
            out.append(decode(pipe.vae, teacher_latents(pipe, cond, z, steps, guidance)))
            advance(len(seeds))
    return np.concatenate(out)


def class_images_of_run(
    run: Path, cfg: FinetuneConfig, pipe: LoadedPipeline, phases: Phases, main: bool, world: Any
) -> list[Image.Image]:
    """The run's cached class images, generated (on the main process) the first time."""
    if main and cached_class_images(run, cfg.num_class_images) is None:
        write_class_images(run, generate_class_images(pipe, cfg, phases))
    barrier(world)
    folder = cached_class_images(run, cfg.num_class_images)
    assert folder is not None
    return read_image_folder(folder, "class images")


def finetune(
    cfg: FinetuneConfig,
    out: str | os.PathLike[str],
    *,
    resume: str | None = None,
    on_step: Callable[[Any, float], None] | None = None,
    on_start: Callable[[int, int], None] | None = None,
    on_phase: PhaseCallback | None = None,
    on_run: Callable[[Path], None] | None = None,
) -> RunSummary:
    """Run (or continue, with ``resume="latest"`` or a checkpoint path) a DreamBooth fine-tune
    into the run folder ``out`` until ``cfg.max_steps``; everything else as
    :func:`wadi_cli.distill.run.distill` (checkpoints, lock, signals, logs, ranks)."""
    run, instance, klass, ckpt = prepare(cfg, out, resume)
    main = launch_rank() == 0
    phases = Phases(on_phase if main else None)
    pipe, topology = load_base(cfg, phases)
    if on_run is not None and main:
        on_run(run)
    with open_run(run, main, RUN_KIND, model_file=pipe.model_file):
        if cfg.prior and klass is None:
            klass = class_images_of_run(run, cfg, pipe, phases, main, topology)
        with phases.phase("encoding the images (VAE, once)"):
            side = pipe.resolution
            klass_px = to_resolution(klass, side) if cfg.prior and klass is not None else None
            tuner = FineTuner(cfg, pipe, to_resolution(instance, side), klass_px, topology)
        if ckpt is not None:
            tuner.load(ckpt)
        return run_loop(cfg, run, tuner, len(instance), ckpt is not None, on_step, on_start)


def finetune_config_for_run(
    out: str | os.PathLike[str],
    resume: str | None = None,
    file: str | os.PathLike[str] | None = None,
    overrides: dict[str, Any] | None = None,
) -> FinetuneConfig:
    """The resolved config of a fine-tune: recipe → file → flags; when resuming, the
    checkpoint's saved config takes the place of the recipe (flags still override)."""
    return resolve_finetune_config(file, overrides, base=saved_run_config(out, resume))
