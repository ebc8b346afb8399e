"""Image generation, batched, with one random generator per image: the one-step sampler
(:mod:`~wadi_cli.pipeline.one_step`) or the teacher (:mod:`~wadi_cli.pipeline.teacher`),
then the VAE.

Image ``i`` of a run starts from ``z_i ~ N(0, I)`` drawn by its own CPU
``torch.Generator`` seeded ``seed + i`` (EDM's per-sample generators), so the images do
not depend on the batch size, nor on the device.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from wadi_cli.pipeline.loaded import LoadedPipeline
from wadi_cli.pipeline.one_step import one_step_latents
from wadi_cli.pipeline.settings import SampleConfig
from wadi_cli.pipeline.teacher import teacher_latents


def initial_noise(
    seeds: Sequence[int], shape: Sequence[int], device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Stack of ``N(0, I)`` latents, one per seed, each from its own CPU generator (float32)."""
    noise = [
        torch.randn(tuple(shape), generator=torch.Generator("cpu").manual_seed(int(s)), dtype=torch.float32)
        for s in seeds
    ]
    return torch.stack(noise).to(device)


@torch.no_grad()
def decode(vae: torch.nn.Module, x0: torch.Tensor) -> np.ndarray:
    """VAE-decode clean latents: ``vae.decode(x0 / scaling_factor)`` mapped from [−1, 1]
    to uint8, as an (N, H, W, 3) array."""
    config = vae.config  # type: ignore[attr-defined]
    latents = x0.float() / float(config.scaling_factor)
    shift = getattr(config, "shift_factor", None)
    if shift:
        latents = latents + float(shift)
    dtype = next(vae.parameters()).dtype
    images = vae.decode(latents.to(dtype)).sample.float()  # type: ignore[operator]
    images = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return images.permute(0, 2, 3, 1).cpu().numpy()


@dataclass
class Generation:
    """Generated images (N, H, W, 3) uint8 with the prompt and seed of each."""

    images: np.ndarray
    prompts: list[str]
    seeds: list[int]
    config: SampleConfig
    seconds: float = 0.0
    timings: list[float] = field(default_factory=list)


@torch.no_grad()
def images_from_noise(
    pipe: LoadedPipeline, prompts: Sequence[str], config: SampleConfig, z: torch.Tensor
) -> np.ndarray:
    """uint8 images of ``prompts`` from the initial noise ``z`` (one latent per prompt): the
    one-step formula, or the teacher when ``config.teacher``; ``config`` as resolved by
    :func:`generate` (its ᾱ_T, else the pipeline's)."""
    cfg = config.resolved(pipe.backbone, pipe.alpha_bar_T)
    cond = pipe.prompt_encoder(list(prompts))
    z = z.to(pipe.device)
    if cfg.teacher:
        x0 = teacher_latents(pipe, cond, z, int(cfg.steps), float(cfg.cfg))  # type: ignore[arg-type]
    else:
        x0 = one_step_latents(pipe, cond, z, float(cfg.alpha_bar_T))  # type: ignore[arg-type]
    return decode(pipe.vae, x0)


def generate(
    pipe: LoadedPipeline,
    prompts: Sequence[str],
    config: SampleConfig,
    num_images_per_prompt: int = 1,
    progress: Callable[[int, int], None] | None = None,
) -> Generation:
    """Generate ``num_images_per_prompt`` images for each prompt (prompt-major order);
    image ``i`` uses seed ``config.seed + i``. ``progress(done, total)`` is called after
    every batch. The one-step ᾱ_T is ``config.alpha_bar_T`` when set, else the pipeline's
    (decided when it was loaded)."""
    cfg = config.resolved(pipe.backbone, pipe.alpha_bar_T)
    jobs = [(p, cfg.seed + i) for i, p in enumerate(p for p in prompts for _ in range(num_images_per_prompt))]
    images: list[np.ndarray] = []
    timings: list[float] = []
    start = time.perf_counter()
    for lo in range(0, len(jobs), cfg.batch_size):
        batch = jobs[lo : lo + cfg.batch_size]
        t0 = time.perf_counter()
        z = initial_noise([s for _, s in batch], pipe.latent_shape, pipe.device)
        images.append(images_from_noise(pipe, [p for p, _ in batch], cfg, z))
        timings.append(time.perf_counter() - t0)
        if progress is not None:
            progress(lo + len(batch), len(jobs))
    return Generation(
        images=np.concatenate(images) if images else np.zeros((0, 0, 0, 3), np.uint8),
        prompts=[p for p, _ in jobs],
        seeds=[s for _, s in jobs],
        config=cfg,
        seconds=time.perf_counter() - start,
        timings=timings,
    )
