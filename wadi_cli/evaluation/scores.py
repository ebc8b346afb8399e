"""The protocol's numbers from features, each by its community implementation:

- FID: clean-fid's ``frechet_distance`` on (mean, covariance) computed the way clean-fid's
  ``compare_folders`` computes them;
- KID: clean-fid's ``kernel_distance`` (cubic polynomial kernel, 100 subsets of at most
  1,000), with numpy's global RNG seeded for the call and restored afterwards;
- precision / recall: torch-fidelity's ``prc_features_to_metric`` (Kynkäänniemi et al.,
  k = 3), generated features first;
- CLIP score: the mean over images of the cosine between the image's and its caption's
  (L2-normalised) OpenCLIP embeddings.

clean-fid and torch-fidelity are optional (the eval extra): imported where they are used.
"""

from __future__ import annotations

import contextlib
import io

import numpy as np

from wadi_cli.errors import BadInputError
from wadi_cli.evaluation import protocol


def statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance of ``(N, D)`` features, as clean-fid computes them."""
    if features.ndim != 2 or len(features) < 2:
        raise BadInputError(f"FID needs at least 2 images, got {len(features)}")
    return np.mean(features, axis=0), np.cov(features, rowvar=False)


def fid(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Fréchet distance ``‖μ1 − μ2‖² + tr(Σ1 + Σ2 − 2 (Σ1 Σ2)^½)`` (clean-fid). scipy's and
    clean-fid's own notes about a singular product are kept quiet: the caller says it once,
    in words (:func:`is_singular`, :func:`singular_note`)."""
    import warnings

    from cleanfid.fid import frechet_distance

    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise BadInputError(
            f"FID: features of {len(mu1)} dimensions against a reference of {len(mu2)}: "
            "the reference was made with another feature extractor"
        )
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        return float(frechet_distance(mu1, sigma1, mu2, sigma2))


def is_singular(n_generated: int, n_reference: int, dim: int) -> bool:
    """A covariance of N feature vectors has rank at most N − 1: below ``dim + 1`` images on
    either side, Σ1 Σ2 is singular."""
    return min(n_generated, n_reference) <= dim


def singular_note(n_generated: int, n_reference: int, dim: int) -> str:
    """The one warning of an FID whose covariance product is singular, in words."""
    return (
        f"FID from {n_generated} generated and {n_reference} reference images: with fewer images "
        f"than the {dim} feature dimensions the covariance matrices are singular and the matrix "
        "square root inside FID is only approximate; compare this value only with FIDs from the "
        "same numbers of images (the papers use 30,000)"
    )


def kid(generated: np.ndarray, reference: np.ndarray, seed: int = protocol.KID_SEED) -> float:
    """Kernel Inception Distance (clean-fid), repeatable: the subsets are drawn with numpy's
    global RNG seeded ``seed``; its previous state is restored."""
    from cleanfid.fid import kernel_distance

    if min(len(generated), len(reference)) < 2:
        raise BadInputError("KID needs at least 2 images on each side")
    state = np.random.get_state()
    try:
        np.random.seed(seed)
        return float(
            kernel_distance(
                generated,
                reference,
                num_subsets=protocol.KID_SUBSETS,
                max_subset_size=protocol.KID_SUBSET_SIZE,
            )
        )
    finally:
        np.random.set_state(state)


def precision_recall(
    generated: np.ndarray, reference: np.ndarray, k: int = protocol.PR_NEIGHBORHOOD
) -> tuple[float, float]:
    """(precision, recall) of Kynkäänniemi et al. with k-NN balls (torch-fidelity).

    precision: share of generated samples inside the union of the reference samples'
    balls (radius = distance to their k-th nearest reference neighbour); recall: share
    of reference samples inside the generated samples' balls."""
    import torch
    from torch_fidelity.metric_prc import prc_features_to_metric

    if min(len(generated), len(reference)) <= k:
        raise BadInputError(f"precision/recall with k = {k} needs more than {k} images on each side")
    out = prc_features_to_metric(
        torch.from_numpy(np.ascontiguousarray(generated, np.float32)),
        torch.from_numpy(np.ascontiguousarray(reference, np.float32)),
        prc_neighborhood=k,
        prc_batch_size=10000,
        save_cpu_ram=True,
        verbose=False,
    )
    return float(out["precision"]), float(out["recall"])


def clip_score(image_embeddings: np.ndarray, text_embeddings: np.ndarray) -> float:
    """Mean cosine similarity of matching rows (both L2-normalised): the 0-1 scale, not
    torchmetrics' ``100 · max(cos, 0)``."""
    if image_embeddings.shape != text_embeddings.shape:
        raise BadInputError(f"{len(image_embeddings)} images for {len(text_embeddings)} captions")
    a = np.asarray(image_embeddings, np.float64)
    b = np.asarray(text_embeddings, np.float64)
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return float(cos.mean())
