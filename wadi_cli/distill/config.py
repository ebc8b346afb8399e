"""The distillation config: one dataclass whose fields declare every knob (type, help,
flag), and the resolution of a run's values.

Config flows one way: the backbone's recipe file (``wadi_cli/configs/distill/NAME.toml``,
with its ``[per_adapter.KIND]`` values for the chosen student kind) → a YAML/TOML
``--config`` file (a path, or a shipped name such as ``tiny_paper``) → command-line flags.
:func:`resolve_config` applies the layers in that order, fills backbone-derived values
(ᾱ_T) and validates everything; the result is written into the run folder and printed by
``--dry-run``. The recipe files are the only place defaults live: :class:`DistillConfig`
holds no numbers, and ``wadi distill --help`` quotes a default only where every backbone's
recipe agrees on it.
"""

from __future__ import annotations

import functools
import json
import math
import os
from collections.abc import Mapping
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from wadi_cli.backbones import BACKBONES, get_backbone
from wadi_cli.backbones.recipes import (
    PER_ADAPTER,
    backbone_recipe,
    read_recipe,
    recipe_values,
    shipped_recipe_path,
    shipped_recipes,
)
from wadi_cli.errors import BadInputError

#: Student kinds: LoRaD (the method) and, for the paper's ablations, peft's LoRA / DoRA, DoRA
#: with its magnitude frozen, a learned orthogonal matrix per layer (torch's maps, Table R4)
#: and a full fine-tune (every weight trainable, as in DMD2).
ADAPTERS: tuple[str, ...] = ("lorad", "lora", "dora", "dora-frozen-norm", "orthogonal", "full")
MIXED_PRECISION: tuple[str, ...] = ("auto", "no", "fp16", "bf16")
OPTIMIZERS: tuple[str, ...] = ("adamw", "adamw8bit")
LR_SCHEDULES: tuple[str, ...] = ("constant", "cosine")
#: The backbone of ``wadi distill`` without ``-b`` (its recipe supplies everything else).
DEFAULT_BACKBONE = "tiny"


def knob(help: str, *, default: Any = MISSING, short: str | None = None, alias: str | None = None) -> Any:
    """A :class:`DistillConfig` field and its one command-line flag.

    ``help`` is the flag's help text without a default (``wadi distill --help`` appends the
    recipes' default, see :func:`default_text`); ``default`` is only for values a recipe
    cannot hold (``None``: "the backbone's" / "built in"); ``short`` is a one-letter alias
    and ``alias`` an old spelling that keeps working, hidden from the help.
    """
    return field(default=default, metadata={"help": help, "short": short, "alias": alias})


@dataclass(kw_only=True)
class DistillConfig:
    """Every knob of a WaDi distillation run. Values come from the backbone's recipe file
    (:func:`resolve_config`); the fields declare types and flags, not defaults.

    ``None`` means "the backbone's value" for ``alpha_bar_T`` (and for ``rank`` /
    ``fake_rank`` in a user's file) and is replaced by :func:`resolve_config`.
    """

    backbone: str = knob("Base model: sd15, sd21, pixart or tiny.", short="-b")
    model: str | None = knob(
        "Base pipeline folder or hub id, or an original-layout .safetensors single file of a "
        "sd15/sd21 fine-tune (the teacher; default: the backbone's).",
        default=None,
    )
    components: str | None = knob(
        "VAE / text encoder / tokenizer / scheduler source, folder or hub id (default: the "
        "--model pipeline, else the backbone's; see `wadi info -b NAME`).",
        default=None,
    )
    adapter: str = knob(
        "Student: lorad (the method); lora, dora, dora-frozen-norm (peft), orthogonal (torch's "
        "maps, see --orthogonal-map) or full (baselines)."
    )
    orthogonal_map: str = knob(
        "--adapter orthogonal: torch's map to O(n), matrix_exp, cayley or householder. Per adapted "
        "Linear (n = in_features) it trains an n×n matrix (n² parameters, --rank unused) and adds "
        "an O(n³) map plus an n×n matmul per token to every forward."
    )
    rank: int | None = knob("Student adapter rank.")
    fake_rank: int | None = knob("Fake-score LoRaD rank.")
    init_seed: int = knob("Seed of the adapters' initialisation.")
    # optimisation (two AdamW)
    lr: float = knob("Student learning rate.")
    fake_lr: float = knob("Fake-score learning rate.")
    adam_beta1: float = knob("AdamW β1 of both optimizers.")
    adam_beta2: float = knob("AdamW β2 of both optimizers.")
    adam_eps: float = knob("AdamW ε of both optimizers.")
    weight_decay: float = knob("AdamW weight decay of both optimizers.")
    max_grad_norm: float = knob("Gradient clipping norm of the student.")
    fake_max_grad_norm: float = knob("Gradient clipping norm of the fake score.")
    warmup_steps: int = knob("Linear lr warm-up steps of both lrs; 0 = none.")
    lr_schedule: str = knob("After warm-up: constant (the paper) or cosine (to 0 at --max-steps).")
    optimizer: str = knob("adamw or adamw8bit (bitsandbytes).")
    # VSD
    guidance: float = knob("Teacher CFG scale.")
    fake_guidance: float = knob("Fake-score CFG scale.")
    t_min: int = knob("Smallest timestep of the VSD noise.")
    t_max: int = knob("Largest timestep of the VSD noise.")
    fake_t_min: int = knob("Smallest timestep of the fake-score update.")
    fake_t_max: int = knob("Largest timestep of the fake-score update.")
    alpha_bar_T: float | None = knob(
        "One-step ᾱ_T (default: the backbone's, see `wadi info`).", default=None, alias="--alpha-bar-T"
    )
    prompt_dropout: float = knob("Probability that ∅ replaces the prompt in the fake update.")
    ema_decay: float = knob("Student EMA decay; 0 = off.")
    fake_updates: int = knob("Fake-score updates per generator update.")
    # DMD-style regression to teacher samples (NOT in the paper; 0 = off): the generator loss
    # gains  w · mean((G(z_j) − x0_teacher(z_j))²)  over fixed noise/teacher-sample pairs
    regression_weight: float = knob(
        "Weight of a DMD-style regression to teacher samples (not in the paper); 0 = off."
    )
    regression_pairs: int = knob("Fixed (noise, prompt, teacher sample) pairs of the regression term.")
    regression_steps: int = knob("Teacher DDIM steps (with the teacher CFG) per regression pair.")
    # run
    batch_size: int = knob("Prompts per micro-batch and process.")
    grad_accum: int = knob("Micro-batches accumulated into each optimizer step.")
    max_steps: int = knob("Stop after this many steps (total).")
    seed: int = knob("Seed of noise, timesteps and data order.")
    checkpoint_every: int = knob("Checkpoint every N steps.")
    keep_last: int = knob("Keep only the newest K checkpoints.")
    log_every: int = knob("Write metrics.csv every N steps.")
    validate_every: int = knob("Validation images (+ tiny metrics) every N steps; 0 = off.")
    prompts: str | None = knob(
        "Prompt file: .txt, .jsonl, .csv or .parquet; 'smoke' = 16 built-in smoke-test prompts "
        "(default: tiny draws from its grammar; sd15/sd21/pixart need one).",
        default=None,
    )
    prompt_column: str = knob("Column / key of the prompts in --prompts.")
    text_cache: int = knob("Keep the encodings of up to N distinct prompts (LRU); 0 = encode on the fly.")
    tensorboard: bool = knob("TensorBoard logs in RUN/tensorboard (needs the tensorboard package).")
    device: str = knob("auto, cpu, cuda, cuda:1.")
    mixed_precision: str = knob("auto (the backbone's on CUDA, none on CPU), no, fp16 or bf16.")
    gradient_checkpointing: bool = knob("Recompute activations in backward (less memory).")
    lorad_exact_low_precision: bool = knob(
        "fp16/bf16 LoRaD: one matmul over hi + lo halves of the rotated weight, so small rotations "
        "reach the forward (twice the adapted Linears' FLOPs; analysis/lorad_precision)."
    )

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON view."""
        return asdict(self)

    def fingerprint(self) -> dict[str, Any]:
        """What a resumed run must share with the run it continues."""
        return {
            k: getattr(self, k)
            for k in ("backbone", "model", "components", "adapter", "orthogonal_map", "rank", "fake_rank")
        }


@dataclass(frozen=True)
class Schema:
    """The fields of a run config dataclass declared with :func:`knob`, by the type their
    values and flags take (``DistillConfig`` here; ``FinetuneConfig`` of
    :mod:`wadi_cli.finetune.config` shares the file reading and type checks through it)."""

    fields: dict[str, Any]
    bools: frozenset[str]
    ints: frozenset[str]
    floats: frozenset[str]
    nullable: frozenset[str]
    required: tuple[str, ...]  # fields a recipe must set (the others default to None)

    @classmethod
    def of(cls, config_class: type) -> Schema:
        """The schema of a ``@dataclass`` whose fields are :func:`knob` s."""
        found = {f.name: f for f in fields(config_class)}

        def having(word: str) -> frozenset[str]:
            return frozenset(n for n, f in found.items() if word in str(f.type))

        return cls(
            fields=found,
            bools=frozenset(n for n, f in found.items() if str(f.type) == "bool"),
            ints=having("int"),
            floats=having("float"),
            nullable=having("None"),
            required=tuple(n for n, f in found.items() if f.default is MISSING),
        )


SCHEMA = Schema.of(DistillConfig)
_FIELDS = SCHEMA.fields
_BOOL_FIELDS, _INT_FIELDS, _FLOAT_FIELDS = SCHEMA.bools, SCHEMA.ints, SCHEMA.floats
_NULLABLE = SCHEMA.nullable
#: Fields a recipe must set (the others default to ``None``, which a TOML file cannot hold).
REQUIRED_FIELDS: tuple[str, ...] = SCHEMA.required


# ---- flags -----------------------------------------------------------------------------------
def flag_name(name: str) -> str:
    """The command-line flag of field ``name`` (``fake_lr`` → ``--fake-lr``)."""
    return "--" + name.replace("_", "-").lower()


def field_kind(name: str, schema: Schema = SCHEMA) -> type:
    """``bool``, ``int``, ``float`` or ``str``: what the flag of field ``name`` parses."""
    for kind, names in ((bool, schema.bools), (int, schema.ints), (float, schema.floats)):
        if name in names:
            return kind
    return str


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


@functools.cache
def _recipe_values_everywhere() -> tuple[dict[str, Any], ...]:
    """The values of every backbone's recipe for every student kind it names (read once)."""
    out = []
    for backbone in BACKBONES:
        recipe = backbone_recipe(backbone)
        out += [recipe_values(recipe, adapter) for adapter in (None, *recipe.get(PER_ADAPTER, {}))]
    return tuple(out)


def default_text(name: str) -> str:
    """What ``wadi distill --help`` says of field ``name``'s default, read from the recipes:
    the value when every backbone's recipe (for every student kind) agrees on it, else
    "backbone default"; ``""`` for fields no recipe sets (their help says it)."""
    if name == "backbone":
        return f"default {DEFAULT_BACKBONE}"
    if name not in REQUIRED_FIELDS:
        return ""
    everywhere = _recipe_values_everywhere()
    if len({repr(values.get(name)) for values in everywhere}) == 1:
        return f"default {_show(everywhere[0][name])}"
    return "backbone default, see --dry-run"


def option_help(name: str) -> str:
    """The full help of field ``name``'s flag: its declared help and :func:`default_text`."""
    text, default = _FIELDS[name].metadata["help"], default_text(name)
    return f"{text} ({default})" if default else text


def option_alias(name: str, schema: Schema = SCHEMA) -> tuple[str | None, str | None]:
    """``(short, hidden old spelling)`` of field ``name``'s flag (each may be ``None``)."""
    meta = schema.fields[name].metadata
    return meta["short"], meta["alias"]


# ---- config files ----------------------------------------------------------------------------
def config_file_path(value: str | os.PathLike[str], shipped_names: bool = True) -> Path:
    """The file ``--config VALUE`` names: a path, or (``shipped_names``) the name of a shipped
    distillation recipe (``tiny_paper`` → ``wadi_cli/configs/distill/tiny_paper.toml``)."""
    p = Path(value).expanduser()
    if p.is_dir():
        raise BadInputError(f"--config {p}: is a folder, not a config file")
    if p.is_file():
        return p
    shipped = shipped_recipe_path(str(value)) if not p.suffix and shipped_names else None
    if shipped is not None:
        return shipped
    if not shipped_names:
        raise BadInputError(f"--config {p}: no such file")
    raise BadInputError(
        f"--config {p}: no such file (or pass a shipped recipe by name: {', '.join(shipped_recipes())})"
    )


def _check_keys(where: str, data: Mapping[str, Any], schema: Schema = SCHEMA) -> dict[str, Any]:
    """``data`` with ``-`` in keys made ``_``; unknown keys and ill-typed values refused."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name == PER_ADAPTER:
            if not isinstance(value, Mapping) or not all(isinstance(v, Mapping) for v in value.values()):
                raise BadInputError(f"{where}: [{PER_ADAPTER}.KIND] must be tables of option values")
            out[name] = {str(kind): _check_keys(where, v, schema) for kind, v in value.items()}
            continue
        out[name] = value
    unknown = sorted(set(out) - set(schema.fields) - {PER_ADAPTER})
    if unknown:
        raise BadInputError(f"{where}: unknown key(s) {', '.join(unknown)}")
    for name, value in out.items():  # every value, also those a flag will override
        if name != PER_ADAPTER:
            try:
                coerce(name, value, schema)
            except BadInputError as exc:
                raise BadInputError(f"{where}: {exc}") from None
    return out


def check_config_values(where: str, data: Mapping[str, Any]) -> dict[str, Any]:
    """``data`` (config field → value, ``-`` or ``_`` in names) checked like a config file's
    keys: an unknown field or a value of the wrong type is a :class:`BadInputError` that
    starts with ``where``. Returns the values under their field names (ints given for
    floats stay ints)."""
    return _check_keys(where, data)


def read_config_file(path: str | os.PathLike[str], schema: Schema = SCHEMA) -> dict[str, Any]:
    """Read a YAML (``.yaml``/``.yml``) or TOML (``.toml``) config file, or a shipped recipe
    by name, into a dict (with a ``per_adapter`` table when the file has one).

    Keys may use ``-`` or ``_``; unknown keys (fields ``schema`` lacks) raise
    :class:`BadInputError` naming them.
    """
    p = config_file_path(path, shipped_names=schema is SCHEMA)
    suffix = p.suffix.lower()
    if suffix == ".toml":
        data: Any = read_recipe(p, f"--config {p}")
    elif suffix in (".yaml", ".yml"):
        data = _read_yaml(p)
    else:
        raise BadInputError(f"--config {p}: use a .yaml, .yml or .toml file")
    if not isinstance(data, Mapping):
        raise BadInputError(f"--config {p}: expected a mapping of option names to values")
    return _check_keys(f"--config {p}", data, schema)


def _read_yaml(p: Path) -> Any:
    import yaml  # start-up time (`wadi distill --help`): only YAML files need it

    try:
        return yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except (OSError, UnicodeDecodeError) as exc:
        raise BadInputError(f"--config {p}: cannot read ({exc})") from None
    except Exception as exc:  # noqa: BLE001 - yaml.YAMLError and friends
        raise BadInputError(f"--config {p}: not valid YAML ({str(exc).splitlines()[0]})") from None


def coerce(name: str, value: Any, schema: Schema = SCHEMA) -> Any:
    """Type-check one value of field ``name`` (ints stay ints, ints are accepted for floats)."""
    if value is None:
        if name in schema.nullable:
            return None
        raise BadInputError(f"config {name}: must not be empty")
    if name in schema.bools:
        if not isinstance(value, bool):
            raise BadInputError(f"config {name}: expected true or false, got {value!r}")
        return value
    if name in schema.ints:
        if isinstance(value, bool) or not isinstance(value, int):
            raise BadInputError(f"config {name}: expected an integer, got {value!r}")
        return value
    if name in schema.floats:
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

    check_adapter_choice(cfg.adapter, cfg.orthogonal_map, cfg.weight_decay)
    for name in (
        "rank", "fake_rank", "batch_size", "grad_accum", "fake_updates", "max_steps", "checkpoint_every",
        "log_every", "keep_last",
    ):  # fmt: skip
        need(getattr(cfg, name) >= 1, f"{flag_name(name)} must be at least 1")
    need(
        cfg.regression_pairs >= 1 and cfg.regression_steps >= 1,
        "regression pairs and steps must be >= 1 (--regression-pairs, --regression-steps)",
    )
    need(cfg.warmup_steps >= 0, "--warmup-steps must be >= 0")
    need(cfg.text_cache >= 0, "--text-cache must be >= 0 (0 encodes prompts on the fly)")
    need(cfg.regression_weight >= 0, "--regression-weight must be >= 0 (0 turns it off)")
    need(cfg.validate_every >= 0, "--validate-every must be >= 0 (0 turns validation off)")
    for name in ("lr", "fake_lr", "adam_eps", "max_grad_norm", "fake_max_grad_norm"):
        value = getattr(cfg, name)
        need(math.isfinite(value) and value > 0, f"{flag_name(name)} must be positive")
    need(cfg.weight_decay >= 0, "--weight-decay must be >= 0")
    need(
        0 <= cfg.adam_beta1 < 1 and 0 <= cfg.adam_beta2 < 1,
        "--adam-beta1 and --adam-beta2 must lie in [0, 1)",
    )
    need(0 <= cfg.ema_decay < 1, "--ema-decay must lie in [0, 1) (0 turns EMA off)")
    need(0 <= cfg.prompt_dropout <= 1, "--prompt-dropout must lie in [0, 1]")
    need(cfg.guidance >= 0 and cfg.fake_guidance >= 0, "--guidance and --fake-guidance must be >= 0")
    need(0 < cfg.alpha_bar_T < 1, "--alpha-bar-t must lie in (0, 1)")
    need(0 <= cfg.t_min <= cfg.t_max, "need 0 <= --t-min <= --t-max")
    need(0 <= cfg.fake_t_min <= cfg.fake_t_max, "need 0 <= --fake-t-min <= --fake-t-max")
    need(cfg.mixed_precision in MIXED_PRECISION, f"--mixed-precision must be one of {MIXED_PRECISION}")
    need(bool(cfg.prompt_column), "--prompt-column must not be empty")
    need(cfg.optimizer in OPTIMIZERS, f"--optimizer must be one of {', '.join(OPTIMIZERS)}")
    need(cfg.lr_schedule in LR_SCHEDULES, f"--lr-schedule must be one of {', '.join(LR_SCHEDULES)}")


def last_set(key: str, layers: list[Mapping[str, Any]], fallback: Any) -> Any:
    """The value of ``key`` in the last layer that sets it."""
    return next((layer[key] for layer in reversed(layers) if key in layer), fallback)


def resolve_config(
    file: str | os.PathLike[str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    base: DistillConfig | Mapping[str, Any] | None = None,
) -> DistillConfig:
    """Resolve a run's config: ``base`` (a saved config; default: the backbone's recipe with
    its values for the chosen student kind) → ``file`` (a path or a shipped recipe name) →
    ``overrides`` (flags; ``None`` values are ignored).

    Keys a saved config lacks (written by an older wadi) come from its backbone's recipe;
    ``None`` ranks and ᾱ_T are filled from the registry.
    """

    layer = read_config_file(file) if file is not None else {}
    flags = {k: v for k, v in (overrides or {}).items() if v is not None}
    saved = (base.to_dict() if isinstance(base, DistillConfig) else dict(base)) if base is not None else {}
    for where, keys in (("unknown config key(s)", flags), ("the saved run config has unknown key(s)", saved)):
        unknown = sorted(set(keys) - set(_FIELDS))
        if unknown:
            raise BadInputError(f"{where}: {', '.join(unknown)}")
    layers = [saved, layer, flags]
    backbone = get_backbone(coerce("backbone", last_set("backbone", layers, DEFAULT_BACKBONE))).name
    recipe = backbone_recipe(backbone)
    adapter = str(last_set("adapter", layers, recipe.get("adapter")))
    values = recipe_values(recipe, adapter)
    if base is None:  # the file's values for this student kind replace the recipe's
        values.update(recipe_values(layer, adapter))
    else:  # a saved run keeps its values; the file's per-kind values do not re-apply
        values.update(saved)
        values.update({k: v for k, v in layer.items() if k != PER_ADAPTER})
    values.update(flags)
    values["backbone"] = backbone
    missing = sorted(set(REQUIRED_FIELDS) - set(values))
    if missing:
        raise BadInputError(f"the {backbone} recipe lacks key(s) {', '.join(missing)}")
    values = {k: coerce(k, v) for k, v in values.items()}
    spec = get_backbone(backbone)
    if values["rank"] is None:
        values["rank"] = spec.student_rank
    if values["fake_rank"] is None:
        values["fake_rank"] = spec.fake_rank
    if values.get("alpha_bar_T") is None:
        values["alpha_bar_T"] = spec.alpha_bar_T
    cfg = DistillConfig(**values)
    _validate(cfg)
    return cfg


def check_adapter_choice(adapter: str, orthogonal_map: str, weight_decay: float) -> None:
    """The trained adapter kind and its options, as every training command checks them
    (:class:`BadInputError` with the flag's name)."""
    from wadi_cli.lorad.orthogonal import ORTHOGONAL_MAPS  # torch: not at `--help`

    if adapter not in ADAPTERS:
        raise BadInputError(f"--adapter must be one of {', '.join(ADAPTERS)}; got {adapter!r}")
    if orthogonal_map not in ORTHOGONAL_MAPS:
        raise BadInputError(
            f"--orthogonal-map must be one of {', '.join(ORTHOGONAL_MAPS)}; got {orthogonal_map!r}"
        )
    # torch's householder map reads fixed signs from the diagonal of the trained matrix
    # (``.int()`` of −1); AdamW's decay would shrink them to −0.99 → 0 and zero the weight
    if adapter == "orthogonal" and orthogonal_map == "householder" and weight_decay > 0:
        raise BadInputError(
            "--orthogonal-map householder needs --weight-decay 0 (decay would erase the map's diagonal signs)"
        )


def adapter_options(config: Any) -> dict[str, Any]:
    """The keyword arguments the student's adapter kind takes from a run's config (a
    distill or finetune config, or its saved dict): ``orthogonal_map`` for ``orthogonal``."""
    values = config.to_dict() if hasattr(config, "to_dict") else config
    if values.get("adapter") == "orthogonal":
        return {"orthogonal_map": values["orthogonal_map"]}
    return {}


def config_from_json(text: str) -> DistillConfig:
    """A :class:`DistillConfig` from the ``config.json`` of a run folder."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BadInputError(f"run config is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise BadInputError("run config is not a JSON object")
    return resolve_config(base=data)
