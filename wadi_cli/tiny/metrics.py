"""Metrics of the tiny model: attribute accuracy and Fréchet distance (FD).

- ``accuracy``: share of generated images whose predicted colour, shape AND position
  all match the prompt's (by the shipped classifier, :mod:`wadi_cli.tiny.classifier`).
- ``fd``: Fréchet distance between Gaussians fitted to classifier features of the
  generated images and of a *reference set of freshly rendered real images with the same
  attribute list* (same N, one real image per generated one, jitter drawn from
  ``real_seed``). Both sets have the same size, so the finite-sample bias of FD is the
  same for every model compared at a given N; compare FDs only at equal N.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import scipy.linalg
import torch

from wadi_cli.errors import BadInputError
from wadi_cli.tiny.classifier import TinyClassifier, attribute_matches, features, load_classifier, predict
from wadi_cli.tiny.data import Attrs, render_batch


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2):

        ‖mu1 − mu2‖² + tr(sigma1 + sigma2 − 2 (sigma1 sigma2)^{1/2})

    computed in float64 with ``scipy.linalg.sqrtm``; a tiny imaginary part from round-off
    is dropped, and a singular product is regularised with ``1e-6 · I`` on both sides.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise BadInputError(f"shape mismatch: mu {mu1.shape}/{mu2.shape}, sigma {s1.shape}/{s2.shape}")
    diff = mu1 - mu2
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():
        eps = np.eye(s1.shape[0]) * 1e-6
        covmean = scipy.linalg.sqrtm((s1 + eps) @ (s2 + eps))
    if np.iscomplexobj(covmean):
        covmean = covmean.real
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean))


def feature_statistics(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased, N−1) covariance of ``(N, D)`` features, float64."""
    f = np.asarray(feats, np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise BadInputError(f"need at least 2 feature vectors, got shape {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def evaluate_images(
    images: np.ndarray | torch.Tensor,
    attrs: Sequence[Attrs],
    real_seed: int,
    classifier: TinyClassifier | None = None,
) -> dict[str, object]:
    """Accuracy and FD of generated uint8 ``(N, 32, 32, 3)`` images against their prompts.

    Returns ``{"accuracy", "fd", "per_attribute_accuracy": {attr: acc}, "num_images"}``.
    The FD reference is ``render_batch(attrs, real_seed)`` (see the module docstring).
    """
    n = len(images)
    if n != len(attrs):
        raise BadInputError(f"{n} images for {len(attrs)} prompts")
    if n < 2:
        raise BadInputError("need at least 2 images to evaluate")
    model = classifier if classifier is not None else load_classifier()
    match = attribute_matches(predict(images, model), attrs)
    all_ok = np.logical_and.reduce(list(match.values()))
    fake = feature_statistics(features(images, model))
    real = feature_statistics(features(render_batch(attrs, real_seed), model))
    return {
        "accuracy": float(all_ok.mean()),
        "fd": frechet_distance(fake[0], fake[1], real[0], real[1]),
        "per_attribute_accuracy": {k: float(v.mean()) for k, v in match.items()},
        "num_images": n,
    }
