"""Image-to-image (SDEdit, Meng et al. 2022) with the one-step student or the teacher, and
the two-stage high-resolution run built on it.

One step at strength ``s`` (WaDi's student was trained at t = T−1 only; how it behaves at
lower t is measured in ``analysis/downstream_tiny/``):

    t    = round(s · (T − 1))                      (s = 1: t = 999, the student's own step)
    x_t  = sqrt(ᾱ_t) · x0_init + sqrt(1 − ᾱ_t) · ε,   ε ~ N(0, I), ᾱ_t = alphas_cumprod[t]
    x0   = (x_t − sqrt(1 − ᾱ_t) · ε̂(x_t, t, c)) / sqrt(ᾱ_t)
         = sqrt(ᾱ_t) · x_t − sqrt(1 − ᾱ_t) · v̂(x_t, t, c)      (v-prediction)

``x0_init`` is the VAE encoding of the init image (the posterior mean, times the VAE's
scaling factor). The teacher follows diffusers' ``StableDiffusionImg2ImgPipeline``: of its
``N``-step DDIM schedule it runs the last ``int(N · s)`` steps, after noising ``x0_init``
to the first of them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from wadi_cli.diffusion import TextCondition, add_noise, alpha_bar_at, alphas_cumprod_of, to_x0
from wadi_cli.errors import BadInputError
from wadi_cli.pipeline.loaded import LoadedPipeline


def strength_timestep(strength: float, num_train_timesteps: int) -> int:
    """t = round(s · (T − 1)): where one image-to-image step starts (s in (0, 1])."""
    if not 0.0 < strength <= 1.0:
        raise BadInputError(f"--strength must lie in (0, 1], got {strength}")
    return int(round(strength * (num_train_timesteps - 1)))


@torch.no_grad()
def encode(vae: torch.nn.Module, images: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
    """Clean latents of (N, H, W, 3) uint8 ``images``: the VAE posterior's mean of the image
    mapped to [−1, 1], shifted and scaled like :func:`~wadi_cli.pipeline.generation.decode`
    undoes (``(mean − shift_factor) · scaling_factor``). The mean, not a sample: the init
    latent does not depend on a second random draw (the noise of step t already is one)."""
    config = vae.config  # type: ignore[attr-defined]
    dtype = next(vae.parameters()).dtype
    x = (
        torch.from_numpy(np.array(images, dtype=np.uint8, copy=True)).permute(0, 3, 1, 2).float() / 127.5
        - 1.0
    )
    mean = vae.encode(x.to(device, dtype)).latent_dist.mean.float()  # type: ignore[operator]
    shift = getattr(config, "shift_factor", None)
    if shift:
        mean = mean - float(shift)
    return mean * float(config.scaling_factor)


@torch.no_grad()
def one_step_img2img_latents(
    pipe: LoadedPipeline, cond: TextCondition, x0_init: torch.Tensor, noise: torch.Tensor, strength: float
) -> torch.Tensor:
    """The one-step clean latent from ``x0_init`` at ``strength`` (formula in the module
    docstring): one denoiser call at t = round(s · (T − 1)), no guidance."""
    ac = alphas_cumprod_of(pipe.scheduler)
    t = strength_timestep(strength, len(ac))
    ab = float(alpha_bar_at(ac, t))
    x_t = add_noise(x0_init.to(noise.dtype), noise, ab)
    pred = pipe.denoiser(x_t, t, cond)
    return to_x0(pred, x_t, ab, pipe.denoiser.prediction_type)


def teacher_start(steps: int, strength: float, flag: str = "--strength") -> int:
    """Index of the first of ``steps`` DDIM timesteps the teacher runs at ``strength``
    (diffusers' ``get_timesteps``: it runs the last ``int(steps · s)``); at least one.
    ``flag`` names the option that set ``strength`` in the error."""
    run = min(int(steps * strength), steps)
    if run < 1:
        raise BadInputError(
            f"{flag} {strength} with --steps {steps} leaves int({steps}·{strength}) = 0 teacher "
            f"steps to run; raise {flag} or --steps"
        )
    return steps - run


def refine_noise(
    seeds: Sequence[int], native: Sequence[int], large: Sequence[int], device: torch.device | str = "cpu"
) -> torch.Tensor:
    """The noise of the refining step of image ``i`` at the large size: drawn by the same
    CPU generator (seed ``seeds[i]``) right after its native-size noise, so it is new noise
    yet depends on nothing but the seed."""
    out = []
    for s in seeds:
        g = torch.Generator("cpu").manual_seed(int(s))
        torch.randn(tuple(native), generator=g, dtype=torch.float32)
        out.append(torch.randn(tuple(large), generator=g, dtype=torch.float32))
    return torch.stack(out).to(device)


def upscale_images(images: np.ndarray, factor: int) -> np.ndarray:
    """(N, H, W, 3) uint8 images ``factor`` times larger with PIL's bicubic filter."""
    from PIL import Image

    h, w = images.shape[1:3]
    return np.stack(
        [
            np.asarray(Image.fromarray(im).resize((w * factor, h * factor), Image.Resampling.BICUBIC))
            for im in images
        ]
    )
