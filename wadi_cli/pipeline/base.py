"""The base pipeline of a backbone, assembled from where each part really lives.

A pipeline is a denoiser (U-Net or transformer) plus a VAE, a text encoder, a tokenizer
and a scheduler. They usually live in one hub repository, but not always: PixArt-α
256's repository holds only ``transformer/``, and its VAE, T5 encoder, tokenizer and
scheduler come from the PixArt-α 512 pipeline repository (the backbone registry's
``components_repo``; ``--components`` overrides it). :func:`resolve_pipeline_source`
finds both folders (local paths, or hub snapshots holding only the files the command
needs, in the precision asked for); :func:`load_base_pipeline` loads each part with its
own diffusers/transformers class, never the safety checker or feature extractor.
diffusers and transformers are imported by the functions that load (start-up time:
several seconds, which commands that only resolve folders or read weights do not pay).
"""

from __future__ import annotations

import importlib.util
import json
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from wadi_cli.backbones.registry import PIPELINE_COMPONENTS, Backbone
from wadi_cli.errors import BadInputError, CheckpointError, MismatchError
from wadi_cli.io.checkpoints import open_checkpoint
from wadi_cli.io.hub import looks_like_repo_id, repo_files, resolve_repo, snapshot_files
from wadi_cli.io.hub_files import FetchPlan, MissingFiles, folder_weights, select_files
from wadi_cli.io.paths import input_path_problem
from wadi_cli.io.sd_single_file_read import SINGLE_FILE_SUFFIX, file_fingerprint, is_single_file_model
from wadi_cli.io.sources import TensorSource, require_finite
from wadi_cli.io.tensor_map import KeyDiff, Tensors, as_tensor_map
from wadi_cli.tiny import TINY_PIPELINE_DIR, tiny_pipeline_available

if TYPE_CHECKING:
    from diffusers import SchedulerMixin

_TEXT_ENCODERS = {
    "clip": ("CLIPTextModel", "CLIPTokenizer"),
    "t5": ("T5EncoderModel", "T5Tokenizer"),
    "clip-l+clip-g": ("CLIPTextModel", "CLIPTokenizer"),
}
#: SDXL's second text encoder and tokenizer (folders text_encoder_2/, tokenizer_2/)
_SECOND_TEXT_ENCODER = ("CLIPTextModelWithProjection", "CLIPTokenizer")
#: the files of a VAE repository that holds one diffusers model at its root
_VAE_REPO_FILES = ("config.json", "diffusion_pytorch_model.safetensors")


def weights_variant(dtype: torch.dtype) -> str | None:
    """The hub weights variant to prefer for ``dtype``: ``fp16`` for float16 (half the
    download, same values), else the plain fp32 files (bf16 is cast from fp32: the fp16
    copies are rounded to a different grid and clipped to fp16's range)."""
    return "fp16" if dtype == torch.float16 else None


@dataclass(frozen=True)
class PipelineSource:
    """Local folders of a base pipeline: ``denoiser_root`` holds ``<subfolder>/`` of the
    denoiser, ``components_root`` holds vae/, text_encoder/, tokenizer/, scheduler/
    (``None`` when the command needs only the denoiser). ``*_ref`` are what was asked for
    (hub ids or paths), for messages and provenance."""

    denoiser_root: Path
    denoiser_ref: str
    subfolder: str
    components_root: Path | None = None
    components_ref: str | None = None
    variant: str | None = None
    vae_root: Path | None = None  # a VAE that replaces the components' (SDXL in fp16)
    vae_ref: str | None = None
    #: ``--model FILE``: an original-layout single file whose weights replace the base's
    #: U-Net, VAE and text encoder (the folders then give configs, tokenizer, scheduler)
    single_file: Path | None = None
    #: what a run records of ``single_file`` (name, bytes, sha256; see ``file_fingerprint``)
    single_file_record: dict[str, Any] | None = None

    def describe(self) -> str:
        """One line: where the denoiser and the other components come from."""
        if self.single_file is not None:
            sha = (self.single_file_record or {}).get("sha256", "")[:12]
            return (
                f"{self.single_file} (single file, sha256 {sha}…) on the architecture, tokenizer "
                f"and scheduler of {self.components_ref}"
            )
        vae = f" + {self.vae_ref} (vae)" if self.vae_ref else ""
        if self.components_ref is None or self.components_ref == self.denoiser_ref:
            return self.denoiser_ref + vae
        parts = "vae, text encoder, tokenizer, scheduler"
        return f"{self.denoiser_ref} ({self.subfolder}) + {self.components_ref} ({parts}){vae}"


def _plan(folders: tuple[str, ...], weights: tuple[str, ...], variant: str | None) -> FetchPlan:
    return FetchPlan(folders=folders, weights=weights, variant=variant)


def _open_root(ref: str, plan: FetchPlan, flag: str) -> Path:
    """A local folder or a hub snapshot holding what ``plan`` needs; ``flag`` names the
    option that takes a local copy, for the error message."""
    local = Path(ref).expanduser()
    if local.exists():
        if not local.is_dir():
            raise CheckpointError(f"{flag} {local}: expected a diffusers pipeline folder, not a file")
        try:
            select_files(snapshot_files(local), plan)
        except MissingFiles as exc:
            raise CheckpointError(f"{flag} {local}: {exc.folder}/: {exc.detail}") from None
        return local
    if not looks_like_repo_id(ref):
        raise CheckpointError(f"{flag} {local}: {input_path_problem(local) or 'no such file or directory'}")
    return resolve_repo(ref, plan)


def _holds_components(ref: str, components: tuple[str, ...] = PIPELINE_COMPONENTS) -> bool:
    """Whether ``ref`` (a local folder or hub id) is a complete pipeline (not only a denoiser)."""
    local = Path(ref).expanduser()
    if local.exists():
        return all((local / c).is_dir() for c in components)

    folders = {f.split("/", 1)[0] for f in repo_files(ref, None, None) if "/" in f}
    return all(c in folders for c in components)


def _open_vae_repo(ref: str) -> Path:
    """The folder of a one-model VAE repository (``config.json`` and its safetensors at the root)."""
    plan = FetchPlan(folders=(), root=_VAE_REPO_FILES)
    root = _open_root(ref, plan, "the fp16 VAE")
    missing = [n for n in _VAE_REPO_FILES if not (root / n).is_file()]
    if missing:
        raise CheckpointError(f"the fp16 VAE {ref}: no {', '.join(missing)} in {root}")
    return root


def resolve_pipeline_source(
    backbone: Backbone,
    model: str | os.PathLike[str] | None = None,
    components: str | os.PathLike[str] | None = None,
    *,
    variant: str | None = None,
    denoiser_weights: bool = True,
    with_components: bool = True,
) -> PipelineSource:
    """Find (and fetch, for hub ids) the folders of ``backbone``'s base pipeline.

    ``model`` (``--model``) replaces the registry's denoiser source: a complete pipeline
    (folder or hub id) then also provides the other components, a denoiser-only one
    (like PixArt-α 256) takes them from ``components`` (``--components``) or the
    registry's ``components_repo``. ``denoiser_weights=False`` fetches only the
    denoiser's config (its weights are replaced, e.g. by merged one-step weights);
    ``with_components=False`` skips the other components (``export --format merged``).
    Only the files needed are fetched, ``variant`` (``fp16``) preferred. A backbone with an
    ``fp16_vae_repo`` (SDXL) takes its VAE from there when ``variant`` is ``fp16`` (the
    components' own VAE is then neither fetched nor loaded).
    """
    sub = backbone.denoiser_subfolder
    if is_single_file_model(model):
        return _single_file_source(backbone, Path(str(model)).expanduser(), components, variant)
    if model is None and backbone.name == "tiny":
        if not tiny_pipeline_available():
            raise CheckpointError(
                f"the shipped tiny pipeline is missing or incomplete at {TINY_PIPELINE_DIR}; "
                "pass a tiny pipeline folder with --model DIR"
            )
        model = str(TINY_PIPELINE_DIR)
    den_ref = str(model) if model is not None else backbone.hub_id
    comp_ref: str | None = None
    if with_components:
        if components is not None:
            comp_ref = str(components)
        elif model is None:
            comp_ref = backbone.components_repo or backbone.hub_id
        elif backbone.components_repo is None or _holds_components(den_ref, backbone.components):
            comp_ref = den_ref
        else:
            comp_ref = backbone.components_repo
    den_weights = (sub,) if denoiser_weights else ()
    vae_ref = backbone.fp16_vae_repo if (variant == "fp16" and comp_ref is not None) else None
    weighted = tuple(c for c in backbone.weighted_components if not (vae_ref and c == "vae"))
    vae_root = _open_vae_repo(vae_ref) if vae_ref else None
    if comp_ref == den_ref:  # one repository: one plan, one snapshot
        plan = _plan((sub, *backbone.components), den_weights + weighted, variant)
        root = _open_root(den_ref, plan, "--model")
        return PipelineSource(root, den_ref, sub, root, den_ref, variant, vae_root, vae_ref)
    den_root = _open_root(den_ref, _plan((sub,), den_weights, variant), "--model")
    comp_root = None
    if comp_ref is not None:
        comp_plan = _plan(backbone.components, weighted, variant)
        comp_root = _open_root(comp_ref, comp_plan, "--components")
    return PipelineSource(den_root, den_ref, sub, comp_root, comp_ref, variant, vae_root, vae_ref)


def _single_file_source(
    backbone: Backbone, path: Path, components: str | os.PathLike[str] | None, variant: str | None
) -> PipelineSource:
    """``--model FILE``: the backbone's pipeline (or ``--components``) gives the configs,
    tokenizer and scheduler (no weights are fetched); the file gives every weight."""
    if not path.name.lower().endswith(SINGLE_FILE_SUFFIX):
        raise CheckpointError(
            f"--model {path}: expected an original-layout .safetensors single file, a pipeline folder "
            "or a hub id"
        )
    ref = str(components) if components is not None else backbone.components_repo or backbone.hub_id
    if components is None and backbone.name == "tiny":
        ref = str(TINY_PIPELINE_DIR)
    sub = backbone.denoiser_subfolder
    root = _open_root(ref, _plan((sub, *backbone.components), (), variant), "--components")
    record = file_fingerprint(path)
    return PipelineSource(root, ref, sub, root, ref, variant, single_file=path, single_file_record=record)


def open_base_denoiser(source: PipelineSource) -> TensorSource:
    """The base denoiser's tensors (lazy, diffusers names): the U-Net of a ``--model`` single
    file (mapped with the architecture's config), else the denoiser folder's weights."""
    if source.single_file is not None:
        config = json.loads((source.denoiser_root / source.subfolder / "config.json").read_text("utf-8"))
        return open_checkpoint(source.single_file, ldm_config=config)
    return open_checkpoint(source.denoiser_root, source.subfolder)


# ---- loading ------------------------------------------------------------------------------
@dataclass
class BasePipeline:
    """The loaded parts of a base pipeline (all in eval mode, gradients off)."""

    denoiser: nn.Module
    vae: nn.Module
    text_encoder: nn.Module
    tokenizer: Any
    scheduler: SchedulerMixin
    source: PipelineSource
    text_encoder_2: nn.Module | None = None  # SDXL's second text encoder and tokenizer
    tokenizer_2: Any = None
    force_zeros_for_empty_prompt: bool = False  # model_index.json's (SDXL: True)


@contextmanager
def _quiet() -> Iterator[None]:
    """No progress bars or warnings from diffusers/transformers while loading."""
    from diffusers.utils import logging as dlogging
    from transformers.utils import logging as tlogging

    bars = dlogging.is_progress_bar_enabled(), tlogging.is_progress_bar_enabled()
    dlogging.disable_progress_bar()
    tlogging.disable_progress_bar()
    levels = dlogging.get_verbosity(), tlogging.get_verbosity()
    dlogging.set_verbosity_error()
    tlogging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        dlogging.set_verbosity(levels[0])
        tlogging.set_verbosity(levels[1])
        if bars[0]:
            dlogging.enable_progress_bar()
        if bars[1]:
            tlogging.enable_progress_bar()


def _variant_kwargs(folder: Path, variant: str | None) -> dict[str, Any]:
    """``variant=`` for ``from_pretrained``: the variant of the weights actually present."""
    names = [p.name for p in folder.iterdir()] if folder.is_dir() else []
    _, found = folder_weights(names, variant)
    return {"variant": found} if found else {}


def _index_classes(root: Path) -> dict[str, str]:
    """``{component: class name}`` from ``model_index.json`` (empty when absent)."""
    index = root / "model_index.json"
    if not index.is_file():
        return {}
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}
    return {k: v[1] for k, v in data.items() if isinstance(v, list) and len(v) == 2 and v[1]}


def require_tokenizer_packages(folder: Path) -> None:
    """A T5 tokenizer shipped as ``spiece.model`` (no ``tokenizer.json``) is converted with
    the sentencepiece and protobuf packages; without them transformers fails with an
    unrelated message, so say which package is missing."""
    if (folder / "tokenizer.json").is_file() or not (folder / "spiece.model").is_file():
        return
    missing = [
        pkg for pkg, mod in (("sentencepiece", "sentencepiece"), ("protobuf", "google.protobuf"))
        if _module_missing(mod)
    ]  # fmt: skip
    if missing:
        raise BadInputError(
            f"the T5 tokenizer in {folder} needs the {' and '.join(missing)} package"
            f"{'s' if len(missing) > 1 else ''}: pip install {' '.join(missing)}"
        )


def _module_missing(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is None
    except (ImportError, ValueError):
        return True


def _load(what: str, root: Path, fn: Any) -> Any:
    try:
        with _quiet():
            return fn()
    except (OSError, ValueError, TypeError, KeyError, RuntimeError, AttributeError) as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{root}: cannot load its {what} ({msg[:300]})") from None


def load_denoiser(
    backbone: Backbone, source: PipelineSource, dtype: torch.dtype, weights: bool = True
) -> nn.Module:
    """The denoiser of ``source``: its weights, or (``weights=False``) built from its
    config only, for weights that replace them all (merged one-step weights)."""
    import diffusers

    cls = getattr(diffusers, backbone.denoiser_class)
    root, sub = source.denoiser_root, source.subfolder
    if weights:
        kwargs = _variant_kwargs(root / sub, source.variant)
        net = _load(
            f"{sub}/",
            root,
            lambda: cls.from_pretrained(
                str(root), subfolder=sub, torch_dtype=dtype, local_files_only=True, **kwargs
            ),
        )
    else:
        net = _load(
            f"{sub}/ config", root, lambda: cls.from_config(cls.load_config(str(root / sub))).to(dtype)
        )
    return net.eval().requires_grad_(False)


def _text_parts(
    root: Path,
    classes: dict[str, str],
    folders: tuple[str, str],
    names: tuple[str, str],
    dtype: torch.dtype,
    variant: str | None,
    *,
    weights: bool = True,
) -> tuple[nn.Module, Any]:
    """(text encoder, tokenizer) from ``folders`` of ``root``, by the classes ``model_index.json``
    names, else ``names``; ``weights=False`` builds the encoder from its config alone (its
    weights come from a ``--model`` single file)."""
    import transformers

    enc_folder, tok_folder = folders
    enc_cls = getattr(transformers, classes.get(enc_folder, names[0]), None) or getattr(
        transformers, names[0]
    )
    tok_cls = getattr(transformers, classes.get(tok_folder, names[1]), None) or getattr(
        transformers, names[1]
    )
    if not weights:
        encoder = _load(
            f"{enc_folder}/ config",
            root,
            lambda: enc_cls._from_config(enc_cls.config_class.from_pretrained(str(root / enc_folder))).to(
                dtype
            ),
        )
    else:
        encoder = _load(
            f"{enc_folder}/",
            root,
            lambda: enc_cls.from_pretrained(
                str(root), subfolder=enc_folder, torch_dtype=dtype, local_files_only=True,
                **_variant_kwargs(root / enc_folder, variant),
            ),
        )  # fmt: skip
    require_tokenizer_packages(root / tok_folder)
    tokenizer = _load(
        f"{tok_folder}/",
        root,
        lambda: tok_cls.from_pretrained(str(root), subfolder=tok_folder, local_files_only=True),
    )
    return encoder.eval().requires_grad_(False), tokenizer


def _index_flag(root: Path, key: str) -> bool:
    """A boolean of ``model_index.json`` (``False`` when absent)."""
    try:
        return bool(json.loads((root / "model_index.json").read_text(encoding="utf-8")).get(key, False))
    except (OSError, json.JSONDecodeError, AttributeError):
        return False


def load_base_pipeline(
    backbone: Backbone, source: PipelineSource, dtype: torch.dtype, *, denoiser_weights: bool = True
) -> BasePipeline:
    """Load every part of the base pipeline in ``dtype`` (the scheduler has no dtype)."""
    import diffusers

    if source.components_root is None:
        raise BadInputError("this command needs the whole base pipeline, not only its denoiser")
    root = source.components_root
    classes = _index_classes(root)
    vae_root, vae_sub = (source.vae_root, None) if source.vae_root is not None else (root, "vae")
    if source.single_file is not None:  # architectures only: the file gives the weights
        vae_cls = diffusers.AutoencoderKL
        vae = _load(
            "vae/ config", root, lambda: vae_cls.from_config(vae_cls.load_config(str(root / "vae"))).to(dtype)
        )
    else:
        vae = _load(
            "vae/" if vae_sub else "VAE",
            vae_root,
            lambda: diffusers.AutoencoderKL.from_pretrained(
                str(vae_root), subfolder=vae_sub, torch_dtype=dtype, local_files_only=True,
                **_variant_kwargs(vae_root / (vae_sub or ""), source.variant),
            ),
        )  # fmt: skip
    names = _TEXT_ENCODERS[backbone.text_encoder]
    text_encoder, tokenizer = _text_parts(
        root,
        classes,
        ("text_encoder", "tokenizer"),
        names,
        dtype,
        source.variant,
        weights=source.single_file is None,
    )
    second: tuple[nn.Module | None, Any] = (None, None)
    if "text_encoder_2" in backbone.components:
        second = _text_parts(
            root, classes, ("text_encoder_2", "tokenizer_2"), _SECOND_TEXT_ENCODER, dtype, source.variant,
            weights=source.single_file is None,
        )  # fmt: skip
    scheduler = _load("scheduler/", root, lambda: _scheduler(root))
    denoiser = load_denoiser(backbone, source, dtype, denoiser_weights and source.single_file is None)
    if source.single_file is not None:
        _load_single_file(backbone, source.single_file, denoiser, vae, text_encoder, second[0])
    for m in (vae, text_encoder):
        m.eval().requires_grad_(False)
    return BasePipeline(
        denoiser,
        vae,
        text_encoder,
        tokenizer,
        scheduler,
        source,
        text_encoder_2=second[0],
        tokenizer_2=second[1],
        force_zeros_for_empty_prompt=_index_flag(root, "force_zeros_for_empty_prompt"),
    )


def load_state_strict(model: nn.Module, source: Tensors, label: str) -> None:
    """Copy a full state dict (a mapping or a lazy ``TensorSource``) into ``model``.

    Names and shapes are checked before any tensor is read or copied; a mismatch raises
    :class:`MismatchError` naming the first missing/unexpected keys and shape mismatches.
    """
    expected = model.state_dict()
    diff = KeyDiff.between(expected, source)
    if diff:
        what = diff.describe("missing key(s)", "unexpected key(s)", "model", "file")
        raise MismatchError(f"{label} does not fit the base model: {what}")
    src = as_tensor_map(source)
    with torch.no_grad():
        for k, param in expected.items():
            tensor = src.get(k)
            require_finite(label, k, tensor)
            param.copy_(tensor.to(dtype=param.dtype))


def _load_single_file(
    backbone: Backbone,
    path: Path,
    unet: nn.Module,
    vae: nn.Module,
    text: nn.Module,
    text_2: nn.Module | None = None,
) -> None:
    """Read ``--model FILE`` against the architectures built from the backbone's configs and
    copy its weights in (strict: every tensor of the models, shapes checked first; SDXL's
    second text encoder too)."""
    from wadi_cli.io.sd_single_file_read import read_single_file

    models = {"unet": unet, "vae": vae, "text_encoder": text}
    if text_2 is not None:
        models["text_encoder_2"] = text_2
    shapes = {name: {k: tuple(v.shape) for k, v in m.state_dict().items()} for name, m in models.items()}
    states = read_single_file(path, backbone.name, shapes, dict(unet.config), dict(vae.config))
    for name, model in models.items():
        load_state_strict(model, states[name], f"--model {path} ({name})")


def _scheduler(root: Path) -> Any:
    """The pipeline's scheduler, by the class its config names (any diffusers scheduler
    with a discrete training schedule works: only ``alphas_cumprod`` and the config are
    used)."""
    import diffusers

    config = diffusers.DDPMScheduler.load_config(str(root), subfolder="scheduler")
    cls = getattr(diffusers, str(config.get("_class_name", "")), None)
    if cls is None or not hasattr(cls, "from_config"):
        cls = diffusers.DDPMScheduler
    return cls.from_config(config)


def latent_size(denoiser: nn.Module, default: int) -> int:
    """The latent side the denoiser was trained at: its config's ``sample_size`` (SD2.1:
    96 → 768 px; SD2.1-base and SD1.5: 64 → 512 px; PixArt-α 256: 32), else ``default``."""
    size = getattr(getattr(denoiser, "config", None), "sample_size", None)
    if isinstance(size, list | tuple):
        size = size[0]
    return int(size) if isinstance(size, int) and size > 0 else int(default)


def vae_scale_factor(vae: nn.Module) -> int:
    """Pixels per latent: 2^(number of VAE blocks − 1) (8 for SD and PixArt)."""
    blocks = getattr(getattr(vae, "config", None), "block_out_channels", None)
    return 2 ** (len(blocks) - 1) if blocks else 8
