"""Backbone registry: what wadi knows about each supported base model.

Each :class:`Backbone` holds its hub id, the architecture config shipped inside the
package (so the network skeleton can be built, and adapter sizes counted, without a
download), the LoRaD target rules per role (WaDi §2) with the ranks of its distillation
recipe (``wadi_cli/configs/distill/NAME.toml``), resolution, text encoder, and the
one-step constant ``ᾱ_T`` (WaDi §3).

Importing it needs neither torch nor diffusers (``wadi info`` answers at once): adapter
plans come from the shape tables of :mod:`wadi_cli.backbones.skeletons`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from wadi_cli.backbones.recipes import RECIPES_DIR, backbone_recipe
from wadi_cli.errors import BadInputError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from wadi_cli.lorad.config import LoRaDConfig

#: ᾱ_T used to turn the student's ε-prediction at t = T−1 into x0 (WaDi §3). The
#: authors' release uses this one constant for every backbone (SD's scaled-linear
#: schedule gives ᾱ_999 ≈ 0.00466); the released weights were trained with it, so it is
#: the default everywhere. Named once, here.
ALPHA_BAR_T: float = 0.0047

_PACKAGE_DIR = Path(__file__).resolve().parent.parent
CONFIGS_DIR: Path = _PACKAGE_DIR / "configs"


def scaled_linear_alpha_bar_last(
    beta_start: float = 0.00085, beta_end: float = 0.012, steps: int = 1000
) -> float:
    """ᾱ at the last training step of a "scaled_linear" schedule (SD, SDXL):
    ``β_t = (√β_start + t/(steps−1) · (√β_end − √β_start))²`` and ``ᾱ_T = Π_t (1 − β_t)``,
    in float64 without torch (``wadi info`` imports none). SD1.5/2.1 and SDXL share
    0.00085–0.012 over 1000 steps: ᾱ_999 ≈ 0.004661."""
    lo, hi = math.sqrt(beta_start), math.sqrt(beta_end)
    prod = 1.0
    for t in range(steps):
        prod *= 1.0 - (lo + (hi - lo) * t / (steps - 1)) ** 2
    return prod


#: Where the tiny model's diffusers pipeline folder is shipped (see ``wadi_cli.tiny``).
TINY_PIPELINE_DIR: Path = _PACKAGE_DIR / "assets" / "tiny" / "pipeline"

#: Pipeline folders besides the denoiser that sampling and training load; the first two
#: hold weights, the others only configs and vocabularies.
PIPELINE_COMPONENTS: tuple[str, ...] = ("vae", "text_encoder", "tokenizer", "scheduler")
WEIGHTED_COMPONENTS: tuple[str, ...] = ("vae", "text_encoder")

_UNET_ROOTS = ("down_blocks", "mid_block", "up_blocks")
_FAKE_EXCLUDES = ("proj_in", "proj_out", "time_emb_proj")


def adapter_params(kind: str, rank: int, out_features: int, in_features: int) -> int:
    """Trainable parameters of one adapted Linear: LoRaD ``r(m + n/2)``, LoRA ``r(m + n)``,
    DoRA ``r(m + n) + m`` (the magnitude vector), DoRA with a frozen norm ``r(m + n)``,
    orthogonal ``n²`` (torch's square ``original``, whatever the rank)."""
    if kind == "lorad":
        return rank * (out_features + in_features // 2)
    if kind == "orthogonal":
        return in_features * in_features
    return rank * (out_features + in_features) + (out_features if kind == "dora" else 0)


@dataclass(frozen=True)
class TargetRule:
    """Which ``nn.Linear`` modules LoRaD adapts, as data.

    A module path matches when its first component is in ``include_roots`` (``None``:
    any), its first component is not in ``exclude_roots``, and it contains none of
    ``exclude_substrings``. Only ``nn.Linear`` modules are ever selected (never convs).
    """

    include_roots: tuple[str, ...] | None = None
    exclude_roots: tuple[str, ...] = ()
    exclude_substrings: tuple[str, ...] = ()

    def matches(self, name: str) -> bool:
        """Whether the module path ``name`` is selected by this rule."""
        root = name.split(".", 1)[0]
        if self.include_roots is not None and root not in self.include_roots:
            return False
        if root in self.exclude_roots:
            return False
        return not any(s in name for s in self.exclude_substrings)


def linear_names(model: nn.Module) -> list[str]:
    """Paths of the plain Linears of ``model`` (the base layers inside LoRaD wrappers are
    reported under the wrapper's path, so an injected model gives the same names)."""
    from torch import nn  # start-up time: the registry imports no torch (`wadi info`)

    from wadi_cli.lorad.layer import LoRaDLinear

    modules = dict(model.named_modules())
    wrapped = {f"{n}.base_layer" for n, m in modules.items() if isinstance(m, LoRaDLinear)}
    out = []
    for name, module in modules.items():
        is_linear = isinstance(module, nn.Linear) and name not in wrapped
        if is_linear or isinstance(module, LoRaDLinear):
            out.append(name)
    return out


# (backbone name, config path) -> ({linear path: (out, in)}, total parameter count)
_SKELETON_CACHE: dict[tuple[str, str], tuple[dict[str, tuple[int, int]], int]] = {}


@dataclass(frozen=True)
class Backbone:
    """A supported base model. Build one with :func:`get_backbone`."""

    name: str
    family: str  # "unet" | "dit"
    hub_id: str
    denoiser_subfolder: str  # "unet" | "transformer"
    denoiser_class: str  # diffusers class name
    config_path: Path  # shipped architecture config of the denoiser
    resolution: int  # image side in pixels
    latent_size: int  # latent side
    latent_channels: int
    text_encoder: str  # "clip" | "t5"
    text_max_length: int
    student_rank: int  # from the backbone's recipe (configs/distill/NAME.toml)
    fake_rank: int  # likewise
    student_targets: TargetRule
    fake_targets: TargetRule
    alpha_bar_T: float = ALPHA_BAR_T
    prediction_type: str = "epsilon"
    learned_sigma: bool = False  # PixArt outputs 8 channels: the first 4 are ε
    release_repo: str | None = None
    release_file: str | None = None
    # Where the VAE, text encoder, tokenizer and scheduler come from when ``hub_id`` holds
    # only the denoiser (PixArt-α 256's repo holds only transformer/); None: ``hub_id``.
    components_repo: str | None = None
    # Pipeline folders beyond PIPELINE_COMPONENTS (SDXL: its second text encoder and tokenizer)
    # and the weighted ones among them.
    extra_components: tuple[str, ...] = ()
    extra_weighted: tuple[str, ...] = ()
    # A VAE repository (a diffusers model folder at its root) that replaces the pipeline's
    # VAE when the frozen weights run in float16 (SDXL's VAE overflows in fp16); None: none.
    fp16_vae_repo: str | None = None
    # Shown by `wadi info` beside the recipe ("" for the paper's recipes).
    recipe_note: str = ""
    # Other base models of the same family, as (hub id, what it is): shown by `wadi info`.
    alternatives: tuple[tuple[str, str], ...] = ()
    default_dtype_name: str = "float16"  # dtype of frozen weights on a GPU (see default_dtype)
    mixed_precision: str = "fp16"  # "fp16" | "bf16" | "no"
    # Intra-op threads on CPU (None: torch's choice). The tiny model's ops are too small
    # to gain from threads, and with 2 OpenMP threads on a machine whose other core is
    # busy, every op waits at a barrier: 0.44 s became 17 s for one 25-step image.
    cpu_threads: int | None = None
    description: str = field(default="", compare=False)

    # ---- names and config -----------------------------------------------------------
    @property
    def default_dtype(self) -> torch.dtype:
        """The torch dtype of the frozen weights on a GPU (imports torch on first use)."""
        import torch  # start-up time: the registry imports no torch (`wadi info`)

        return getattr(torch, self.default_dtype_name)

    @property
    def components(self) -> tuple[str, ...]:
        """Pipeline folders besides the denoiser that sampling and training load."""
        return PIPELINE_COMPONENTS + self.extra_components

    @property
    def weighted_components(self) -> tuple[str, ...]:
        """Those of :attr:`components` that hold weights."""
        return WEIGHTED_COMPONENTS + self.extra_weighted

    def model_id(self, override: str | None = None) -> str:
        """The base model to load: ``override`` (``--model PATH_OR_ID``) or the hub id."""
        return override if override else self.hub_id

    def sources(self) -> dict[str, Any]:
        """Where the base model's parts come from by default, and the flag that changes
        each: ``{"denoiser": {"repo", "flag"}, "components": {...}, "alternatives": [...]}``."""
        subfolder = self.denoiser_subfolder
        return {
            "denoiser": {"repo": self.hub_id, "folder": subfolder, "flag": "--model"},
            "components": {
                "repo": self.components_repo or self.hub_id,
                "folders": list(self.components),
                "flag": "--components",
            },
            "alternatives": [{"repo": h, "what": w, "flag": f"--model {h}"} for h, w in self.alternatives],
        }

    def denoiser_config(self) -> dict[str, Any]:
        """The shipped denoiser config (diffusers ``config.json``)."""
        if not self.config_path.is_file():
            raise BadInputError(
                f"backbone {self.name!r}: its architecture config {self.config_path} is not there "
                "(the package install is incomplete)"
            )
        try:
            return json.loads(self.config_path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise BadInputError(f"backbone {self.name!r}: cannot read {self.config_path}: {exc}") from None

    def build_denoiser(
        self, device: str | torch.device = "meta", dtype: torch.dtype | None = None
    ) -> nn.Module:
        """Build the U-Net / transformer from the shipped config, without any download.

        ``device="meta"`` gives a weightless skeleton (instant; for counting and target
        discovery); ``"cpu"`` gives randomly initialised weights to load a state dict into.
        """
        import diffusers  # start-up time: the registry imports neither torch nor diffusers
        import torch

        cls = getattr(diffusers, self.denoiser_class)
        config = self.denoiser_config()
        with torch.device(device):
            model = cls.from_config(config)
        if dtype is not None:
            model = model.to(dtype)
        return model.eval()

    def _skeleton(self) -> tuple[dict[str, tuple[int, int]], int]:
        key = (self.name, str(self.config_path))
        if key not in _SKELETON_CACHE:
            # imported here, not at the top: `python -m wadi_cli.backbones.skeletons` runs it as a script
            from wadi_cli.backbones.skeletons import skeleton

            _SKELETON_CACHE[key] = skeleton(self)
        return _SKELETON_CACHE[key]

    # ---- adapter targets and sizes --------------------------------------------------
    def rule(self, role: str) -> TargetRule:
        """The target rule of ``role`` (``"student"`` or ``"fake"``)."""
        if role == "student":
            return self.student_targets
        if role == "fake":
            return self.fake_targets
        from wadi_cli.lorad.config import ROLES  # start-up time: lorad imports torch

        raise BadInputError(f"unknown LoRaD role {role!r}; expected one of {', '.join(ROLES)}")

    @property
    def recipe_path(self) -> Path:
        """The distillation recipe of this backbone (every default of ``wadi distill -b NAME``)."""
        return RECIPES_DIR / f"{self.name}.toml"

    def default_rank(self, role: str) -> int:
        """The recipe's rank for ``role`` on this backbone."""
        self.rule(role)
        return self.student_rank if role == "student" else self.fake_rank

    def target_modules(self, model: nn.Module | None, role: str) -> list[str]:
        """Module paths LoRaD adapts for ``role`` (WaDi §2), in module order. With
        ``model=None`` they are read from the shipped config's skeleton."""
        rule = self.rule(role)
        names = list(self._skeleton()[0]) if model is None else linear_names(model)
        return [n for n in names if rule.matches(n)]

    def lorad_config(self, role: str, rank: int | None = None, model: str | None = None) -> LoRaDConfig:
        """The :class:`LoRaDConfig` for ``role`` on this backbone (targets from the shipped
        architecture, rank defaulting to the recipe's, base model = ``model_id(model)``)."""
        from wadi_cli.lorad.config import LoRaDConfig  # start-up time: lorad imports torch

        return LoRaDConfig(
            rank=self.default_rank(role) if rank is None else rank,
            role=role,
            targets=tuple(self.target_modules(None, role)),
            backbone=self.name,
            base_model=self.model_id(model),
        )

    def adapter_plan(
        self, rank: int | None = None, fake_rank: int | None = None, adapter: str = "lorad"
    ) -> dict[str, Any]:
        """Layers and trainable parameters per role, summed over the targets of the shipped
        architecture: the student's of kind ``adapter`` (:func:`adapter_params`; LoRaD's
        ``r · (out + in/2)`` by default; ``full``: every weight), the fake score's LoRaD.
        Ranks default to the recipe's; ``recipe`` holds the recipe file and its values
        (every default of ``wadi distill -b NAME``)."""
        shapes, base_params = self._skeleton()
        plan: dict[str, Any] = {
            "backbone": self.name,
            "hub_id": self.hub_id,
            "sources": self.sources(),
            "denoiser": self.denoiser_class,
            "base_params": base_params,
        }
        for role, r in (("student", rank), ("fake", fake_rank)):
            r = self.default_rank(role) if r is None else r
            if isinstance(r, bool) or not isinstance(r, int) or r < 1:
                raise BadInputError(f"{role} rank must be a positive integer, got {r!r}")
            targets = self.target_modules(None, role)
            odd = [t for t in targets if shapes[t][1] % 2]
            if odd:
                raise BadInputError(f"{self.name}: targets with odd in_features: {', '.join(odd[:5])}")
            kind = adapter if role == "student" else "lorad"
            if kind == "full":  # every weight of the denoiser
                entry: dict[str, Any] = {"rank": None, "layers": len(shapes), "trainable_params": base_params}
            else:
                trainable = sum(adapter_params(kind, r, *shapes[t]) for t in targets)
                entry = {"rank": None if kind == "orthogonal" else r, "layers": len(targets)}
                entry["trainable_params"] = trainable
            plan[role] = entry if adapter == "lorad" else {**entry, "adapter": kind}
        plan.update(
            alpha_bar_T=self.alpha_bar_T,
            resolution=self.resolution,
            latent_size=self.latent_size,
            text_encoder=self.text_encoder,
            text_max_length=self.text_max_length,
            prediction_type=self.prediction_type,
            mixed_precision=self.mixed_precision,
            fp16_vae=self.fp16_vae_repo,
            recipe={
                "file": str(self.recipe_path),
                "values": backbone_recipe(self.name),
                "note": self.recipe_note,
            },
        )
        return plan


def _tiny_text_max_length() -> int:
    """The tiny tokenizer's ``model_max_length`` (from the shipped pipeline, else from the
    architecture module that defines it)."""
    cfg = TINY_PIPELINE_DIR / "tokenizer" / "tokenizer_config.json"
    if cfg.is_file():
        try:
            value = json.loads(cfg.read_text()).get("model_max_length")
            if isinstance(value, int):
                return value
        except (OSError, json.JSONDecodeError):
            pass
    try:
        from wadi_cli.tiny.arch import MAX_TOKENS

        return int(MAX_TOKENS)
    except Exception:  # noqa: BLE001 - the tiny module is optional at import time
        return 77


_SD_STUDENT = TargetRule(include_roots=_UNET_ROOTS)
_SD_FAKE = TargetRule(include_roots=_UNET_ROOTS, exclude_substrings=_FAKE_EXCLUDES)


def _recipe_ranks(name: str) -> dict[str, int]:
    """Student and fake-score ranks of backbone ``name``, from its recipe file."""
    recipe = backbone_recipe(name)
    return {"student_rank": int(recipe["rank"]), "fake_rank": int(recipe["fake_rank"])}


def _make_registry() -> dict[str, Backbone]:
    sd_common: dict[str, Any] = dict(
        family="unet",
        denoiser_subfolder="unet",
        denoiser_class="UNet2DConditionModel",
        resolution=512,
        latent_size=64,
        latent_channels=4,
        text_encoder="clip",
        text_max_length=77,
        student_targets=_SD_STUDENT,
        fake_targets=_SD_FAKE,
        release_repo="gudaochangsheng/WaDi",
        default_dtype_name="float16",
        mixed_precision="fp16",
    )
    entries = [
        Backbone(
            name="sd15",
            hub_id="stable-diffusion-v1-5/stable-diffusion-v1-5",
            config_path=CONFIGS_DIR / "sd15" / "unet" / "config.json",
            release_file="rotated_unet-sdv1-5.safetensors",
            **_recipe_ranks("sd15"),
            description="Stable Diffusion 1.5 (512 px, CLIP ViT-L/14, ε-prediction)",
            **sd_common,
        ),
        Backbone(
            name="sd21",
            hub_id="stabilityai/stable-diffusion-2-1-base",
            config_path=CONFIGS_DIR / "sd21" / "unet" / "config.json",
            release_file="rotated_unet-sdv2-1.safetensors",
            **_recipe_ranks("sd21"),
            alternatives=(
                (
                    "stabilityai/stable-diffusion-2-1",
                    "SD2.1 at 768 px, v-prediction (resolution and prediction type are read from its config)",
                ),
            ),
            description="Stable Diffusion 2.1-base (512 px, OpenCLIP ViT-H/14, ε-prediction)",
            **sd_common,
        ),
        Backbone(
            name="pixart",
            family="dit",
            hub_id="PixArt-alpha/PixArt-XL-2-256x256",
            denoiser_subfolder="transformer",
            denoiser_class="PixArtTransformer2DModel",
            config_path=CONFIGS_DIR / "pixart" / "transformer" / "config.json",
            resolution=256,
            latent_size=32,
            latent_channels=4,
            text_encoder="t5",
            text_max_length=120,
            **_recipe_ranks("pixart"),
            student_targets=TargetRule(exclude_roots=("adaln_single",)),
            fake_targets=TargetRule(include_roots=("transformer_blocks",), exclude_substrings=_FAKE_EXCLUDES),
            learned_sigma=True,
            release_repo="gudaochangsheng/WaDi",
            release_file="rotated_transformer.safetensors",
            # the 256 px repo holds only transformer/; the 512 px repo is the PixArt-α
            # pipeline with the same T5-XXL, VAE, tokenizer and training schedule
            components_repo="PixArt-alpha/PixArt-XL-2-512x512",
            default_dtype_name="bfloat16",
            mixed_precision="bf16",
            description="PixArt-α 256 px DiT (T5-XXL, ε-prediction, learned variance)",
        ),
        Backbone(
            name="sdxl",
            hub_id="stabilityai/stable-diffusion-xl-base-1.0",
            config_path=CONFIGS_DIR / "sdxl" / "unet" / "config.json",
            extra_components=("text_encoder_2", "tokenizer_2"),
            extra_weighted=("text_encoder_2",),
            # SDXL's own scheduler: scaled_linear 0.00085-0.012 over 1000 steps, as SD's
            alpha_bar_T=scaled_linear_alpha_bar_last(0.00085, 0.012, 1000),
            # the SDXL VAE's activations overflow fp16 (NaN images); this fine-tune keeps
            # its outputs and scales its inner activations down (its model card)
            fp16_vae_repo="madebyollin/sdxl-vae-fp16-fix",
            **_recipe_ranks("sdxl"),
            recipe_note=(
                "not validated at full scale: the paper's SD recipe with the SDXL distillers' "
                "teacher CFG and timesteps (wadi_cli/configs/distill/sdxl.toml); no release exists"
            ),
            description="Stable Diffusion XL base 1.0 (1024 px, CLIP ViT-L + OpenCLIP bigG, ε-prediction)",
            **{
                **sd_common,
                "resolution": 1024,
                "latent_size": 128,
                "text_encoder": "clip-l+clip-g",
                "release_repo": None,  # no one-step SDXL release: `wadi sample -b sdxl` needs -w
            },
        ),
        Backbone(
            name="tiny",
            family="unet",
            hub_id=str(TINY_PIPELINE_DIR),
            denoiser_subfolder="unet",
            denoiser_class="UNet2DConditionModel",
            config_path=TINY_PIPELINE_DIR / "unet" / "config.json",
            resolution=32,
            latent_size=8,
            latent_channels=4,
            text_encoder="clip",
            text_max_length=_tiny_text_max_length(),
            **_recipe_ranks("tiny"),
            student_targets=_SD_STUDENT,
            fake_targets=_SD_FAKE,
            default_dtype_name="float32",
            mixed_precision="no",
            cpu_threads=1,
            description="tiny SD-like model shipped with wadi (32 px, CPU-friendly; for tests and demos)",
        ),
    ]
    return {b.name: b for b in entries}


#: Every supported backbone by name.
BACKBONES: dict[str, Backbone] = _make_registry()


def get_backbone(name: str) -> Backbone:
    """The registry entry ``name``; :class:`BadInputError` listing valid names otherwise."""
    key = str(name).strip().lower()
    if key not in BACKBONES:
        raise BadInputError(f"unknown backbone {name!r}; choose one of: {', '.join(BACKBONES)}")
    return BACKBONES[key]
