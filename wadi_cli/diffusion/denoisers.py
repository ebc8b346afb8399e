"""One denoiser wrapper per backbone family, hiding each family's quirks behind the same
call ``denoiser(x_t, t, cond) -> raw prediction`` and ``denoiser.eps(x_t, t, cond) -> ε``:

- :class:`UNetDenoiser` (SD 1.5 / 2.1 / SDXL / tiny): ``UNet2DConditionModel``; no mask
  unless the text condition carries one. A U-Net with ``addition_embed_type="text_time"``
  (SDXL) gets ``added_cond_kwargs``: ``text_embeds`` = the pooled text embedding of the
  condition and ``time_ids`` = (original size, crop top-left, target size) =
  (H, W, 0, 0, H, W) in pixels, H × W being the latent side times the VAE's scale factor
  (diffusers' ``StableDiffusionXLPipeline`` defaults: no crop, original = target size).
- :class:`DiTDenoiser` (PixArt-α): ``PixArtTransformer2DModel``; learned variance means 8
  output channels of which the first 4 are ε; the T5 attention mask goes to
  ``encoder_attention_mask``; ``added_cond_kwargs`` is ``{"resolution": None,
  "aspect_ratio": None}`` unless the config uses additional conditions, in which case the
  pixel resolution and aspect ratio are derived from the latent size.

The wrapped network stays reachable as ``denoiser.model`` (for adapters, weight loading,
``torch.compile``).
"""

from __future__ import annotations

import torch
from torch import nn

from wadi_cli.diffusion.schedule import PREDICTION_TYPES, alpha_bar_at, to_eps
from wadi_cli.diffusion.text import TextCondition
from wadi_cli.errors import BadInputError


class Denoiser(nn.Module):
    """Base class: ``forward(x_t, t, cond)`` returns the network's raw prediction (of
    ``prediction_type``) with exactly ``x_t``'s channels; :meth:`eps` converts it to ε
    using the schedule's ``alphas_cumprod``. ``vae_scale_factor`` (pixels per latent) turns
    latent sides into the pixel sizes of added conditions (SDXL's time ids, PixArt's
    resolution)."""

    family: str = ""

    def __init__(
        self,
        model: nn.Module,
        prediction_type: str = "epsilon",
        alphas_cumprod: torch.Tensor | None = None,
        vae_scale_factor: int = 8,
    ) -> None:
        super().__init__()
        if prediction_type not in PREDICTION_TYPES:
            raise BadInputError(f"unknown prediction type {prediction_type!r}")
        self.model = model
        self.prediction_type = prediction_type
        self.alphas_cumprod = None if alphas_cumprod is None else alphas_cumprod.detach().double().cpu()
        self.vae_scale_factor = vae_scale_factor

    @staticmethod
    def _timesteps(t: int | torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        tt = torch.as_tensor(t, device=x.device)
        if tt.ndim == 0:
            tt = tt.expand(x.shape[0])
        if tt.shape != (x.shape[0],):
            raise ValueError(f"timesteps must be a scalar or shape ({x.shape[0]},), got {tuple(tt.shape)}")
        return tt

    def eps(self, x_t: torch.Tensor, t: int | torch.Tensor, cond: TextCondition) -> torch.Tensor:
        """ε-prediction at (x_t, t): the raw output, converted if the model is not ε-parameterised."""
        if self.prediction_type == "epsilon":
            return self(x_t, t, cond)
        if self.alphas_cumprod is None:
            raise BadInputError(
                f"a {self.prediction_type} model needs the schedule's alphas_cumprod to convert to ε"
            )
        pred = self(x_t, t, cond)
        tt = self._timesteps(t, x_t)
        return to_eps(pred, x_t, alpha_bar_at(self.alphas_cumprod, tt.long()), self.prediction_type)


def sdxl_time_ids(
    height: int, width: int, batch: int, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """SDXL's micro-conditioning (B, 6): original size (H, W), crop top-left (0, 0), target
    size (H, W), in pixels."""
    row = torch.tensor([height, width, 0, 0, height, width], device=device, dtype=dtype)
    return row.expand(batch, 6)


class UNetDenoiser(Denoiser):
    """SD-style ``UNet2DConditionModel`` (with SDXL's added conditions when its config asks)."""

    family = "unet"

    def _added_cond_kwargs(self, x: torch.Tensor, cond: TextCondition) -> dict[str, torch.Tensor] | None:
        config = getattr(self.model, "config", None)
        if getattr(config, "addition_embed_type", None) != "text_time":
            return None
        if cond.pooled is None:
            raise BadInputError(
                "this U-Net (SDXL) needs the pooled text embedding of its second text encoder"
            )
        dtype = self.model.dtype  # type: ignore[attr-defined]
        h, w = x.shape[-2] * self.vae_scale_factor, x.shape[-1] * self.vae_scale_factor
        return {
            "text_embeds": cond.pooled.to(device=x.device, dtype=dtype),
            "time_ids": sdxl_time_ids(h, w, x.shape[0], x.device, dtype),
        }

    def forward(self, x_t: torch.Tensor, t: int | torch.Tensor, cond: TextCondition) -> torch.Tensor:
        kwargs: dict[str, object] = {}
        if cond.mask is not None:
            kwargs["encoder_attention_mask"] = cond.mask
        added = self._added_cond_kwargs(x_t, cond)
        if added is not None:
            kwargs["added_cond_kwargs"] = added
        dtype = self.model.dtype  # type: ignore[attr-defined]
        out = self.model(
            x_t.to(dtype),
            self._timesteps(t, x_t),
            encoder_hidden_states=cond.embeds.to(dtype),
            return_dict=False,
            **kwargs,
        )[0]
        return out.to(x_t.dtype)


class DiTDenoiser(Denoiser):
    """PixArt-α ``PixArtTransformer2DModel`` (learned variance: first ``C`` of ``2C`` channels)."""

    family = "dit"

    def _added_cond_kwargs(self, x: torch.Tensor) -> dict[str, torch.Tensor | None]:
        if not getattr(self.model, "use_additional_conditions", False):
            return {"resolution": None, "aspect_ratio": None}
        h, w = x.shape[-2] * self.vae_scale_factor, x.shape[-1] * self.vae_scale_factor
        b = x.shape[0]
        dtype = self.model.dtype  # type: ignore[attr-defined]
        resolution = torch.tensor([h, w], device=x.device, dtype=dtype).repeat(b, 1)
        aspect_ratio = torch.tensor([h / w], device=x.device, dtype=dtype).repeat(b, 1)
        return {"resolution": resolution, "aspect_ratio": aspect_ratio}

    def forward(self, x_t: torch.Tensor, t: int | torch.Tensor, cond: TextCondition) -> torch.Tensor:
        dtype = self.model.dtype  # type: ignore[attr-defined]
        out = self.model(
            x_t.to(dtype),
            encoder_hidden_states=cond.embeds.to(dtype),
            timestep=self._timesteps(t, x_t),
            added_cond_kwargs=self._added_cond_kwargs(x_t),
            encoder_attention_mask=cond.mask,
            return_dict=False,
        )[0]
        channels = x_t.shape[1]
        if out.shape[1] == 2 * channels:  # learned variance: [ε, variance interpolation]
            out = out[:, :channels]
        return out.to(x_t.dtype)


def wrap_denoiser(
    model: nn.Module,
    prediction_type: str = "epsilon",
    alphas_cumprod: torch.Tensor | None = None,
    family: str | None = None,
    vae_scale_factor: int = 8,
) -> Denoiser:
    """Wrap a diffusers U-Net or PixArt transformer. ``family`` ("unet" | "dit") defaults
    to the model's class: anything named ``*Transformer*`` is a DiT, ``*UNet*`` a U-Net.
    ``vae_scale_factor`` (pixels per latent) turns latent sides into the pixel sizes of the
    added conditions (SDXL's time ids, PixArt's resolution)."""
    if family is None:
        # torch.compile wraps modules; look through to the original class.
        name = type(getattr(model, "_orig_mod", model)).__name__
        if "Transformer" in name:
            family = "dit"
        elif "UNet" in name:
            family = "unet"
        else:
            raise BadInputError(f"cannot tell the denoiser family of {name}; pass family='unet' or 'dit'")
    if family == "unet":
        return UNetDenoiser(model, prediction_type, alphas_cumprod, vae_scale_factor)
    if family == "dit":
        return DiTDenoiser(model, prediction_type, alphas_cumprod, vae_scale_factor)
    raise BadInputError(f"unknown denoiser family {family!r}; expected 'unet' or 'dit'")
