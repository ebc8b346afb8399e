"""Image generation: one-step (WaDi §3) and the multi-step teacher with classifier-free
guidance, batched, with one random generator per image.

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

from wadi_cli.diffusion import TextCondition, last_timestep, one_step_x0
from wadi_cli.sample.config import SampleConfig
from wadi_cli.sample.loading import LoadedPipeline


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
def one_step_latents(
    pipe: LoadedPipeline, cond: TextCondition, z: torch.Tensor, alpha_bar_T: float
) -> torch.Tensor:
    """x0 = (z − sqrt(1 − ᾱ_T) ε̂(z, T−1, c)) / sqrt(ᾱ_T): one denoiser call, no guidance."""
    t = last_timestep(pipe.scheduler)
    pred = pipe.denoiser(z, t, cond)
    return one_step_x0(z, pred, alpha_bar_T, pipe.denoiser.prediction_type)


#: DDIM settings of every teacher, whatever scheduler the pipeline ships: no clipping of
#: the predicted x0 (latents are not bounded to [-1, 1]), the final step lands on
#: ᾱ_0 of the schedule (not 1), trailing timesteps. SD's configs set the first two
#: already; PixArt's DPM-Solver config has neither key, and DDIM's own defaults
#: (clip_sample=True, set_alpha_to_one=True) would clip every x0 estimate.
TEACHER_DDIM: dict[str, object] = {
    "prediction_type": "epsilon",
    "timestep_spacing": "trailing",
    "clip_sample": False,
    "set_alpha_to_one": False,
}


def teacher_scheduler(pipe: LoadedPipeline) -> object:
    """A DDIM scheduler (η = 0, deterministic) on the pipeline's training schedule, with
    :data:`TEACHER_DDIM`; it is fed ε (the denoiser wrapper converts v-predictions),
    hence ``prediction_type=epsilon``.

    Timesteps use *trailing* spacing (Lin et al. 2024, "Common Diffusion Noise Schedules
    and Sample Steps are Flawed"): N steps start at t = 999, so 1 step is [999] and 4 are
    [999, 749, 499, 249]. SD's default "leading" spacing with ``steps_offset=1`` would
    start a 1-step run at t = 1 on pure noise, which makes few-step teacher numbers
    meaningless."""
    from diffusers import DDIMScheduler  # start-up time: only the teacher needs diffusers here

    return DDIMScheduler.from_config(pipe.scheduler.config, **TEACHER_DDIM)


@torch.no_grad()
def teacher_latents(
    pipe: LoadedPipeline, cond: TextCondition, z: torch.Tensor, steps: int, cfg: float
) -> torch.Tensor:
    """Multi-step DDIM sampling with classifier-free guidance
    ``ε = ε(∅) + w (ε(c) − ε(∅))``, conditional and unconditional halves in ONE forward."""
    scheduler = teacher_scheduler(pipe)
    scheduler.set_timesteps(steps, device=z.device)  # type: ignore[attr-defined]
    x = z * scheduler.init_noise_sigma  # type: ignore[attr-defined]
    guided = cfg != 1.0
    both = TextCondition.cat([pipe.prompt_encoder.empty(len(cond)).to(z.device), cond]) if guided else cond
    for t in scheduler.timesteps:  # type: ignore[attr-defined]
        inp = torch.cat([x, x]) if guided else x
        inp = scheduler.scale_model_input(inp, t)  # type: ignore[attr-defined]
        eps = pipe.denoiser.eps(inp, t, both)
        if guided:
            eps_u, eps_c = eps.chunk(2)
            eps = eps_u + cfg * (eps_c - eps_u)
        x = scheduler.step(eps, t, x).prev_sample  # type: ignore[attr-defined]
    return x


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


def generate(
    pipe: LoadedPipeline,
    prompts: Sequence[str],
    config: SampleConfig,
    num_images_per_prompt: int = 1,
    progress: Callable[[int, int], None] | None = None,
) -> Generation:
    """Generate ``num_images_per_prompt`` images for each prompt (prompt-major order);
    image ``i`` uses seed ``config.seed + i``. ``progress(done, total)`` is called after
    every batch."""
    cfg = config.resolved(pipe.backbone, getattr(pipe, "weights_alpha_bar_T", None))
    jobs = [(p, cfg.seed + i) for i, p in enumerate(p for p in prompts for _ in range(num_images_per_prompt))]
    images: list[np.ndarray] = []
    timings: list[float] = []
    start = time.perf_counter()
    for lo in range(0, len(jobs), cfg.batch_size):
        batch = jobs[lo : lo + cfg.batch_size]
        t0 = time.perf_counter()
        cond = pipe.prompt_encoder([p for p, _ in batch])
        z = initial_noise([s for _, s in batch], pipe.latent_shape, pipe.device)
        if cfg.teacher:
            x0 = teacher_latents(pipe, cond, z, int(cfg.steps), float(cfg.cfg))  # type: ignore[arg-type]
        else:
            x0 = one_step_latents(pipe, cond, z, float(cfg.alpha_bar_T))  # type: ignore[arg-type]
        images.append(decode(pipe.vae, x0))
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
