"""The one-step sampler (WaDi §3): the student's single denoiser call at t = T−1."""

from __future__ import annotations

import torch

from wadi_cli.diffusion import TextCondition, last_timestep, one_step_x0
from wadi_cli.pipeline.loaded import LoadedPipeline


@torch.no_grad()
def one_step_latents(
    pipe: LoadedPipeline, cond: TextCondition, z: torch.Tensor, alpha_bar_T: float
) -> torch.Tensor:
    """x0 = (z − sqrt(1 − ᾱ_T) ε̂(z, T−1, c)) / sqrt(ᾱ_T): one denoiser call, no guidance."""
    t = last_timestep(pipe.scheduler)
    pred = pipe.denoiser(z, t, cond)
    return one_step_x0(z, pred, alpha_bar_T, pipe.denoiser.prediction_type)
