"""Image generation, batched, with one random generator per image: the one-step sampler
(:mod:`~wadi_cli.pipeline.one_step`) or the teacher (:mod:`~wadi_cli.pipeline.teacher`),
then the VAE.

Image ``i`` of a run starts from ``z_i ~ N(0, I)`` drawn by its own CPU
``torch.Generator`` seeded ``seed + i`` (EDM's per-sample generators), so the images do
not depend on the batch size, nor on the device.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from wadi_cli.diffusion import TextCondition
from wadi_cli.pipeline.defaults import STRENGTH
from wadi_cli.pipeline.img2img import (
    encode,
    one_step_img2img_latents,
    refine_noise,
    teacher_start,
    upscale_images,
)
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
    pipe: LoadedPipeline,
    prompts: Sequence[str],
    config: SampleConfig,
    z: torch.Tensor,
    init: torch.Tensor | None = None,
) -> np.ndarray:
    """uint8 images of ``prompts`` from the initial noise ``z`` (one latent per prompt): the
    one-step formula, or the teacher when ``config.teacher``; ``config`` as resolved by
    :func:`generate` (its ᾱ_T, else the pipeline's). With ``init`` (clean latents, one per
    prompt) it is image-to-image at ``config.strength`` (:mod:`~wadi_cli.pipeline.img2img`),
    ``z`` the noise added to ``init``."""
    cfg = config.resolved(pipe.backbone, pipe.alpha_bar_T)
    cond = pipe.prompt_encoder(list(prompts))
    z = z.to(pipe.device)
    return decode(pipe.vae, _latents(pipe, cond, cfg, z, init))


def _latents(
    pipe: LoadedPipeline, cond: TextCondition, cfg: SampleConfig, z: torch.Tensor, init: torch.Tensor | None
) -> torch.Tensor:
    """Clean latents by the sampler ``cfg`` names (resolved), from noise or from ``init``."""
    strength = float(cfg.strength or STRENGTH)
    if cfg.teacher:
        steps, guidance = int(cfg.steps), float(cfg.cfg)  # type: ignore[arg-type]
        return teacher_latents(pipe, cond, z, steps, guidance, init, strength)
    if init is not None:
        return one_step_img2img_latents(pipe, cond, init.to(z.device), z, strength)
    return one_step_latents(pipe, cond, z, float(cfg.alpha_bar_T))  # type: ignore[arg-type]


def refined(
    pipe: LoadedPipeline,
    prompts: Sequence[str],
    config: SampleConfig,
    seeds: Sequence[int],
    native: np.ndarray,
) -> np.ndarray:
    """The second stage of ``--upscale K``: the native images enlarged K× in pixel space
    (PIL bicubic), encoded by the VAE, and refined by one image-to-image step (or the
    teacher's last steps) at ``config.refine_strength``, with :func:`refine_noise`."""
    k = int(config.upscale)  # type: ignore[arg-type]
    c, h, w = pipe.latent_shape_for(native.shape[1], native.shape[2])
    large = upscale_images(native, k)
    init = encode(pipe.vae, large, pipe.device)
    noise = refine_noise(seeds, (c, h, w), (c, h * k, w * k), pipe.device)
    cfg = dataclasses.replace(config, strength=config.refine_strength, upscale=None)
    return images_from_noise(pipe, prompts, cfg, noise, init)


def generate(
    pipe: LoadedPipeline,
    prompts: Sequence[str],
    config: SampleConfig,
    num_images_per_prompt: int = 1,
    progress: Callable[[int, int], None] | None = None,
    init_images: np.ndarray | None = None,
    control_images: np.ndarray | None = None,
) -> Generation:
    """Generate ``num_images_per_prompt`` images for each prompt (prompt-major order);
    image ``i`` uses seed ``config.seed + i``. ``progress(done, total)`` is called after
    every batch. The one-step ᾱ_T is ``config.alpha_bar_T`` when set, else the pipeline's
    (decided when it was loaded). ``init_images`` ((len(prompts), H, W, 3) uint8 at the
    run's size): image-to-image from the image of each prompt at ``config.strength``.
    ``config.height`` / ``width`` set the size; ``config.upscale`` adds :func:`refined`.
    ``control_images`` (the same shape): the control image of each prompt, for a pipeline
    whose denoiser runs a ControlNet (:func:`~wadi_cli.pipeline.control.with_controlnet`)."""
    cfg = config.resolved(pipe.backbone, pipe.alpha_bar_T)
    if cfg.teacher and cfg.upscale:  # before any work, naming the flag that set the strength
        teacher_start(int(cfg.steps), float(cfg.refine_strength), "--refine-strength")  # type: ignore[arg-type]
    shape = pipe.latent_shape_for(cfg.height, cfg.width)
    jobs = [
        (p, cfg.seed + i, k)
        for i, (k, p) in enumerate(
            (k, p) for k, p in enumerate(prompts) for _ in range(num_images_per_prompt)
        )
    ]
    images: list[np.ndarray] = []
    timings: list[float] = []
    start = time.perf_counter()
    for lo in range(0, len(jobs), cfg.batch_size):
        batch = jobs[lo : lo + cfg.batch_size]
        texts, seeds = [p for p, _, _ in batch], [s for _, s, _ in batch]
        t0 = time.perf_counter()
        z = initial_noise(seeds, shape, pipe.device)
        if control_images is not None:
            from wadi_cli.pipeline.control import control_tensor

            pipe.denoiser.use(control_tensor(control_images[[k for _, _, k in batch]]))  # type: ignore[operator]
        init = None
        if init_images is not None:
            init = encode(pipe.vae, init_images[[k for _, _, k in batch]], pipe.device)
        out = images_from_noise(pipe, texts, cfg, z, init)
        if cfg.upscale:
            out = refined(pipe, texts, cfg, seeds, out)
        images.append(out)
        timings.append(time.perf_counter() - t0)
        if progress is not None:
            progress(lo + len(batch), len(jobs))
    return Generation(
        images=np.concatenate(images) if images else np.zeros((0, 0, 0, 3), np.uint8),
        prompts=[p for p, _, _ in jobs],
        seeds=[s for _, s, _ in jobs],
        config=cfg,
        seconds=time.perf_counter() - start,
        timings=timings,
    )
