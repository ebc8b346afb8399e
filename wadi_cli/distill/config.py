"""The distillation recipe as data (WaDi §4): one dataclass with the paper's defaults.

Config flows one way: dataclass defaults → per-backbone defaults (:data:`BACKBONE_DEFAULTS`)
→ a YAML/TOML config file → command-line flags. :func:`resolve_config` applies the layers
in that order, fills backbone-derived values (ranks, ᾱ_T, mixed precision) and validates
everything; the result is written into the run folder and printed by ``--dry-run``.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import tomllib

from wadi_cli.errors import BadInputError

#: Student kinds: LoRaD (the method) and, for the paper's ablation, peft's LoRA / DoRA and a
#: full fine-tune (every weight trainable, as in DMD2).
ADAPTERS: tuple[str, ...] = ("lorad", "lora", "dora", "full")
MIXED_PRECISION: tuple[str, ...] = ("auto", "no", "fp16", "bf16")
OPTIMIZERS: tuple[str, ...] = ("adamw", "adamw8bit")
LR_SCHEDULES: tuple[str, ...] = ("constant", "cosine")

#: Defaults that differ per backbone (applied before the config file and flags).
BACKBONE_DEFAULTS: dict[str, dict[str, Any]] = {
    # The tiny model is not SD-scale: the paper's lr 1e-4 / fake lr 1e-2 / CFG 1.5 / EMA 0.999
    # leave its student at the base one-step quality (accuracy 0.69, fd 49.7 after 400 steps).
    # With lr 1e-2 / fake lr 1e-3 / CFG 3 / fake CFG 1 the paper's VSD objective reaches
    # accuracy 0.91-0.95 but stops at fd 17-21 for every student kind (4 seeds,
    # analysis/adapter_study). The tiny default therefore adds what closes that gap (not in
    # the paper): a DMD-style regression to 25-step teacher samples (weight 4, 1024 pairs)
    # and a wider fake score (rank 64), over 1000 steps (analysis/distill_tiny/NOTES.md):
    # seed 0 → accuracy 0.946, fd 9.07 (target ≤ 10.9); seeds 0-3 mean 0.933 / 10.85.
    # TINY_PAPER_OBJECTIVE takes those additions back out.
    "tiny": {
        "batch_size": 16,
        "max_steps": 1000,
        "checkpoint_every": 250,
        "validate_every": 250,
        "lr": 1e-2,
        "fake_lr": 1e-3,
        "guidance": 3.0,
        "fake_guidance": 1.0,
        "ema_decay": 0.0,
        "fake_rank": 64,
        "regression_weight": 4.0,
        "text_cache": 4096,  # the tiny grammar has 48 distinct prompts
    },
    "sd15": {"batch_size": 16, "max_steps": 20000, "checkpoint_every": 1000, "validate_every": 1000},
    "sd21": {"batch_size": 16, "max_steps": 20000, "checkpoint_every": 1000, "validate_every": 1000},
    "pixart": {"batch_size": 16, "max_steps": 20000, "checkpoint_every": 1000, "validate_every": 1000},
}

#: Defaults per (backbone, adapter), applied after :data:`BACKBONE_DEFAULTS`, from the
#: lr sweeps in analysis/adapter_study (tiny, 400 steps, `wadi eval -n 500`):
#: - a full fine-tune moves every weight and needs a far smaller lr than an adapter: the
#:   tiny adapter lr 1e-2 destroys it (accuracy 0.02), 1e-3 gives 0.41, 1e-4 gives 0.956;
#:   for SD-scale U-Nets / DiTs we default to 1e-5, the usual order for full fine-tunes;
#: - LoRA / DoRA (B starts at zero, A random) also break at lr 1e-2 on tiny (accuracy 0.04);
#:   lr 3e-4 / 1e-3 / 3e-3 give 0.872 / 0.932 / 0.900.
ADAPTER_DEFAULTS: dict[tuple[str, str], dict[str, Any]] = {
    ("tiny", "full"): {"lr": 1e-4},
    ("tiny", "lora"): {"lr": 1e-3},
    ("tiny", "dora"): {"lr": 1e-3},
    ("sd15", "full"): {"lr": 1e-5},
    ("sd21", "full"): {"lr": 1e-5},
    ("pixart", "full"): {"lr": 1e-5},
}


#: The tiny backbone with the paper's objective only: no regression term, the registry's
#: fake rank (8), 400 steps. The demo and the adapter / swap studies pin these values, since
#: they measure the WaDi method itself (and must fit their time budgets).
TINY_PAPER_OBJECTIVE: dict[str, Any] = {
    "regression_weight": 0.0,
    "fake_rank": 8,
    "max_steps": 400,
    "checkpoint_every": 100,
    "validate_every": 100,
}


def config_flags(values: Mapping[str, Any]) -> list[str]:
    """``values`` as ``wadi distill`` flags (``{"fake_rank": 8}`` → ``["--fake-rank", "8"]``)."""
    out: list[str] = []
    for key, value in values.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            out.append(flag if value else "--no-" + key.replace("_", "-"))
        else:
            out += [flag, str(value)]
    return out


@dataclass
class DistillConfig:
    """Every knob of a WaDi distillation run (defaults = the paper's recipe, §4).

    ``None`` means "the backbone's value" for ``rank``, ``fake_rank``, ``alpha_bar_T`` and
    is replaced by :func:`resolve_config`.
    """

    backbone: str = "tiny"
    model: str | None = None  # base pipeline folder or hub id (default: the backbone's)
    components: str | None = None  # VAE/text encoder/tokenizer/scheduler source (default: as for sampling)
    adapter: str = "lorad"
    rank: int | None = None  # student rank (paper: 256 SD, 128 PixArt)
    fake_rank: int | None = None  # fake-score rank (paper: 32)
    init_seed: int = 0  # seed of the adapters' Xavier initialisation
    # optimisation (two AdamW, constant lr)
    lr: float = 1e-4
    fake_lr: float = 1e-2
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    fake_max_grad_norm: float = 1.0
    warmup_steps: int = 0  # linear lr warm-up (0 = the paper's constant lr)
    lr_schedule: str = "constant"  # after warm-up: "constant" (the paper) or "cosine" (to 0 at max_steps)
    # VSD
    guidance: float = 1.5  # teacher CFG
    fake_guidance: float = 1.5  # fake-score CFG
    t_min: int = 20
    t_max: int = 980
    fake_t_min: int = 0
    fake_t_max: int = 999
    alpha_bar_T: float | None = None  # one-step constant (registry: 0.0047)
    prompt_dropout: float = 0.1  # ∅ replaces the prompt in the fake update
    ema_decay: float = 0.999  # EMA of the student adapter (0 = off)
    fake_updates: int = 1  # fake-score updates per generator update (the paper: 1; DMD2: 5)
    # DMD-style regression to teacher samples (NOT in the paper; 0 = off): the generator loss
    # gains  w · mean((G(z_j) − x0_teacher(z_j))²)  over fixed noise/teacher-sample pairs
    regression_weight: float = 0.0
    regression_pairs: int = 1024  # pairs (z_j, prompt_j, teacher x0_j), made once at start
    regression_steps: int = 25  # teacher DDIM steps (with the teacher CFG) per pair
    # run
    batch_size: int = 16  # prompts per micro-batch (per process)
    grad_accum: int = 1  # micro-batches accumulated into each optimizer step
    max_steps: int = 400
    seed: int = 0
    checkpoint_every: int = 100
    keep_last: int = 2
    log_every: int = 1
    validate_every: int = 0  # one-step validation images (+ tiny metrics) every N steps; 0 = off
    prompts: str | None = None  # prompt file (.txt/.jsonl/.csv/.parquet); None = built-in
    prompt_column: str = "prompt"
    text_cache: int = 0  # keep the encodings of this many distinct prompts (LRU); 0 = encode on the fly
    tensorboard: bool = True  # TensorBoard event files in RUN/tensorboard (when tensorboard is installed)
    device: str = "auto"
    mixed_precision: str = "auto"
    # fp16/bf16 LoRaD: off = the rotated weight rounded to the base dtype (one matmul; most of
    # a rotation below ~1e-3 is lost); on = one matmul over hi + lo halves, twice the adapted
    # Linears' FLOPs (analysis/lorad_precision: the tiny run matches fp32 either way)
    lorad_exact_low_precision: bool = False
    gradient_checkpointing: bool = False
    optimizer: str = "adamw"  # "adamw" | "adamw8bit" (bitsandbytes)

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON view."""
        return asdict(self)

    def fingerprint(self) -> dict[str, Any]:
        """What a resumed run must share with the run it continues."""
        return {
            k: getattr(self, k) for k in ("backbone", "model", "components", "adapter", "rank", "fake_rank")
        }


_FIELDS = {f.name: f for f in fields(DistillConfig)}
_BOOL_FIELDS = {n for n, f in _FIELDS.items() if str(f.type) == "bool"}
_INT_FIELDS = {n for n, f in _FIELDS.items() if "int" in str(f.type)}
_FLOAT_FIELDS = {n for n, f in _FIELDS.items() if "float" in str(f.type)}


def read_config_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a YAML (``.yaml``/``.yml``) or TOML (``.toml``) config file into a dict.

    Keys may use ``-`` or ``_``; unknown keys raise :class:`BadInputError` naming them.
    """
    p = Path(path).expanduser()
    if p.is_dir():
        raise BadInputError(f"--config {p}: is a folder, not a config file")
    if not p.is_file():
        raise BadInputError(f"--config {p}: no such file")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise BadInputError(f"--config {p}: cannot read ({exc})") from None
    suffix = p.suffix.lower()
    try:
        if suffix == ".toml":
            data = tomllib.loads(text)
        elif suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        else:
            raise BadInputError(f"--config {p}: use a .yaml, .yml or .toml file")
    except (tomllib.TOMLDecodeError, ValueError) as exc:
        raise BadInputError(f"--config {p}: not valid {suffix[1:].upper()} ({exc})") from None
    except Exception as exc:  # yaml.YAMLError and friends
        if isinstance(exc, BadInputError):
            raise
        raise BadInputError(f"--config {p}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, Mapping):
        raise BadInputError(f"--config {p}: expected a mapping of option names to values")
    out = {str(k).replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(out) - set(_FIELDS))
    if unknown:
        raise BadInputError(f"--config {p}: unknown key(s) {', '.join(unknown)}")
    for key, value in out.items():  # every value, also those a flag will override
        try:
            _coerce(key, value)
        except BadInputError as exc:
            raise BadInputError(f"--config {p}: {exc}") from None
    return out


def _coerce(name: str, value: Any) -> Any:
    """Type-check one value (ints stay ints, ints are accepted for floats)."""
    if value is None:
        if name in ("rank", "fake_rank", "alpha_bar_T", "model", "components", "prompts"):
            return None
        raise BadInputError(f"config {name}: must not be empty")
    if name in _BOOL_FIELDS:
        if not isinstance(value, bool):
            raise BadInputError(f"config {name}: expected true or false, got {value!r}")
        return value
    if name in _INT_FIELDS:
        if isinstance(value, bool) or not isinstance(value, int):
            raise BadInputError(f"config {name}: expected an integer, got {value!r}")
        return value
    if name in _FLOAT_FIELDS:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise BadInputError(f"config {name}: expected a number, got {value!r}")
        return float(value)
    if not isinstance(value, str):
        raise BadInputError(f"config {name}: expected a string, got {value!r}")
    return value


def _validate(cfg: DistillConfig) -> None:
    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise BadInputError(msg)

    need(cfg.adapter in ADAPTERS, f"--adapter must be one of {', '.join(ADAPTERS)}; got {cfg.adapter!r}")
    for name in (
        "rank", "fake_rank", "batch_size", "grad_accum", "fake_updates", "max_steps", "checkpoint_every",
        "log_every",
    ):  # fmt: skip
        need(getattr(cfg, name) >= 1, f"--{name.replace('_', '-')} must be at least 1")
    need(cfg.keep_last >= 1, "--keep-last must be at least 1")
    need(cfg.warmup_steps >= 0, "--warmup-steps must be >= 0")
    need(cfg.text_cache >= 0, "--text-cache must be >= 0 (0 encodes prompts on the fly)")
    need(cfg.regression_weight >= 0, "--regression-weight must be >= 0 (0 turns it off)")
    need(cfg.regression_pairs >= 1 and cfg.regression_steps >= 1, "regression pairs and steps must be >= 1")
    need(cfg.validate_every >= 0, "--validate-every must be >= 0 (0 turns validation off)")
    for name in ("lr", "fake_lr", "adam_eps", "max_grad_norm", "fake_max_grad_norm"):
        value = getattr(cfg, name)
        need(math.isfinite(value) and value > 0, f"--{name.replace('_', '-')} must be positive")
    need(cfg.weight_decay >= 0, "--weight-decay must be >= 0")
    need(0 <= cfg.adam_beta1 < 1 and 0 <= cfg.adam_beta2 < 1, "Adam betas must lie in [0, 1)")
    need(0 <= cfg.ema_decay < 1, "--ema-decay must lie in [0, 1) (0 turns EMA off)")
    need(0 <= cfg.prompt_dropout <= 1, "--prompt-dropout must lie in [0, 1]")
    need(cfg.guidance >= 0 and cfg.fake_guidance >= 0, "guidance scales must be >= 0")
    need(0 < cfg.alpha_bar_T < 1, "--alpha-bar-T must lie in (0, 1)")
    need(0 <= cfg.t_min <= cfg.t_max, "need 0 <= --t-min <= --t-max")
    need(0 <= cfg.fake_t_min <= cfg.fake_t_max, "need 0 <= --fake-t-min <= --fake-t-max")
    need(cfg.mixed_precision in MIXED_PRECISION, f"--mixed-precision must be one of {MIXED_PRECISION}")
    need(bool(cfg.prompt_column), "--prompt-column must not be empty")
    need(cfg.optimizer in OPTIMIZERS, f"--optimizer must be one of {', '.join(OPTIMIZERS)}")
    need(cfg.lr_schedule in LR_SCHEDULES, f"--lr-schedule must be one of {', '.join(LR_SCHEDULES)}")


def resolve_config(
    file: str | os.PathLike[str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    base: DistillConfig | Mapping[str, Any] | None = None,
) -> DistillConfig:
    """Resolve a run's config: ``base`` (a saved config, or the dataclass defaults plus the
    backbone's defaults) → ``file`` → ``overrides`` (flags; ``None`` values are ignored).

    Backbone-derived ``None`` values (ranks, ᾱ_T) are filled from the registry.
    """
    from wadi_cli.backbones import get_backbone

    layers: list[dict[str, Any]] = []
    if file is not None:
        layers.append(read_config_file(file))
    layers.append({k: v for k, v in (overrides or {}).items() if v is not None})
    for layer in layers:
        unknown = sorted(set(layer) - set(_FIELDS))
        if unknown:
            raise BadInputError(f"unknown config key(s): {', '.join(unknown)}")
    if base is None:
        name = next((layer["backbone"] for layer in reversed(layers) if "backbone" in layer), "tiny")
        backbone = get_backbone(_coerce("backbone", name))
        adapter = next((layer["adapter"] for layer in reversed(layers) if "adapter" in layer), "lorad")
        values = {
            **DistillConfig().to_dict(),
            "backbone": backbone.name,
            **BACKBONE_DEFAULTS[backbone.name],
            **ADAPTER_DEFAULTS.get((backbone.name, str(adapter)), {}),
        }
    else:
        values = base.to_dict() if isinstance(base, DistillConfig) else dict(base)
    for layer in layers:
        values.update(layer)
    values = {k: _coerce(k, v) for k, v in values.items()}
    backbone = get_backbone(values["backbone"])
    values["backbone"] = backbone.name
    cfg = DistillConfig(**values)
    cfg = replace(
        cfg,
        rank=backbone.student_rank if cfg.rank is None else cfg.rank,
        fake_rank=backbone.fake_rank if cfg.fake_rank is None else cfg.fake_rank,
        alpha_bar_T=backbone.alpha_bar_T if cfg.alpha_bar_T is None else cfg.alpha_bar_T,
    )
    _validate(cfg)
    return cfg


def config_from_json(text: str) -> DistillConfig:
    """A :class:`DistillConfig` from the ``config.json`` of a run folder."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BadInputError(f"run config is not valid JSON ({exc})") from None
    unknown = sorted(set(data) - set(_FIELDS))
    if unknown:
        raise BadInputError(f"run config has unknown key(s): {', '.join(unknown)}")
    return resolve_config(base={**DistillConfig().to_dict(), **data})
