"""Loading a backbone's pipeline and one-step weights into a :class:`Sampler`.

``--weights`` accepts, detected from the path and the tensor names:

- ``merged``: a full denoiser state dict in diffusers naming (the authors' release format,
  e.g. ``rotated_unet-sdv2-1.safetensors``), loaded strictly into the U-Net/transformer;
- ``adapter``: a LoRaD adapter file (``*.lorad_A`` / ``*.lorad_B``), merged into the base
  weights (exact rotation, no approximation);
- ``folder``: an exported diffusers pipeline folder (its ``unet/`` or ``transformer/``)
  or a diffusers model folder, loaded strictly.

Hub access goes through :mod:`wadi_cli.io` (``resolve_model`` / ``fetch_file``), which
turns failures into :class:`HubError`; here the message gains the flag that takes a local
copy instead.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from wadi_cli.diffusion import Denoiser, PromptEncoder, alphas_cumprod_of, wrap_denoiser
from wadi_cli.errors import BadInputError, CheckpointError, HubError, MismatchError

WeightsKind = Literal["merged", "adapter", "folder"]
ADAPTER_SUFFIXES: tuple[str, ...] = (".lorad_A", ".lorad_B")


@dataclass
class Sampler:
    """Everything generation needs, on one device: the wrapped denoiser, the VAE, the
    prompt encoder, the pipeline's scheduler (for ``alphas_cumprod`` and the teacher)."""

    backbone: Any
    denoiser: Denoiser
    vae: nn.Module
    prompt_encoder: PromptEncoder
    scheduler: Any
    device: torch.device
    dtype: torch.dtype
    model_source: str
    weights: str | None = None
    weights_kind: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the latents, from the backbone registry."""
        size = int(self.backbone.latent_size)
        return (int(self.backbone.latent_channels), size, size)


def get_backbone_spec(backbone: str | Any) -> Any:
    """A registry entry from its name (``sd15``, ``sd21``, ``pixart``, ``tiny``) or as given."""
    if not isinstance(backbone, str):
        return backbone
    from wadi_cli.backbones import get_backbone

    return get_backbone(backbone)


# ---- pipeline ------------------------------------------------------------------------
class _MissingDownload(Exception):
    """A hub fetch failed; ``hint`` says what to download and which flag takes it."""

    def __init__(self, hint: str) -> None:
        super().__init__(hint)
        self.hint = hint


def resolve_pipeline_source(backbone: Any, model: str | os.PathLike[str] | None = None) -> Path:
    """Folder of the base pipeline: ``model`` (a local folder or a hub id) if given; the
    shipped tiny pipeline for ``tiny``; else the backbone's hub id (cache or download).
    Hub failures raise :class:`HubError` naming the repo and the ``--model`` flag."""
    try:
        return _pipeline_source(backbone, model)
    except _MissingDownload as exc:
        raise HubError(f"cannot fetch {exc.hint}") from None


def _pipeline_source(backbone: Any, model: str | os.PathLike[str] | None) -> Path:
    from wadi_cli.io import resolve_model

    if model is None and backbone.name == "tiny":
        from wadi_cli.tiny import TINY_PIPELINE_DIR, tiny_pipeline_available

        if not tiny_pipeline_available():
            raise CheckpointError(
                f"the shipped tiny pipeline is missing or incomplete at {TINY_PIPELINE_DIR}; "
                "pass a tiny pipeline folder with --model DIR"
            )
        return Path(TINY_PIPELINE_DIR)
    repo = str(model if model is not None else backbone.hub_id)
    try:
        path = Path(resolve_model(repo))
    except HubError:
        raise _MissingDownload(
            f"the base pipeline {repo} (download it, e.g. `hf download {repo}`, and pass the folder "
            "with --model DIR)"
        ) from None
    if not (path / "model_index.json").is_file():
        raise CheckpointError(f"--model {path}: not a diffusers pipeline folder (no model_index.json)")
    return path


def _load_pipeline(backbone: Any, path: Path, dtype: torch.dtype) -> Any:
    from diffusers import PixArtAlphaPipeline, StableDiffusionPipeline

    kwargs: dict[str, Any] = {"torch_dtype": dtype, "local_files_only": True}
    if backbone.family == "dit":
        cls = PixArtAlphaPipeline
    else:
        cls = StableDiffusionPipeline
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    from diffusers.utils import logging as dlogging
    from transformers.utils import logging as tlogging

    bars = dlogging.is_progress_bar_enabled(), tlogging.is_progress_bar_enabled()
    dlogging.disable_progress_bar()
    tlogging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return cls.from_pretrained(str(path), **kwargs)
    except (OSError, ValueError, TypeError, KeyError, RuntimeError) as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"{path}: cannot load it as a {cls.__name__} for {backbone.name} ({msg})"
        ) from None
    finally:
        if bars[0]:
            dlogging.enable_progress_bar()
        if bars[1]:
            tlogging.enable_progress_bar()


# ---- weights -------------------------------------------------------------------------
def detect_weights_kind(path: str | os.PathLike[str]) -> WeightsKind:
    """``folder`` for a directory, ``adapter`` for a file with ``*.lorad_A/B`` tensors,
    ``merged`` for any other weights file (a full denoiser state dict)."""
    from wadi_cli.io import open_checkpoint

    p = Path(path).expanduser()
    if not p.exists():
        raise CheckpointError(f"--weights {p}: no such file or directory")
    if p.is_dir():
        return "folder"
    with open_checkpoint(p) as src:
        keys = list(src.keys())
    if any(k.endswith(ADAPTER_SUFFIXES) for k in keys):
        return "adapter"
    return "merged"


def _preview(names: list[str], limit: int = 3) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", … (+{len(names) - limit})" if len(names) > limit else "")


def load_state_strict(model: nn.Module, source: Mapping[str, Any] | Any, label: str) -> None:
    """Copy a full state dict (a mapping or a lazy ``TensorSource``) into ``model``.

    Names and shapes are checked before any tensor is read or copied; a mismatch raises
    :class:`MismatchError` naming the first missing/unexpected keys and shape mismatches.
    """
    expected = model.state_dict()
    have = list(source.keys())
    missing = sorted(set(expected) - set(have))
    unexpected = sorted(set(have) - set(expected))

    def shape_of(k: str) -> tuple[int, ...]:
        return tuple(source.shape(k)) if hasattr(source, "shape") else tuple(source[k].shape)

    bad = [
        f"{k}: file {shape_of(k)} vs model {tuple(expected[k].shape)}"
        for k in sorted(set(have) & set(expected))
        if shape_of(k) != tuple(expected[k].shape)
    ]
    if missing or unexpected or bad:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s): {_preview(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s): {_preview(unexpected)}")
        if bad:
            parts.append(f"{len(bad)} shape mismatch(es): {_preview(bad, 2)}")
        raise MismatchError(f"{label} does not fit the base model: " + "; ".join(parts))
    get = source.get if hasattr(source, "shape") else source.__getitem__
    from wadi_cli.io import require_finite

    with torch.no_grad():
        for k, param in expected.items():
            tensor = get(k)
            require_finite(label, k, tensor)
            param.copy_(tensor.to(dtype=param.dtype))


def _read_adapter(path: Path, backbone: Any) -> tuple[dict[str, torch.Tensor], Any]:
    from wadi_cli.lorad import load_adapter

    tensors, cfg = load_adapter(path)
    if getattr(cfg, "backbone", None) and cfg.backbone != backbone.name:
        raise MismatchError(
            f"--weights {path}: adapter was made for backbone {cfg.backbone!r}, not {backbone.name!r}"
        )
    return tensors, cfg


def check_weights(path: str | os.PathLike[str], backbone: Any) -> WeightsKind:
    """Check ``--weights`` as far as it can be without the base model (the file's format and
    header; an adapter's tensors, values and backbone), so a broken file fails before a
    pipeline of gigabytes is loaded. Returns its kind."""
    kind = detect_weights_kind(path)
    if kind == "adapter":
        _read_adapter(Path(path).expanduser(), backbone)
    return kind


def _apply_adapter(model: nn.Module, path: Path, backbone: Any) -> None:
    from wadi_cli.lorad import merge_adapter_into_state_dict

    tensors, _ = _read_adapter(path, backbone)
    # the rotation is computed in fp32 (fp64 for fp64 bases) and cast back to the base dtype
    merged = merge_adapter_into_state_dict(model.state_dict(), tensors)
    load_state_strict(model, merged, f"--weights {path} (adapter merged into the base)")


def apply_weights(model: nn.Module, path: str | os.PathLike[str], backbone: Any) -> WeightsKind:
    """Load one-step weights of any supported kind into the base denoiser ``model``."""
    from wadi_cli.io import open_checkpoint

    p = Path(path).expanduser()
    kind = detect_weights_kind(p)
    if kind == "adapter":
        _apply_adapter(model, p, backbone)
        return kind
    component = None
    if kind == "folder" and (p / "model_index.json").is_file():
        component = backbone.denoiser_subfolder
    with open_checkpoint(p, component) if component else open_checkpoint(p) as src:
        load_state_strict(model, src, f"--weights {p}")
    return kind


def default_weights(backbone: Any) -> Path | None:
    """The authors' released one-step weights for ``backbone`` (fetched from the hub and
    cached), or ``None`` when the backbone has no release (``tiny``). A failed fetch
    raises :class:`HubError` saying what to download and that ``--weights`` takes it."""
    try:
        return _default_weights(backbone)
    except _MissingDownload as exc:
        raise HubError(f"cannot fetch {exc.hint}") from None


def _default_weights(backbone: Any) -> Path | None:
    repo, name = getattr(backbone, "release_repo", None), getattr(backbone, "release_file", None)
    if not repo or not name:
        return None
    from wadi_cli.io import fetch_file

    try:
        return Path(fetch_file(repo, name))
    except HubError:
        raise _MissingDownload(
            f"the default {backbone.name} one-step weights {name} of the hub repo {repo} (download "
            f"https://huggingface.co/{repo}/resolve/main/{name} and pass it with --weights {name})"
        ) from None


def resolve_sources(
    backbone: Any,
    model: str | os.PathLike[str] | None,
    weights: str | os.PathLike[str] | None,
    teacher: bool,
) -> tuple[Path, Path | None]:
    """(pipeline folder, weights path or None) for a run. Every hub failure is reported
    in ONE :class:`HubError` that lists each missing download and the flag that takes it."""
    hints: list[str] = []
    source: Path | None = None
    try:
        source = _pipeline_source(backbone, model)
    except _MissingDownload as exc:
        hints.append(exc.hint)
    wpath = None if weights is None else Path(weights).expanduser()
    if wpath is None and not teacher:
        try:
            wpath = _default_weights(backbone)
        except _MissingDownload as exc:
            hints.append(exc.hint)
    if hints:
        raise HubError("offline or not on the hub; cannot fetch " + " and ".join(hints))
    assert source is not None
    return source, wpath


# ---- the sampler -----------------------------------------------------------------------
def load_sampler(
    backbone: str | Any,
    *,
    model: str | os.PathLike[str] | None = None,
    weights: str | os.PathLike[str] | None = None,
    teacher: bool = False,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    channels_last: bool | None = None,
    compile: bool = False,
) -> Sampler:
    """Load the base pipeline of ``backbone`` (``model`` overrides its source), put the
    one-step ``weights`` into its denoiser (for the student: default = the authors'
    release, when there is one), and move everything to ``device``/``dtype``.

    ``channels_last`` (default: on CUDA) and ``compile`` (``torch.compile`` of the
    denoiser) are speed options for accelerators; neither changes the maths.
    """
    spec = get_backbone_spec(backbone)
    dev = torch.device(device)
    notes: list[str] = []
    if teacher and weights is not None:
        raise BadInputError("--teacher samples the base model: drop --weights (or drop --teacher)")
    source, weights = resolve_sources(spec, model, weights, teacher)
    if weights is not None:
        check_weights(weights, spec)  # before the pipeline loads
    if not teacher and weights is None:
        notes.append(f"no --weights: one-step sampling from the base {spec.name} model itself")
    pipe = _load_pipeline(spec, source, dtype)
    net = pipe.transformer if spec.family == "dit" else pipe.unet
    kind = apply_weights(net, weights, spec) if weights is not None else None
    if channels_last is None:
        channels_last = dev.type == "cuda"
    for m in (net, pipe.vae, pipe.text_encoder):
        m.to(dev).eval().requires_grad_(False)
    if channels_last and spec.family == "unet":
        net.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
    prediction_type = str(pipe.scheduler.config.get("prediction_type", "epsilon"))
    denoiser = wrap_denoiser(net, prediction_type, alphas_cumprod_of(pipe.scheduler), family=spec.family)
    if compile:
        net.compile()  # in place: parameter names and the wrapper stay as they are
    encoder = PromptEncoder(pipe.tokenizer, pipe.text_encoder, spec.text_encoder, spec.text_max_length)
    return Sampler(
        backbone=spec,
        denoiser=denoiser,
        vae=pipe.vae,
        prompt_encoder=encoder,
        scheduler=pipe.scheduler,
        device=dev,
        dtype=dtype,
        model_source=str(source),
        weights=None if weights is None else str(weights),
        weights_kind=kind,
        notes=notes,
    )
