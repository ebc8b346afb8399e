"""The multi-step sampler: the base model as teacher, DDIM (η = 0) with classifier-free
guidance."""

from __future__ import annotations

import torch

from wadi_cli.diffusion import TextCondition, add_noise, alpha_bar_at, alphas_cumprod_of
from wadi_cli.pipeline.img2img import teacher_start
from wadi_cli.pipeline.loaded import LoadedPipeline

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
    pipe: LoadedPipeline,
    cond: TextCondition,
    z: torch.Tensor,
    steps: int,
    cfg: float,
    init: torch.Tensor | None = None,
    strength: float = 1.0,
) -> torch.Tensor:
    """Multi-step DDIM sampling with classifier-free guidance
    ``ε = ε(∅) + w (ε(c) − ε(∅))``, conditional and unconditional halves in ONE forward.

    With ``init`` (clean latents; image-to-image at ``strength``, diffusers'
    ``StableDiffusionImg2ImgPipeline``): only the last ``int(steps · strength)`` of the
    ``steps`` timesteps run, from ``init`` noised by ``z`` to the first of them
    (:func:`~wadi_cli.pipeline.img2img.teacher_start`)."""
    scheduler = teacher_scheduler(pipe)
    scheduler.set_timesteps(steps, device=z.device)  # type: ignore[attr-defined]
    timesteps = scheduler.timesteps  # type: ignore[attr-defined]
    if init is None:
        x = z * scheduler.init_noise_sigma  # type: ignore[attr-defined]
    else:
        timesteps = timesteps[teacher_start(steps, strength) :]
        ab = float(alpha_bar_at(alphas_cumprod_of(pipe.scheduler), int(timesteps[0])))
        x = add_noise(init.to(z.dtype), z, ab)
    guided = cfg != 1.0
    both = TextCondition.cat([pipe.prompt_encoder.empty(len(cond)).to(z.device), cond]) if guided else cond
    for t in timesteps:
        inp = torch.cat([x, x]) if guided else x
        inp = scheduler.scale_model_input(inp, t)  # type: ignore[attr-defined]
        eps = pipe.denoiser.eps(inp, t, both)
        if guided:
            eps_u, eps_c = eps.chunk(2)
            eps = eps_u + cfg * (eps_c - eps_u)
        x = scheduler.step(eps, t, x).prev_sample  # type: ignore[attr-defined]
    return x
