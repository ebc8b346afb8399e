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


#: Segmentation of the shape (:func:`shape_masks`): a pixel is the shape's when its colour
#: distance to the background exceeds ``SHAPE_CONTRAST`` × the image's contrast (the 99th
#: percentile of the distances: inside the shape, which covers 5–12 % of the image) and at
#: least ``SHAPE_MIN_DISTANCE`` (Euclidean RGB, 0–255; rendered backgrounds vary by at most
#: about 35 across an image). On rendered images it recovers the drawn silhouettes exactly
#: (tests/tiny/test_metrics.py).
SHAPE_CONTRAST = 0.4
SHAPE_MIN_DISTANCE = 32.0


def shape_masks(images: np.ndarray) -> np.ndarray:
    """The shape's pixels segmented from tiny images, without any model: ``(N, H, W)`` bool,
    from each pixel's colour distance to the background colour, the per-channel median of
    the image's one-pixel border (shapes stay near their quadrant's centre, so the border is
    almost all background), thresholded as :data:`SHAPE_CONTRAST` says."""
    x = np.asarray(images, dtype=np.float64)
    if x.ndim != 4 or x.shape[-1] != 3:
        raise BadInputError(f"expected (N, H, W, 3) images, got shape {x.shape}")
    border = np.concatenate([x[:, 0], x[:, -1], x[:, 1:-1, 0], x[:, 1:-1, -1]], axis=1)  # (N, P, 3)
    background = np.median(border, axis=1)  # (N, 3)
    dist = np.linalg.norm(x - background[:, None, None, :], axis=-1)
    contrast = np.percentile(dist.reshape(len(dist), -1), 99, axis=1)
    threshold = np.maximum(SHAPE_MIN_DISTANCE, SHAPE_CONTRAST * contrast)
    return dist > threshold[:, None, None]


def mask_iou(predicted: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Per-image intersection over union of two ``(N, H, W)`` bool masks (1 when both are
    empty)."""
    p, t = np.asarray(predicted, dtype=bool), np.asarray(target, dtype=bool)
    if p.shape != t.shape or p.ndim != 3:
        raise BadInputError(f"masks of shapes {p.shape} and {t.shape}: expected the same (N, H, W)")
    inter = (p & t).sum(axis=(1, 2))
    union = (p | t).sum(axis=(1, 2))
    return np.where(union == 0, 1.0, inter / np.maximum(union, 1))


def control_adherence(images: np.ndarray, masks: np.ndarray) -> dict[str, float]:
    """How well generated tiny images follow their control silhouettes: the mean IoU of
    :func:`shape_masks` against ``masks`` ((N, H, W) bool), with a 95 % interval (mean ±
    1.96 standard errors over images)."""
    iou = mask_iou(shape_masks(images), masks)
    half = 1.96 * float(iou.std(ddof=1)) / np.sqrt(len(iou)) if len(iou) > 1 else float("nan")
    return {"iou": float(iou.mean()), "iou_ci95": half}
