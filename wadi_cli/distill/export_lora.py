"""``--format lora``: a plain LoRA approximating the student's weight change, for the tools
that apply LoRAs to any checkpoint of a family (ComfyUI, AUTOMATIC1111, diffusers'
``load_lora_weights``) — community fine-tunes included.

Per layer, ΔW = W_student − W_base (a Conv weight ``(out, in, kh, kw)`` viewed as
``out × (in·kh·kw)``) is replaced by its best rank-r approximation in the Frobenius norm
(Eckart–Young): with the SVD ΔW = U S Vᵀ (float64),

    ΔW_r = up · down,   up = U[:, :r] · sqrt(S[:r]),   down = sqrt(S[:r]) · Vᵀ[:r]

and the relative error ‖ΔW − ΔW_r‖_F / ‖ΔW‖_F = sqrt(Σ_{i>r} S_i²) / sqrt(Σ S_i²). The rank
is ``rank`` for every layer, or per layer the smallest r whose top singular values hold
the fraction ``energy`` of Σ S_i². Layers whose weight did not change are left out;
changed biases and norms cannot be a LoRA and are counted in the report.

Key layouts: ``kohya`` (AUTOMATIC1111 / kohya-ss / ComfyUI): ``lora_unet_<module with _>``
``.lora_down.weight`` (r, in[, kh, kw]), ``.lora_up.weight`` (out, r[, 1, 1]) and ``.alpha``
= 1 (the loaders apply ``α/r · up · down``, so up and down carry sqrt(r) each);
``diffusers`` (PEFT names of ``load_lora_weights``): ``unet.<module>.lora_A.weight`` /
``.lora_B.weight`` (``transformer.`` for PixArt).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from wadi_cli.errors import BadInputError

LORA_KEYS: tuple[str, ...] = ("kohya", "diffusers")
#: The ``.alpha`` of every layer of a kohya file: ONE value, because diffusers (0.42)
#: drops per-layer alphas of kohya files when they differ (its alpha_pattern keys come out
#: misnamed), which would rescale every layer whose rank is not the most common one.
KOHYA_ALPHA = 1.0


class _Tensors(Protocol):
    def get(self, key: str) -> torch.Tensor: ...
    def __iter__(self) -> Any: ...


@dataclass(frozen=True)
class LoraRank:
    """How the rank of every layer is chosen: a fixed ``rank`` or an ``energy`` in (0, 1]."""

    rank: int | None = None
    energy: float | None = None

    def __post_init__(self) -> None:
        if (self.rank is None) == (self.energy is None):
            raise BadInputError("--format lora needs exactly one of --lora-rank R and --lora-energy E")
        if self.rank is not None and self.rank < 1:
            raise BadInputError(f"--lora-rank must be at least 1, got {self.rank}")
        if self.energy is not None and not (0.0 < self.energy <= 1.0 and math.isfinite(self.energy)):
            raise BadInputError(f"--lora-energy must lie in (0, 1], got {self.energy}")

    def choose(self, s: torch.Tensor, name: str) -> int:
        """The rank of one layer with singular values ``s`` (descending, float64)."""
        if self.rank is not None:
            if self.rank > len(s):
                raise BadInputError(
                    f"--lora-rank {self.rank} exceeds the rank {len(s)} of layer {name} "
                    "(min of its output and input sizes); use --lora-energy 1 for full rank"
                )
            return self.rank
        energy = torch.cumsum(s**2, 0)
        total = float(energy[-1])
        if total == 0.0:
            return 1
        # the first r with Σ_{i<=r} S_i² >= energy · Σ S_i² (a relative 1e-12 absorbs rounding at 1)
        r = int(torch.searchsorted(energy, torch.tensor(self.energy * total * (1 - 1e-12), dtype=s.dtype)))
        return min(max(r + 1, 1), len(s))


def low_rank_factors(
    delta: torch.Tensor, rank: LoraRank, name: str
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(up (out, r), down (r, in·kh·kw), relative error)`` of the rank-r truncated SVD of
    ``delta`` (any shape ``(out, ...)``), computed in float64."""
    mat = delta.detach().to("cpu", torch.float64).reshape(delta.shape[0], -1)
    u, s, vh = torch.linalg.svd(mat, full_matrices=False)
    r = rank.choose(s, name)
    root = s[:r].sqrt()
    total = float((s**2).sum())
    err = math.sqrt(float((s[r:] ** 2).sum()) / total) if total > 0 else 0.0
    return u[:, :r] * root, root[:, None] * vh[:r], err


def _key_names(module: str, keys: str, family: str) -> tuple[str, str, str | None]:
    """(down/A key, up/B key, alpha key) of one module in the chosen layout."""
    if keys == "kohya":
        stem = "lora_unet_" + module.replace(".", "_")
        return f"{stem}.lora_down.weight", f"{stem}.lora_up.weight", f"{stem}.alpha"
    prefix = "unet" if family == "unet" else "transformer"
    return f"{prefix}.{module}.lora_A.weight", f"{prefix}.{module}.lora_B.weight", None


def extract_lora(
    base: _Tensors,
    student: Mapping[str, torch.Tensor],
    rank: LoraRank,
    *,
    keys: str = "kohya",
    family: str = "unet",
    dtype: torch.dtype = torch.float32,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The LoRA tensors of ``student − base`` and a report: per layer ``rank`` and
    ``rel_error``, the ``total_rel_error`` (over all changed matrices together), the
    parameter count and the changed tensors a LoRA cannot hold."""
    if keys not in LORA_KEYS:
        raise BadInputError(f"--lora-keys must be one of {', '.join(LORA_KEYS)}; got {keys!r}")
    if keys == "kohya" and family != "unet":
        raise BadInputError("the kohya key layout names U-Net layers; use --lora-keys diffusers for PixArt")
    tensors: dict[str, torch.Tensor] = {}
    layers: list[dict[str, Any]] = []
    residual = norm = 0.0
    skipped: list[str] = []
    for key in _changed(base, student):
        new, old = student[key], base.get(key)
        delta = new.to(torch.float64) - old.to(torch.float64)
        if not key.endswith(".weight") or delta.ndim not in (2, 4):
            skipped.append(key)
            continue
        module = key[: -len(".weight")]
        up, down, err = low_rank_factors(delta, rank, module)
        r = up.shape[1]
        if delta.ndim == 4:  # conv: down is the (r, in, kh, kw) conv, up the 1×1 conv
            down = down.reshape(r, *delta.shape[1:])
            up = up.reshape(delta.shape[0], r, 1, 1)
        k_down, k_up, k_alpha = _key_names(module, keys, family)
        if k_alpha is not None:  # kohya: α = 1 (scale 1/r), so up and down carry sqrt(r) each
            tensors[k_alpha] = torch.tensor(KOHYA_ALPHA, dtype=dtype)
            up, down = up * math.sqrt(r / KOHYA_ALPHA), down * math.sqrt(r / KOHYA_ALPHA)
        tensors[k_down], tensors[k_up] = down.to(dtype).contiguous(), up.to(dtype).contiguous()
        sq = float((delta**2).sum())
        residual += err**2 * sq
        norm += sq
        layers.append({"layer": module, "shape": list(delta.shape), "rank": r, "rel_error": err})
    if not layers:
        raise BadInputError("the student's weights equal the base's: there is no change to export as a LoRA")
    params = sum(t.numel() for k, t in tensors.items() if not k.endswith(".alpha"))
    report = {
        "layers": layers,
        "total_rel_error": math.sqrt(residual / norm) if norm > 0 else 0.0,
        "parameters": params,
        "not_representable": skipped,
    }
    return tensors, report


def _changed(base: _Tensors, student: Mapping[str, torch.Tensor]) -> Iterable[str]:
    """Keys of ``student`` whose tensor differs from ``base``'s (every student key must exist
    in the base with the same shape)."""
    names = set(base)
    for key in sorted(student):
        if key not in names:
            raise BadInputError(f"student tensor {key} has no counterpart in the base model")
        old = base.get(key)
        if tuple(old.shape) != tuple(student[key].shape):
            raise BadInputError(
                f"{key}: student shape {tuple(student[key].shape)} != base {tuple(old.shape)}"
            )
        if not torch.equal(old.to(student[key].dtype), student[key]):
            yield key
