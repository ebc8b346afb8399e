"""The WaDi training step (§4) on ONE frozen base serving teacher, student and fake score.

:class:`Distiller` owns the adapters (student and fake on the same base network, see
:mod:`wadi_cli.distill.adapters`), both AdamW optimizers, the student EMA, the run's RNG
(one CPU generator: every random draw of a step comes from it, so a step depends only on
the state it starts from) and the prompt stream. :func:`wadi_cli.distill.run.distill`
drives it.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from wadi_cli.diffusion import (
    TextCondition,
    add_noise,
    alpha_bar_at,
    alphas_cumprod_of,
    last_timestep,
    one_step_x0,
    wrap_denoiser,
)
from wadi_cli.distill.adapters import (
    adapter_parameters,
    adapter_state_dict,
    add_switchable_adapter,
    load_adapter_tensors,
    use_adapter,
)
from wadi_cli.distill.checkpoint import Checkpoint, restore_rng, rng_state
from wadi_cli.distill.config import DistillConfig
from wadi_cli.distill.data import PromptStream
from wadi_cli.distill.losses import (
    fake_score_loss,
    generator_loss,
    guided_eps,
    regression_loss,
    vsd_gradient,
)
from wadi_cli.errors import BadInputError, MismatchError, WadiError
from wadi_cli.lorad import lorad_layers

if TYPE_CHECKING:
    from wadi_cli.pipeline import LoadedPipeline


class TrainingDiverged(WadiError):
    """A loss became NaN/Inf; the run stops and keeps its last good checkpoint."""

    exit_code = 1


@dataclass(frozen=True)
class Topology:
    """Where this process sits in a (possibly multi-process, via accelerate) run. Every
    rank draws the noise and prompts of the WHOLE global batch from the same generator and
    keeps its own slice, so RNG state and data position are identical on every rank."""

    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def mean(self, tensor: Tensor) -> Tensor:
        """Average ``tensor`` over ranks (accelerate's ``reduce``; identity when alone)."""
        if self.world == 1:
            return tensor
        from accelerate.utils import reduce

        return reduce(tensor, "mean")

    def slice(self, batch: int) -> slice:
        return slice(self.rank * batch, (self.rank + 1) * batch)


@dataclass
class StepResult:
    """Scalars of one training step."""

    step: int
    loss_g: float
    loss_fake: float
    grad_norm_g: float
    grad_norm_fake: float
    lr: float
    fake_lr: float


class Distiller:
    """State and step of a WaDi run. ``pipe`` is a :class:`wadi_cli.sample.LoadedPipeline` of
    the base pipeline (teacher weights, frozen); its denoiser network gets both adapters."""

    def __init__(
        self, cfg: DistillConfig, pipe: LoadedPipeline, prompts: list[str], topology: Topology | None = None
    ) -> None:
        self.cfg = cfg
        self.topology = topology or Topology()
        self.pipe = pipe
        self.denoiser = pipe.denoiser
        self.net = self.denoiser.model
        self.device = pipe.device
        backbone = pipe.backbone
        self.net.requires_grad_(False)
        # targets are read from the plain network, before any wrapping
        self.targets = {
            "student": backbone.target_modules(self.net, "student"),
            "fake": backbone.target_modules(self.net, "fake"),
        }
        self.student_net: torch.nn.Module | None = None
        if cfg.adapter == "full":  # DMD2-style baseline: every student weight trainable (fp32 copy)
            self.student_net = copy.deepcopy(self.net).float()
            self.student_denoiser = wrap_denoiser(
                self.student_net,
                self.denoiser.prediction_type,
                self.denoiser.alphas_cumprod,
                family=self.denoiser.family,
            )
            self.targets["student"] = []
        else:
            add_switchable_adapter(
                self.net,
                "student",
                self.targets["student"],
                cfg.rank,
                init_seed=cfg.init_seed,
                kind=cfg.adapter,
            )
        add_switchable_adapter(
            self.net, "fake", self.targets["fake"], cfg.fake_rank, init_seed=cfg.init_seed + 1
        )
        for layer in lorad_layers(self.net).values():
            layer.exact_low_precision = cfg.lorad_exact_low_precision
        self.params = {name: adapter_parameters(self.net, name) for name in ("student", "fake")}
        if self.student_net is not None:
            self.params["student"] = list(self.student_net.parameters())
        for params in self.params.values():
            for p in params:
                p.requires_grad_(True)
        if cfg.gradient_checkpointing:
            for net in (self.net, self.student_net):
                if net is not None:
                    net.enable_gradient_checkpointing()
        lrs = {"student": cfg.lr, "fake": cfg.fake_lr}
        self.optimizers = {
            name: _make_optimizer(cfg, params, lrs[name]) for name, params in self.params.items()
        }
        # fp16 base weights: scale losses so tiny VSD gradients (g / numel) do not underflow
        fp16 = next(self.net.parameters()).dtype == torch.float16
        self.scalers = {
            name: torch.amp.GradScaler(self.device.type, enabled=fp16) for name in self.optimizers
        }
        self.ema: dict[str, Tensor] | None = None
        if cfg.ema_decay > 0:
            self.ema = {k: v.detach().clone().float() for k, v in self.student_state().items()}
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.alphas_cumprod = alphas_cumprod_of(pipe.scheduler)
        self.t_last = last_timestep(pipe.scheduler)
        self.stream = PromptStream(prompts, cfg.seed)
        self._text_cache: dict[str, TextCondition] = {}
        self.pairs: dict[str, Any] | None = None
        if cfg.regression_weight > 0:
            self.pairs = self._teacher_pairs(prompts)
        self.step = 0

    # ---- pieces of a step ------------------------------------------------------------
    def lr_scale(self, step: int) -> float:
        """Multiplier of both lrs at ``step`` (0-based): linear warm-up over
        ``warmup_steps``, then constant (the paper) or a cosine decay that reaches 0 at
        ``max_steps``. Both optimizers share it."""
        cfg = self.cfg
        w = cfg.warmup_steps
        if w > 0 and step < w:
            return (step + 1) / w
        if cfg.lr_schedule == "cosine":
            span = max(1, cfg.max_steps - w)
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - w) / span)))
        return 1.0

    def _guided_eps(
        self, adapter: str | None, x_t: Tensor, t: Tensor, cond: TextCondition, scale: float
    ) -> Tensor:
        """CFG ε with conditional and unconditional rows in ONE batched forward (at scale 1
        CFG is the conditional prediction itself, so only that half runs)."""
        if scale == 1.0:
            with use_adapter(self.net, adapter):
                return self.denoiser.eps(x_t, t, cond)
        uncond = self.pipe.prompt_encoder.empty(len(cond)).to(self.device)
        with use_adapter(self.net, adapter):
            eps = self.denoiser.eps(
                torch.cat([x_t, x_t]), torch.cat([t, t]), TextCondition.cat([uncond, cond])
            )
        eps_u, eps_c = eps.chunk(2)
        return guided_eps(eps_u, eps_c, scale)

    def encode(self, prompts: list[str]) -> TextCondition:
        """Text conditions of ``prompts``. With ``text_cache > 0`` each distinct prompt is
        encoded once, ALONE (so its embedding never depends on the batch it first came
        in, and a resumed run sees the same bits), and kept in an LRU cache of that many
        prompts; otherwise the batch is encoded on the fly."""
        encoder = self.pipe.prompt_encoder
        size = self.cfg.text_cache
        if size <= 0:
            return encoder(prompts).to(self.device)
        rows = []
        for prompt in prompts:
            hit = self._text_cache.pop(prompt, None)
            if hit is None:
                hit = encoder([prompt]).to(self.device)
            self._text_cache[prompt] = hit  # most recently used last
            rows.append(hit)
        while len(self._text_cache) > size:
            self._text_cache.pop(next(iter(self._text_cache)))
        return TextCondition.cat(rows)

    def _draws(self, batch: int, micro: int = 1) -> list[dict[str, Tensor]]:
        """Every random draw of a step, in a fixed order, from the run's CPU generator: the
        global batch (``micro`` micro-batches × ranks × ``batch``) is drawn at once and this
        rank keeps its slice of each micro-batch, so gradient accumulation over ``k``
        micro-batches of ``B`` draws exactly what one batch of ``k·B`` draws."""
        c, h, w = self.pipe.latent_shape
        g, cfg, topo = self.generator, self.cfg, self.topology
        total = micro * topo.world * batch
        shape = (total, c, h, w)
        d = {
            "z": torch.randn(shape, generator=g),
            "t": torch.randint(cfg.t_min, cfg.t_max + 1, (total,), generator=g),
            "eps": torch.randn(shape, generator=g),
            "t_fake": torch.randint(cfg.fake_t_min, cfg.fake_t_max + 1, (total,), generator=g),
            "eps_fake": torch.randn(shape, generator=g),
            "drop": torch.rand(total, generator=g) < cfg.prompt_dropout,
        }
        out = []
        for m in range(micro):
            start = (m * topo.world + topo.rank) * batch
            out.append({k: v[start : start + batch].to(self.device) for k, v in d.items()})
        return out

    def _prompts(self, micro: int) -> list[list[str]]:
        """The prompts of ``micro`` micro-batches for this rank (same layout as the draws)."""
        b, world = self.cfg.batch_size, self.topology.world
        batch = self.stream.next_batch(micro * world * b)
        return [
            batch[(m * world + self.topology.rank) * b : (m * world + self.topology.rank + 1) * b]
            for m in range(micro)
        ]

    def _backward(self, name: str, loss: Tensor) -> None:
        """Accumulate the gradient of ``loss`` (with the adapter still selected: gradient
        checkpointing recomputes the forward during backward)."""
        with use_adapter(self.net, name):
            self.scalers[name].scale(loss).backward()

    def _step(self, name: str, max_norm: float) -> float:
        """Average the accumulated gradients over ranks, unscale, clip, step, zero."""
        opt, scaler, params = self.optimizers[name], self.scalers[name], self.params[name]
        if self.topology.world > 1:
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
            flat = self.topology.mean(torch.cat([g.flatten() for g in grads]))
            for p, chunk in zip(params, flat.split([p.numel() for p in params]), strict=True):
                p.grad = chunk.view_as(p).clone()
        scaler.unscale_(opt)
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        return float(norm)

    @torch.no_grad()
    def _update_ema(self) -> None:
        if self.ema is None:
            return
        decay = self.cfg.ema_decay
        for k, v in self.student_state().items():
            self.ema[k].mul_(decay).add_(v.float(), alpha=1 - decay)

    def _check(self, name: str, loss: Tensor) -> None:
        finite = torch.isfinite(loss.detach()).float().reshape(1)
        if self.topology.world > 1:  # every rank stops together
            finite = self.topology.mean(finite)
        if float(finite) < 1.0:
            raise TrainingDiverged(
                f"step {self.step + 1}: the {name} loss is {float(loss.detach())}; stopping (the last good "
                "checkpoint is kept; try a lower --lr / --fake-lr)"
            )

    def _one_step_x0(self, z: Tensor, cond: TextCondition) -> Tensor:
        """The student's sample from pure noise at t = T-1 (with graph for a LoRaD/full student)."""
        with self.student() as student:
            pred = student(z, self.t_last, cond)
        return one_step_x0(z, pred, self.cfg.alpha_bar_T, self.denoiser.prediction_type)

    def _fake_loss(self, x0: Tensor, cond: TextCondition, d: dict[str, Tensor]) -> Tensor:
        """§4 step 5 on a detached sample: prompts dropped to ∅ with probability p."""
        dev = self.device
        ab_f = alpha_bar_at(self.alphas_cumprod, d["t_fake"].cpu()).to(dev)
        x_tf = add_noise(x0, d["eps_fake"], ab_f)
        cond_f = _drop_prompts(cond, self.pipe.prompt_encoder.empty(len(cond)).to(dev), d["drop"])
        with use_adapter(self.net, "fake"):
            eps_pred = self.denoiser.eps(x_tf, d["t_fake"], cond_f)
        return fake_score_loss(eps_pred, d["eps_fake"], ab_f)

    @torch.no_grad()
    def _teacher_pairs(self, prompts: list[str]) -> dict[str, Any]:
        """Fixed (noise, prompt, teacher sample) pairs for the regression term, drawn from
        their own generator so a resumed run rebuilds exactly the same ones."""
        from wadi_cli.pipeline.teacher import teacher_latents

        cfg = self.cfg
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + 17)
        n = cfg.regression_pairs
        z = torch.randn((n, *self.pipe.latent_shape), generator=g)
        picks = torch.randint(0, len(prompts), (n,), generator=g).tolist()
        texts = [prompts[i] for i in picks]
        x0 = []
        for start in range(0, n, 64):
            cond = self.encode(texts[start : start + 64])
            zb = z[start : start + 64].to(self.device)
            x0.append(teacher_latents(self.pipe, cond, zb, cfg.regression_steps, cfg.guidance).float())
        return {"z": z.to(self.device), "x0": torch.cat(x0), "prompts": texts}

    def _regression_batch(self) -> tuple[Tensor, TextCondition, Tensor]:
        """A batch of the fixed pairs (indices from the run's generator): noise, text
        condition and teacher sample."""
        assert self.pairs is not None
        cfg, topo = self.cfg, self.topology
        n = len(self.pairs["prompts"])
        idx = torch.randint(0, n, (cfg.batch_size * topo.world,), generator=self.generator)
        idx = idx[topo.slice(cfg.batch_size)]
        cond = self.encode([self.pairs["prompts"][i] for i in idx.tolist()])
        idx = idx.to(self.device)
        return self.pairs["z"][idx], cond, self.pairs["x0"][idx]

    def _student_forward(self, z: Tensor, cond: TextCondition) -> tuple[Tensor, Tensor | None]:
        """§4 step 1, the student's x0 for the VSD batch, and the regression term
        w · mean((G(z_j) − x0_j)²) on a batch of the fixed pairs (``None`` when it is off).
        Both batches go through ONE student forward (a tiny-model step: 0.38 s, against 0.47 s
        with two; analysis/distill_tiny/results/bench_regression_step.md)."""
        if self.pairs is None:
            return self._one_step_x0(z, cond), None
        z_r, cond_r, target = self._regression_batch()
        x_all = self._one_step_x0(torch.cat([z, z_r]), TextCondition.cat([cond, cond_r]))
        n = len(z)
        return x_all[:n], self.cfg.regression_weight * regression_loss(x_all[n:], target)

    # ---- the step ----------------------------------------------------------------------
    def train_step(self) -> StepResult:
        """One generator update and ``fake_updates`` fake-score updates (WaDi §4, steps
        1–6), each accumulated over ``grad_accum`` micro-batches."""
        cfg, dev, k = self.cfg, self.device, self.cfg.grad_accum
        scale = self.lr_scale(self.step)
        for name, base_lr in (("student", cfg.lr), ("fake", cfg.fake_lr)):
            for group in self.optimizers[name].param_groups:
                group["lr"] = base_lr * scale
        saved, losses_g = [], []
        for prompts, d in zip(self._prompts(k), self._draws(cfg.batch_size, k), strict=True):
            cond = self.encode(prompts)
            # 1. student: one step from pure noise at t = T-1 (+ the regression batch, when on)
            x0, loss_r = self._student_forward(d["z"], cond)
            # 2.-4. VSD gradient from teacher and fake score (no graph), generator loss
            ab = alpha_bar_at(self.alphas_cumprod, d["t"].cpu()).to(dev)
            x_t = add_noise(x0.detach(), d["eps"], ab)
            with torch.no_grad():
                eps_real = self._guided_eps(None, x_t, d["t"], cond, cfg.guidance)
                eps_fake = self._guided_eps("fake", x_t, d["t"], cond, cfg.fake_guidance)
            loss_g = generator_loss(x0, vsd_gradient(eps_real, eps_fake, ab))
            if loss_r is not None:
                loss_g = loss_g + loss_r
            self._check("generator", loss_g)
            self._backward("student", loss_g / k)
            losses_g.append(loss_g.detach())
            saved.append((x0.detach(), cond, d))
        norm_g = self._step("student", cfg.max_grad_norm)
        self._update_ema()
        # 5. fake-score update(s); extra updates train on fresh samples of the new student
        for j in range(cfg.fake_updates):
            if j > 0:
                saved = []
                for prompts, d in zip(self._prompts(k), self._draws(cfg.batch_size, k), strict=True):
                    cond = self.encode(prompts)
                    with torch.no_grad():
                        saved.append((self._one_step_x0(d["z"], cond), cond, d))
            losses_f = []
            for x0d, cond, d in saved:
                loss_f = self._fake_loss(x0d, cond, d)
                self._check("fake-score", loss_f)
                self._backward("fake", loss_f / k)
                losses_f.append(loss_f.detach())
            norm_f = self._step("fake", cfg.fake_max_grad_norm)
        self.step += 1
        loss_g = self.topology.mean(torch.stack(losses_g).mean())
        loss_f = self.topology.mean(torch.stack(losses_f).mean())
        return StepResult(
            self.step,
            float(loss_g),
            float(loss_f),
            norm_g,
            norm_f,
            cfg.lr * scale,
            cfg.fake_lr * scale,
        )

    # ---- state -------------------------------------------------------------------------
    @contextlib.contextmanager
    def student(self) -> Iterator[Any]:
        """The student denoiser: the shared base with the student adapter selected, or the
        separate trainable copy of a ``full`` fine-tune."""
        if self.student_net is not None:
            yield self.student_denoiser
            return
        with use_adapter(self.net, "student"):
            yield self.denoiser

    def student_state(self) -> dict[str, Tensor]:
        """The student's trainable tensors (adapter file names, or the full state dict)."""
        if self.student_net is not None:
            return {k: v.detach() for k, v in self.student_net.state_dict().items()}
        return adapter_state_dict(self.net, "student")

    @torch.no_grad()
    def load_student_state(self, tensors: dict[str, Tensor]) -> None:
        """Inverse of :meth:`student_state` (keys and shapes must match)."""
        if self.student_net is None:
            load_adapter_tensors(self.net, "student", tensors)
            return
        try:
            self.student_net.load_state_dict({k: v.to(self.device) for k, v in tensors.items()}, strict=True)
        except RuntimeError as exc:
            raise MismatchError(f"full student state does not fit: {str(exc).splitlines()[0]}") from None

    def student_weights(self, ema: bool = False) -> dict[str, Tensor]:
        """A copy of the student's trainable tensors: its adapter, or every weight for
        ``--adapter full`` (the EMA copy with ``ema=True`` when enabled)."""
        if ema and self.ema is not None:
            return {k: v.clone() for k, v in self.ema.items()}
        return {k: v.clone() for k, v in self.student_state().items()}

    def checkpoint(self) -> Checkpoint:
        """Everything needed to continue from the current step."""
        adapters = {"student": self.student_state(), "fake": adapter_state_dict(self.net, "fake")}
        if self.ema is not None:
            adapters["ema"] = self.ema
        return Checkpoint(
            step=self.step,
            data_position=self.stream.position,
            adapters=adapters,
            optimizers={k: opt.state_dict() for k, opt in self.optimizers.items()},
            rng=rng_state(self.generator),
            config=self.cfg.to_dict(),
            targets={k: list(v) for k, v in self.targets.items()},
            extra={
                "grad_scalers": {k: s.state_dict() for k, s in self.scalers.items() if s.is_enabled()},
                "world_size": self.topology.world,
            },
        )

    def load(self, ckpt: Checkpoint) -> None:
        """Continue from ``ckpt`` (targets must match exactly)."""
        for role in ("student", "fake"):
            if list(ckpt.targets.get(role, [])) != self.targets[role]:
                raise MismatchError(
                    f"cannot resume: the {role} targets of the checkpoint differ from this model's"
                )
            if role == "student":
                self.load_student_state(ckpt.adapters[role])
            else:
                load_adapter_tensors(self.net, role, ckpt.adapters[role])
            self.optimizers[role].load_state_dict(ckpt.optimizers[role])
        if self.ema is not None:
            src = ckpt.adapters.get("ema") or self.student_state()
            self.ema = {k: v.detach().clone().float().to(self.device) for k, v in src.items()}
        for name, state in ckpt.extra.get("grad_scalers", {}).items():
            if self.scalers[name].is_enabled():
                self.scalers[name].load_state_dict(state)
        restore_rng(self.generator, ckpt.rng)
        self.stream.position = ckpt.data_position
        self.step = ckpt.step


def _make_optimizer(cfg: DistillConfig, params: list[torch.nn.Parameter], lr: float) -> torch.optim.Optimizer:
    """AdamW (β, ε, weight decay from the config), or bitsandbytes' 8-bit AdamW."""
    kwargs = dict(
        lr=lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps, weight_decay=cfg.weight_decay
    )
    if cfg.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise BadInputError(
                "--optimizer adamw8bit needs bitsandbytes (pip install bitsandbytes)"
            ) from None
        return bnb.optim.AdamW8bit(params, **kwargs)
    return torch.optim.AdamW(params, **kwargs)


def _drop_prompts(cond: TextCondition, empty: TextCondition, drop: Tensor) -> TextCondition:
    """``cond`` with the rows where ``drop`` is true replaced by ∅."""
    keep = ~drop.reshape(-1, 1, 1)
    embeds = torch.where(keep, cond.embeds, empty.embeds.to(cond.embeds.dtype))
    mask = None
    if cond.mask is not None and empty.mask is not None:
        mask = torch.where(keep[:, :, 0], cond.mask, empty.mask)
    return TextCondition(embeds, mask)
