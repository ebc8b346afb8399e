"""Diffusion maths shared by sampling and distillation: the schedule (α/σ from
``alphas_cumprod``, ε/x0/v conversions, the one-step x0 formula), one denoiser wrapper
per backbone family, and prompt encoding with one attention-mask rule."""

from wadi_cli.diffusion.denoisers import Denoiser, DiTDenoiser, UNetDenoiser, wrap_denoiser
from wadi_cli.diffusion.schedule import (
    PREDICTION_TYPES,
    add_noise,
    alpha_bar_at,
    alphas_cumprod_of,
    eps_from_v,
    eps_from_x0,
    last_timestep,
    one_step_x0,
    to_eps,
    to_x0,
    v_from_eps,
    x0_from_eps,
    x0_from_v,
)
from wadi_cli.diffusion.text import DualCLIPPromptEncoder, PromptEncoder, TextCondition

__all__ = [
    "PREDICTION_TYPES",
    "DiTDenoiser",
    "Denoiser",
    "DualCLIPPromptEncoder",
    "PromptEncoder",
    "TextCondition",
    "UNetDenoiser",
    "add_noise",
    "alpha_bar_at",
    "alphas_cumprod_of",
    "eps_from_v",
    "eps_from_x0",
    "last_timestep",
    "one_step_x0",
    "to_eps",
    "to_x0",
    "v_from_eps",
    "wrap_denoiser",
    "x0_from_eps",
    "x0_from_v",
]
