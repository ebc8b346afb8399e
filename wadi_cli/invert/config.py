"""The relation-inversion config (``wadi invert``): one dataclass whose fields declare every
knob (type, help, flag), and the resolution of a run's values.

Config flows one way, as for ``wadi finetune``: the backbone's recipe
``wadi_cli/configs/invert/NAME.toml`` → a YAML/TOML ``--config`` file → command-line flags
(the file reading and type checks are :mod:`wadi_cli.distill.config`'s). The recipe files
are the only place defaults live; the ReVersion numbers in them name their source.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from wadi_cli.backbones import get_backbone
from wadi_cli.backbones.recipes import shipped_recipe
from wadi_cli.distill.config import (
    LR_SCHEDULES,
    MIXED_PRECISION,
    OPTIMIZERS,
    Schema,
    coerce,
    flag_name,
    knob,
    last_set,
    read_config_file,
)
from wadi_cli.errors import BadInputError

#: Where the shipped inversion recipes live: one file per backbone.
INVERT_RECIPES_DIR: Path = Path(__file__).resolve().parent.parent / "configs" / "invert"
DEFAULT_BACKBONE = "tiny"


@dataclass(kw_only=True)
class InvertConfig:
    """Every knob of a relation inversion (ReVersion, Huang et al., SIGGRAPH Asia 2024): one new
    token's input embedding learned on exemplar images with the base model frozen, by the
    denoising loss plus the steering loss, timesteps drawn by relation-focal importance
    sampling. Values come from the backbone's recipe (:func:`resolve_invert_config`)."""

    backbone: str = knob("Base model: sd15, sd21 or tiny (pixart: refused, see docs/invert.md).", short="-b")
    model: str | None = knob(
        "Base pipeline folder or hub id, or an original-layout .safetensors single file of a "
        "sd15/sd21 fine-tune (default: the backbone's).",
        default=None,
    )
    components: str | None = knob(
        "VAE / text encoder / tokenizer / scheduler source, folder or hub id (default: the "
        "--model pipeline, else the backbone's).",
        default=None,
    )
    # data
    images: str | None = knob(
        "Folder of exemplar images, each showing the relation (required).", default=None
    )
    captions: str | None = knob(
        "JSON file {image file name: caption or [captions]}, each caption holding the token (or "
        'ReVersion\'s \'{}\' placeholder), e.g. `{"0.png": "a red circle <R>"}` '
        "(default: IMAGES/captions.json, else ReVersion's IMAGES/text.json).",
        default=None,
    )
    token: str = knob("The new token, e.g. `<R>` (must be new to the tokenizer).")
    init_word: str = knob("Word whose embedding starts the token (one token of the vocabulary).")
    # the ReVersion objective
    steer_weight: float = knob("Weight λ of the steering loss (0 turns it off).")
    temperature: float = knob("Temperature τ of the steering loss.")
    num_positives: int = knob("Positive words sampled each step for the steering loss.")
    positive_words: str = knob("Comma-separated relation (preposition) words the token is pulled toward.")
    stop_words: str = knob(
        "Comma-separated words of the captions that are not negatives (besides the positive words)."
    )
    importance_alpha: float = knob(
        "Relation-focal sampling: p(t) ∝ 1 − α·cos(π t / T); 0 = uniform timesteps."
    )
    # optimisation
    lr: float = knob("Learning rate.")
    adam_beta1: float = knob("AdamW β1.")
    adam_beta2: float = knob("AdamW β2.")
    adam_eps: float = knob("AdamW ε.")
    weight_decay: float = knob("AdamW weight decay.")
    max_grad_norm: float = knob("Gradient clipping norm (inf: none).")
    warmup_steps: int = knob("Linear lr warm-up steps; 0 = none.")
    lr_schedule: str = knob("After warm-up: constant or cosine (to 0 at --max-steps).")
    optimizer: str = knob("adamw or adamw8bit (bitsandbytes).")
    # run
    batch_size: int = knob("Exemplar images per micro-batch and process.")
    grad_accum: int = knob("Micro-batches accumulated into each optimizer step.")
    max_steps: int = knob("Stop after this many steps (total).")
    seed: int = knob("Seed of noise, timesteps, captions, positive words and data order.")
    checkpoint_every: int = knob("Checkpoint every N steps.")
    keep_last: int = knob("Keep only the newest K checkpoints.")
    log_every: int = knob("Write metrics.csv every N steps.")
    tensorboard: bool = knob("TensorBoard logs in RUN/tensorboard (needs the tensorboard package).")
    device: str = knob("auto, cpu, cuda, cuda:1.")
    mixed_precision: str = knob("auto (the backbone's on CUDA, none on CPU), no, fp16 or bf16.")

    #: No validation images during an inversion (the loop's validation hook stays off).
    validate_every = 0

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON view."""
        return asdict(self)

    def fingerprint(self) -> dict[str, Any]:
        """What a resumed run must share with the run it continues."""
        keys = ("backbone", "model", "components", "token", "init_word", "images", "captions")
        return {k: getattr(self, k) for k in keys}

    @property
    def positives(self) -> list[str]:
        """:attr:`positive_words` as a list."""
        return split_words(self.positive_words)

    @property
    def stops(self) -> list[str]:
        """:attr:`stop_words` as a list."""
        return split_words(self.stop_words)


def split_words(text: str) -> list[str]:
    """Comma-separated words, stripped, empty ones dropped."""
    return [w.strip() for w in text.split(",") if w.strip()]


SCHEMA = Schema.of(InvertConfig)


def invert_recipe(backbone: str) -> dict[str, Any]:
    """The inversion recipe of ``backbone`` (``INVERT_RECIPES_DIR/<backbone>.toml``; a copy)."""
    return shipped_recipe(INVERT_RECIPES_DIR, backbone, "inversion")


def _validate(cfg: InvertConfig) -> None:
    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise BadInputError(msg)

    for name in ("batch_size", "grad_accum", "max_steps", "checkpoint_every", "log_every", "keep_last"):
        need(getattr(cfg, name) >= 1, f"{flag_name(name)} must be at least 1")
    need(cfg.warmup_steps >= 0, "--warmup-steps must be >= 0")
    for name in ("lr", "adam_eps", "temperature"):
        value = getattr(cfg, name)
        need(math.isfinite(value) and value > 0, f"{flag_name(name)} must be positive")
    need(cfg.max_grad_norm > 0, "--max-grad-norm must be positive (inf: no clipping)")
    need(cfg.weight_decay >= 0, "--weight-decay must be >= 0")
    need(math.isfinite(cfg.steer_weight) and cfg.steer_weight >= 0, "--steer-weight must be >= 0")
    need(0 <= cfg.importance_alpha <= 1, "--importance-alpha must lie in [0, 1]")
    need(
        0 <= cfg.adam_beta1 < 1 and 0 <= cfg.adam_beta2 < 1,
        "--adam-beta1 and --adam-beta2 must lie in [0, 1)",
    )
    need(cfg.mixed_precision in MIXED_PRECISION, f"--mixed-precision must be one of {MIXED_PRECISION}")
    need(cfg.optimizer in OPTIMIZERS, f"--optimizer must be one of {', '.join(OPTIMIZERS)}")
    need(cfg.lr_schedule in LR_SCHEDULES, f"--lr-schedule must be one of {', '.join(LR_SCHEDULES)}")
    need(bool(cfg.images), "--images DIR is required (a folder of exemplar images)")
    from wadi_cli.diffusion.tokens import check_token_text  # torch: not at `wadi --help`

    check_token_text(cfg.token)
    need(bool(cfg.init_word.strip()), "--init-word must not be empty")
    if cfg.steer_weight > 0:
        need(bool(cfg.positives), "--positive-words: the steering loss needs at least one word")
        need(
            1 <= cfg.num_positives <= len(cfg.positives),
            f"--num-positives must lie in [1, {len(cfg.positives)}] (the number of --positive-words)",
        )


def resolve_invert_config(
    file: str | os.PathLike[str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    base: InvertConfig | Mapping[str, Any] | None = None,
) -> InvertConfig:
    """Resolve an inversion's config: ``base`` (a saved config; default: the backbone's recipe)
    → ``file`` → ``overrides`` (flags; ``None`` values are ignored)."""
    layer = read_config_file(file, SCHEMA) if file is not None else {}
    flags = {k: v for k, v in (overrides or {}).items() if v is not None}
    saved = (base.to_dict() if isinstance(base, InvertConfig) else dict(base)) if base is not None else {}
    for where, keys in (("unknown config key(s)", flags), ("the saved run config has unknown key(s)", saved)):
        unknown = sorted(set(keys) - set(SCHEMA.fields))
        if unknown:
            raise BadInputError(f"{where}: {', '.join(unknown)}")
    layers = [saved, layer, flags]
    backbone = get_backbone(coerce("backbone", last_set("backbone", layers, DEFAULT_BACKBONE), SCHEMA)).name
    from wadi_cli.diffusion.tokens import check_token_backbone  # torch: not at `wadi --help`

    check_token_backbone(backbone, "wadi invert")
    values = invert_recipe(backbone)
    for source in (saved, layer, flags):
        values.update(source)
    values["backbone"] = backbone
    missing = sorted(set(SCHEMA.required) - set(values))
    if missing:
        raise BadInputError(f"the {backbone} inversion recipe lacks key(s) {', '.join(missing)}")
    values = {k: coerce(k, v, SCHEMA) for k, v in values.items()}
    cfg = InvertConfig(**values)
    _validate(cfg)
    return cfg
