"""A loaded pipeline: what generation needs on one device, decided once and then fixed.

:class:`LoadedPipeline` settles, when it is built, the two questions every sampler asks:
which one-step ᾱ_T to use (:func:`wadi_cli.pipeline.alpha_bar.decide_alpha_bar_T`, with its
warning) and whether weights and the teacher were asked for together
(:func:`check_weights_or_teacher`). It is a frozen dataclass: nothing changes it afterwards
(``wadi swap`` loads its variants' tensors into the denoiser module, not new fields).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from wadi_cli.backbones import Backbone
from wadi_cli.diffusion import Denoiser, DualCLIPPromptEncoder, PromptEncoder
from wadi_cli.errors import BadInputError
from wadi_cli.pipeline.alpha_bar import AlphaBarT, decide_alpha_bar_T

if TYPE_CHECKING:
    from diffusers import SchedulerMixin


def check_weights_or_teacher(
    teacher: bool, weights: str | os.PathLike[str] | None, base: bool = False
) -> None:
    """The one check of what is sampled: ``--base`` is the undistilled base in one step
    (neither ``--weights`` nor ``--teacher``). ``--teacher`` samples the base model with the
    multi-step sampler, or, with ``--weights``, those weights in its place (a fine-tuned base:
    a ``wadi finetune`` run)."""
    if base and (weights is not None or teacher):
        raise BadInputError("--base samples the undistilled model in one step: drop --weights and --teacher")


@dataclass(frozen=True)
class LoadedPipeline:
    """Everything generation needs, on one device: the wrapped denoiser, the VAE, the
    prompt encoder, the pipeline's scheduler (for ``alphas_cumprod`` and the teacher).

    ``requested_alpha_bar_T`` (``--alpha-bar-t``) and the ᾱ_T recorded in ``weights`` give
    :attr:`alpha_bar` once, here; ``notes`` and ``warnings`` are read-only copies."""

    backbone: Backbone
    denoiser: Denoiser
    vae: nn.Module
    prompt_encoder: PromptEncoder | DualCLIPPromptEncoder
    scheduler: SchedulerMixin
    device: torch.device
    dtype: torch.dtype
    model_source: str
    model_file: dict[str, Any] | None = None  # --model FILE: its name, bytes, sha256
    weights: str | None = None
    weights_kind: str | None = None
    note_lines: tuple[str, ...] = ()
    latent_size: int | None = None  # from the denoiser's config (None: the registry's)
    vae_scale: int = 8
    teacher: bool = False
    requested_alpha_bar_T: float | None = None
    alpha_bar: AlphaBarT = field(init=False)

    def __post_init__(self) -> None:
        check_weights_or_teacher(self.teacher, self.weights)
        object.__setattr__(
            self, "alpha_bar", decide_alpha_bar_T(self.backbone, self.weights, self.requested_alpha_bar_T)
        )

    @property
    def alpha_bar_T(self) -> float:
        """The one-step ᾱ_T this pipeline samples with."""
        return self.alpha_bar.value

    @property
    def weights_alpha_bar_T(self) -> float | None:
        """ᾱ_T recorded in the one-step weights' metadata (``None``: none recorded)."""
        return self.alpha_bar.recorded

    @property
    def notes(self) -> list[str]:
        """What the user should know about the run (e.g. sampling the undistilled base)."""
        return list(self.note_lines)

    @property
    def warnings(self) -> list[str]:
        """What may be wrong: an ``--alpha-bar-t`` that differs from the weights' value
        (one-step sampling only)."""
        warning = None if self.teacher else self.alpha_bar.warning
        return [warning] if warning else []

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the latents: the side from the denoiser's own config (SD2.1 768:
        96), the registry's value when the config has none."""
        size = int(self.latent_size or self.backbone.latent_size)
        return (int(self.backbone.latent_channels), size, size)

    @property
    def resolution(self) -> int:
        """Image side in pixels."""
        return self.latent_shape[-1] * int(self.vae_scale)

    @property
    def size_multiple(self) -> int:
        """Pixels an image side must be a multiple of: the VAE's factor times the
        denoiser's own (a U-Net halves the latent once per down block after the first, so
        2^(blocks − 1); a DiT cuts it into ``patch_size`` patches)."""
        config = getattr(self.denoiser.model, "config", None)
        patch = getattr(config, "patch_size", None)
        blocks = getattr(config, "block_out_channels", None)
        own = int(patch) if patch else 2 ** (len(blocks) - 1) if blocks else 1
        return int(self.vae_scale) * own

    def latent_shape_for(self, height: int | None, width: int | None) -> tuple[int, int, int]:
        """(C, H, W) of latents for an image of ``height`` × ``width`` pixels (``None``: the
        model's own side). Raises :class:`BadInputError` for a side the denoiser cannot take."""
        c, h, w = self.latent_shape
        m, scale = self.size_multiple, int(self.vae_scale)
        for flag, value in (("--height", height), ("--width", width)):
            if value is not None and value % m:
                lo = max(m, value // m * m)
                raise BadInputError(
                    f"{flag} {value}: the {self.backbone.name} denoiser takes multiples of {m} pixels "
                    f"(VAE ×{scale}, denoiser ×{m // scale}); try {lo} or {lo + m}"
                )
        return (c, h if height is None else height // scale, w if width is None else width // scale)
