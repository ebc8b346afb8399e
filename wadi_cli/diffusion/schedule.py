"""Noise-schedule maths in one place: α/σ from ``alphas_cumprod``, the ε / x0 / v
conversions, forward noising, and the one-step generator's x0 formula (WaDi §3).

Conventions (variance-preserving discrete DDPM schedules, as in SD and PixArt):

    ᾱ_t = alphas_cumprod[t],   α_t = sqrt(ᾱ_t),   σ_t = sqrt(1 − ᾱ_t)
    x_t = α_t · x0 + σ_t · ε
    v   = α_t · ε − σ_t · x0          (the "v-prediction" target)

Every function accepts ᾱ as a Python float, a 0-d tensor, or a per-sample tensor of
shape ``(B,)``; it is broadcast over the remaining dimensions of ``x``. The arithmetic
runs in at least float32 (float64 stays float64) and the result is cast back to the
dtype of the input latents, so fp16 models do not lose precision in the division by
``sqrt(ᾱ_T) ≈ 0.069``.
"""

from __future__ import annotations

from typing import Literal

import torch

from wadi_cli.errors import BadInputError

PredictionType = Literal["epsilon", "v_prediction", "sample"]
PREDICTION_TYPES: tuple[str, ...] = ("epsilon", "v_prediction", "sample")

AlphaBar = float | torch.Tensor


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _coefficients(alpha_bar: AlphaBar, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(α, σ) = (sqrt(ᾱ), sqrt(1 − ᾱ)) broadcastable against ``like`` (B, ...)."""
    dtype = _compute_dtype(like)
    ab = torch.as_tensor(alpha_bar, dtype=dtype, device=like.device)
    if ab.ndim not in (0, 1):
        raise ValueError(f"alpha_bar must be a scalar or a (B,) tensor, got shape {tuple(ab.shape)}")
    if ab.ndim == 1:
        ab = ab.reshape(-1, *([1] * (like.ndim - 1)))
    if bool(((ab <= 0) | (ab > 1)).any()):
        raise BadInputError(f"alpha_bar must lie in (0, 1], got {ab.flatten()[:4].tolist()}")
    return ab.sqrt(), (1 - ab).sqrt()


def alphas_cumprod_of(scheduler: object) -> torch.Tensor:
    """``alphas_cumprod`` of a diffusers scheduler as a float64 CPU tensor (length T)."""
    ac = getattr(scheduler, "alphas_cumprod", None)
    if ac is None:
        raise BadInputError(
            f"{type(scheduler).__name__} has no alphas_cumprod (not a discrete DDPM schedule)"
        )
    return torch.as_tensor(ac).detach().to("cpu", torch.float64)


def alpha_bar_at(alphas_cumprod: torch.Tensor, t: int | torch.Tensor) -> torch.Tensor:
    """ᾱ_t for integer timestep(s) ``t`` (indexing on CPU, returned on ``t``'s device)."""
    idx = torch.as_tensor(t, dtype=torch.long)
    device = idx.device
    out = alphas_cumprod[idx.cpu()]
    return out.to(device)


def last_timestep(scheduler: object) -> int:
    """T − 1, the timestep the one-step generator is evaluated at (999 for T = 1000)."""
    return int(scheduler.config.num_train_timesteps) - 1  # type: ignore[attr-defined]


def add_noise(x0: torch.Tensor, eps: torch.Tensor, alpha_bar: AlphaBar) -> torch.Tensor:
    """x_t = sqrt(ᾱ) x0 + sqrt(1 − ᾱ) ε."""
    a, s = _coefficients(alpha_bar, x0)
    dt = _compute_dtype(x0)
    return (a * x0.to(dt) + s * eps.to(dt)).to(x0.dtype)


def x0_from_eps(x_t: torch.Tensor, eps: torch.Tensor, alpha_bar: AlphaBar) -> torch.Tensor:
    """x0 = (x_t − sqrt(1 − ᾱ) ε) / sqrt(ᾱ)."""
    a, s = _coefficients(alpha_bar, x_t)
    dt = _compute_dtype(x_t)
    return ((x_t.to(dt) - s * eps.to(dt)) / a).to(x_t.dtype)


def eps_from_x0(x_t: torch.Tensor, x0: torch.Tensor, alpha_bar: AlphaBar) -> torch.Tensor:
    """ε = (x_t − sqrt(ᾱ) x0) / sqrt(1 − ᾱ)."""
    a, s = _coefficients(alpha_bar, x_t)
    dt = _compute_dtype(x_t)
    return ((x_t.to(dt) - a * x0.to(dt)) / s).to(x_t.dtype)


def eps_from_v(x_t: torch.Tensor, v: torch.Tensor, alpha_bar: AlphaBar) -> torch.Tensor:
    """ε = sqrt(ᾱ) v + sqrt(1 − ᾱ) x_t."""
    a, s = _coefficients(alpha_bar, x_t)
    dt = _compute_dtype(x_t)
    return (a * v.to(dt) + s * x_t.to(dt)).to(x_t.dtype)


def x0_from_v(x_t: torch.Tensor, v: torch.Tensor, alpha_bar: AlphaBar) -> torch.Tensor:
    """x0 = sqrt(ᾱ) x_t − sqrt(1 − ᾱ) v."""
    a, s = _coefficients(alpha_bar, x_t)
    dt = _compute_dtype(x_t)
    return (a * x_t.to(dt) - s * v.to(dt)).to(x_t.dtype)


def v_from_eps(x_t: torch.Tensor, eps: torch.Tensor, alpha_bar: AlphaBar) -> torch.Tensor:
    """v = sqrt(ᾱ) ε − sqrt(1 − ᾱ) x0, with x0 recovered from (x_t, ε)."""
    a, s = _coefficients(alpha_bar, x_t)
    dt = _compute_dtype(x_t)
    x0 = (x_t.to(dt) - s * eps.to(dt)) / a
    return (a * eps.to(dt) - s * x0).to(x_t.dtype)


def _check_prediction_type(prediction_type: str) -> None:
    if prediction_type not in PREDICTION_TYPES:
        raise BadInputError(
            f"unknown prediction type {prediction_type!r}; expected one of {', '.join(PREDICTION_TYPES)}"
        )


def to_eps(pred: torch.Tensor, x_t: torch.Tensor, alpha_bar: AlphaBar, prediction_type: str) -> torch.Tensor:
    """Turn a model output of ``prediction_type`` at noise level ᾱ into an ε-prediction."""
    _check_prediction_type(prediction_type)
    if prediction_type == "epsilon":
        return pred
    if prediction_type == "v_prediction":
        return eps_from_v(x_t, pred, alpha_bar)
    return eps_from_x0(x_t, pred, alpha_bar)


def to_x0(pred: torch.Tensor, x_t: torch.Tensor, alpha_bar: AlphaBar, prediction_type: str) -> torch.Tensor:
    """Turn a model output of ``prediction_type`` at noise level ᾱ into a clean-sample estimate."""
    _check_prediction_type(prediction_type)
    if prediction_type == "epsilon":
        return x0_from_eps(x_t, pred, alpha_bar)
    if prediction_type == "v_prediction":
        return x0_from_v(x_t, pred, alpha_bar)
    return pred


def one_step_x0(
    z: torch.Tensor, pred: torch.Tensor, alpha_bar_T: float, prediction_type: str = "epsilon"
) -> torch.Tensor:
    """The one-step generator's clean latent (WaDi §3):

        x0 = (z − sqrt(1 − ᾱ_T) · ε̂(z, T−1, c)) / sqrt(ᾱ_T)

    ``z`` is pure Gaussian noise, ``pred`` the denoiser's output at t = T−1 and
    ``alpha_bar_T`` the method's constant (named once, as ``ALPHA_BAR_T`` in the backbone
    registry; a pipeline decides which value it samples with in
    ``wadi_cli/pipeline/alpha_bar.py``). A v-prediction model is converted with the same ᾱ_T.
    """
    return to_x0(pred, z, alpha_bar_T, prediction_type)
