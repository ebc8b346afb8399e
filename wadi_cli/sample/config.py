"""Sampling settings: the resolved configuration of one ``wadi sample`` / ``wadi eval`` run,
teacher defaults per backbone, dtype/device resolution, and prompt-file reading."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from wadi_cli.errors import BadInputError
from wadi_cli.io.prompts import read_prompt_file

#: Multi-step teacher defaults (steps, classifier-free guidance scale) per backbone: the
#: paper's teacher baselines (SD1.5: 25 steps, cfg 3; PixArt-α: 20 steps, cfg 4.5), the
#: usual SD2.1 setting (cfg 7.5), and the scale the tiny teacher was tuned for. A registry
#: entry may override the scale with a ``teacher_cfg`` attribute.
TEACHER_DEFAULTS: dict[str, tuple[int, float]] = {
    "sd15": (25, 3.0),
    "sd21": (25, 7.5),
    "pixart": (20, 4.5),
    "tiny": (25, 3.0),
}

DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "fp16": torch.float16,
    "float16": torch.float16,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
}


@dataclass
class SampleConfig:
    """How to sample. ``teacher=False``: the one-step generator (WaDi §3) at t = T−1 with
    ``alpha_bar_T`` (``None`` = the registry's constant). ``teacher=True``: the base model
    with ``steps`` DDIM steps and guidance ``cfg`` (``None`` = :data:`TEACHER_DEFAULTS`).
    Image ``i`` of a run uses its own generator seeded ``seed + i``."""

    teacher: bool = False
    steps: int | None = None
    cfg: float | None = None
    alpha_bar_T: float | None = None
    seed: int = 0
    batch_size: int = 4

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise BadInputError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.steps is not None and self.steps < 1:
            raise BadInputError(f"--steps must be at least 1, got {self.steps}")
        if self.alpha_bar_T is not None and not 0.0 < self.alpha_bar_T < 1.0:
            raise BadInputError(f"--alpha-bar-t must lie in (0, 1), got {self.alpha_bar_T}")
        if self.cfg is not None and self.cfg < 0:
            raise BadInputError(f"--cfg must be non-negative, got {self.cfg}")
        if self.seed < 0:
            raise BadInputError(f"--seed must be non-negative, got {self.seed}")

    def resolved(self, backbone: object, recorded_alpha_bar_T: float | None = None) -> SampleConfig:
        """Copy with every ``None`` replaced by its default: ᾱ_T from the one-step weights'
        metadata (``recorded_alpha_bar_T``), else the registry's constant."""
        name = str(getattr(backbone, "name", ""))
        steps, cfg = TEACHER_DEFAULTS.get(name, (25, 7.5))
        cfg = float(getattr(backbone, "teacher_cfg", None) or cfg)
        return SampleConfig(
            teacher=self.teacher,
            steps=self.steps if self.steps is not None else steps,
            cfg=self.cfg if self.cfg is not None else cfg,
            alpha_bar_T=resolve_alpha_bar_T(
                self.alpha_bar_T,
                recorded_alpha_bar_T,
                float(backbone.alpha_bar_T),  # type: ignore[attr-defined]
            ),
            seed=self.seed,
            batch_size=self.batch_size,
        )

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def resolve_alpha_bar_T(requested: float | None, recorded: float | None, registry: float) -> float:
    """The one-step ᾱ_T: ``--alpha-bar-t`` when given, else the value the weights record
    (what their student was trained with), else the registry's constant."""
    if requested is not None:
        return float(requested)
    return float(recorded) if recorded is not None else float(registry)


def alpha_bar_T_warning(requested: float | None, recorded: float | None) -> str | None:
    """The warning for an ``--alpha-bar-t`` that differs from the value the weights
    record (``None`` when they agree or either is unknown)."""
    if requested is None or recorded is None or abs(float(requested) - float(recorded)) <= 1e-12:
        return None
    return (
        f"--alpha-bar-t {requested:g} differs from the alpha_bar_T = {recorded:g} recorded in the weights "
        f"(what their student was trained with); sampling with {requested:g}"
    )


def resolve_dtype(dtype: str | None, device: torch.device, family: str = "unet") -> torch.dtype:
    """``None``/"auto" -> fp32 on CPU; on accelerators fp16 for U-Nets (SD was trained in
    fp16) and bf16 for DiTs (PixArt's release trained in bf16)."""
    if dtype in (None, "", "auto"):
        if device.type == "cpu":
            return torch.float32
        return torch.bfloat16 if family == "dit" else torch.float16
    key = dtype.lower()
    if key not in DTYPES:
        raise BadInputError(f"--dtype: unknown {dtype!r}; expected auto, fp32, fp16 or bf16")
    return DTYPES[key]


def read_prompts(
    prompts: Sequence[str] = (), prompts_file: str | os.PathLike[str] | None = None
) -> list[str]:
    """Prompts from the command line followed by those of ``prompts_file`` (``.txt``: one
    per line, ``#`` comment lines and blank lines skipped; also ``.jsonl``/``.csv``/
    ``.parquet`` with a ``prompt`` column, see :func:`wadi_cli.io.prompts.read_prompt_file`). Raises
    :class:`BadInputError` when the result is empty."""
    out = [str(p) for p in prompts]
    if prompts_file is not None:
        out.extend(read_prompt_file(prompts_file))
    if not out:
        where = f" ({prompts_file} holds none)" if prompts_file is not None else ""
        raise BadInputError(
            f"no prompts given{where}: pass PROMPT arguments, or a prompt file (one per line) "
            "with --prompts FILE"
        )
    return out
