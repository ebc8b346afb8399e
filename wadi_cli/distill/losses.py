"""VSD losses of WaDi (CVPR 2026, §4 steps 3–5), as small callables on tensors.

Notation: ``x0`` the student's clean latent, ``ᾱ_t`` per-sample (B,), ``ε_real`` the
teacher's guided ε-prediction, ``ε_fake`` the fake score model's. All arithmetic runs in
at least fp32 (fp64 stays fp64).
"""

from __future__ import annotations

import torch
from torch import Tensor


def _bcast(alpha_bar: Tensor, like: Tensor) -> Tensor:
    dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
    ab = torch.as_tensor(alpha_bar, dtype=dtype, device=like.device)
    return ab.reshape(-1, *([1] * (like.dim() - 1))) if ab.dim() == 1 else ab


# WaDi §4 step 3 (classifier-free guidance, Ho & Salimans 2022):
#   ε = ε(x_t, t, ∅) + w · (ε(x_t, t, c) − ε(x_t, t, ∅))
def guided_eps(eps_uncond: Tensor, eps_cond: Tensor, scale: float) -> Tensor:
    """Classifier-free guidance of an unconditional and a conditional ε-prediction."""
    return eps_uncond + scale * (eps_cond - eps_uncond)


# WaDi §4 step 4:  g = (1 − ᾱ_t) · (ε_real − ε_fake), NaNs zeroed.
def vsd_gradient(eps_real: Tensor, eps_fake: Tensor, alpha_bar_t: Tensor) -> Tensor:
    """The variational-score-distillation gradient ``g`` w.r.t. ``x0`` (no graph)."""
    dt = torch.float64 if eps_real.dtype == torch.float64 else torch.float32
    g = (1 - _bcast(alpha_bar_t, eps_real)) * (eps_real.to(dt) - eps_fake.to(dt))
    return torch.nan_to_num(g.detach(), nan=0.0)


# WaDi §4 step 4:  L_G = ½ · mean((x0 − stopgrad(x0 − g))²), so ∂L_G/∂x0 = g / numel(x0).
def generator_loss(x0: Tensor, g: Tensor) -> Tensor:
    """The generator's VSD surrogate loss: its gradient w.r.t. ``x0`` is ``g`` divided by
    the number of elements of ``x0`` (the ``mean``)."""
    x = x0.float() if x0.dtype in (torch.float16, torch.bfloat16) else x0
    target = (x - g.to(x.dtype)).detach()
    return 0.5 * torch.mean((x - target) ** 2)


# WaDi §4 step 5:  L_fake = mean((sqrt(ᾱ_t) ε_fake(x_t, t, ·) − sqrt(ᾱ_t) ε)²)
def fake_score_loss(eps_pred: Tensor, eps: Tensor, alpha_bar_t: Tensor) -> Tensor:
    """Denoising loss of the fake score model on the student's (detached) samples,
    weighted by ``sqrt(ᾱ_t)`` inside the square, as in the paper."""
    dt = torch.float64 if eps_pred.dtype == torch.float64 else torch.float32
    w = _bcast(alpha_bar_t, eps_pred).sqrt()
    return torch.mean((w * eps_pred.to(dt) - w * eps.to(dt)) ** 2)


# Not in WaDi: the DMD-style regression term (Yin et al., CVPR 2024, "one-step diffusion with
# distribution matching distillation", eq. 6 with an L2 distance):  mean((G(z_j) − x0_j)²)
# over fixed (noise z_j, teacher sample x0_j) pairs; the caller multiplies it by its weight.
def regression_loss(x0: Tensor, target: Tensor) -> Tensor:
    """Mean squared distance between the student's samples and fixed teacher samples."""
    dt = torch.float64 if torch.float64 in (x0.dtype, target.dtype) else torch.float32
    return torch.mean((x0.to(dt) - target.to(dt)) ** 2)
