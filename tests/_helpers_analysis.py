"""Planted teacher/student pairs for the analysis tests: known per-row norm scalings,
rotations by known angles, direction residuals of known rank, conv layers."""

from __future__ import annotations

import numpy as np
import torch


def orthonormal_complement_vectors(t: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """For each row of ``t`` (m x n, float64), a unit vector orthogonal to that row."""
    w = torch.randn(t.shape, generator=gen, dtype=torch.float64)
    d = t / torch.linalg.vector_norm(t, dim=1, keepdim=True)
    w = w - (w * d).sum(1, keepdim=True) * d
    w = w - (w * d).sum(1, keepdim=True) * d  # second pass: orthogonal to rounding
    return w / torch.linalg.vector_norm(w, dim=1, keepdim=True)


def rotate_rows(t: torch.Tensor, angles: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Rotate each row of ``t`` (m x n) by ``angles[i]`` radians in a random plane, norm kept."""
    t = t.to(torch.float64)
    norms = torch.linalg.vector_norm(t, dim=1, keepdim=True)
    d = t / norms
    w = orthonormal_complement_vectors(t, gen)
    a = angles.to(torch.float64).unsqueeze(1)
    return norms * (torch.cos(a) * d + torch.sin(a) * w)


def planted_pair(
    rows: int = 24,
    cols: int = 40,
    *,
    seed: int = 0,
    scales: torch.Tensor | None = None,
    angles: torch.Tensor | None = None,
    shape: tuple[int, ...] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher (float64) and a student whose row i is rotated by ``angles[i]`` and scaled by
    ``scales[i]``; reshaped to ``shape`` (e.g. a conv shape with ``shape[0] == rows``)."""
    gen = torch.Generator().manual_seed(seed)
    t = torch.randn(rows, cols, generator=gen, dtype=torch.float64)
    s = t.clone()
    if angles is not None:
        s = rotate_rows(t, angles, gen)
    if scales is not None:
        s = s * scales.to(torch.float64).unsqueeze(1)
    if shape is not None:
        t, s = t.reshape(shape), s.reshape(shape)
    return t, s


def planted_low_rank_pair(
    rows: int, cols: int, teacher_rank: int, extra_rank: int, *, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Pair whose direction residual has rank exactly ``teacher_rank + extra_rank``.

    Teacher rows lie in a ``teacher_rank``-dim subspace P; every student row is its teacher
    row rotated (random angle) towards a vector of a fixed ``extra_rank``-dim subspace W
    orthogonal to P, so each residual row lies in P + W.
    """
    gen = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(
        torch.randn(cols, teacher_rank + extra_rank, generator=gen, dtype=torch.float64)
    )
    p, w = basis[:, :teacher_rank].T, basis[:, teacher_rank:].T
    t = torch.randn(rows, teacher_rank, generator=gen, dtype=torch.float64) @ p
    dirs = torch.randn(rows, extra_rank, generator=gen, dtype=torch.float64) @ w
    dirs = dirs / torch.linalg.vector_norm(dirs, dim=1, keepdim=True)
    theta = 0.05 + 0.3 * torch.rand(rows, 1, generator=gen, dtype=torch.float64)
    norms = torch.linalg.vector_norm(t, dim=1, keepdim=True)
    s = norms * (torch.cos(theta) * t / norms + torch.sin(theta) * dirs)
    return t, s, teacher_rank + extra_rank


def reference_residual(t: torch.Tensor, s: torch.Tensor) -> np.ndarray:
    """Slow, obvious float64 numpy reference of ``D_S - D_T`` (row matrices)."""
    tm = t.reshape(t.shape[0], -1).to(torch.float64).numpy()
    sm = s.reshape(s.shape[0], -1).to(torch.float64).numpy()
    out = np.zeros_like(tm)
    for i in range(tm.shape[0]):
        out[i] = sm[i] / np.linalg.norm(sm[i]) - tm[i] / np.linalg.norm(tm[i])
    return out


def matrix_with_singular_values(m: int, n: int, sv: np.ndarray, seed: int = 0) -> torch.Tensor:
    """``U diag(sv) V^T`` with random orthonormal U (m x r), V (n x r), r = len(sv)."""
    rng = np.random.default_rng(seed)
    r = len(sv)
    u, _ = np.linalg.qr(rng.standard_normal((m, r)))
    v, _ = np.linalg.qr(rng.standard_normal((n, r)))
    return torch.from_numpy((u * sv) @ v.T)
