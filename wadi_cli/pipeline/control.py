"""ControlNet (Zhang et al. 2023) with the one-step student or the teacher: a diffusers
``ControlNetModel`` reads the control image and adds its residuals to the U-Net's skip
connections and middle block, at every denoiser call (the student's one call at t = 999,
each of the teacher's steps, both halves of classifier-free guidance):

    (d_1 … d_n, m) = ControlNet(x_t, t, c, control image) · scale
    ε̂ = U-Net(x_t, t, c; skip_i + d_i, mid + m)

exactly as diffusers' ``StableDiffusionControlNetPipeline`` (guess mode off). The control
image is RGB in [0, 1] at the output's pixel size (fitted like ``--init-image``,
:mod:`~wadi_cli.pipeline.images`). The ControlNet must belong to the U-Net's family: same
cross-attention width and block widths (an SD1.5 ControlNet on SD1.5, an SD2.1 one on
SD2.1); PixArt has no ControlNet here.

Besides folders and hub ids, ``--controlnet`` takes the names of :data:`BUILTIN_CONTROLNETS`:
``tiny``, the ControlNet shipped for the tiny teacher (control: the shape's silhouette, white
on black; ``analysis/tiny_controlnet/``).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch
from torch import nn

from wadi_cli.diffusion import TextCondition
from wadi_cli.diffusion.denoisers import UNetDenoiser
from wadi_cli.errors import BadInputError
from wadi_cli.io.hub import looks_like_repo_id, resolve_repo
from wadi_cli.io.hub_files import FetchPlan
from wadi_cli.io.paths import input_path_problem
from wadi_cli.pipeline.defaults import CONTROL_SCALE
from wadi_cli.pipeline.loaded import LoadedPipeline
from wadi_cli.tiny.arch import TINY_CONTROLNET_DIR

#: ControlNets shipped with wadi, by the name ``--controlnet`` takes (before any folder of
#: that name: a built-in name is never a path).
BUILTIN_CONTROLNETS: dict[str, Path] = {"tiny": TINY_CONTROLNET_DIR}


def controlnet_plan(variant: str | None) -> FetchPlan:
    """The files of a ControlNet repository wadi reads: ``config.json`` and one safetensors
    copy of the weights at the root (``variant`` ``fp16`` preferred when asked for)."""
    return FetchPlan(folders=("",), weights=("",), variant=variant, root=("config.json",))


def load_controlnet(ref: str, pipe: LoadedPipeline, variant: str | None = None) -> nn.Module:
    """The ``ControlNetModel`` of ``ref`` (a built-in name, a folder, or a hub id fetched by
    :func:`controlnet_plan`) on ``pipe``'s device and dtype, checked to fit its U-Net."""
    if pipe.denoiser.family != "unet":
        raise BadInputError(
            f"--controlnet: not supported for {pipe.backbone.name} (a DiT); use sd15, sd21 or tiny"
        )
    local = BUILTIN_CONTROLNETS.get(ref.strip().lower()) or Path(ref).expanduser()
    if local.exists():
        problem = input_path_problem(local)
        if problem or not local.is_dir():
            raise BadInputError(
                f"--controlnet {local}: {problem or 'expected a ControlNet folder, not a file'}"
            )
        root = local
    elif looks_like_repo_id(ref):
        root = resolve_repo(ref, controlnet_plan(variant))
    else:
        raise BadInputError(f"--controlnet {ref}: no such file or directory")
    from diffusers import ControlNetModel

    from wadi_cli.pipeline.base import _load, _variant_kwargs

    net = _load(
        "ControlNet",
        root,
        lambda: ControlNetModel.from_pretrained(
            str(root), torch_dtype=pipe.dtype, local_files_only=True, **_variant_kwargs(root, variant)
        ),
    )
    check_fits(net, pipe.denoiser.model, ref, pipe.backbone.name)
    return net.to(pipe.device).eval().requires_grad_(False)


def check_fits(controlnet: nn.Module, unet: nn.Module, ref: str, backbone: str) -> None:
    """One error line when ``controlnet`` was built for another U-Net (cross-attention width,
    block widths, or blocks per level differ)."""
    c, u = controlnet.config, unet.config  # type: ignore[attr-defined]
    for key, what in (
        ("cross_attention_dim", "cross-attention width"),
        ("block_out_channels", "block widths"),
        ("layers_per_block", "layers per block"),
        ("in_channels", "latent channels"),
    ):
        cv, uv = getattr(c, key, None), getattr(u, key, None)
        if list(np.atleast_1d(cv)) != list(np.atleast_1d(uv)):
            raise BadInputError(
                f"--controlnet {ref}: made for another model ({what} {cv}, the {backbone} U-Net's {uv})"
            )


class ControlledDenoiser(UNetDenoiser):
    """A U-Net denoiser with a ControlNet: :meth:`use` sets the control images of the next
    calls ((B, 3, H, W) in [0, 1]); a call on k·B latents (classifier-free guidance's
    unconditional and conditional halves) repeats them k times, as diffusers does."""

    def __init__(self, base: UNetDenoiser, controlnet: nn.Module, scale: float) -> None:
        super().__init__(base.model, base.prediction_type, base.alphas_cumprod)
        self.controlnet = controlnet
        self.scale = float(scale)
        self.control: torch.Tensor | None = None

    def use(self, control: torch.Tensor | None) -> None:
        """The control images of the latents the next calls get (``None``: none set)."""
        self.control = control

    def forward(self, x_t: torch.Tensor, t: int | torch.Tensor, cond: TextCondition) -> torch.Tensor:
        if self.control is None:
            raise BadInputError("a ControlNet run needs control images (none were given for this batch)")
        dtype = self.model.dtype  # type: ignore[attr-defined]
        reps, rest = divmod(x_t.shape[0], self.control.shape[0])
        if rest:
            raise ValueError(f"{x_t.shape[0]} latents for {self.control.shape[0]} control images")
        tt = self._timesteps(t, x_t)
        emb = cond.embeds.to(dtype)
        down, mid = self.controlnet(
            x_t.to(dtype),
            tt,
            encoder_hidden_states=emb,
            controlnet_cond=self.control.repeat(reps, 1, 1, 1).to(x_t.device, dtype),
            conditioning_scale=self.scale,
            return_dict=False,
        )
        out = self.model(
            x_t.to(dtype),
            tt,
            encoder_hidden_states=emb,
            down_block_additional_residuals=down,
            mid_block_additional_residual=mid,
            return_dict=False,
        )[0]
        return out.to(x_t.dtype)


def with_controlnet(pipe: LoadedPipeline, controlnet: nn.Module, scale: float) -> LoadedPipeline:
    """``pipe`` whose denoiser runs ``controlnet`` at ``scale`` (set its images with
    ``pipe.denoiser.use``)."""
    if not isinstance(pipe.denoiser, UNetDenoiser):
        raise BadInputError(f"--controlnet: not supported for {pipe.backbone.name}")
    return dataclasses.replace(pipe, denoiser=ControlledDenoiser(pipe.denoiser, controlnet, scale))


def control_tensor(images: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) uint8 → (N, 3, H, W) float in [0, 1] (diffusers' control image range)."""
    return torch.from_numpy(np.array(images, dtype=np.float32)).permute(0, 3, 1, 2) / 255.0


def add_controlnet(
    pipe: LoadedPipeline, controlnet: str | None, control_scale: float | None, dtype: torch.dtype
) -> LoadedPipeline:
    """``pipe`` with the ControlNet ``controlnet`` (``--controlnet``) loaded into its denoiser
    at ``control_scale`` (``None``: the default), unchanged without one."""
    if controlnet is None:
        return pipe
    from wadi_cli.pipeline.base import weights_variant

    scale = CONTROL_SCALE if control_scale is None else control_scale
    return with_controlnet(pipe, load_controlnet(controlnet, pipe, weights_variant(dtype)), scale)
