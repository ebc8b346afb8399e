"""ReVersion's objective (Huang, Wu, Jiang, Chan, Liu, "ReVersion: Diffusion-Based Relation
Inversion from Images", SIGGRAPH Asia 2024, arXiv 2303.13495, §3.2–3.3):

    L = L_denoise + λ_steer · L_steer,

with the timesteps of L_denoise drawn by relation-focal importance sampling.

- L_denoise: the base model's own denoising loss (ε or v, as the backbone predicts), shared
  with DreamBooth (:func:`wadi_cli.finetune.losses.denoising_loss`).
- L_steer (relation-steering contrastive learning, a multi-instance InfoNCE): with the
  relation token's input embedding r, positives P (preposition / relation words, sampled
  each step) and negatives N (the other words of the exemplar captions, i.e. the entities),
  and s_w = cos(r, w) / τ,

      L_steer = −log( Σ_{p∈P} exp s_p / Σ_{w∈P∪N} exp s_w ).

  Only r receives gradients (the word embeddings are frozen).
- Relation-focal importance sampling: t ∈ {0, …, T−1} drawn with probability proportional to
  f(t) = (1 − α · cos(π t / T)) / T, which grows from (1 − α)/T at t = 0 to (1 + α)/T at
  t = T (α = 0.5 in the paper's release: three times as likely at the noisiest step as at
  the cleanest), emphasising the high-noise steps where layout and relations form.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from wadi_cli.errors import BadInputError


def relation_focal_probabilities(timesteps: int, alpha: float) -> Tensor:
    """(T,) float64 probabilities of t = 0 … T−1, proportional to 1 − α · cos(π t / T)
    (α = 0: uniform). α must lie in [0, 1]."""
    if not 0.0 <= alpha <= 1.0:
        raise BadInputError(f"--importance-alpha must lie in [0, 1], got {alpha}")
    t = torch.arange(timesteps, dtype=torch.float64)
    f = (1.0 - alpha * torch.cos(math.pi * t / timesteps)) / timesteps
    return f / f.sum()


def sample_timesteps(probabilities: Tensor, n: int, generator: torch.Generator) -> Tensor:
    """``n`` timesteps (int64) drawn with replacement from ``probabilities``."""
    return torch.multinomial(probabilities, n, replacement=True, generator=generator)


def steering_loss(relation: Tensor, positives: Tensor, negatives: Tensor, temperature: float) -> Tensor:
    """Multi-instance InfoNCE of the module docstring: ``relation`` (D,) or (1, D), the
    ``positives`` (P, D) and ``negatives`` (N, D) word embeddings (N may be 0), temperature
    τ > 0. Computed in float32 (float64 stays float64); gradients reach ``relation`` only."""
    if len(positives) == 0:
        raise BadInputError("the steering loss needs at least one positive word")
    dt = torch.float64 if relation.dtype == torch.float64 else torch.float32
    r = F.normalize(relation.reshape(1, -1).to(dt), dim=1)
    bank = F.normalize(torch.cat([positives, negatives]).detach().to(device=r.device, dtype=dt), dim=1)
    logits = (r @ bank.T).reshape(-1) / temperature
    return torch.logsumexp(logits, 0) - torch.logsumexp(logits[: len(positives)], 0)
