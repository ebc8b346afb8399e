"""Loading a backbone's pipeline and one-step weights into a
:class:`~wadi_cli.pipeline.loaded.LoadedPipeline`.

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
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

import wadi_cli.pipeline.base as base_files
from wadi_cli import tiny  # module, not names: tests point tiny.TINY_STUDENT_PATH elsewhere
from wadi_cli.backbones import Backbone, get_backbone
from wadi_cli.diffusion import DualCLIPPromptEncoder, PromptEncoder, alphas_cumprod_of, wrap_denoiser
from wadi_cli.errors import BadInputError, CheckpointError, HubError, MismatchError
from wadi_cli.io import fetch_file, open_checkpoint
from wadi_cli.io.paths import input_path_problem
from wadi_cli.io.sd_single_file_read import is_single_file_model
from wadi_cli.lorad import is_adapter, load_adapter, merge_adapter_into_state_dict
from wadi_cli.pipeline.base import (
    BasePipeline,
    PipelineSource,
    latent_size,
    load_base_pipeline,
    load_state_strict,
    vae_scale_factor,
    weights_variant,
)
from wadi_cli.pipeline.loaded import LoadedPipeline, check_weights_or_teacher

WeightsKind = Literal["merged", "adapter", "folder"]


def get_backbone_spec(backbone: str | Backbone) -> Backbone:
    """A registry entry from its name (``sd15``, ``sd21``, ``pixart``, ``tiny``) or as given."""
    if not isinstance(backbone, str):
        return backbone
    return get_backbone(backbone)


# ---- pipeline ------------------------------------------------------------------------
class _MissingDownload(Exception):
    """A hub fetch failed: ``what`` is missing, ``command`` fetches it where the hub is
    reachable, ``flag`` takes a local copy instead."""

    def __init__(self, what: str, command: str, flag: str) -> None:
        super().__init__(what)
        self.what, self.command, self.flag = what, command, flag


def _missing_message(missing: list[_MissingDownload]) -> str:
    """One line naming every missing download, ending with the flags that take local copies."""
    what = ", nor ".join(m.what for m in missing)
    commands = " and ".join(f"`{m.command}`" for m in missing)
    them = "it" if len(missing) == 1 else "them"
    copies = "a local copy" if len(missing) == 1 else "local copies"
    return (
        f"offline or not on the hub: cannot fetch {what}; fetch {them} with {commands} where the hub "
        f"is reachable, or pass {copies} with {' '.join(m.flag for m in missing)}"
    )


def resolve_pipeline_source(
    backbone: Backbone,
    model: str | os.PathLike[str] | None = None,
    components: str | os.PathLike[str] | None = None,
    **kwargs: Any,
) -> PipelineSource:
    """Folders of the base pipeline (see :func:`wadi_cli.pipeline.base.resolve_pipeline_source`;
    ``kwargs`` go there). Hub failures raise :class:`HubError` naming the repo and the
    flag that takes a local copy."""
    try:
        return _pipeline_source(backbone, model, components, **kwargs)
    except _MissingDownload as exc:
        raise HubError(_missing_message([exc])) from None


def _pipeline_source(
    backbone: Backbone,
    model: str | os.PathLike[str] | None,
    components: str | os.PathLike[str] | None,
    **kwargs: Any,
) -> PipelineSource:
    try:
        return base_files.resolve_pipeline_source(backbone, model, components, **kwargs)
    except HubError as exc:
        single = is_single_file_model(model)  # --model FILE: the backbone's folders give the configs
        repo = str(model if model is not None and not single else backbone.hub_id)
        comp = str(components or backbone.components_repo or repo)
        detail = str(exc).split(";", 1)[0]  # which folder or file is missing, without its hint
        command = getattr(exc, "command", None)  # hf download of exactly the planned files
        if comp == repo:
            what = (
                f"the configs, tokenizer and scheduler of {repo}" if single else f"the base pipeline {repo}"
            )
            flag = "--components DIR" if single else "--model DIR"
            raise _MissingDownload(f"{what} ({detail})", command or f"hf download {repo}", flag) from None
        raise _MissingDownload(
            f"the base pipeline {repo} with the components of {comp} ({detail})",
            command or f"hf download {repo}; hf download {comp}",
            "--model DIR --components DIR",
        ) from None


# ---- weights -------------------------------------------------------------------------
def detect_weights_kind(path: str | os.PathLike[str]) -> WeightsKind:
    """``folder`` for a directory, ``adapter`` for a file with ``*.lorad_A/B`` tensors,
    ``merged`` for any other weights file (a full denoiser state dict)."""
    p = Path(path).expanduser()
    if input_path_problem(p):
        raise CheckpointError(f"--weights {p}: {input_path_problem(p)}")
    if p.is_dir():
        return "folder"
    with open_checkpoint(p) as src:
        if is_adapter(src.keys()):
            return "adapter"
    return "merged"


def _read_adapter(path: Path, backbone: Backbone) -> tuple[dict[str, torch.Tensor], Any]:
    tensors, cfg = load_adapter(path)
    if getattr(cfg, "backbone", None) and cfg.backbone != backbone.name:
        raise MismatchError(
            f"--weights {path}: adapter was made for backbone {cfg.backbone!r}, not {backbone.name!r}"
        )
    return tensors, cfg


def check_weights(path: str | os.PathLike[str], backbone: Backbone) -> WeightsKind:
    """Check ``--weights`` as far as it can be without the base model (the file's format and
    header; an adapter's tensors, values and backbone), so a broken file fails before a
    pipeline of gigabytes is loaded. Returns its kind."""
    kind = detect_weights_kind(path)
    if kind == "adapter":
        _read_adapter(Path(path).expanduser(), backbone)
    return kind


def _apply_adapter(model: nn.Module, path: Path, backbone: Backbone) -> None:
    tensors, _ = _read_adapter(path, backbone)
    # the rotation is computed in fp32 (fp64 for fp64 bases) and cast back to the base dtype
    merged = merge_adapter_into_state_dict(model.state_dict(), tensors)
    load_state_strict(model, merged, f"--weights {path} (adapter merged into the base)")


def apply_weights(model: nn.Module, path: str | os.PathLike[str], backbone: Backbone) -> WeightsKind:
    """Load one-step weights of any supported kind into the base denoiser ``model``."""
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


def default_weights(backbone: Backbone, source: str | os.PathLike[str] | None = None) -> Path | None:
    """The default one-step weights for ``backbone`` on the base pipeline ``source``: the
    authors' release (fetched from the hub and cached) for sd15 / sd21 / pixart, the
    student shipped with wadi for tiny on its shipped pipeline (``None`` on another tiny
    base: the student was not trained on it). A failed fetch raises :class:`HubError`
    saying what to download and that ``--weights`` takes it."""
    try:
        return _default_weights(backbone, source)
    except _MissingDownload as exc:
        raise HubError(_missing_message([exc])) from None


def _shipped_tiny_student(source: str | os.PathLike[str] | None) -> Path | None:
    if source is not None and Path(os.path.realpath(source)) != Path(tiny.TINY_PIPELINE_DIR).resolve():
        return None
    if not tiny.TINY_STUDENT_PATH.is_file():
        raise CheckpointError(
            f"the tiny one-step student is missing at {tiny.TINY_STUDENT_PATH} (incomplete install); "
            "pass one-step weights with --weights FILE, or sample the undistilled model with --base"
        )
    return tiny.TINY_STUDENT_PATH


def _default_weights(backbone: Backbone, source: str | os.PathLike[str] | None = None) -> Path | None:
    if is_single_file_model(source):  # a fine-tune: no released student was trained on it
        return None
    if backbone.name == "tiny":
        return _shipped_tiny_student(source)
    repo, name = getattr(backbone, "release_repo", None), getattr(backbone, "release_file", None)
    if not repo or not name:
        return None
    try:
        return Path(fetch_file(repo, name))
    except HubError:
        raise _MissingDownload(
            f"the {backbone.name} one-step weights {name} of the hub repo {repo} "
            f"(https://huggingface.co/{repo}/resolve/main/{name})",
            f"hf download {repo} {name}",
            f"--weights {name}",
        ) from None


def no_release_message(backbone: Backbone) -> None:
    """Raise :class:`BadInputError` for a backbone with no one-step release (SDXL): its
    student needs ``--weights``."""
    if backbone.name != "tiny" and not backbone.release_repo:
        raise BadInputError(
            f"no one-step {backbone.name} release exists: pass --weights (a `wadi distill` adapter "
            "or `wadi export` output), or --teacher / --base for the undistilled model"
        )


def resolve_sources(
    backbone: Backbone,
    model: str | os.PathLike[str] | None,
    weights: str | os.PathLike[str] | None,
    teacher: bool,
    components: str | os.PathLike[str] | None = None,
    variant: str | None = None,
    base: bool = False,
) -> tuple[PipelineSource, Path | None]:
    """(pipeline folders, weights path or None) for a run: without ``weights`` the student
    gets :func:`default_weights` unless ``base`` (one step from the undistilled base). Every
    hub failure is reported in ONE :class:`HubError` that lists each missing download and
    the flag that takes it.

    Merged one-step weights (and exported pipeline folders) replace the base denoiser
    entirely, so its weights are not fetched then: only its config."""
    missing: list[_MissingDownload] = []
    wpath = None if weights is None else Path(weights).expanduser()
    if wpath is None and not teacher and not base:
        no_release_message(backbone)
        try:
            wpath = _default_weights(backbone, model)
        except _MissingDownload as exc:
            missing.append(exc)
    replaces_base = wpath is not None and wpath.exists() and detect_weights_kind(wpath) != "adapter"
    source: PipelineSource | None = None
    try:
        source = _pipeline_source(
            backbone, model, components, variant=variant, denoiser_weights=not replaces_base
        )
    except _MissingDownload as exc:
        missing.insert(0, exc)
    if missing:
        raise HubError(_missing_message(missing))
    assert source is not None
    return source, wpath


# ---- the loaded pipeline --------------------------------------------------------------
def prompt_encoder(spec: Backbone, pipe: BasePipeline) -> PromptEncoder | DualCLIPPromptEncoder:
    """The prompt encoder of a loaded base pipeline (SDXL: both CLIPs, pooled output)."""
    if pipe.text_encoder_2 is not None:
        return DualCLIPPromptEncoder(
            (pipe.tokenizer, pipe.tokenizer_2),
            (pipe.text_encoder, pipe.text_encoder_2),
            spec.text_max_length,
            zero_empty=pipe.force_zeros_for_empty_prompt,
        )
    return PromptEncoder(pipe.tokenizer, pipe.text_encoder, spec.text_encoder, spec.text_max_length)


def load_pipeline(
    backbone: str | Backbone,
    *,
    model: str | os.PathLike[str] | None = None,
    weights: str | os.PathLike[str] | None = None,
    teacher: bool = False,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    channels_last: bool | None = None,
    compile: bool = False,
    components: str | os.PathLike[str] | None = None,
    base: bool = False,
    alpha_bar_T: float | None = None,
) -> LoadedPipeline:
    """Load the base pipeline of ``backbone`` (``model`` overrides its source,
    ``components`` where its VAE / text encoder / tokenizer / scheduler come from), put
    the one-step ``weights`` into its denoiser (for the student: default = the authors'
    release, or the shipped tiny student; ``base=True``: none, one step from the
    undistilled base), and move everything to ``device``/``dtype``. Hub downloads take
    the fp16 weight files when ``dtype`` is fp16.

    ``channels_last`` (default: on CUDA) and ``compile`` (``torch.compile`` of the
    denoiser) are speed options for accelerators; neither changes the maths.
    ``alpha_bar_T`` is ``--alpha-bar-t`` (``None``: the weights' value, else the
    registry's); the pipeline decides its one-step ᾱ_T from it once, when built.
    """
    spec = get_backbone_spec(backbone)
    dev = torch.device(device)
    notes: list[str] = []
    check_weights_or_teacher(teacher, weights, base)
    source, weights = resolve_sources(
        spec, model, weights, teacher, components, weights_variant(dtype), base=base
    )
    kind = check_weights(weights, spec) if weights is not None else None  # before the pipeline loads
    if not teacher and weights is None:
        why = "--base" if base else "no --weights and no default for this base"
        notes.append(f"{why}: one-step sampling from the undistilled {spec.name} model itself")
    pipe = load_base_pipeline(spec, source, dtype, denoiser_weights=kind in (None, "adapter"))
    net = pipe.denoiser
    if weights is not None:
        apply_weights(net, weights, spec)
    if channels_last is None:
        channels_last = dev.type == "cuda"
    for m in (net, pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
        if m is not None:
            m.to(dev).eval().requires_grad_(False)
    if channels_last and spec.family == "unet":
        net.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
    prediction_type = str(pipe.scheduler.config.get("prediction_type", "epsilon"))
    denoiser = wrap_denoiser(
        net,
        prediction_type,
        alphas_cumprod_of(pipe.scheduler),
        family=spec.family,
        vae_scale_factor=vae_scale_factor(pipe.vae),
    )
    if compile:
        net.compile()  # in place: parameter names and the wrapper stay as they are
    encoder = prompt_encoder(spec, pipe)
    return LoadedPipeline(
        backbone=spec,
        denoiser=denoiser,
        vae=pipe.vae,
        prompt_encoder=encoder,
        scheduler=pipe.scheduler,
        device=dev,
        dtype=dtype,
        model_source=source.describe(),
        model_file=source.single_file_record,
        weights=None if weights is None else str(weights),
        weights_kind=kind,
        note_lines=tuple(notes),
        latent_size=latent_size(net, spec.latent_size),
        vae_scale=vae_scale_factor(pipe.vae),
        teacher=teacher,
        requested_alpha_bar_T=alpha_bar_T,
    )
