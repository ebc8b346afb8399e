"""Diffusers' own pipeline on a ``--format diffusers`` export, next to ``wadi sample``, from
the same initial noise (shared by the tiny and the family tests)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

#: Prompts of the comparisons (the tiny tokenizer knows these words; the miniature CLIP
#: tokenizers map them to whatever ids they have).
PROMPTS = ["a red circle at the top left", "a blue square at the bottom right"]
SEED = 11  # image i starts from wadi's noise of seed SEED + i


def wadi_one_step(backbone: str, weights: Path, model: str | None = None, alpha_bar_T: float | None = None):
    """``wadi sample``'s latents x0 and uint8 images of :data:`PROMPTS`, and its initial noise."""
    from wadi_cli.pipeline import decode, initial_noise, load_pipeline, one_step_latents

    pipe = load_pipeline(backbone, model=model, weights=weights, alpha_bar_T=alpha_bar_T)
    z = initial_noise([SEED + i for i in range(len(PROMPTS))], pipe.latent_shape)
    x0 = one_step_latents(pipe, pipe.prompt_encoder(PROMPTS), z, pipe.alpha_bar_T)
    return z, x0, decode(pipe.vae, x0)


def one_step_scheduler(scheduler, alpha_bar_T: float):
    """Diffusers' own DDIM scheduler on ``scheduler``'s schedule and prediction type, made to
    take one step at t = 999 and return the predicted x0 there: trailing spacing,
    ``set_alpha_to_one``, no clipping, and ᾱ_999 planted as ``alpha_bar_T`` (written into
    ``alphas_cumprod`` directly, independently of how wadi's export encodes it in the betas)."""
    from diffusers import DDIMScheduler

    over = dict(timestep_spacing="trailing", set_alpha_to_one=True, clip_sample=False, thresholding=False)
    sched = DDIMScheduler.from_config(scheduler.config, **over, rescale_betas_zero_snr=False)
    sched.alphas_cumprod[-1] = alpha_bar_T
    return sched


def pipeline_one_step(pipe, z: torch.Tensor, guidance_scale: float = 0.0):
    """``pipe(PROMPTS, num_inference_steps=1, guidance_scale=..., latents=z)`` of a loaded
    diffusers pipeline: its latents and its uint8 images (diffusers' own postprocessing)."""
    pipe.set_progress_bar_config(disable=True)
    kw = dict(num_inference_steps=1, guidance_scale=guidance_scale, latents=z.clone())
    if "Pixart" in type(pipe).__name__ or "PixArt" in type(pipe).__name__:
        kw["use_resolution_binning"] = False  # the miniature's side is none of the real bins
    with torch.no_grad():
        latents = pipe(PROMPTS, output_type="latent", **kw).images
        images = pipe(PROMPTS, output_type="np", **kw).images
    assert [int(t) for t in pipe.scheduler.timesteps] == [999]
    return latents, (np.asarray(images) * 255).round().astype(np.uint8)


def diffusers_one_step(
    folder: Path, z: torch.Tensor, guidance_scale: float = 0.0, pipeline_class: str = "DiffusionPipeline"
):
    """The plain one-step call ``pipe(prompt, num_inference_steps=1, guidance_scale=...)`` on
    the pipeline folder ``folder`` loaded with ``pipeline_class``, with ``latents=z``: its
    latents and its uint8 images."""
    import diffusers

    cls = getattr(diffusers, pipeline_class)
    pipe = cls.from_pretrained(str(folder), local_files_only=True)
    return pipeline_one_step(pipe, z, guidance_scale)
