"""Predicted peak accelerator memory of a distillation run (printed by ``wadi distill --dry-run``).

The peak of one WaDi step (§4) is modelled as

    peak = frozen weights + adapters, their optimizer states and EMA + max(step phases)

- **Frozen weights**: every network the run keeps on the device (the denoiser, the text
  encoder(s) and the VAE: :func:`wadi_cli.pipeline.load_pipeline` moves them all), in the
  storage dtype of ``--mixed-precision`` (fp32 for ``no``; the VAE of the fp16 SDXL run is
  the fp16-safe one, same architecture). Parameter counts come from building each network
  on the meta device from its architecture config: the ``--model`` folder's when it is
  local, else the one shipped in ``wadi_cli/configs/NAME/`` (a network with no config is
  left out and named in :attr:`MemoryPrediction.not_counted`).
- **Adapters**: student and fake-score adapter parameters in fp32 (LoRaD keeps its angles
  in fp32 whatever the base dtype; ``--adapter full`` trains an fp32 copy of the whole
  denoiser), AdamW's two moments (4 bytes each per parameter; ``adamw8bit``: 1 byte each),
  and the student's EMA copy in fp32 when ``--ema-decay > 0``. Gradients are not here: they
  exist only during a role's own phase and are part of that phase's traced bytes.
- **Step phases** (one micro-batch; accumulation adds only detached latents): *generator*
  — the student's forward with its autograd graph, the teacher's and the fake score's
  guided forwards without graph (``2B`` rows under CFG) while that graph lives, then the
  backward that creates the student's gradients; *fake* — the fake score's forward with
  graph on the detached sample and its backward. Their bytes are **traced**: the very
  denoiser class is built from its config on :class:`FakeTensorMode` (shapes and dtypes,
  no data, no compute), gets both adapters on the backbone's target rules and, when on,
  gradient checkpointing, and runs both phases; a dispatch mode adds up the bytes of every
  storage an operation creates and subtracts them when the storage dies
  (:class:`LiveBytes`), so what is counted is what autograd really keeps: saved
  activations, LoRaD's rotated weights and angles (batch-independent), recomputation
  under checkpointing, gradients and temporaries. Tracing at batch 1 and 2 splits each
  phase into ``fixed + B × per_sample``. Memory is nearly linear in the batch; this
  extrapolation undercounts larger batches a little (tiny at batch 5: 2 % in the
  generator phase, 11 % in the fake phase; tests/distill/test_memory.py).

Known bias: on the meta device ``scaled_dot_product_attention`` takes its math path, which
keeps the attention probabilities (tokens² per head); the CPU's and the GPU's fused kernels
keep only the output and its log-sum-exp. So the traced phases overcount attention, more as
the token count grows (tiny at 16² latents: +12 to +19 % of the measured peak,
analysis/sdxl_memory): the prediction errs high.

What the model leaves out: the allocator's caching and fragmentation (the CUDA caching
allocator rounds blocks and keeps freed ones; ``torch.cuda.max_memory_allocated`` does not
count them, ``nvidia-smi`` does), the CUDA context (~0.5 GB), cuDNN / cuBLAS workspaces,
attention kernels whose temporaries differ from the CPU kernel's, and the VAE decode of
validation images. ``analysis/sdxl_memory`` checks the model against peaks measured in
real training steps on CPU; ``analysis/gpu_acceptance.py`` measures it on a GPU.
"""

from __future__ import annotations

import json
import weakref
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from wadi_cli.backbones import Backbone
    from wadi_cli.distill.config import DistillConfig

#: Bytes per parameter of AdamW's state (two moments): fp32, and bitsandbytes' 8-bit AdamW.
OPTIMIZER_STATE_BYTES: dict[str, int] = {"adamw": 8, "adamw8bit": 2}
#: Text tokens of the prompt embedding per text family when no tokenizer config is at hand.
DEFAULT_TOKENS: dict[str, int] = {"unet": 77, "dit": 120}
GIB = 1024**3
#: Traced phase bytes of the shipped architectures at their recipes (see :func:`write_traces`).
TRACES_FILE: Path = Path(__file__).resolve().parent.parent / "configs" / "memory_traces.json"
#: Denoisers up to this size are traced when asked (seconds); larger ones read the table.
TRACE_NOW_PARAMS = 50_000_000
#: The config values a shipped trace was made with (the dry-run says when they differ).
TRACED_WITH: tuple[str, ...] = ("adapter", "rank", "fake_rank", "guidance", "fake_guidance")


@dataclass(frozen=True)
class MemoryPrediction:
    """A predicted peak, in bytes, with its parts (see the module docstring)."""

    weights_dtype: str
    batch_size: int
    gradient_checkpointing: bool
    latent_size: int
    frozen: dict[str, int]  # network -> bytes of its weights
    adapters: dict[str, int]  # "student params", "student optimizer", ... -> bytes
    phases: dict[str, dict[str, int]]  # "generator" / "fake" -> {"fixed", "per_sample"}
    not_counted: tuple[str, ...] = field(default=())
    traced: str = ""  # where the phase bytes come from (the shipped table, or a trace now)

    def phase_bytes(self, phase: str, batch: int | None = None) -> int:
        """Traced bytes of ``phase`` at ``batch`` (default: the run's)."""
        p = self.phases[phase]
        return p["fixed"] + (self.batch_size if batch is None else batch) * p["per_sample"]

    @property
    def static_bytes(self) -> int:
        """Frozen weights + adapters, optimizer states and EMA (alive the whole run)."""
        return sum(self.frozen.values()) + sum(self.adapters.values())

    def peak_bytes(self, batch: int | None = None) -> int:
        """The predicted peak at ``batch`` prompts per micro-batch (default: the run's); without
        traced phases (see :attr:`traced`), the static part only: a lower bound."""
        return self.static_bytes + max((self.phase_bytes(p, batch) for p in self.phases), default=0)

    def largest_batch(self, budget_bytes: int) -> int:
        """The largest micro-batch whose predicted peak fits ``budget_bytes`` (0: none)."""
        free = budget_bytes - self.static_bytes
        fits = [
            (free - p["fixed"]) // p["per_sample"] if p["per_sample"] > 0 else 10**6
            for p in self.phases.values()
        ]
        return max(0, min(fits, default=0))

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON view, with the totals (``--dry-run --json``'s ``memory``)."""
        out = asdict(self)
        out["not_counted"] = list(self.not_counted)
        out["static_bytes"] = self.static_bytes
        out["peak_bytes"] = self.peak_bytes()
        out["peak_gib"] = round(self.peak_bytes() / GIB, 2)
        return out


# ---- measuring live bytes ---------------------------------------------------------------------
def _dispatch_mode_base() -> type:
    from torch.utils._python_dispatch import TorchDispatchMode

    return TorchDispatchMode


class LiveBytes:
    """Bytes of the tensor storages created inside the block that are still alive, and
    their peak: every operation's outputs are registered by storage (views share one) and
    a weak reference subtracts a storage's bytes when it dies. Works for real tensors and
    for :class:`FakeTensorMode` ones alike (a fake storage has the real one's size).

    Usage: ``with LiveBytes() as live: ...; live.peak`` (``live.mark()`` starts a new peak)."""

    def __init__(self) -> None:
        base = _dispatch_mode_base()
        owner = self

        class _Mode(base):  # type: ignore[misc, valid-type]
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
                out = func(*args, **(kwargs or {}))
                owner._track_all(out)
                return out

        self._mode = _Mode()
        self._sizes: dict[int, int] = {}
        self.now = 0
        self.peak = 0

    def _free(self, key: int) -> None:
        self.now -= self._sizes.pop(key, 0)

    def _track_all(self, out: Any) -> None:
        import torch
        from torch.utils._pytree import tree_flatten

        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = storage._cdata
                if key in self._sizes:
                    continue
                self._sizes[key] = storage.nbytes()
                self.now += self._sizes[key]
                self.peak = max(self.peak, self.now)
                weakref.finalize(storage, self._free, key)

    def mark(self) -> None:
        """Start a new peak from the bytes alive now."""
        self.peak = self.now

    def __enter__(self) -> LiveBytes:
        self._mode.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._mode.__exit__(*exc)


# ---- parameter counts -------------------------------------------------------------------------
def _model_folder(cfg: DistillConfig, backbone: Backbone) -> Path | None:
    """The local pipeline folder of the run's base (``--model``, else a local ``hub_id``)."""
    for source in (cfg.model, backbone.hub_id):
        if source is not None and (Path(source).expanduser() / "model_index.json").is_file():
            return Path(source).expanduser()
    return None


def component_config(cfg: DistillConfig, backbone: Backbone, sub: str) -> dict[str, Any] | None:
    """The architecture config of pipeline sub-folder ``sub``: the local base folder's, else
    the shipped ``wadi_cli/configs/NAME/SUB/config.json``, else ``None``."""
    folder = _model_folder(cfg, backbone)
    if folder is not None:
        local = folder / sub / "config.json"
        if not local.is_file():
            return None
        config = json.loads(local.read_text())
        if "_class_name" not in config and "architectures" not in config:  # the class: model_index.json's
            entry = json.loads((folder / "model_index.json").read_text()).get(sub)
            if isinstance(entry, list) and len(entry) == 2:
                config["architectures"] = [entry[1]]
        return config
    shipped = backbone.config_path.parent.parent / sub / "config.json"
    return json.loads(shipped.read_text()) if shipped.is_file() else None


def count_parameters(config: dict[str, Any]) -> int:
    """Parameters of the diffusers / transformers network ``config`` describes, built on the
    meta device (no weights, no download)."""
    import torch

    with torch.device("meta"):
        if "_class_name" in config:
            import diffusers

            model = getattr(diffusers, config["_class_name"]).from_config(config)
        else:
            import transformers

            cls = getattr(transformers, config["architectures"][0])
            model = cls(cls.config_class.from_dict(config))
    return sum(p.numel() for p in model.parameters())


# ---- tracing a step ---------------------------------------------------------------------------
def _condition(net: Any, family: str, batch: int, tokens: int, dtype: torch.dtype) -> Any:
    """Prompt embeddings of the right shapes for ``net`` (fake tensors inside the trace)."""
    import torch

    from wadi_cli.diffusion import TextCondition

    config = net.config
    width = config.cross_attention_dim if family == "unet" else config.caption_channels
    if family == "dit":
        mask = torch.ones(batch, tokens, dtype=torch.long)
        return TextCondition(torch.randn(batch, tokens, width, dtype=dtype), mask)
    pooled = None
    if getattr(config, "addition_embed_type", None) == "text_time":  # SDXL
        dim = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        pooled = torch.randn(batch, dim, dtype=dtype)
    return TextCondition(torch.randn(batch, tokens, width, dtype=dtype), None, pooled)


def _phase_peaks(
    cfg: DistillConfig,
    backbone: Backbone,
    config: dict[str, Any],
    dtype: torch.dtype,
    batch: int,
    tokens: int,
) -> dict[str, int]:
    """Traced peak bytes above the frozen state of the generator and fake phases of one VSD
    micro-step at ``batch`` (see the module docstring)."""
    import diffusers
    import torch

    from wadi_cli.diffusion import TextCondition, wrap_denoiser
    from wadi_cli.distill.losses import fake_score_loss, generator_loss, guided_eps, vsd_gradient
    from wadi_cli.lorad.multi_adapter import adapter_parameters, add_switchable_adapter, use_adapter

    with torch.device("meta"):
        # eval mode, as the run's pipeline (training mode adds dropout masks even at p = 0)
        net = _build(diffusers, backbone.denoiser_class, config, dtype).eval().requires_grad_(False)
        targets = {role: backbone.target_modules(net, role) for role in ("student", "fake")}
        student_net = None
        if cfg.adapter == "full":
            student_net = _build(diffusers, backbone.denoiser_class, config, torch.float32).eval()
        else:
            add_switchable_adapter(
                net, "student", targets["student"], cfg.rank, kind=cfg.adapter, options=_opts(cfg)
            )
        add_switchable_adapter(net, "fake", targets["fake"], cfg.fake_rank)
        roles = {
            "student": list(student_net.parameters()) if student_net else adapter_parameters(net, "student"),
            "fake": adapter_parameters(net, "fake"),
        }
        for params in roles.values():
            for p in params:
                p.requires_grad_(True)
        if cfg.gradient_checkpointing:
            for n in (net, student_net):
                if n is not None:
                    n.enable_gradient_checkpointing()
        den = wrap_denoiser(net, backbone.prediction_type, None, family=backbone.family)
        student = den if student_net is None else wrap_denoiser(student_net, family=backbone.family)
        side = config.get("sample_size") or backbone.latent_size
        side = side if isinstance(side, int) else side[0]
        shape = (batch, config["in_channels"], side, side)
        cond = _condition(net, backbone.family, batch, tokens, dtype)
        ab = torch.full((batch,), 0.5)  # any ᾱ: memory does not depend on it

        def add_noise(x: torch.Tensor, noise: torch.Tensor, _: Any) -> torch.Tensor:  # no value checks
            return 0.5**0.5 * x + 0.5**0.5 * noise

        t = torch.full((batch,), 500, dtype=torch.long)
        peaks = {}
        with LiveBytes() as live:
            # generator phase: the student's graph lives through the teacher / fake forwards
            with use_adapter(net, None if student_net is not None else "student"):
                z = torch.randn(shape)
                a = cfg.alpha_bar_T**0.5  # one_step_x0's arithmetic without its value checks
                x0 = (z - (1 - cfg.alpha_bar_T) ** 0.5 * student.eps(z, t, cond)) / a
            x_t = add_noise(x0.detach(), torch.randn(shape), ab)
            with torch.no_grad():
                eps = {}
                for name, adapter, scale in (
                    ("real", None, cfg.guidance),
                    ("fake", "fake", cfg.fake_guidance),
                ):
                    eps[name] = _guided(den, net, adapter, x_t, t, cond, scale, guided_eps, TextCondition)
            loss = generator_loss(x0, vsd_gradient(eps["real"], eps["fake"], ab))
            with use_adapter(net, "student"):
                loss.backward()
            del x0, x_t, eps, loss
            for p in roles["student"]:  # the student step frees them (zero_grad(set_to_none))
                p.grad = None
            peaks["generator"] = live.peak
            live.mark()
            # fake phase: its forward with graph on the detached sample, then its backward
            x_tf = add_noise(torch.randn(shape), torch.randn(shape), ab)
            with use_adapter(net, "fake"):
                loss_f = fake_score_loss(den.eps(x_tf, t, cond), torch.randn(shape), ab)
                loss_f.backward()
            peaks["fake"] = live.peak
    return peaks


def _build(diffusers: Any, name: str, config: dict[str, Any], dtype: torch.dtype) -> Any:
    """``diffusers.NAME`` from ``config`` with parameters created in ``dtype`` (fake tensors
    cannot be cast in place)."""
    import torch

    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        return getattr(diffusers, name).from_config(config)
    finally:
        torch.set_default_dtype(before)


def _opts(cfg: DistillConfig) -> dict[str, Any]:
    from wadi_cli.distill.config import adapter_options

    return adapter_options(cfg)


def _guided(
    den: Any,
    net: Any,
    adapter: str | None,
    x_t: Any,
    t: Any,
    cond: Any,
    scale: float,
    cfg_eps: Callable,
    tc: Any,
) -> Any:
    """CFG ε as :meth:`Distiller._guided_eps` computes it (2B rows; B at scale 1)."""
    import torch

    from wadi_cli.lorad.multi_adapter import use_adapter

    with use_adapter(net, adapter):
        if scale == 1.0:
            return den.eps(x_t, t, cond)
        eps = den.eps(torch.cat([x_t, x_t]), torch.cat([t, t]), tc.cat([cond, cond]))
    eps_u, eps_c = eps.chunk(2)
    return cfg_eps(eps_u, eps_c, scale)


# ---- the shipped table of traces -----------------------------------------------------------
def _trace_key(backbone: Backbone, config: dict[str, Any], dtype: torch.dtype, checkpointing: bool) -> str:
    from wadi_cli.backbones.skeletons import config_digest

    name = str(dtype).removeprefix("torch.")
    return f"{backbone.name}/{config_digest(config)[:16]}/{name}/ckpt={checkpointing}"


def _read_traces(path: Path = TRACES_FILE) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def trace_phases(
    cfg: DistillConfig, backbone: Backbone, config: dict[str, Any], dtype: torch.dtype
) -> dict[str, dict[str, int]]:
    """``{"generator"|"fake": {"fixed", "per_sample"}}`` from traces at batch 1 and 2."""
    tokens = _tokens(cfg, backbone)
    one, two = (_phase_peaks(cfg, backbone, config, dtype, b, tokens) for b in (1, 2))
    return {p: {"fixed": 2 * one[p] - two[p], "per_sample": two[p] - one[p]} for p in one}


def traced_phases(
    cfg: DistillConfig, backbone: Backbone, config: dict[str, Any], dtype: torch.dtype, trace: bool = False
) -> tuple[dict[str, dict[str, int]], str]:
    """The phase bytes of ``cfg`` and where they come from: the shipped table when it has the
    architecture (traced at its recipe's adapter kind and ranks, ``python -m
    wadi_cli.distill.memory``; a trace takes seconds for tiny and minutes for SDXL on a CPU),
    else, for a denoiser of at most :data:`TRACE_NOW_PARAMS` parameters (a miniature, a small
    custom folder) or with ``trace``, a trace made now."""
    from wadi_cli.backbones.skeletons import skeleton

    entry = _read_traces().get(_trace_key(backbone, config, dtype, cfg.gradient_checkpointing))
    if trace or (entry is None and skeleton(backbone, config)[1] <= TRACE_NOW_PARAMS):
        try:
            return trace_phases(cfg, backbone, config, dtype), "traced now"
        except Exception as exc:  # noqa: BLE001 - an adapter kind that reads values cannot run on meta
            return {}, f"--adapter {cfg.adapter} cannot be traced on the meta device ({type(exc).__name__})"
    if entry is None:  # a trace takes minutes here: say so instead of hanging the dry-run
        return {}, f"no shipped trace (python -m wadi_cli.distill.memory {backbone.name} adds it)"
    what = entry["traced_with"]
    same = all(getattr(cfg, k) == v for k, v in what.items())
    if same:
        return entry["phases"], "shipped trace"
    return entry["phases"], "shipped trace, made with " + ", ".join(f"{k} {v}" for k, v in what.items())


def write_traces(names: Iterable[str], path: Path = TRACES_FILE) -> Path:
    """Trace every backbone of ``names`` at its recipe (weights in the dtype of its GPU
    recipe, gradient checkpointing on and off) and write the table (atomically); other
    entries are kept."""
    import torch

    from wadi_cli.backbones import get_backbone
    from wadi_cli.distill.config import resolve_config
    from wadi_cli.io import write_text_atomic

    table = _read_traces(path)
    for name in names:
        backbone = get_backbone(name)
        config = backbone.denoiser_config()
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(backbone.mixed_precision, torch.float32)
        for ckpt in (True, False):
            cfg = resolve_config(overrides={"backbone": name, "gradient_checkpointing": ckpt})
            table[_trace_key(backbone, config, dtype, ckpt)] = {
                "traced_with": {k: getattr(cfg, k) for k in TRACED_WITH},
                "phases": trace_phases(cfg, backbone, config, dtype),
            }
            text = "{\n" + ",\n".join(f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in table.items())
            write_text_atomic(path, text + "\n}\n")
            print(name, dtype, ckpt, flush=True)
    return path


# ---- the prediction ---------------------------------------------------------------------------
def _tokens(cfg: DistillConfig, backbone: Backbone) -> int:
    """Prompt tokens: the local tokenizer config's ``model_max_length``, else the family's."""
    folder = _model_folder(cfg, backbone)
    path = folder / "tokenizer" / "tokenizer_config.json" if folder else None
    if path is not None and path.is_file():
        length = json.loads(path.read_text()).get("model_max_length")
        if isinstance(length, int) and 0 < length < 100_000:
            return length
    return DEFAULT_TOKENS[backbone.family]


def predict_memory(
    cfg: DistillConfig, plan: dict[str, Any] | None = None, trace: bool = False
) -> MemoryPrediction:
    """The predicted peak GPU memory of ``wadi distill`` with ``cfg`` (weights in the dtype
    ``--mixed-precision`` gives on CUDA). ``plan``: :func:`wadi_cli.distill.plan.parameter_plan`
    of ``cfg`` when already computed; ``trace``: trace the step now whatever the denoiser's
    size (instead of the shipped table for a large one)."""
    import torch

    from wadi_cli.backbones import get_backbone
    from wadi_cli.distill.plan import _denoiser_config, parameter_plan
    from wadi_cli.distill.run import weights_dtype

    backbone = get_backbone(cfg.backbone)
    plan = plan or parameter_plan(cfg)
    dtype = weights_dtype(cfg, torch.device("cuda"))
    width = torch.finfo(dtype).bits // 8
    frozen = {backbone.denoiser_subfolder: plan["base_params"] * width}
    missing = []
    for sub in backbone.weighted_components:
        config = component_config(cfg, backbone, sub)
        if config is None:
            missing.append(sub)
        else:
            frozen[sub] = count_parameters(config) * width
    student, fake = plan["student"]["trainable_params"], plan["fake"]["trainable_params"]
    state = OPTIMIZER_STATE_BYTES[cfg.optimizer]
    adapters = {
        "student params": 4 * student,
        "student optimizer": state * student,
        "student EMA": 4 * student if cfg.ema_decay > 0 else 0,
        "fake params": 4 * fake,
        "fake optimizer": state * fake,
    }
    config = _denoiser_config(cfg, backbone)
    phases, traced = traced_phases(cfg, backbone, config, dtype, trace)
    side = config.get("sample_size") or backbone.latent_size
    return MemoryPrediction(
        weights_dtype=str(dtype).removeprefix("torch."),
        batch_size=cfg.batch_size,
        gradient_checkpointing=cfg.gradient_checkpointing,
        latent_size=side if isinstance(side, int) else side[0],
        frozen=frozen,
        adapters=adapters,
        phases=phases,
        not_counted=tuple(missing),
        traced=traced,
    )


def memory_lines(pred: MemoryPrediction, budgets_gib: Iterable[int] = (80, 24)) -> list[str]:
    """The dry-run's memory section as text lines (GiB; every number predicted)."""

    def gib(n: int) -> str:
        return f"{n / GIB:.2f} GiB"

    if not pred.phases:
        return [
            f"predicted GPU memory: at least {gib(pred.static_bytes)} (weights, adapters, optimizer "
            f"states; activations not modelled: {pred.traced})"
        ]
    lines = [
        f"predicted peak GPU memory: {gib(pred.peak_bytes())} (batch {pred.batch_size}, weights "
        f"{pred.weights_dtype}, gradient checkpointing {'on' if pred.gradient_checkpointing else 'off'}, "
        f"latent {pred.latent_size}x{pred.latent_size}; a model, see docs/sdxl.md#memory)",
    ]
    lines += [f"  frozen {name}: {gib(n)}" for name, n in pred.frozen.items()]
    lines += [f"  {name}: {gib(n)}" for name, n in pred.adapters.items() if n]
    for phase, p in pred.phases.items():
        lines.append(
            f"  {phase} phase (activations, gradients, temporaries): {gib(p['fixed'])} + "
            f"{gib(p['per_sample'])} per sample x {pred.batch_size} = {gib(pred.phase_bytes(phase))}"
        )
    lines.append(f"  activation bytes: {pred.traced}")
    if pred.not_counted:
        lines.append(f"  not counted (no architecture config here): {', '.join(pred.not_counted)}")
    for budget in budgets_gib:
        lines.append(f"  largest batch within {budget} GiB (predicted): {pred.largest_batch(budget * GIB)}")
    return lines


if __name__ == "__main__":  # regenerate the shipped table: python -m wadi_cli.distill.memory [NAME ...]
    import sys

    print(write_traces(sys.argv[1:] or ["tiny", "sdxl", "sd15", "sd21", "pixart"]))
