"""Generation settings: :class:`SampleConfig` (what one :func:`~wadi_cli.pipeline.generation.generate`
call does: one step or the teacher, its steps and guidance, ᾱ_T, seed, batch size) and the
dtype a pipeline loads in. The teacher's default steps and guidance come from the backbone's
sampling recipe (``wadi_cli/configs/sample/NAME.toml``)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from wadi_cli.backbones import Backbone
from wadi_cli.backbones.recipes import teacher_defaults
from wadi_cli.errors import BadInputError
from wadi_cli.pipeline.alpha_bar import resolve_alpha_bar_T
from wadi_cli.pipeline.defaults import REFINE_STRENGTH

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
    with ``steps`` DDIM steps and guidance ``cfg`` (``None`` = the ``[teacher]`` table of the
    backbone's sampling recipe). ``strength``: image-to-image from init latents
    (:mod:`~wadi_cli.pipeline.img2img`); ``height`` / ``width``: the image size in pixels
    (``None``: the model's own); ``upscale`` K: the two-stage high-resolution run (native
    size, then K× larger and refined by one image-to-image step at ``refine_strength``).
    Image ``i`` of a run uses its own generator seeded ``seed + i``. The command-line
    options behind it are declared in :class:`wadi_cli.pipeline.options.SamplingOptions`."""

    teacher: bool = False
    steps: int | None = None
    cfg: float | None = None
    alpha_bar_T: float | None = None
    seed: int = 0
    batch_size: int = 4
    strength: float | None = None
    height: int | None = None
    width: int | None = None
    upscale: int | None = None
    refine_strength: float | None = None

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
        for flag, value in (("--strength", self.strength), ("--refine-strength", self.refine_strength)):
            if value is not None and not 0.0 < value <= 1.0:
                raise BadInputError(f"{flag} must lie in (0, 1], got {value}")
        for flag, value in (("--height", self.height), ("--width", self.width)):
            if value is not None and value < 1:
                raise BadInputError(f"{flag} must be a positive number of pixels, got {value}")
        if self.upscale is not None and self.upscale < 2:
            raise BadInputError(f"--upscale must be a whole factor of at least 2, got {self.upscale}")

    def resolved(self, backbone: Backbone, alpha_bar_T: float | None = None) -> SampleConfig:
        """Copy with every ``None`` replaced by its default: the teacher's steps and
        guidance from ``backbone``'s sampling recipe; ᾱ_T from ``alpha_bar_T`` (the
        pipeline's, :attr:`LoadedPipeline.alpha_bar_T`), else the registry's constant."""
        steps, cfg = teacher_defaults(backbone.name)
        return SampleConfig(
            teacher=self.teacher,
            steps=self.steps if self.steps is not None else steps,
            cfg=self.cfg if self.cfg is not None else cfg,
            alpha_bar_T=resolve_alpha_bar_T(self.alpha_bar_T, alpha_bar_T, backbone.alpha_bar_T),
            seed=self.seed,
            batch_size=self.batch_size,
            strength=self.strength,
            height=self.height,
            width=self.width,
            upscale=self.upscale,
            refine_strength=(self.refine_strength or REFINE_STRENGTH) if self.upscale else None,
        )

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


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
