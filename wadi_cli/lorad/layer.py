"""The LoRaD layer: a Linear whose weight rows are rotated pair-wise by low-rank angles.

The maths lives in :func:`rotate_weight` (module level, equation in its docstring); the
layer :class:`LoRaDLinear` wraps a frozen ``nn.Linear`` (kept as ``base_layer``), owns
the two adapter parameters named in :attr:`LoRaDLinear.adapter_param_names`, and
computes the rotated weight once per forward followed by exactly one matmul with the
input (the base layer's own forward is never called in adapted mode).

In fp16/bf16 the rotated weight is rounded to the base dtype before that matmul, which
drops every change below half a step of the stored weight: most of a 1e-4..1e-3 rotation
(analysis/lorad_precision/). ``exact_low_precision=True`` multiplies by the rotated
weight as two low-precision halves ``R(Θ)W = hi + lo`` against the input repeated
(:func:`split_linear`: still one matmul, of twice the inner size), so the fp32
accumulator sums ``x·(hi + lo)ᵀ`` and small rotations reach the output.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wadi_cli.errors import BadInputError


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    """fp64 if any input is fp64 (references, gradcheck), else fp32 (never fp16/bf16)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _rotate_pairs(w: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate each column pair ``(2k, 2k+1)`` of every row of ``w`` ([m, n]) by the angle
    whose cosine/sine are ``cos``/``sin`` ([m, n/2])."""
    m, n = w.shape
    pairs = w.reshape(m, n // 2, 2)
    w0, w1 = pairs[..., 0], pairs[..., 1]
    return torch.stack((cos * w0 - sin * w1, sin * w0 + cos * w1), dim=-1).reshape(m, n)


class _PairRotation(torch.autograd.Function):
    """``W' = R(Θ) W`` with a hand-written backward that saves only ``W`` (the frozen
    base weight, no copy) and ``Θ``, instead of fp32 copies of ``W``, cos and sin.

    Gradients (per row i, pair k, with ``g = ∂L/∂W'``):
        ∂L/∂θ      = g_{2k} · (−sin θ W_{2k} − cos θ W_{2k+1}) + g_{2k+1} · (cos θ W_{2k} − sin θ W_{2k+1})
        ∂L/∂W_pair = R(−θ) g_pair   (a rotation is orthogonal: its transpose is R(−θ))
    """

    @staticmethod
    def forward(ctx, weight: Tensor, theta: Tensor, compute_dtype: torch.dtype) -> Tensor:  # type: ignore[override]
        th = theta.to(compute_dtype)
        out = _rotate_pairs(weight.to(compute_dtype), torch.cos(th), torch.sin(th))
        ctx.save_for_backward(weight, theta)
        ctx.compute_dtype = compute_dtype
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        weight, theta = ctx.saved_tensors
        cd = ctx.compute_dtype
        m, n = weight.shape
        th = theta.to(cd)
        cos, sin = torch.cos(th), torch.sin(th)
        g = grad_out.to(cd).reshape(m, n // 2, 2)
        g0, g1 = g[..., 0], g[..., 1]
        grad_weight = grad_theta = None
        if ctx.needs_input_grad[1]:
            w = weight.to(cd).reshape(m, n // 2, 2)
            w0, w1 = w[..., 0], w[..., 1]
            grad_theta = (g1 * (cos * w0 - sin * w1) - g0 * (sin * w0 + cos * w1)).to(theta.dtype)
        if ctx.needs_input_grad[0]:
            grad_weight = _rotate_pairs(g.reshape(m, n), cos, -sin).to(weight.dtype)
        return grad_weight, grad_theta, None


def rotate_weight(weight: Tensor, theta: Tensor, *, dtype: torch.dtype | None = None) -> Tensor:
    """Rotate every row of ``weight`` pair-wise by the angles ``theta`` (LoRaD, WaDi §2).

    For ``W ∈ R^{m×n}`` (n even) and ``Θ ∈ R^{m×n/2}``, every row i rotates each of its
    column pairs ``(2k, 2k+1)`` by its own angle ``θ_{ik}``::

        W'_{i,2k}   = cos θ_{ik} · W_{i,2k} − sin θ_{ik} · W_{i,2k+1}
        W'_{i,2k+1} = sin θ_{ik} · W_{i,2k} + cos θ_{ik} · W_{i,2k+1}

    Every pair norm (hence every row norm) is preserved; ``Θ = 0`` gives ``W' = W``;
    rotating by ``−Θ`` undoes the rotation. Computed in fp32 (fp64 if either input is
    fp64) whatever the storage dtype, and returned in ``dtype`` (default: ``weight``'s
    dtype). Differentiable in both arguments.
    """
    if weight.dim() != 2:
        raise BadInputError(f"rotate_weight expects a 2-D weight [m, n], got shape {tuple(weight.shape)}")
    m, n = weight.shape
    if n % 2:
        raise BadInputError(f"rotate_weight needs an even number of columns, got {n}")
    if tuple(theta.shape) != (m, n // 2):
        raise BadInputError(
            f"angle matrix has shape {tuple(theta.shape)}, expected [m, n/2] = [{m}, {n // 2}]"
        )
    out = _PairRotation.apply(weight, theta, _compute_dtype(weight, theta))
    return out.to(dtype or weight.dtype)


LOW_PRECISION: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16)


class _SplitLinear(torch.autograd.Function):
    """``y = x (hi + lo)ᵀ + b`` in ONE low-precision matmul of twice the inner size.

    ``hi = round(W')`` and ``lo = round(W' − hi)`` in ``x``'s dtype hold the fp32 weight
    ``W'`` to about twice that dtype's mantissa. The input's columns are repeated and the
    halves interleaved (``[x₀, x₀, x₁, x₁, …] · [hi₀, lo₀, hi₁, lo₁, …]``), so every
    partial sum of the matmul, split-K partitions included, sees ``hi`` and ``lo`` of the
    same column together and rounds once. Backward saves ``x`` and ``hi`` only and runs the
    usual two matmuls: ``∂L/∂x = g · hi`` (a low-precision gradient, like any other layer's)
    and ``∂L/∂W' = gᵀ x`` (to the rotation's backward, in fp32).
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:  # type: ignore[override]
        m, n = weight.shape
        hi = weight.to(x.dtype)
        lo = (weight - hi.to(weight.dtype)).to(x.dtype)
        x2 = torch.stack((x, x), dim=-1).reshape(*x.shape[:-1], 2 * n)
        y = F.linear(x2, torch.stack((hi, lo), dim=-1).reshape(m, 2 * n), bias)
        ctx.save_for_backward(x, hi)
        ctx.weight_dtype = weight.dtype
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        x, hi = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out @ hi
        if ctx.needs_input_grad[1]:
            g2 = grad_out.reshape(-1, grad_out.shape[-1])
            grad_w = (g2.T @ x.reshape(-1, x.shape[-1])).to(ctx.weight_dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
        return grad_x, grad_w, grad_b


def split_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear(x, weight, bias)`` for a low-precision ``x`` and an fp32 ``weight`` that
    keeps the weight's fp32 detail: one matmul over ``weight = hi + lo`` (see
    :class:`_SplitLinear`), where ``F.linear(x, weight.to(x.dtype))`` would round every
    entry to ``x``'s dtype first. Output in ``x``'s dtype."""
    if x.dtype not in LOW_PRECISION:
        raise BadInputError(f"split_linear is for fp16/bf16 inputs, got {x.dtype}")
    return _SplitLinear.apply(x, weight, None if bias is None else bias.to(x.dtype))


def lorad_theta(A: Tensor, B: Tensor) -> Tensor:
    """Angle matrix ``Θ = A B`` ([m, r] @ [r, n/2]) in fp32 (fp64 if an input is fp64)."""
    cd = _compute_dtype(A, B)
    with _no_autocast(A.device.type):
        return A.to(cd) @ B.to(cd)


@contextlib.contextmanager
def _no_autocast(device_type: str) -> Iterator[None]:
    """Keep adapter maths in fp32 even inside an autocast region."""
    if torch.amp.is_autocast_available(device_type):
        with torch.autocast(device_type=device_type, enabled=False):
            yield
    else:
        yield


class LoRaDLinear(nn.Module):
    """``nn.Linear`` with LoRaD: ``y = x (R(A B) W)ᵀ + b``, one matmul per forward.

    The wrapped Linear is kept (frozen) as the submodule ``base_layer``; the adapter owns
    ``lorad_A`` ([out, r], zeros) and ``lorad_B`` ([r, in/2], Xavier-uniform), always
    created in fp32, so the layer equals its base at initialisation. ``merge()`` writes
    the rotated weight into the base layer (exact up to the base dtype's rounding);
    ``unmerge()`` rotates it back by ``−Θ``.

    With fp16/bf16 inputs the rotated weight is rounded to the input's dtype (changes
    below half its step are lost); with ``exact_low_precision`` the matmul is
    :func:`split_linear` instead (the rotated weight as two low-precision halves, twice the
    inner size), so rotations smaller than the base dtype's step still reach the output,
    and while ``lorad_A`` is all zeros (``Θ = 0`` exactly, :meth:`at_identity`) it is the
    base layer's own matmul, bit for bit. fp32/fp64 inputs always take the single matmul.

    Args:
        base_layer: the Linear to adapt; its ``in_features`` must be even.
        rank: rank ``r`` of ``Θ``.
        name: module path, used in error messages.
        generator: optional RNG for the Xavier initialisation of ``lorad_B``.
        exact_low_precision: the hi/lo matmul for fp16/bf16 inputs (an attribute: it can
            be switched on a built model).
    """

    adapter_param_names: tuple[str, ...] = ("lorad_A", "lorad_B")

    def __init__(
        self,
        base_layer: nn.Linear,
        rank: int,
        *,
        name: str | None = None,
        generator: torch.Generator | None = None,
        exact_low_precision: bool = False,
    ) -> None:
        super().__init__()
        label = name or "Linear"
        if not isinstance(base_layer, nn.Linear):
            raise BadInputError(f"{label}: LoRaD adapts nn.Linear only, got {type(base_layer).__name__}")
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise BadInputError(f"{label}: LoRaD rank must be a positive integer, got {rank!r}")
        m, n = base_layer.out_features, base_layer.in_features
        if n % 2:
            raise BadInputError(
                f"{label}: in_features={n} is odd; LoRaD rotates pairs of input columns "
                "and needs an even number of them (exclude this layer from the targets)"
            )
        self.base_layer = base_layer
        self.base_layer.requires_grad_(False)
        self.rank = rank
        self.merged = False
        self.exact_low_precision = exact_low_precision
        self._identity_cache: tuple[tuple[int, int, int], bool] | None = None
        device = base_layer.weight.device
        self.lorad_A = nn.Parameter(torch.zeros(m, rank, dtype=torch.float32, device=device))
        self.lorad_B = nn.Parameter(torch.empty(rank, n // 2, dtype=torch.float32, device=device))
        self.reset_adapter(generator)

    # ---- conveniences mirroring nn.Linear ------------------------------------------
    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    @property
    def weight(self) -> Tensor:
        """The base layer's stored weight (rotated only while merged); see :meth:`effective_weight`."""
        return self.base_layer.weight

    @property
    def bias(self) -> Tensor | None:
        return self.base_layer.bias

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, merged={self.merged}"

    # ---- adapter ----------------------------------------------------------------------
    def reset_adapter(self, generator: torch.Generator | None = None) -> None:
        """Re-initialise: ``A = 0``, ``B`` Xavier-uniform (optionally from ``generator``,
        drawn on the CPU so a seed gives the same values on every device)."""
        if self.merged:
            raise BadInputError("cannot reset a merged LoRaD layer; unmerge() first")
        with torch.no_grad():
            self.lorad_A.zero_()
            if self.lorad_B.device.type == "meta":
                return
            b = torch.empty(self.lorad_B.shape, dtype=torch.float32)
            nn.init.xavier_uniform_(b, generator=generator)
            self.lorad_B.copy_(b)

    def at_identity(self) -> bool:
        """True when ``lorad_A`` is all zeros (as :meth:`reset_adapter` leaves it), so
        ``Θ = A B = 0`` exactly and the layer is its base. Decided by the values alone (a
        resumed run takes the same path as the run it continues); the answer is kept until
        ``lorad_A`` is replaced or changed in place (torch's version counter: optimizer
        steps, loads), so the check, one host sync on a GPU, runs once per such change."""
        a = self.lorad_A
        if a.device.type == "meta":
            return False
        stamp = (id(a), a.data_ptr(), a._version)
        if self._identity_cache is None or self._identity_cache[0] != stamp:
            self._identity_cache = (stamp, not bool(a.detach().any()))
        return self._identity_cache[1]

    def theta(self) -> Tensor:
        """The angle matrix ``Θ = A B`` ([out, in/2], fp32)."""
        return lorad_theta(self.lorad_A, self.lorad_B)

    def effective_weight(self, dtype: torch.dtype | None = None) -> Tensor:
        """The weight the layer applies: ``R(Θ) W`` (or the stored weight while merged)."""
        w = self.base_layer.weight
        if self.merged:
            return w if dtype is None else w.to(dtype)
        with _no_autocast(w.device.type):
            return rotate_weight(w, self.theta(), dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        b = self.base_layer.bias
        bias = None if b is None else b.to(x.dtype)
        split = self.exact_low_precision and x.dtype in LOW_PRECISION and not self.merged
        if not split or self.at_identity():
            return F.linear(x, self.effective_weight(dtype=x.dtype), bias)
        return split_linear(x, self.effective_weight(dtype=torch.float32), bias)

    @torch.no_grad()
    def merge(self) -> None:
        """Replace the base weight by ``R(Θ) W`` in place (no-op when already merged)."""
        if self.merged:
            return
        w = self.base_layer.weight
        w.copy_(rotate_weight(w.detach(), self.theta().detach()))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Rotate the base weight back by ``−Θ`` (no-op when not merged)."""
        if not self.merged:
            return
        w = self.base_layer.weight
        w.copy_(rotate_weight(w.detach(), -self.theta().detach()))
        self.merged = False
