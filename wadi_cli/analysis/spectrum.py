"""Singular-value spectrum of a direction residual ``R = D_S - D_T`` and its summaries.

Two ways to get the spectrum, both giving *every* singular value:

- ``"gram"`` (default): the squared singular values of ``R`` are the eigenvalues of the
  smaller Gram matrix ``G = R R^T`` (or ``R^T R``). ``G`` is formed with a float32
  matrix product that skips the blocks above the diagonal (about half the FLOPs of a
  full product), and its eigenvalues are taken in the same precision
  (``torch.linalg.eigvalsh``; float64 would buy nothing after a float32 product, and
  costs ~40% more on CPU). Rounding: every eigenvalue is within about
  ``1e-7 * sigma_1^2`` of the exact one (float32 rounding of the product), so energy
  shares and ranks are unaffected and the top singular values agree with ``"exact"`` far
  below 1%; singular values below ~3e-4 sigma_1 sit at that noise floor.
- ``"exact"``: ``torch.linalg.svdvals`` of ``R`` in float64 (the slow, obvious way; use
  it to check the default).

Summaries (see :func:`spectrum_stats`), for ``E = sum_i sigma_i^2 = ‖R‖_F^2``:

- ``energy_at_k``: ``sum_{i<=k} sigma_i^2 / E`` (sigma sorted descending);
- ``rank90`` / ``rank93`` / ``rank99``: fewest singular values whose squares hold at
  least 90 / 93 / 99 % of ``E``;
- ``effective_rank``: ``exp(-sum_i p_i log p_i)`` with ``p_i = sigma_i / sum_j sigma_j``
  (Roy & Vetterli, 2007), between 1 and ``min(m, n)``.

A zero residual (identical directions) has no spectrum: ``energy_at_k`` and
``effective_rank`` are NaN and the ranks 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

METHODS = ("gram", "exact")
RANK_SHARES = {"rank90": 0.90, "rank93": 0.93, "rank99": 0.99}


def gram_lower(r: torch.Tensor, blocks: int = 8) -> torch.Tensor:
    """Lower triangle of ``r @ r.T`` (the upper triangle is left as garbage/zero).

    The rows of ``r`` are cut into ``blocks`` panels and only the panels on or below
    the diagonal are multiplied, which costs ``(blocks + 1) / (2 * blocks)`` of a full
    product. The diagonal blocks are computed whole (so they are symmetric).
    """
    m = r.shape[0]
    g = torch.zeros((m, m), dtype=r.dtype, device=r.device)
    blocks = max(1, min(blocks, m // 128 or 1))
    edges = [round(i * m / blocks) for i in range(blocks + 1)]
    prev = torch.get_float32_matmul_precision()
    if r.is_cuda:
        torch.set_float32_matmul_precision("highest")  # no TF32: it would cost 3 digits
    try:
        for i in range(blocks):
            a, b = edges[i], edges[i + 1]
            g[a:b, :b].copy_(r[a:b] @ r[:b].T)
    finally:
        torch.set_float32_matmul_precision(prev)
    return g


def gram_of_smaller_side(r: torch.Tensor) -> torch.Tensor:
    """Lower triangle of ``R R^T`` or ``R^T R``, whichever is smaller (``min(m, n)`` square)."""
    return gram_lower(r if r.shape[0] <= r.shape[1] else r.T)


def eigvals_desc(g: torch.Tensor) -> np.ndarray:
    """Eigenvalues of a symmetric matrix given by its lower triangle, returned as float64,
    clipped at 0 (they are squared singular values), sorted descending. Solved in the
    matrix's own precision (at least float32)."""
    if g.numel() == 0:
        return np.zeros(0)
    if g.dtype not in (torch.float32, torch.float64):
        g = g.float()
    ev = torch.linalg.eigvalsh(g, UPLO="L").cpu().numpy().astype(np.float64)
    return np.sort(np.clip(ev, 0.0, None))[::-1].copy()


def exact_squared_singular_values(r: torch.Tensor) -> np.ndarray:
    """Squared singular values from a float64 SVD, sorted descending (the reference)."""
    if r.numel() == 0:
        return np.zeros(0)
    sv = torch.linalg.svdvals(r.to(torch.float64)).cpu().numpy()
    return np.sort(sv * sv)[::-1].copy()


def squared_singular_values(r: torch.Tensor, method: str = "gram") -> np.ndarray:
    """All squared singular values of the 2-D tensor ``r``, float64, sorted descending.

    ``method`` is ``"gram"`` (eigenvalues of the smaller Gram matrix, fast) or
    ``"exact"`` (float64 SVD). Negative rounding residue of ``"gram"`` is clipped to 0.
    """
    if method not in METHODS:
        raise ValueError(f"unknown spectrum method {method!r}; expected one of {METHODS}")
    if r.ndim != 2:
        raise ValueError(f"expected a matrix, got shape {tuple(r.shape)}")
    if method == "exact":
        return exact_squared_singular_values(r)
    if r.numel() == 0:
        return np.zeros(0)
    return eigvals_desc(gram_of_smaller_side(r))


@dataclass
class SpectrumStats:
    """Summary of one residual spectrum (see the module docstring for definitions)."""

    energy: float  # sum of squared singular values = ‖R‖_F^2
    energy_at_k: float
    rank90: int
    rank93: int
    rank99: int
    effective_rank: float
    top_singular_values: list[float] = field(default_factory=list)


def rank_at_share(sq_desc: np.ndarray, share: float) -> int:
    """Fewest leading entries of ``sq_desc`` (descending) whose sum is >= ``share`` of the total.

    A relative tolerance of 1e-12 absorbs rounding in the cumulative sum. Returns 0 for
    an all-zero spectrum.
    """
    total = float(sq_desc.sum())
    if total <= 0.0:
        return 0
    cum = np.cumsum(sq_desc) / total
    idx = int(np.searchsorted(cum, share * (1.0 - 1e-12), side="left"))
    return min(idx + 1, len(sq_desc))


def effective_rank(sq_desc: np.ndarray) -> float:
    """Roy-Vetterli effective rank ``exp(H(p))``, ``p_i = sigma_i / sum sigma``; NaN if all zero."""
    sv = np.sqrt(np.clip(sq_desc, 0.0, None))
    total = float(sv.sum())
    if total <= 0.0:
        return math.nan
    p = sv[sv > 0] / total
    return float(np.exp(-(p * np.log(p)).sum()))


def spectrum_stats(sq_desc: np.ndarray, k: int = 64, top: int = 8) -> SpectrumStats:
    """Summaries of a descending array of squared singular values.

    Args:
        sq_desc: squared singular values, sorted descending (as returned by
            :func:`squared_singular_values`).
        k: cut-off for ``energy_at_k``.
        top: how many leading singular values to keep in ``top_singular_values``.
    """
    if k < 1:
        raise ValueError("k must be >= 1")
    total = float(sq_desc.sum())
    energy_at_k = float(sq_desc[:k].sum()) / total if total > 0 else math.nan
    ranks = {name: rank_at_share(sq_desc, share) for name, share in RANK_SHARES.items()}
    top_sv = [float(math.sqrt(x)) for x in sq_desc[:top]]
    return SpectrumStats(
        energy=total,
        energy_at_k=energy_at_k,
        effective_rank=effective_rank(sq_desc),
        top_singular_values=top_sv,
        **ranks,
    )
