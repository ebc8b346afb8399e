"""Row-wise norm/direction decomposition of a teacher/student weight pair.

Every weight with at least two dimensions is viewed as a matrix of rows, one row per
output unit: a Linear ``(m, n)`` stays ``m x n``; a Conv ``(out, in, kh, kw)`` becomes
``out x (in*kh*kw)``. Row ``i`` splits as ``W_i = g_i * d_i`` with norm ``g_i = ||W_i||_2``
and unit direction ``d_i = W_i / g_i`` (the weight-normalisation split of the WaDi paper).

For a teacher row ``T_i`` and a student row ``S_i`` this module computes (row results in
float64, see :func:`decompose_rows` for the cancellation-free formulas):

- the relative norm change ``|‖S_i‖ - ‖T_i‖| / ‖T_i‖``;
- the direction change as a chord ``c_i = ‖d_S,i - d_T,i‖`` (in ``[0, 2]``, equal to
  ``2 sin(theta_i / 2)``) and as an angle ``theta_i = 2 atan2(c_i, sqrt(4 - c_i^2))``.
  The chord is computed from the difference of the rows, so tiny angles keep their
  relative accuracy (``arccos`` of a rounded cosine loses everything below ~1e-8 rad in
  float64, ~3e-4 rad in float32);
- the direction residual ``R = D_S - D_T`` (rows ``d_S,i - d_T,i``) used by
  :mod:`wadi_cli.analysis.spectrum`.

Rows that cannot be split are counted, never fatal: a row holding NaN/Inf in either
checkpoint is *non-finite*; a row with zero norm in either checkpoint is *zero*. Both
are excluded from the statistics and their residual row is set to zero. A row whose
teacher norm is non-zero but whose student row is zero still has a norm change (1.0)
but no direction, so it only enters the norm statistics.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

# Rows processed per float64 chunk: small enough to stay in cache, large enough to keep
# the per-call overhead negligible. Chunks are sized in elements, not rows.
_CHUNK_ELEMENTS = 1 << 21

_EMBEDDING_MODULE = re.compile(r"(^|[._])(embedding|embeddings|embed|emb|embed_tokens)$")


def layer_kind(name: str, shape: tuple[int, ...]) -> str:
    """Classify a weight tensor: ``"linear"`` (2-D), ``"conv"`` (3-D to 5-D) or ``"other"``.

    2-D tensors whose module name ends in ``embedding``/``embed``/``emb`` (lookup tables
    such as ``nn.Embedding``) are ``"other"``; so is anything with more than five dims.
    """
    module = name.rsplit(".", 1)[0] if "." in name else name
    if len(shape) == 2:
        return "other" if _EMBEDDING_MODULE.search(module) else "linear"
    if 3 <= len(shape) <= 5:
        return "conv"
    return "other"


def matrix_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    """Rows x columns of the matrix view of a weight of ``shape`` (needs >= 2 dims)."""
    if len(shape) < 2:
        raise ValueError(f"a matrix view needs at least 2 dims, got shape {shape}")
    return int(shape[0]), int(math.prod(shape[1:]))


def as_matrix(t: torch.Tensor) -> torch.Tensor:
    """Reshape a weight to its row matrix ``(shape[0], prod(shape[1:]))`` (a view when possible)."""
    rows, cols = matrix_shape(tuple(t.shape))
    return t.reshape(rows, cols)


@dataclass
class RowDecomposition:
    """Per-row results for one teacher/student pair (all 1-D tensors are float64, on CPU).

    ``residual`` is ``D_S - D_T`` (zero rows where the direction is undefined), on the
    compute device, in the dtype requested from :func:`decompose_rows`.
    """

    teacher_norm: torch.Tensor
    student_norm: torch.Tensor
    norm_diff: torch.Tensor  # ‖S_i‖ - ‖T_i‖, computed without cancellation
    chord: torch.Tensor
    finite: torch.Tensor  # bool: no NaN/Inf in either row
    norm_valid: torch.Tensor  # bool: finite and teacher norm > 0
    direction_valid: torch.Tensor  # bool: finite and both norms > 0
    residual: torch.Tensor

    @property
    def rows(self) -> int:
        return int(self.chord.numel())

    @property
    def rows_nonfinite(self) -> int:
        """Rows with a NaN or Inf in the teacher or the student."""
        return int((~self.finite).sum())

    @property
    def rows_zero(self) -> int:
        """Finite rows whose teacher or student norm is exactly zero."""
        zero = (self.teacher_norm == 0) | (self.student_norm == 0)
        return int((zero & self.finite).sum())

    def norm_rel_change(self) -> torch.Tensor:
        """``|‖S_i‖ - ‖T_i‖| / ‖T_i‖`` over the norm-valid rows (float64)."""
        return self.norm_diff[self.norm_valid].abs() / self.teacher_norm[self.norm_valid]

    def direction_chord(self) -> torch.Tensor:
        """``‖d_S,i - d_T,i‖`` over the direction-valid rows (float64, in [0, 2])."""
        return self.chord[self.direction_valid]

    def angle_rad(self) -> torch.Tensor:
        """Angle between ``S_i`` and ``T_i`` in radians over the direction-valid rows."""
        return chord_to_angle(self.direction_chord())


def chord_to_angle(chord: torch.Tensor) -> torch.Tensor:
    """Angle between two unit vectors from their chord ``c = ‖u - v‖``.

    ``‖u + v‖ = sqrt(4 - c^2)`` for unit vectors (parallelogram law), so
    ``theta = 2 atan2(‖u - v‖, ‖u + v‖)``: accurate for tiny and for near-pi angles.
    """
    c = chord.to(torch.float64).clamp(0.0, 2.0)
    return 2.0 * torch.atan2(c, torch.sqrt((4.0 - c * c).clamp_min(0.0)))


def _safe_inverse(x: torch.Tensor, ok: torch.Tensor) -> torch.Tensor:
    """``1 / x`` where ``ok``, else 0 (the row is dropped)."""
    inv = torch.zeros_like(x)
    inv[ok] = 1.0 / x[ok]
    return inv


def _compute_dtype(teacher: torch.Tensor, residual_dtype: torch.dtype) -> torch.dtype:
    if torch.float64 in (teacher.dtype, residual_dtype):
        return torch.float64
    return torch.float32


def decompose_rows(
    teacher: torch.Tensor,
    student: torch.Tensor,
    *,
    residual_dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> RowDecomposition:
    """Split both weights into row norms and directions and compare them row by row.

    Stable formulation (no cancellation, so tiny changes are exact to rounding of the
    change itself, not of the weights): with ``Δ = S - T`` (correctly rounded),

    - ``‖S‖ - ‖T‖ = (2<Δ,T> + ‖Δ‖²) / (‖S‖ + ‖T‖)``;
    - ``d_S - d_T = Δ / ‖S‖ + T (1/‖S‖ - 1/‖T‖)`` and
      ``1/‖S‖ - 1/‖T‖ = -(‖S‖ - ‖T‖) / (‖S‖ ‖T‖)``.

    Both terms of the residual are of the size of the change, so their rounding errors
    are relative to the change. Row reductions are combined in float64; the elementwise
    passes run in float32 (float64 when an input or ``residual_dtype`` is float64), in
    chunks of rows, so memory stays bounded and fp16/bf16 inputs are upcast per chunk.

    Args:
        teacher, student: weights of identical shape with >= 2 dims (any float dtype).
        residual_dtype: dtype of the returned residual ``D_S - D_T``.
        device: where to compute (default: the teacher's device).
    """
    if teacher.shape != student.shape:
        raise ValueError(f"shape mismatch: {tuple(teacher.shape)} vs {tuple(student.shape)}")
    dev = torch.device(device) if device is not None else teacher.device
    cdt = _compute_dtype(teacher, residual_dtype)
    t_mat, s_mat = as_matrix(teacher), as_matrix(student)
    rows, cols = t_mat.shape
    residual = torch.empty((rows, cols), dtype=residual_dtype, device=dev)
    stats = torch.empty((4, rows), dtype=torch.float64, device=dev)  # ‖T‖, ‖S‖, ‖S‖-‖T‖, chord
    step = max(1, _CHUNK_ELEMENTS // max(cols, 1))
    for a in range(0, rows, step):
        b = min(rows, a + step)
        t = t_mat[a:b].to(device=dev, dtype=cdt)
        s = s_mat[a:b].to(device=dev, dtype=cdt)
        r = residual[a:b] if residual_dtype == cdt else torch.empty_like(t)
        torch.sub(s, t, out=r)  # Δ
        nt = torch.linalg.vector_norm(t, dim=1).double()
        ns = torch.linalg.vector_norm(s, dim=1).double()
        dot = torch.linalg.vecdot(r, t, dim=1).double()
        dd = torch.linalg.vector_norm(r, dim=1).double().square()
        fin = torch.isfinite(nt) & torch.isfinite(ns) & torch.isfinite(dot) & torch.isfinite(dd)
        ok = fin & (nt > 0) & (ns > 0)
        den = ns + nt
        diff = (2.0 * dot + dd) / torch.where(den > 0, den, 1.0)  # ‖S‖ - ‖T‖, stable
        inv_s = _safe_inverse(ns, ok)
        delta = -diff * inv_s * _safe_inverse(nt, ok)  # 1/‖S‖ - 1/‖T‖
        r.mul_(inv_s.to(cdt).unsqueeze(1)).addcmul_(t, delta.to(cdt).unsqueeze(1))
        if not bool(ok.all()):
            r[~ok] = 0.0
        stats[0, a:b], stats[1, a:b], stats[2, a:b] = nt, ns, diff
        stats[3, a:b] = torch.linalg.vector_norm(r, dim=1).double()
        if r.data_ptr() != residual[a:b].data_ptr():
            residual[a:b].copy_(r)
    norms_t, norms_s, norm_diff, chord = stats.cpu().unbind(0)
    finite = torch.isfinite(norms_t) & torch.isfinite(norms_s) & torch.isfinite(norm_diff)
    norm_valid = finite & (norms_t > 0)
    direction_valid = norm_valid & (norms_s > 0)
    return RowDecomposition(
        teacher_norm=norms_t,
        student_norm=norms_s,
        norm_diff=norm_diff,
        chord=chord,
        finite=finite,
        norm_valid=norm_valid,
        direction_valid=direction_valid,
        residual=residual,
    )
