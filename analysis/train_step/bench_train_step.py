"""One WaDi training step on the SD2.1-base U-Net: this implementation vs the authors'
forward-hook approach vs peft LoRA (step time and peak memory).

"One training step" is the generator + fake-score step of WaDi §4 on ONE shared frozen
base: the student's one-step x0 from noise at t = T-1; teacher and fake-score CFG ε on
x_t (no grad; conditional and unconditional rows in one batch); the generator loss
backward and an AdamW step on the student adapter; then the fake-score forward/backward
and its AdamW step. Three variants:

- ``ours``: the real :meth:`wadi_cli.distill.trainer.Distiller.train_step` (LoRaD student
  rank 256 and fake score rank 32 as switchable adapters on one base; one matmul per
  adapted Linear, the rotation through its own autograd function).
- ``hook``: a re-creation, written from the method description, of the authors'
  mechanism: adapter tensors kept outside the network, a forward hook on every targeted
  ``nn.Linear`` that AFTER the original forward has run materialises the rotated weight
  with plain autograd ops and recomputes ``F.linear(x, W', b)``, returning that (the
  base matmul is wasted). Student and fake adapters are two sets on the same base,
  switched by a flag. Its step (:class:`HookTrainer`) follows ``Distiller.train_step``
  line by line (same draws, same losses, same optimizers; the test checks it reaches
  the same adapter values).
- ``lora``: ``Distiller.train_step`` with ``adapter="lora"``: peft's LoRA Linear for the
  student (rank chosen to match LoRaD-256's trainable count), LoRaD fake score.

The U-Net is built from the shipped ``wadi_cli/configs/sd21/unet/config.json`` with random
weights (speed does not depend on weight values); the text condition is a random
[B, 77, 1024] embedding instead of OpenCLIP (the text encoder is not what is compared);
the scheduler is SD2.1's (DDPM, scaled-linear betas 0.00085-0.012). EMA is off for every
variant (the release never used it). Each variant runs in a fresh subprocess per round,
rounds interleaved (ours hook lora ours hook lora ...), so load changes on a shared
machine hit every variant alike; medians over all timed steps are reported. Memory: on
CUDA ``torch.cuda.max_memory_allocated`` over the timed steps; on the CPU the peak RSS
sampled every 5 ms during the steps, and the process's lifetime ``ru_maxrss``.

    python analysis/train_step/bench_train_step.py               # CPU default (reduced size)
    python analysis/train_step/bench_train_step.py --device cuda --dtype bf16 --resolution 512 --batch 16
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

REPO = Path(__file__).resolve().parents[2]
RESULTS = Path(__file__).resolve().parent / "results" / "bench_train_step.json"


def _rel(path: Path) -> str:
    """``path`` relative to the repository when inside it (no machine paths in the results)."""
    path = path.resolve()
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


VARIANTS: tuple[str, ...] = ("ours", "hook", "lora")
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PROMPTS: list[str] = [f"benchmark prompt {i}" for i in range(64)]
#: The targets (GPU, 512 px, batch 16).
TARGETS: dict[str, tuple[str, float]] = {
    "speedup_vs_hook": (">=", 1.5),
    "ours_over_lora_time": ("<=", 1.15),
    "ours_over_hook_memory": ("<=", 1.0),
}


# ---- model pieces (no download) ---------------------------------------------------------
def sd21_unet_config(
    blocks: int = 4,
    width_div: int = 1,
    layers_per_block: int | None = None,
    cross_attention_dim: int | None = None,
) -> dict[str, Any]:
    """The shipped SD2.1-base U-Net config, optionally reduced: the first ``blocks - 1``
    cross-attention levels plus the last plain level, channels divided by ``width_div``.
    ``blocks=4, width_div=1`` is the real architecture."""
    from wadi_cli.backbones import get_backbone

    cfg = dict(get_backbone("sd21").denoiser_config())
    if not 2 <= blocks <= 4 or width_div < 1:
        raise ValueError("blocks must lie in 2..4 and width_div be >= 1")
    keep = list(range(blocks - 1)) + [3]  # crossattn levels + the final DownBlock2D level
    cfg["down_block_types"] = [cfg["down_block_types"][i] for i in keep]
    cfg["up_block_types"] = [cfg["up_block_types"][3 - i] for i in reversed(keep)]
    cfg["block_out_channels"] = [cfg["block_out_channels"][i] // width_div for i in keep]
    cfg["attention_head_dim"] = [cfg["attention_head_dim"][i] for i in keep]
    cfg["norm_num_groups"] = math.gcd(cfg["norm_num_groups"], *cfg["block_out_channels"])
    if layers_per_block is not None:
        cfg["layers_per_block"] = layers_per_block
    if cross_attention_dim is not None:
        cfg["cross_attention_dim"] = cross_attention_dim
    return cfg


class RandomTextEncoder:
    """Stands in for OpenCLIP: each prompt maps to a fixed random [L, D] embedding (seeded
    by the prompt's characters), ∅ included. Same interface as ``PromptEncoder``."""

    def __init__(self, length: int, dim: int, device: torch.device, dtype: torch.dtype) -> None:
        self.length, self.dim, self.device, self.dtype = length, dim, device, dtype

    def _one(self, prompt: str) -> Tensor:
        seed = sum((i + 1) * ord(c) for i, c in enumerate(prompt)) % (2**31)
        g = torch.Generator().manual_seed(seed)
        return torch.randn(self.length, self.dim, generator=g)

    def __call__(self, prompts: list[str]) -> Any:
        from wadi_cli.diffusion import TextCondition

        embeds = torch.stack([self._one(p) for p in prompts]).to(self.device, self.dtype)
        return TextCondition(embeds, None)

    def empty(self, n: int) -> Any:
        from wadi_cli.diffusion import TextCondition

        e = self([""]).embeds
        return TextCondition(e.expand(n, *e.shape[1:]), None)


def build_sampler(
    unet_config: dict[str, Any], resolution: int, device: str, dtype: torch.dtype, seed: int = 0
) -> Any:
    """A :class:`wadi_cli.pipeline.LoadedPipeline` around a random-weight U-Net of ``unet_config``
    (SD2.1's scheduler, a random text condition, no VAE: training never decodes)."""
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from diffusers.utils import logging as dlogging

    from wadi_cli.backbones import get_backbone
    from wadi_cli.diffusion import alphas_cumprod_of, wrap_denoiser
    from wadi_cli.pipeline import LoadedPipeline

    if resolution % 8:
        raise ValueError("resolution must be a multiple of 8 (the VAE's factor)")
    torch.manual_seed(seed)
    dev = torch.device(device)
    level = dlogging.get_verbosity()
    dlogging.set_verbosity_error()  # "modules to keep in float32: []" on every cast
    try:
        with dev:  # random init directly on the device
            unet = UNet2DConditionModel.from_config(unet_config)
        unet = unet.to(dtype).eval().requires_grad_(False)
    finally:
        dlogging.set_verbosity(level)
    scheduler = DDPMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"
    )
    backbone = dataclasses.replace(get_backbone("sd21"), resolution=resolution, latent_size=resolution // 8)
    denoiser = wrap_denoiser(unet, "epsilon", alphas_cumprod_of(scheduler), family="unet")
    encoder = RandomTextEncoder(backbone.text_max_length, unet.config.cross_attention_dim, dev, dtype)
    return LoadedPipeline(backbone, denoiser, nn.Identity(), encoder, scheduler, dev, dtype, "random weights")


def lorad_count(shapes: list[tuple[int, int]], rank: int) -> int:
    """LoRaD trainable parameters: ``r · (m + n/2)`` per [m, n] Linear (WaDi §2)."""
    return sum(rank * (m + n // 2) for m, n in shapes)


def lora_count(shapes: list[tuple[int, int]], rank: int) -> int:
    """LoRA trainable parameters: ``r · (m + n)`` per [m, n] Linear."""
    return sum(rank * (m + n) for m, n in shapes)


def matching_lora_rank(shapes: list[tuple[int, int]], lorad_rank: int) -> int:
    """The LoRA rank whose trainable count is closest to LoRaD at ``lorad_rank``."""
    target = lorad_count(shapes, lorad_rank)
    per_rank = lora_count(shapes, 1)
    return max(1, round(target / per_rank))


# ---- the authors' mechanism, re-created ---------------------------------------------
def rotated_weight_plain(weight: Tensor, A: Tensor, B: Tensor) -> Tensor:
    """``R(A B) W`` (WaDi §2) with plain autograd ops, in fp32: every row i rotates its
    column pairs (2k, 2k+1) by θ_ik, ``W'_2k = cos·W_2k − sin·W_2k+1``,
    ``W'_2k+1 = sin·W_2k + cos·W_2k+1``. Autograd keeps cos, sin and the fp32 pair views."""
    m, n = weight.shape
    theta = A.float() @ B.float()
    cos, sin = torch.cos(theta), torch.sin(theta)
    pairs = weight.float().reshape(m, n // 2, 2)
    w0, w1 = pairs[..., 0], pairs[..., 1]
    return torch.stack((cos * w0 - sin * w1, sin * w0 + cos * w1), dim=-1).reshape(m, n)


class HookAdapters:
    """LoRaD adapters bolted on with forward hooks, as the authors' release does.

    Adapter tensors live in ``params[role][path] = (A, B)`` (A zeros [m, r], B Xavier
    [r, n/2], fp32, B drawn from one CPU generator in target order like ours). ``active``
    selects the role; ``None`` leaves the original output alone. Use as a context manager:
    the hooks are removed on exit.
    """

    def __init__(
        self, net: nn.Module, targets: dict[str, list[str]], ranks: dict[str, int], seeds: dict[str, int]
    ) -> None:
        self.net = net
        self.active: str | None = None
        self.params: dict[str, dict[str, tuple[nn.Parameter, nn.Parameter]]] = {}
        for role, paths in targets.items():
            gen = torch.Generator().manual_seed(seeds[role])
            self.params[role] = {}
            for path in paths:
                lin = net.get_submodule(path)
                m, n = lin.weight.shape
                b = torch.empty(ranks[role], n // 2)
                nn.init.xavier_uniform_(b, generator=gen)
                dev = lin.weight.device
                A = nn.Parameter(torch.zeros(m, ranks[role], device=dev))
                self.params[role][path] = (A, nn.Parameter(b.to(dev)))
        paths = dict.fromkeys(p for ps in targets.values() for p in ps)
        self.handles = [net.get_submodule(p).register_forward_hook(self._hook(p)) for p in paths]

    def _hook(self, path: str) -> Callable[..., Tensor | None]:
        def hook(module: nn.Linear, args: tuple[Tensor, ...], output: Tensor) -> Tensor | None:
            ab = self.params.get(self.active or "", {}).get(path)
            if ab is None:
                return None  # teacher, or a layer this role does not adapt
            x = args[0]
            w = rotated_weight_plain(module.weight, *ab).to(x.dtype)
            b = module.bias
            return F.linear(x, w, None if b is None else b.to(x.dtype))  # `output` is thrown away

        return hook

    def parameters(self, role: str) -> list[nn.Parameter]:
        """The trainable tensors of ``role`` in target order."""
        return [p for ab in self.params[role].values() for p in ab]

    @contextlib.contextmanager
    def use(self, role: str | None) -> Iterator[None]:
        """Enable ``role``'s adapters (``None``: the plain teacher) within the block."""
        previous, self.active = self.active, role
        try:
            yield
        finally:
            self.active = previous

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def __enter__(self) -> HookAdapters:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class HookTrainer:
    """:meth:`Distiller.train_step` with :class:`HookAdapters` instead of switchable layers:
    same config, same draws from the same generator, same losses and AdamW/clipping."""

    def __init__(self, cfg: Any, sampler: Any, prompts: list[str]) -> None:
        from wadi_cli.diffusion import alphas_cumprod_of, last_timestep
        from wadi_cli.distill.data import PromptStream
        from wadi_cli.distill.optimizers import make_optimizer as _make_optimizer

        self.cfg, self.sampler, self.device = cfg, sampler, sampler.device
        self.denoiser, self.net = sampler.denoiser, sampler.denoiser.model
        self.net.requires_grad_(False)
        backbone = sampler.backbone
        targets = {r: backbone.target_modules(self.net, r) for r in ("student", "fake")}
        ranks = {"student": cfg.rank, "fake": cfg.fake_rank}
        self.adapters = HookAdapters(
            self.net, targets, ranks, {"student": cfg.init_seed, "fake": cfg.init_seed + 1}
        )
        self.params = {r: self.adapters.parameters(r) for r in ("student", "fake")}
        lrs = {"student": cfg.lr, "fake": cfg.fake_lr}
        self.optimizers = {r: _make_optimizer(cfg, self.params[r], lrs[r]) for r in self.params}
        fp16 = next(self.net.parameters()).dtype == torch.float16
        self.scalers = {r: torch.amp.GradScaler(self.device.type, enabled=fp16) for r in self.params}
        if cfg.gradient_checkpointing:
            self.net.enable_gradient_checkpointing()
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.alphas_cumprod = alphas_cumprod_of(sampler.scheduler)
        self.t_last = last_timestep(sampler.scheduler)
        self.stream = PromptStream(prompts, cfg.seed)

    def _draws(self, batch: int) -> dict[str, Tensor]:
        c, h, w = self.sampler.latent_shape
        g, cfg, shape = self.generator, self.cfg, (batch, c, h, w)
        d = {
            "z": torch.randn(shape, generator=g),
            "t": torch.randint(cfg.t_min, cfg.t_max + 1, (batch,), generator=g),
            "eps": torch.randn(shape, generator=g),
            "t_fake": torch.randint(cfg.fake_t_min, cfg.fake_t_max + 1, (batch,), generator=g),
            "eps_fake": torch.randn(shape, generator=g),
            "drop": torch.rand(batch, generator=g) < cfg.prompt_dropout,
        }
        return {k: v.to(self.device) for k, v in d.items()}

    def _guided_eps(self, role: str | None, x_t: Tensor, t: Tensor, cond: Any, scale: float) -> Tensor:
        from wadi_cli.diffusion import TextCondition
        from wadi_cli.distill.losses import guided_eps

        uncond = self.sampler.prompt_encoder.empty(len(cond)).to(self.device)
        with self.adapters.use(role):
            eps = self.denoiser.eps(
                torch.cat([x_t, x_t]), torch.cat([t, t]), TextCondition.cat([uncond, cond])
            )
        eps_u, eps_c = eps.chunk(2)
        return guided_eps(eps_u, eps_c, scale)

    def _update(self, role: str, loss: Tensor, max_norm: float) -> float:
        opt, scaler, params = self.optimizers[role], self.scalers[role], self.params[role]
        opt.zero_grad(set_to_none=True)
        with self.adapters.use(role):  # gradient checkpointing re-runs the hooks in backward
            scaler.scale(loss).backward()
        scaler.unscale_(opt)
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        scaler.step(opt)
        scaler.update()
        return float(norm)

    def train_step(self) -> tuple[float, float]:
        """WaDi §4 steps 1-6 (as ``Distiller.train_step``); returns (loss_g, loss_fake)."""
        from wadi_cli.diffusion import add_noise, alpha_bar_at, one_step_x0
        from wadi_cli.distill.losses import fake_score_loss, generator_loss, vsd_gradient
        from wadi_cli.distill.trainer import _drop_prompts

        cfg, dev = self.cfg, self.device
        cond = self.sampler.prompt_encoder(self.stream.next_batch(cfg.batch_size)).to(dev)
        d = self._draws(len(cond))
        with self.adapters.use("student"):
            pred = self.denoiser(d["z"], self.t_last, cond)
        x0 = one_step_x0(d["z"], pred, cfg.alpha_bar_T, self.denoiser.prediction_type)
        ab = alpha_bar_at(self.alphas_cumprod, d["t"].cpu()).to(dev)
        x_t = add_noise(x0.detach(), d["eps"], ab)
        with torch.no_grad():
            eps_real = self._guided_eps(None, x_t, d["t"], cond, cfg.guidance)
            eps_fake = self._guided_eps("fake", x_t, d["t"], cond, cfg.fake_guidance)
        loss_g = generator_loss(x0, vsd_gradient(eps_real, eps_fake, ab))
        self._update("student", loss_g, cfg.max_grad_norm)
        x0d = x0.detach()
        ab_f = alpha_bar_at(self.alphas_cumprod, d["t_fake"].cpu()).to(dev)
        x_tf = add_noise(x0d, d["eps_fake"], ab_f)
        empty = self.sampler.prompt_encoder.empty(len(cond)).to(dev)
        cond_f = _drop_prompts(cond, empty, d["drop"])
        with self.adapters.use("fake"):
            eps_pred = self.denoiser.eps(x_tf, d["t_fake"], cond_f)
        loss_f = fake_score_loss(eps_pred, d["eps_fake"], ab_f)
        self._update("fake", loss_f, cfg.fake_max_grad_norm)
        return float(loss_g.detach()), float(loss_f.detach())


# ---- one variant, uniform interface ------------------------------------------------------
@dataclasses.dataclass
class Bench:
    """A variant ready to step: ``step()`` → (loss_g, loss_fake); ``student_eps`` runs the
    student on given inputs; ``trainable`` counts adapter parameters per role."""

    variant: str
    trainer: Any
    sampler: Any
    trainable: dict[str, int]
    extra: dict[str, Any]

    def step(self) -> tuple[float, float]:
        if self.variant == "hook":
            return self.trainer.train_step()
        r = self.trainer.train_step()
        return r.loss_g, r.loss_fake

    @torch.no_grad()
    def student_eps(self, z: Tensor, cond: Any) -> Tensor:
        t = self.trainer.t_last
        if self.variant == "hook":
            with self.trainer.adapters.use("student"):
                return self.sampler.denoiser.eps(z, t, cond)
        with self.trainer.student() as student:
            return student.eps(z, t, cond)


def build_bench(
    variant: str,
    unet_config: dict[str, Any],
    *,
    resolution: int,
    batch: int,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    rank: int = 256,
    fake_rank: int = 32,
    lora_rank: int | None = None,
    gradient_checkpointing: bool = False,
    seed: int = 0,
) -> Bench:
    """Build ``variant`` (``ours`` | ``hook`` | ``lora``) on a fresh random-weight U-Net."""
    from wadi_cli.distill import resolve_config
    from wadi_cli.distill.trainer import Distiller

    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; expected one of {VARIANTS}")
    sampler = build_sampler(unet_config, resolution, device, dtype, seed)
    net = sampler.denoiser.model
    shapes = {
        r: [tuple(net.get_submodule(p).weight.shape) for p in sampler.backbone.target_modules(net, r)]
        for r in ("student", "fake")
    }
    if lora_rank is None:
        lora_rank = matching_lora_rank(shapes["student"], rank)
    overrides = dict(
        backbone="sd21",
        adapter="lora" if variant == "lora" else "lorad",
        rank=lora_rank if variant == "lora" else rank,
        fake_rank=fake_rank,
        batch_size=batch,
        ema_decay=0.0,
        device=device,
        seed=seed,
        gradient_checkpointing=gradient_checkpointing,
    )
    cfg = resolve_config(overrides=overrides)
    if variant == "hook":
        trainer: Any = HookTrainer(cfg, sampler, PROMPTS)
    else:
        trainer = Distiller(cfg, sampler, PROMPTS)
    trainable = {r: sum(p.numel() for p in trainer.params[r]) for r in ("student", "fake")}
    extra = {
        "student_adapter": "peft LoRA" if variant == "lora" else "LoRaD",
        "student_rank": cfg.rank,
        "fake_rank": fake_rank,
        "student_layers": len(shapes["student"]),
        "fake_layers": len(shapes["fake"]),
        "lorad_count_formula": lorad_count(shapes["student"], rank),
        "lora_count_formula": lora_count(shapes["student"], lora_rank),
        "lora_rank": lora_rank,
    }
    return Bench(variant, trainer, sampler, trainable, extra)


# ---- measurement -------------------------------------------------------------------------
class RssSampler:
    """Peak resident set size of this process, sampled every ``interval`` s in a thread
    (``ru_maxrss`` cannot be reset, so it would include model construction)."""

    def __init__(self, interval: float = 0.005) -> None:
        self.interval, self.peak, self._stop = interval, 0, threading.Event()
        self._page = os.sysconf("SC_PAGE_SIZE")
        self._thread = threading.Thread(target=self._run, daemon=True)

    def rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self._page

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(self.interval)

    def __enter__(self) -> RssSampler:
        self.peak = self.rss()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_variant(variant: str, args: argparse.Namespace) -> dict[str, Any]:
    """Build one variant, run ``args.warmup`` untimed and ``args.repeats`` timed steps;
    return times, losses, memory and trainable counts."""
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    unet_cfg = sd21_unet_config(args.blocks, args.width_div)
    t0 = time.perf_counter()
    bench = build_bench(
        variant,
        unet_cfg,
        resolution=args.resolution,
        batch=args.batch,
        device=args.device,
        dtype=DTYPES[args.dtype],
        rank=args.rank,
        fake_rank=args.fake_rank,
        lora_rank=args.lora_rank,
        gradient_checkpointing=args.gradient_checkpointing,
        seed=args.seed,
    )
    build_s = time.perf_counter() - t0
    dev = bench.sampler.device
    losses = [bench.step() for _ in range(args.warmup)]
    _sync(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    times = []
    with RssSampler() as rss:
        rss_before = rss.rss()
        for _ in range(args.repeats):
            _sync(dev)
            t = time.perf_counter()
            losses.append(bench.step())
            _sync(dev)
            times.append(time.perf_counter() - t)
    out: dict[str, Any] = {
        "variant": variant,
        "times_s": times,
        "build_s": build_s,
        "losses": losses,
        "trainable": bench.trainable,
        **bench.extra,
        "rss_before_steps_gb": rss_before / 1e9,
        "peak_rss_steps_gb": rss.peak / 1e9,
        "ru_maxrss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9,
    }
    if dev.type == "cuda":
        out["peak_cuda_allocated_gb"] = torch.cuda.max_memory_allocated(dev) / 1e9
        out["peak_cuda_reserved_gb"] = torch.cuda.max_memory_reserved(dev) / 1e9
    return out


def machine_info(device: str) -> dict[str, Any]:
    """CPU model, cores, memory, torch version, GPU name, load average, date."""
    from wadi_cli.machine import cpu_model

    cpu = cpu_model()
    info: dict[str, Any] = {
        "date_utc": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "load_average_start": list(os.getloadavg()),
    }
    with contextlib.suppress(Exception):
        import diffusers
        import peft

        info.update(diffusers=diffusers.__version__, peft=peft.__version__)
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
    return info


def _worker_argv(variant: str, args: argparse.Namespace) -> list[str]:
    argv = [sys.executable, str(Path(__file__).resolve()), "--worker", variant]
    for key in (
        "device",
        "dtype",
        "resolution",
        "batch",
        "repeats",
        "warmup",
        "rank",
        "fake_rank",
        "threads",
        "blocks",
        "width_div",
        "seed",
    ):
        argv += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    if args.lora_rank is not None:
        argv += ["--lora-rank", str(args.lora_rank)]
    if args.gradient_checkpointing:
        argv.append("--gradient-checkpointing")
    return argv


def summarise(runs: dict[str, list[dict[str, Any]]], cuda: bool) -> dict[str, Any]:
    """Per variant: median step time over every timed step of every round, memory peak
    (max over rounds), trainable counts; then ours/hook and ours/LoRA against the targets."""
    mem_key = "peak_cuda_allocated_gb" if cuda else "peak_rss_steps_gb"
    table: dict[str, Any] = {}
    for v, rs in runs.items():
        times = [t for r in rs for t in r["times_s"]]
        table[v] = {
            "median_step_s": statistics.median(times),
            "min_step_s": min(times),
            "max_step_s": max(times),
            "times_s": times,
            "peak_memory_gb": max(r[mem_key] for r in rs),
            "memory_kind": mem_key,
            "ru_maxrss_gb": max(r["ru_maxrss_gb"] for r in rs),
            "trainable": rs[0]["trainable"],
            "student_adapter": rs[0]["student_adapter"],
            "student_rank": rs[0]["student_rank"],
            "build_s": statistics.median(r["build_s"] for r in rs),
        }
    ratios: dict[str, Any] = {}
    if "ours" in table:
        ours = table["ours"]
        if "hook" in table:
            h = table["hook"]
            ratios["speedup_vs_hook"] = h["median_step_s"] / ours["median_step_s"]
            ratios["ours_over_hook_memory"] = ours["peak_memory_gb"] / h["peak_memory_gb"]
        if "lora" in table:
            ratios["ours_over_lora_time"] = ours["median_step_s"] / table["lora"]["median_step_s"]
            ratios["ours_over_lora_memory"] = ours["peak_memory_gb"] / table["lora"]["peak_memory_gb"]
    checks = {
        f"{k} {op} {lim:g}": None
        if k not in ratios
        else (ratios[k] >= lim if op == ">=" else ratios[k] <= lim)
        for k, (op, lim) in TARGETS.items()
    }
    return {"variants": table, "ratios": ratios, "targets_met": checks}


def markdown_table(summary: dict[str, Any], setup: dict[str, Any]) -> str:
    """The results as a Markdown table plus the ratios."""
    mem = "peak CUDA allocated" if setup["device"].startswith("cuda") else "peak RSS during steps"
    lines = [
        f"| variant | student adapter | trainable (student / fake) | median step | min-max | {mem} |",
        "|---|---|---|---|---|---|",
    ]
    for v, row in summary["variants"].items():
        tr = row["trainable"]
        lines.append(
            f"| {v} | {row['student_adapter']} r{row['student_rank']} | "
            f"{tr['student']:,} / {tr['fake']:,} | {row['median_step_s']:.3f} s | "
            f"{row['min_step_s']:.3f}-{row['max_step_s']:.3f} s | {row['peak_memory_gb']:.2f} GB |"
        )
    r = summary["ratios"]
    lines.append("")
    if "speedup_vs_hook" in r:
        lines.append(
            f"- ours vs hook: {r['speedup_vs_hook']:.2f}x faster (target >= 1.5x); "
            f"memory ratio {r['ours_over_hook_memory']:.3f} (target <= 1)"
        )
    if "ours_over_lora_time" in r:
        lines.append(
            f"- ours / LoRA step time: {r['ours_over_lora_time']:.3f} (target <= 1.15); "
            f"memory ratio {r['ours_over_lora_memory']:.3f}"
        )
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="frozen base weights")
    p.add_argument("--resolution", type=int, default=64, help="image side in px (latent = /8)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=2, help="timed steps per round")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per round")
    p.add_argument("--rounds", type=int, default=2, help="fresh processes per variant, interleaved")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--rank", type=int, default=256)
    p.add_argument("--fake-rank", type=int, default=32)
    p.add_argument("--lora-rank", type=int, default=None, help="default: match LoRaD's count")
    p.add_argument("--threads", type=int, default=1, help="CPU intra-op threads (1: see the .md)")
    p.add_argument("--blocks", type=int, default=4, help="U-Net levels (4 = real SD2.1)")
    p.add_argument("--width-div", type=int, default=1, help="divide channels (1 = real SD2.1)")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        print("RESULT " + json.dumps(run_variant(args.worker, args)), flush=True)
        return
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    info = machine_info(args.device)
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    for rnd in range(args.rounds):
        for v in variants:
            proc = subprocess.run(_worker_argv(v, args), capture_output=True, text=True, cwd=REPO)
            line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
            if proc.returncode or line is None:
                sys.exit(f"{v} (round {rnd + 1}) failed:\n{proc.stderr[-3000:]}")
            res = json.loads(line[len("RESULT ") :])
            res["load_average_after"] = list(os.getloadavg())
            runs[v].append(res)
            mem = res.get("peak_cuda_allocated_gb", res["peak_rss_steps_gb"])
            print(
                f"round {rnd + 1} {v:5s}: steps {', '.join(f'{t:.3f}' for t in res['times_s'])} s, "
                f"peak {mem:.2f} GB, load {os.getloadavg()[0]:.2f}",
                flush=True,
            )
    info["load_average_end"] = list(os.getloadavg())
    setup = {k: (_rel(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "worker"}
    summary = summarise(runs, args.device.startswith("cuda"))
    result = {"machine": info, "setup": setup, **summary, "runs": runs}
    first = runs[variants[0]][0]
    print(
        f"student layers {first['student_layers']}, fake layers {first['fake_layers']}; LoRaD r{args.rank} "
        f"{first['lorad_count_formula']:,} vs LoRA r{first['lora_rank']} {first['lora_count_formula']:,}"
    )
    print(markdown_table(summary, setup))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(
        f"Device {args.device} ({info.get('gpu', info['cpu'])}), {info['date_utc']}, torch {info['torch']}, "
        f"{args.resolution} px, batch {args.batch}, {args.dtype}.\n\n" + markdown_table(summary, setup)
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
