"""The sampling options: one dataclass whose fields declare every option of sampling a
backbone (what ``wadi sample``, ``wadi eval`` and ``wadi swap --sample`` take), with the
help of each flag, and the one validator of their values.

Like :class:`wadi_cli.distill.config.DistillConfig`, the fields declare types, flags and help,
and the commands generate their flags from them (``wadi_cli/cli/sampling_flags.py``). The
defaults that depend on the backbone are data: the teacher's steps and guidance in
``wadi_cli/configs/sample/NAME.toml``, ᾱ_T in the backbone registry; the help of those
flags says so instead of quoting a number. A command that takes an option with another
meaning or default than the declared one says so in the field's ``commands`` entry.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field, fields
from typing import TYPE_CHECKING, Any

from wadi_cli.errors import BadInputError
from wadi_cli.pipeline.defaults import CONTROL_SCALE, REFINE_STRENGTH, STRENGTH

if TYPE_CHECKING:
    from wadi_cli.pipeline.settings import SampleConfig

#: The commands that take sampling options.
COMMANDS: tuple[str, ...] = ("sample", "eval", "swap")
_ALL: Mapping[str, Mapping[str, Any]] = {c: {} for c in COMMANDS}


def option(
    help: str,
    *,
    default: Any = MISSING,
    short: str | None = None,
    commands: Mapping[str, Mapping[str, Any]] = _ALL,
) -> Any:
    """A :class:`SamplingOptions` field and its command-line flag.

    ``help`` is the flag's help; ``short`` a one-letter alias. ``commands`` names the
    commands that take the flag, each with what it changes for that command
    (``{"default": ..., "help": ...}``: the command's own default or meaning).
    """
    return field(default=default, metadata={"help": help, "short": short, "commands": dict(commands)})


_RECIPE = "the backbone's sampling recipe, see `wadi info -b NAME`"
#: The downstream flags ``wadi sample`` and ``wadi eval`` share (eval scores what they make).
_DOWNSTREAM: Mapping[str, Mapping[str, Any]] = {"sample": {}, "eval": {}}


@dataclass(frozen=True, kw_only=True)
class SamplingOptions:
    """Every option of sampling a backbone: what to load (``backbone``, ``weights``,
    ``model``, ``components``), how (``teacher`` / ``base``, ``steps``, ``cfg``,
    ``alpha_bar_T``), how many and where (``num_images``, ``batch_size``, ``seed``,
    ``device``, ``dtype``, ``compile``), and the downstream uses (``init_image`` /
    ``strength``, ``height`` / ``width``, ``upscale`` / ``refine_strength``).
    ``None`` means "the backbone's" or "the command's" default.
    Validated when built (:meth:`__post_init__`)."""

    backbone: str = option(
        "Base model: sd15, sd21, pixart or tiny.",
        default="sd21",
        short="-b",
        commands={"sample": {}, "eval": {"default": "tiny"}, "swap": {"default": "tiny"}},
    )
    weights: str | None = option(
        "One-step weights: a merged release file, a LoRaD adapter, an exported diffusers folder, or a "
        "`wadi distill` run folder (its latest student, EMA when kept). Default: the backbone's "
        "(the authors' release; tiny: the student shipped with wadi).",
        default=None,
        short="-w",
        commands={"sample": {}, "eval": {}},
    )
    base: bool = option(
        "One step from the undistilled base model instead of the default weights.",
        default=False,
        commands={"sample": {}, "eval": {}},
    )
    model: str | None = option(
        "Base pipeline: a diffusers folder or hub id, or one holding only the denoiser, or an "
        "original-layout .safetensors single file of a sd15/sd21 fine-tune (A1111/ComfyUI) whose "
        "weights replace the backbone's (default: the backbone's, see `wadi info -b NAME`).",
        default=None,
    )
    components: str | None = option(
        "Where the VAE, text encoder, tokenizer and scheduler come from: folder or hub id "
        "(default: the --model pipeline, else the backbone's, see `wadi info -b NAME`).",
        default=None,
        commands={"sample": {}},
    )
    teacher: bool = option(
        "Sample the base model with a multi-step DDIM scheduler (the teacher).",
        default=False,
        commands={"sample": {}, "eval": {}},
    )
    steps: int | None = option(f"Teacher DDIM steps (default: {_RECIPE}).", default=None)
    cfg: float | None = option(f"Teacher guidance scale (default: {_RECIPE}).", default=None)
    alpha_bar_T: float | None = option(
        "One-step ᾱ_T (default: the value the weights record, else the backbone's, see `wadi info -b NAME`).",
        default=None,
        commands={"sample": {}, "eval": {}},
    )
    seed: int = option("Random seed: image i uses seed + i.", default=0)
    num_images: int | None = option(
        "How many images.",
        default=None,
        short="-n",
        commands={
            "sample": {"default": 1, "help": "Images per prompt."},
            "eval": {"help": "Images (= captions) to score (default: tiny 256; all captions)."},
            "swap": {"default": 500, "help": "Images per variant for the tiny scores."},
        },
    )
    batch_size: int | None = option(
        "Images per forward pass.",
        default=None,
        commands={
            "sample": {"default": 4},
            "eval": {"help": "Images per forward pass (default: tiny 32, 8)."},
        },
    )
    device: str = option("Torch device: auto, cpu, cuda, cuda:1, mps.", default="auto")
    dtype: str = option(
        "auto (fp32 on CPU, fp16/bf16 on GPU), fp32, fp16, bf16.",
        default="auto",
        commands={"sample": {}, "eval": {}},
    )
    compile: bool = option(
        "torch.compile the denoiser (pays off on GPUs).", default=False, commands={"sample": {}}
    )
    init_image: str | None = option(
        "Image-to-image (SDEdit) from IMG, or from a folder of images paired with the prompts in "
        "sorted order (each center-cropped to the output's aspect ratio and resized). One step: "
        "t = round(s·999), x_t = sqrt(ᾱ_t)·x0_init + sqrt(1−ᾱ_t)·ε, x0 = (x_t − sqrt(1−ᾱ_t)·ε̂(x_t, t, c)) "
        "/ sqrt(ᾱ_t) (v-prediction: x0 = sqrt(ᾱ_t)·x_t − sqrt(1−ᾱ_t)·v̂); with --teacher the last "
        "int(steps·s) DDIM steps (as diffusers' img2img).",
        default=None,
        commands=_DOWNSTREAM,
    )
    strength: float | None = option(
        "How much of the init image is replaced, s in (0, 1] (1: pure noise at t = 999; "
        f"default {STRENGTH}).",
        default=None,
        commands=_DOWNSTREAM,
    )
    height: int | None = option(
        "Image height in pixels: a multiple of the VAE factor × the denoiser's (sd: 64, pixart: 16, "
        "tiny: 8); default the model's own.",
        default=None,
        commands=_DOWNSTREAM,
    )
    width: int | None = option(
        "Image width in pixels (as --height).",
        default=None,
        commands=_DOWNSTREAM,
    )
    upscale: int | None = option(
        "High resolution in two stages: sample at the native size, enlarge K× in pixel space (bicubic; "
        "the VAE re-encodes it, so the refining step starts from a latent the denoiser knows), then "
        "one image-to-image step at the K× size with --refine-strength.",
        default=None,
        commands={"sample": {}},
    )
    controlnet: str | None = option(
        "ControlNet (diffusers ControlNetModel: folder or hub id, e.g. lllyasviel/control_v11p_sd15_canny) "
        "for sd15/sd21, or `tiny` (shipped for -b tiny; control: the shape's silhouette, white on black): "
        "its residuals join every denoiser call (the student's one step at t = 999, each teacher step). "
        "Needs --control-image.",
        default=None,
        commands=_DOWNSTREAM,
    )
    control_image: str | None = option(
        "Control image IMG, or a folder of them paired with the prompts in sorted order (fitted to "
        "the output size like --init-image).",
        default=None,
        commands=_DOWNSTREAM,
    )
    control_scale: float | None = option(
        f"ControlNet conditioning scale (default {CONTROL_SCALE}).",
        default=None,
        commands=_DOWNSTREAM,
    )
    refine_strength: float | None = option(
        f"Strength of --upscale's refining image-to-image step, in (0, 1] (default {REFINE_STRENGTH}).",
        default=None,
        commands={"sample": {}},
    )

    def __post_init__(self) -> None:
        """The one validator of sampling options: value ranges (through
        :class:`~wadi_cli.pipeline.settings.SampleConfig`), what is sampled
        (:func:`~wadi_cli.pipeline.loaded.check_weights_or_teacher`), and the teacher's
        settings only with the teacher. (The CLI builds its flags from this module without
        torch; the checks import it when options are built.)"""
        from wadi_cli.pipeline.loaded import check_weights_or_teacher

        self.sample_config()
        check_weights_or_teacher(self.teacher, self.weights, self.base)
        if not self.teacher and (self.steps is not None or self.cfg is not None):
            raise BadInputError("--steps and --cfg apply to --teacher only")
        if self.num_images is not None and self.num_images < 1:
            raise BadInputError(f"--num-images must be at least 1, got {self.num_images}")
        if self.strength is not None and self.init_image is None:
            raise BadInputError("--strength applies to --init-image only")
        if self.refine_strength is not None and self.upscale is None:
            raise BadInputError("--refine-strength applies to --upscale only")
        if (self.controlnet is None) != (self.control_image is None):
            raise BadInputError("--controlnet and --control-image go together: give both or neither")
        if self.control_scale is not None and self.controlnet is None:
            raise BadInputError("--control-scale applies to --controlnet only")
        if self.controlnet is not None and self.upscale is not None:
            raise BadInputError("--upscale with --controlnet is not supported: drop one of them")
        if self.upscale is not None and self.init_image is not None:
            raise BadInputError("--upscale refines a generated image: drop --init-image (or --upscale)")

    def sample_config(self, batch_size: int = 4) -> SampleConfig:
        """The generation settings (``batch_size``: the command's default when these options
        name none). Its ``alpha_bar_T`` is ``--alpha-bar-t`` as given; the pipeline loaded
        with the same value decides what ``None`` means."""
        from wadi_cli.pipeline.settings import SampleConfig

        return SampleConfig(
            teacher=self.teacher,
            steps=self.steps,
            cfg=self.cfg,
            alpha_bar_T=self.alpha_bar_T,
            seed=self.seed,
            batch_size=batch_size if self.batch_size is None else self.batch_size,
            strength=self.strength,
            height=self.height,
            width=self.width,
            upscale=self.upscale,
            refine_strength=self.refine_strength,
        )


def command_fields(command: str) -> list[str]:
    """The :class:`SamplingOptions` fields ``command`` takes as flags, in declaration order."""
    return [f.name for f in fields(SamplingOptions) if command in f.metadata["commands"]]


def command_default(command: str, name: str) -> Any:
    """The default of field ``name`` in ``command`` (its own, else the declared one)."""
    f = _FIELDS[name]
    return f.metadata["commands"][command].get("default", f.default)


def command_help(command: str, name: str) -> str:
    """The help of field ``name``'s flag in ``command`` (its own, else the declared one)."""
    f = _FIELDS[name]
    return str(f.metadata["commands"][command].get("help", f.metadata["help"]))


_FIELDS = {f.name: f for f in fields(SamplingOptions)}
