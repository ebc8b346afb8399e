"""The swap experiment of WaDi (§1): hybrid checkpoints, row by row.

Every weight of kind linear/conv (:func:`wadi_cli.analysis.decompose.layer_kind`) is viewed
as a matrix of rows, one per output unit (:func:`~wadi_cli.analysis.decompose.as_matrix`),
and each row splits as ``W_i = g_i d_i`` with ``g_i = ||W_i||`` and ``d_i = W_i / g_i``.
For a teacher row ``T_i`` and a student row ``S_i`` and a strength ``alpha`` in [0, 1]:

- ``"teacher_norms"`` (the student gets the teacher's *norms*, ``wadi swap --keep direction``):
  ``row = g(a) d_S`` with ``g(a) = (1 - a) g_S + a g_T``;
- ``"teacher_directions"`` (the student gets the teacher's *directions*, ``--keep norm``):
  ``row = g_S d(a)`` where ``d(a)`` runs along the great circle from ``d_S`` to ``d_T``
  (spherical interpolation, ``d(0) = d_S``, ``d(1) = d_T``).

The paper reports that the first barely changes a one-step student (FID +0.7) while the
second collapses it (FID +241). Tensors of kind ``"other"`` (biases, norm layers,
embeddings) stay the student's. The maths runs in float64 and the result is cast back to
the student's dtype; ``alpha = 0`` returns the student bit for bit. Rows that have no
direction (zero norm in either checkpoint) or hold NaN/Inf are left as the student's and
counted, never fatal.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from wadi_cli.analysis.decompose import as_matrix, layer_kind
from wadi_cli.errors import BadInputError, MismatchError
from wadi_cli.io import check_writable, open_checkpoint, provenance_metadata, save_safetensors
from wadi_cli.io.checkpoints import recorded_alpha_bar_T
from wadi_cli.io.metadata import ALPHA_BAR_T_METADATA
from wadi_cli.io.tensor_map import KeyDiff, Tensors, as_tensor_map, preview
from wadi_cli.lorad import is_adapter, load_adapter, merge_adapter_into_state_dict

#: The two hybrids, named for what the student receives from the teacher.
SWAP_VARIANTS: tuple[str, ...] = ("teacher_norms", "teacher_directions")
#: ``wadi swap --keep`` (what the student keeps) -> the variant it makes: the CLI's spelling,
#: also recorded in the hybrid's metadata.
VARIANT_OF_KEEP: dict[str, str] = {"direction": "teacher_norms", "norm": "teacher_directions"}

# Rows per float64 chunk are sized in elements so memory stays bounded for huge convs.
_CHUNK_ELEMENTS = 1 << 21
# Below this length the component of d_T orthogonal to d_S does not define a great circle
# (the rows are antipodal to float64 rounding): any orthogonal direction is as good.
_ANTIPODAL_TOL = 1e-12


@dataclass
class SwapStats:
    """What a swap did.

    ``tensors``: tensors in the hybrid (every student key); ``tensors_swappable``: linear
    and conv weights; ``tensors_swapped``: those selected (``filter``) and swapped;
    ``rows_swapped``: rows given the hybrid formula; ``rows_zero`` / ``rows_nonfinite``:
    rows left as the student's because a norm is zero or a value is NaN/Inf (in either
    checkpoint); ``rows_undefined``: single-column rows whose teacher direction is the
    opposite of the student's, which have no path between them for ``0 < alpha < 1`` (left
    as the student's); ``rows_antipodal``: rows whose directions are opposite, interpolated
    along an arbitrary great circle (``teacher_directions``, ``0 < alpha < 1`` only).
    """

    variant: str
    alpha: float
    filter: str | None
    tensors: int = 0
    tensors_swappable: int = 0
    tensors_swapped: int = 0
    rows_swapped: int = 0
    rows_zero: int = 0
    rows_nonfinite: int = 0
    rows_undefined: int = 0
    rows_antipodal: int = 0

    @property
    def rows_skipped(self) -> int:
        """Rows of swapped tensors left as the student's."""
        return self.rows_zero + self.rows_nonfinite + self.rows_undefined

    @property
    def keep(self) -> str:
        """The ``--keep`` spelling of the variant (``direction`` or ``norm``)."""
        return {v: k for k, v in VARIANT_OF_KEEP.items()}[self.variant]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (includes ``rows_skipped`` and the ``--keep`` spelling)."""
        return {**asdict(self), "rows_skipped": self.rows_skipped, "keep": self.keep}


# ---- argument checks -------------------------------------------------------------------
def variant_of_keep(keep: str) -> str:
    """The variant ``wadi swap --keep KEEP`` makes (``direction`` → ``teacher_norms``,
    ``norm`` → ``teacher_directions``; case-insensitive), else :class:`BadInputError`."""
    value = str(keep).strip().lower()
    if value not in VARIANT_OF_KEEP:
        raise BadInputError(
            f"--keep must be 'direction' (student directions, teacher norms) or 'norm' "
            f"(student norms, teacher directions); got {keep!r}"
        )
    return VARIANT_OF_KEEP[value]


def check_variant(variant: str) -> str:
    """``variant`` when it is one of :data:`SWAP_VARIANTS`, else :class:`BadInputError`."""
    if variant not in SWAP_VARIANTS:
        raise BadInputError(
            "the swap variant must be 'teacher_norms' (--keep direction) or 'teacher_directions' "
            f"(--keep norm); got {variant!r}"
        )
    return variant


def check_alpha(alpha: float) -> float:
    """``alpha`` as a float in [0, 1], else :class:`BadInputError`."""
    try:
        value = float(alpha)
    except (TypeError, ValueError):
        raise BadInputError(f"--alpha must be a number in [0, 1]; got {alpha!r}") from None
    if not (math.isfinite(value) and 0.0 <= value <= 1.0):
        raise BadInputError(f"--alpha must lie in [0, 1] (0 = student, 1 = full swap); got {alpha}")
    return value


def compile_filter(filter: str | None) -> re.Pattern[str] | None:
    """Compile a ``--filter`` regular expression (``None`` = every tensor)."""
    if filter is None:
        return None
    try:
        return re.compile(filter)
    except re.error as exc:
        raise BadInputError(f"--filter {filter!r} is not a valid regular expression ({exc})") from None


# ---- the row maths ---------------------------------------------------------------------
def _orthogonal_unit(d: Tensor) -> Tensor:
    """For unit rows ``d`` (>= 2 columns) a unit row orthogonal to each: the basis vector
    where ``|d|`` is smallest, minus its projection on ``d`` (its norm is >= 1/sqrt(2))."""
    k = d.abs().argmin(dim=1, keepdim=True)
    e = torch.zeros_like(d).scatter_(1, k, 1.0)
    v = e - d.gather(1, k) * d
    return v / torch.linalg.vector_norm(v, dim=1, keepdim=True)


def slerp_rows(d_s: Tensor, d_t: Tensor, alpha: float) -> tuple[Tensor, Tensor, Tensor]:
    """Spherical interpolation between unit rows: ``d(a) = cos(a th) d_S + sin(a th) u``.

    ``th`` is the angle between ``d_S`` and ``d_T``, computed as
    ``2 atan2(||d_S - d_T||, ||d_S + d_T||)`` (accurate near 0 and near pi), and ``u`` is
    the unit component of ``d_T`` orthogonal to ``d_S``, built from the difference
    ``d_T - d_S`` so small angles keep their relative accuracy. This equals the textbook
    ``(sin((1-a) th) d_S + sin(a th) d_T) / sin th`` without its division by ``sin th``.
    Identical rows give ``d_S``. Antipodal rows (no unique great circle) take an arbitrary
    orthogonal ``u``; with a single column there is none, and the row is reported
    undefined.

    Returns ``(d, antipodal, undefined)``: the interpolated rows and two boolean masks.
    """
    diff = d_t - d_s
    theta = 2.0 * torch.atan2(
        torch.linalg.vector_norm(diff, dim=1), torch.linalg.vector_norm(d_t + d_s, dim=1)
    )
    u = diff - (diff * d_s).sum(dim=1, keepdim=True) * d_s  # = d_T - cos(th) d_S
    u = u - (u * d_s).sum(dim=1, keepdim=True) * d_s  # re-orthogonalise against rounding
    nu = torch.linalg.vector_norm(u, dim=1)
    antipodal = (nu <= _ANTIPODAL_TOL) & (theta > math.pi / 2)
    u = torch.where((nu > 0).unsqueeze(1), u / torch.where(nu > 0, nu, 1.0).unsqueeze(1), 0.0)
    undefined = torch.zeros_like(antipodal)
    if bool(antipodal.any()):
        if d_s.shape[1] >= 2:
            u[antipodal] = _orthogonal_unit(d_s[antipodal])
        else:
            undefined = antipodal
    at = alpha * theta
    d = torch.cos(at).unsqueeze(1) * d_s + torch.sin(at).unsqueeze(1) * u
    return d, antipodal & ~undefined, undefined


@dataclass
class RowCounts:
    """Per-tensor counts returned by :func:`swap_rows`."""

    swapped: int = 0
    zero: int = 0
    nonfinite: int = 0
    undefined: int = 0
    antipodal: int = 0


def _swap_chunk(t: Tensor, s: Tensor, variant: str, alpha: float) -> tuple[Tensor, Tensor, RowCounts]:
    """Hybrid rows of one float64 chunk; returns (rows, mask of rows to write, counts)."""
    g_s = torch.linalg.vector_norm(s, dim=1)
    g_t = torch.linalg.vector_norm(t, dim=1)
    finite = torch.isfinite(s).all(dim=1) & torch.isfinite(t).all(dim=1)
    ok = finite & (g_s > 0) & (g_t > 0)
    counts = RowCounts(nonfinite=int((~finite).sum()), zero=int((finite & ~ok).sum()), swapped=int(ok.sum()))
    s, t, g_s, g_t = s[ok], t[ok], g_s[ok], g_t[ok]
    if variant == "teacher_norms":
        g = (1.0 - alpha) * g_s + alpha * g_t
        rows = s * (g / g_s).unsqueeze(1)  # = g(a) d_S
    else:
        d_t = t / g_t.unsqueeze(1)
        if alpha == 1.0:
            d = d_t  # exactly the teacher's directions
        else:
            d, antipodal, undefined = slerp_rows(s / g_s.unsqueeze(1), d_t, alpha)
            counts.antipodal = int(antipodal.sum())
            counts.undefined = int(undefined.sum())
            counts.swapped -= counts.undefined
            keep_rows = ~undefined
            if not bool(keep_rows.all()):
                idx = ok.nonzero().squeeze(1)
                ok = ok.clone()
                ok[idx[undefined]] = False
                d, g_s = d[keep_rows], g_s[keep_rows]
        rows = g_s.unsqueeze(1) * d
    return rows, ok, counts


def swap_rows(teacher: Tensor, student: Tensor, variant: str, alpha: float = 1.0) -> tuple[Tensor, RowCounts]:
    """Hybrid of one weight pair (same shape, >= 2 dims), row by row (see the module doc).

    Computed in float64 in chunks of rows and cast back to the student's dtype; rows that
    are not swapped (zero norm, NaN/Inf, undefined) are the student's bits. ``alpha = 0``
    returns a bit-exact copy of the student (rows are still counted).
    """
    variant = check_variant(variant)
    alpha = check_alpha(alpha)
    if tuple(teacher.shape) != tuple(student.shape):
        raise MismatchError(f"shape differs: {tuple(teacher.shape)} vs {tuple(student.shape)}")
    out = student.detach().clone(memory_format=torch.contiguous_format)
    t_mat, o_mat = as_matrix(teacher.detach()), as_matrix(out)
    rows, cols = o_mat.shape
    total = RowCounts()
    step = max(1, _CHUNK_ELEMENTS // max(cols, 1))
    for a in range(0, rows, step):
        b = min(rows, a + step)
        new, ok, counts = _swap_chunk(t_mat[a:b].double(), o_mat[a:b].double(), variant, alpha)
        for field in ("swapped", "zero", "nonfinite", "undefined", "antipodal"):
            setattr(total, field, getattr(total, field) + getattr(counts, field))
        if alpha != 0.0 and bool(ok.any()):
            o_mat[a:b][ok] = new.to(out.dtype)
    return out, total


# ---- state dicts -------------------------------------------------------------------------
def check_compatible(teacher: Tensors, student: Tensors) -> None:
    """Raise :class:`MismatchError` (one line naming the first differences) unless both
    checkpoints hold the same tensor names with the same shapes. Reads headers only."""
    diff = KeyDiff.between(teacher, student)
    if not diff:
        return
    hint = ""
    if len(diff.common) < 0.5 * max(len(diff.common) + len(diff.only_b), 1):
        hint = "; if STUDENT is an adapter, merge it first (`wadi merge` or `wadi export --format merged`)"
    what = diff.describe("keys only in the teacher", "keys only in the student", "teacher", "student")
    raise MismatchError(f"teacher and student are different architectures: {what}{hint}")


def swappable_names(student: Tensors) -> list[str]:
    """Names of the floating linear/conv weights of a checkpoint (the rows that can swap)."""
    src = as_tensor_map(student)
    return [k for k in src if layer_kind(k, src.shape(k)) != "other" and src.dtype(k).is_floating_point]


def plan_swap(teacher: Tensors, student: Tensors, filter: str | None = None) -> tuple[list[str], list[str]]:
    """Check compatibility and select the tensors to swap (headers only, nothing read).

    Returns ``(selected, swappable)``. Raises :class:`MismatchError` for different
    architectures and :class:`BadInputError` for a ``filter`` that is invalid or selects
    nothing.
    """
    pattern = compile_filter(filter)
    check_compatible(teacher, student)
    swappable = swappable_names(student)
    if not swappable:
        raise BadInputError("the checkpoints hold no linear or conv weights (nothing to swap)")
    selected = swappable if pattern is None else [k for k in swappable if pattern.search(k)]
    if not selected:
        raise BadInputError(
            f"--filter {filter!r} matches none of the {len(swappable)} swappable weights "
            f"(e.g. {preview(swappable, 2)})"
        )
    return selected, swappable


def swap_state_dict(
    teacher: Tensors,
    student: Tensors,
    variant: str,
    *,
    alpha: float = 1.0,
    filter: str | None = None,
) -> tuple[dict[str, Tensor], SwapStats]:
    """The hybrid state dict: every student key; selected linear/conv weights swapped.

    ``teacher``/``student`` are dicts or lazy :class:`wadi_cli.io.TensorSource` objects
    (read one tensor at a time). ``"teacher_norms"`` gives the student the teacher's row
    norms, ``"teacher_directions"`` the teacher's row directions; ``alpha`` in [0, 1] interpolates
    (0 = student, 1 = full swap); ``filter`` (a regex, ``re.search`` on names) limits the
    swap to matching tensors. Untouched tensors are the student's own tensors. Everything
    is checked (names, shapes, arguments) before any tensor is read.
    """
    variant, alpha = check_variant(variant), check_alpha(alpha)
    selected, swappable = plan_swap(teacher, student, filter)
    stats = SwapStats(variant=variant, alpha=alpha, filter=filter, tensors_swappable=len(swappable))
    chosen = set(selected)
    out: dict[str, Tensor] = {}
    for name in student:
        s = student[name]
        if name in chosen:
            s, counts = swap_rows(teacher[name], s, variant, alpha)
            stats.tensors_swapped += 1
            stats.rows_swapped += counts.swapped
            stats.rows_zero += counts.zero
            stats.rows_nonfinite += counts.nonfinite
            stats.rows_undefined += counts.undefined
            stats.rows_antipodal += counts.antipodal
        out[name] = s
    stats.tensors = len(out)
    return out, stats


# ---- files ---------------------------------------------------------------------------------
def open_student(student_path: str | os.PathLike[str], teacher: Any) -> tuple[Any, str]:
    """Open STUDENT lazily; a LoRaD adapter file is merged into ``teacher`` (its base by
    construction: student = teacher + LoRaD) in memory. Returns ``(source, description)``;
    the caller closes a returned TensorSource."""
    src = open_checkpoint(student_path)
    if not is_adapter(src.keys()):
        return src, src.description
    src.close()
    tensors, config = load_adapter(student_path)
    merged = merge_adapter_into_state_dict(teacher, tensors)
    return merged, f"LoRaD adapter (rank {config.rank}) merged into the teacher"


def check_output(
    out: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    inputs: Mapping[str, str | os.PathLike[str]] | None = None,
) -> Path:
    """Fail early (one line) if the hybrid cannot be written to ``out``: not writable, a
    folder, an existing file without ``overwrite``, or one of ``inputs`` (label -> path)."""
    out_path = check_writable(out)
    if out_path.exists() and not overwrite:
        raise BadInputError(f"{out_path} already exists (pass --overwrite to replace it)")
    for label, src_path in (inputs or {}).items():
        p = Path(src_path).expanduser()
        if out_path.exists() and p.exists() and out_path.resolve() == p.resolve():
            raise BadInputError(f"--out must differ from {label} ({p})")
    return out_path


def write_swap(
    teacher_path: str | os.PathLike[str],
    student_path: str | os.PathLike[str],
    variant: str,
    out: str | os.PathLike[str],
    *,
    alpha: float = 1.0,
    filter: str | None = None,
    overwrite: bool = False,
    student_label: str | None = None,
) -> SwapStats:
    """Write the hybrid of TEACHER and STUDENT (:func:`swap_state_dict`) to ``out``: one
    safetensors file holding the full student state dict (loads like the student, e.g. with
    ``wadi sample --weights``), written atomically with provenance metadata (variant, alpha,
    filter, sources, counts).

    Inputs are anything :func:`wadi_cli.io.open_checkpoint` reads (safetensors files,
    diffusers model/pipeline folders, shards, SD single files); a LoRaD adapter as STUDENT
    is merged into TEACHER first. Arguments, ``out`` and compatibility are checked before
    any tensor is read; nothing is written on error. An existing ``out`` is replaced only
    with ``overwrite=True``. ``student_label`` names STUDENT in the metadata when the path
    is a temporary export (e.g. of a `wadi distill` run).
    """
    variant, alpha = check_variant(variant), check_alpha(alpha)
    compile_filter(filter)
    out_path = check_output(
        out, overwrite=overwrite, inputs={"TEACHER": teacher_path, "STUDENT": student_path}
    )
    with open_checkpoint(teacher_path) as teacher:
        student, student_desc = open_student(student_path, teacher)
        try:
            hybrid, stats = swap_state_dict(teacher, student, variant, alpha=alpha, filter=filter)
            recipe = {
                "operation": "swap",
                "keep": stats.keep,
                "variant": variant,
                "alpha": alpha,
                "filter": filter,
                "teacher": str(teacher_path),
                "student": student_label or str(student_path),
                "student_format": student_desc,
                **{k: v for k, v in stats.to_dict().items() if k.startswith(("rows_", "tensors"))},
            }
            meta = provenance_metadata(
                config=recipe, sources=[str(teacher_path), student_label or str(student_path)]
            )
            alpha_bar_T = recorded_alpha_bar_T(student_path)
            if alpha_bar_T is not None:  # the hybrid samples with its student's ᾱ_T
                meta[ALPHA_BAR_T_METADATA] = str(alpha_bar_T)
            save_safetensors(hybrid, out_path, meta)
        finally:
            close = getattr(student, "close", None)
            if callable(close):
                close()
    return stats
