"""The DreamBooth objective (Ruiz et al., "DreamBooth: Fine Tuning Text-to-Image Diffusion
Models for Subject-Driven Generation", CVPR 2023, Eq. 2): the base model's own denoising loss
on the instance images, plus λ times the same loss on class images of the base model
(prior preservation).

Written in the parameterisation the base network predicts (the backbone's scheduler config
says which): with x_t = sqrt(ᾱ_t) x0 + sqrt(1 − ᾱ_t) ε (:func:`wadi_cli.diffusion.add_noise`),

    ε-prediction:  target = ε
    v-prediction:  target = v = sqrt(ᾱ_t) ε − sqrt(1 − ᾱ_t) x0
    x0-prediction: target = x0

and the loss is the mean squared error between the network's output and the target, in
float32 (float64 stays float64), averaged over every element of the batch.
"""

from __future__ import annotations

import torch
from torch import Tensor

from wadi_cli.errors import BadInputError


def denoising_target(x0: Tensor, eps: Tensor, alpha_bar: Tensor, prediction_type: str) -> Tensor:
    """What a network of ``prediction_type`` should output at x_t = sqrt(ᾱ) x0 + sqrt(1 − ᾱ) ε
    (``alpha_bar``: one ᾱ_t per sample, shape ``(B,)``)."""
    if prediction_type == "epsilon":
        return eps
    if prediction_type == "sample":
        return x0
    if prediction_type != "v_prediction":
        raise BadInputError(f"unknown prediction type {prediction_type!r}")
    dt = torch.float64 if x0.dtype == torch.float64 else torch.float32
    ab = alpha_bar.to(device=x0.device, dtype=dt).reshape(-1, *([1] * (x0.ndim - 1)))
    return (ab.sqrt() * eps.to(dt) - (1 - ab).sqrt() * x0.to(dt)).to(x0.dtype)


def denoising_loss(pred: Tensor, target: Tensor) -> Tensor:
    """mean((pred − target)²) in at least float32."""
    dt = torch.float64 if pred.dtype == torch.float64 else torch.float32
    return torch.mean((pred.to(dt) - target.to(dt)) ** 2)


def dreambooth_loss(
    pred: Tensor, target: Tensor, n_instance: int, prior_weight: float
) -> tuple[Tensor, Tensor, Tensor | None]:
    """DreamBooth Eq. 2 on a batch whose first ``n_instance`` rows are instance images and
    the rest class images: ``(total, instance loss, prior loss or None)`` with
    total = L_instance + λ · L_prior (``prior_weight`` = λ; no class rows: L_instance)."""
    instance = denoising_loss(pred[:n_instance], target[:n_instance])
    if n_instance == len(pred):
        return instance, instance, None
    prior = denoising_loss(pred[n_instance:], target[n_instance:])
    return instance + prior_weight * prior, instance, prior
