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
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

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
from wadi_cli.distill.losses import fake_score_loss, generator_loss, guided_eps, vsd_gradient
from wadi_cli.errors import BadInputError, MismatchError, WadiError


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
    """State and step of a WaDi run. ``sampler`` is a :class:`wadi_cli.sample.Sampler` of
    the base pipeline (teacher weights, frozen); its denoiser network gets both adapters."""

    def __init__(
        self, cfg: DistillConfig, sampler: Any, prompts: list[str], topology: Topology | None = None
    ) -> None:
        self.cfg = cfg
        self.topology = topology or Topology()
        self.sampler = sampler
        self.denoiser = sampler.denoiser
        self.net = self.denoiser.model
        self.device = sampler.device
        backbone = sampler.backbone
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
        self.alphas_cumprod = alphas_cumprod_of(sampler.scheduler)
        self.t_last = last_timestep(sampler.scheduler)
        self.stream = PromptStream(prompts, cfg.seed)
        self.step = 0

    # ---- pieces of a step ------------------------------------------------------------
    def lr_scale(self, step: int) -> float:
        """Linear warm-up over ``warmup_steps`` then constant (the paper: constant)."""
        w = self.cfg.warmup_steps
        return 1.0 if w <= 0 else min(1.0, (step + 1) / w)

    def _guided_eps(
        self, adapter: str | None, x_t: Tensor, t: Tensor, cond: TextCondition, scale: float
    ) -> Tensor:
        """CFG ε with conditional and unconditional rows in ONE batched forward."""
        uncond = self.sampler.prompt_encoder.empty(len(cond)).to(self.device)
        with use_adapter(self.net, adapter):
            eps = self.denoiser.eps(
                torch.cat([x_t, x_t]), torch.cat([t, t]), TextCondition.cat([uncond, cond])
            )
        eps_u, eps_c = eps.chunk(2)
        return guided_eps(eps_u, eps_c, scale)

    def _draws(self, batch: int) -> dict[str, Tensor]:
        """Every random draw of a step, in a fixed order, from the run's CPU generator (the
        global batch is drawn; this rank keeps its slice)."""
        c, h, w = self.sampler.latent_shape
        g, cfg, topo = self.generator, self.cfg, self.topology
        batch = batch * topo.world
        shape = (batch, c, h, w)
        d = {
            "z": torch.randn(shape, generator=g),
            "t": torch.randint(cfg.t_min, cfg.t_max + 1, (batch,), generator=g),
            "eps": torch.randn(shape, generator=g),
            "t_fake": torch.randint(cfg.fake_t_min, cfg.fake_t_max + 1, (batch,), generator=g),
            "eps_fake": torch.randn(shape, generator=g),
            "drop": torch.rand(batch, generator=g) < cfg.prompt_dropout,
        }
        return {k: v[topo.slice(batch // topo.world)].to(self.device) for k, v in d.items()}

    def _update(self, name: str, loss: Tensor, max_norm: float) -> float:
        """Backward (with the adapter still selected: gradient checkpointing recomputes the
        forward during backward), average over ranks, unscale, clip, step."""
        opt, scaler, params = self.optimizers[name], self.scalers[name], self.params[name]
        opt.zero_grad(set_to_none=True)
        with use_adapter(self.net, name):
            scaler.scale(loss).backward()
        if self.topology.world > 1:
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
            flat = self.topology.mean(torch.cat([g.flatten() for g in grads]))
            for p, chunk in zip(params, flat.split([p.numel() for p in params]), strict=True):
                p.grad = chunk.view_as(p).clone()
        scaler.unscale_(opt)
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        scaler.step(opt)
        scaler.update()
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

    # ---- the step ----------------------------------------------------------------------
    def train_step(self) -> StepResult:
        """One generator update and one fake-score update (WaDi §4, steps 1–6)."""
        cfg, dev = self.cfg, self.device
        prompts = self.stream.next_batch(cfg.batch_size * self.topology.world)[
            self.topology.slice(cfg.batch_size)
        ]
        cond = self.sampler.prompt_encoder(prompts).to(dev)
        d = self._draws(len(prompts))
        scale = self.lr_scale(self.step)
        for name, base_lr in (("student", cfg.lr), ("fake", cfg.fake_lr)):
            for group in self.optimizers[name].param_groups:
                group["lr"] = base_lr * scale
        # 1. student: one step from pure noise at t = T-1
        with self.student() as student:
            pred = student(d["z"], self.t_last, cond)
        x0 = one_step_x0(d["z"], pred, cfg.alpha_bar_T, self.denoiser.prediction_type)
        # 2.-4. VSD gradient from teacher and fake score (no graph), generator update
        ab = alpha_bar_at(self.alphas_cumprod, d["t"].cpu()).to(dev)
        x_t = add_noise(x0.detach(), d["eps"], ab)
        with torch.no_grad():
            eps_real = self._guided_eps(None, x_t, d["t"], cond, cfg.guidance)
            eps_fake = self._guided_eps("fake", x_t, d["t"], cond, cfg.fake_guidance)
        loss_g = generator_loss(x0, vsd_gradient(eps_real, eps_fake, ab))
        self._check("generator", loss_g)
        norm_g = self._update("student", loss_g, cfg.max_grad_norm)
        self._update_ema()
        # 5. fake-score update on the detached sample, prompts dropped to ∅ with p
        x0d = x0.detach()
        ab_f = alpha_bar_at(self.alphas_cumprod, d["t_fake"].cpu()).to(dev)
        x_tf = add_noise(x0d, d["eps_fake"], ab_f)
        cond_f = _drop_prompts(cond, self.sampler.prompt_encoder.empty(len(cond)).to(dev), d["drop"])
        with use_adapter(self.net, "fake"):
            eps_pred = self.denoiser.eps(x_tf, d["t_fake"], cond_f)
        loss_f = fake_score_loss(eps_pred, d["eps_fake"], ab_f)
        self._check("fake-score", loss_f)
        norm_f = self._update("fake", loss_f, cfg.fake_max_grad_norm)
        self.step += 1
        return StepResult(
            self.step,
            float(loss_g.detach()),
            float(loss_f.detach()),
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

    def student_adapter(self, ema: bool = False) -> dict[str, Tensor]:
        """The student tensors (the EMA copy with ``ema=True`` when enabled)."""
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
