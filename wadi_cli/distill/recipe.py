"""What every adapter-training recipe on ONE frozen base holds, whatever its loss.

Shaped like torchtune's recipe interface: :meth:`AdapterRecipe.setup` builds the state,
``train_step`` (the subclass's) runs one optimisation step, :meth:`AdapterRecipe.checkpoint`
/ :meth:`AdapterRecipe.load` save and restore it. The state is

- one adapter per trained role on the frozen base network of a
  :class:`~wadi_cli.pipeline.LoadedPipeline` (switchable layers of
  :mod:`wadi_cli.lorad.multi_adapter`; or, for the student of kind ``full``, a trainable
  fp32 copy of the whole network), described by :meth:`AdapterRecipe.roles`;
- the optimizer and gradient scaler of each role (:mod:`wadi_cli.distill.optimizers`), the
  learning-rate schedule and the step that unscales, clips and steps them;
- the student's EMA (:class:`~wadi_cli.distill.ema.EMA`), updated after every student step;
- the run's RNG: one CPU generator from which every random draw of a step comes, so a
  step depends only on the state it starts from; and the data stream's position.

A recipe names its trained roles and writes ``train_step``: the WaDi distiller
(:class:`wadi_cli.distill.trainer.Distiller`) trains a student and a fake score with the
VSD losses; a DreamBooth-style fine-tune would train the student alone with the plain
denoising loss. The role named ``student`` is the one the EMA averages and export reads.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from wadi_cli.diffusion import wrap_denoiser
from wadi_cli.distill.checkpoint import Checkpoint, restore_rng, rng_state
from wadi_cli.distill.ema import EMA
from wadi_cli.distill.optimizers import make_grad_scaler, make_optimizer
from wadi_cli.distill.topology import Topology
from wadi_cli.errors import BadInputError, MismatchError, WadiError
from wadi_cli.lorad import lorad_layers
from wadi_cli.lorad.multi_adapter import (
    adapter_parameters,
    adapter_state_dict,
    add_switchable_adapter,
    load_adapter_tensors,
    use_adapter,
)

if TYPE_CHECKING:
    from wadi_cli.pipeline import LoadedPipeline

#: The role the EMA averages, validation samples and export reads.
STUDENT = "student"


class TrainingDiverged(WadiError):
    """A loss became NaN/Inf; the run stops and keeps its last good checkpoint."""

    exit_code = 1


@dataclass(frozen=True)
class Role:
    """One trained role: an adapter of ``kind`` and ``rank`` on the Linears ``targets``
    (``kind="full"``: every weight of a trainable copy, student only), its ``B`` matrices
    drawn from ``init_seed``, trained at ``lr`` with gradients clipped to ``max_grad_norm``;
    ``options`` are the kind's keyword arguments (``orthogonal_map``)."""

    name: str
    targets: list[str]
    kind: str
    rank: int
    init_seed: int
    lr: float
    max_grad_norm: float
    options: Mapping[str, Any] = field(default_factory=dict)


class AdapterRecipe:
    """State of an adapter-training run on the frozen base of ``pipe`` (see the module
    docstring). Subclasses implement :meth:`roles` and ``train_step``, and set
    ``self.stream`` (anything with a ``position``: the data stream) in :meth:`setup`.

    ``cfg`` is a config with the fields used here (``seed``, ``init_seed``, ``optimizer``
    and AdamW's, ``warmup_steps``, ``lr_schedule``, ``max_steps``, ``ema_decay``,
    ``gradient_checkpointing``, ``lorad_exact_low_precision``) and ``to_dict()``.

    :func:`wadi_cli.distill.run.run_loop` drives it: ``train_step`` returns a result with
    the attributes named by :attr:`metric_fields`, and :meth:`validate` may add validation
    rows."""

    #: The columns of ``metrics.csv``: attributes of ``train_step``'s result + ``seconds``.
    metric_fields: tuple[str, ...] = ("step", "seconds")

    def __init__(self, cfg: Any, pipe: LoadedPipeline, topology: Topology | None = None) -> None:
        self.cfg = cfg
        self.topology = topology or Topology()
        self.pipe = pipe
        self.denoiser = pipe.denoiser
        self.net = self.denoiser.model
        self.device = pipe.device
        self.net.requires_grad_(False)
        self.stream: Any = None
        self.step = 0
        self.setup()

    # ---- what a recipe defines -------------------------------------------------------
    def roles(self) -> list[Role]:
        """The trained roles, student first (called once, on the plain network, so that
        targets are read before any Linear is wrapped)."""
        raise NotImplementedError

    # ---- setup ----------------------------------------------------------------------------
    def setup(self) -> None:
        """Adapters, trainable parameters, optimizers, scalers, EMA and generator."""
        cfg = self.cfg
        self.role_specs = {role.name: role for role in self.roles()}
        self.targets = {name: list(role.targets) for name, role in self.role_specs.items()}
        self.student_net: torch.nn.Module | None = None
        for name, role in self.role_specs.items():
            if role.kind == "full":
                self._full_copy(name)
            else:
                add_switchable_adapter(
                    self.net,
                    name,
                    role.targets,
                    role.rank,
                    init_seed=role.init_seed,
                    kind=role.kind,
                    options=role.options,
                )
        for layer in lorad_layers(self.net).values():
            layer.exact_low_precision = cfg.lorad_exact_low_precision
        self.params = {name: adapter_parameters(self.net, name) for name in self.role_specs}
        if self.student_net is not None:
            self.params[STUDENT] = list(self.student_net.parameters())
        for params in self.params.values():
            for p in params:
                p.requires_grad_(True)
        if cfg.gradient_checkpointing:
            for net in (self.net, self.student_net):
                if net is not None:
                    net.enable_gradient_checkpointing()
        self._setup_optimizers()
        self.ema: EMA | None = EMA(self.student_state(), cfg.ema_decay) if cfg.ema_decay > 0 else None
        self.generator = torch.Generator().manual_seed(cfg.seed)

    def _full_copy(self, name: str) -> None:
        """DMD2-style baseline: every student weight trainable (an fp32 copy of the base)."""
        if name != STUDENT:
            raise BadInputError(f"adapter kind 'full' is for the {STUDENT} only, not {name!r}")
        self.student_net = copy.deepcopy(self.net).float()
        self.student_denoiser = wrap_denoiser(
            self.student_net,
            self.denoiser.prediction_type,
            self.denoiser.alphas_cumprod,
            family=self.denoiser.family,
            vae_scale_factor=getattr(self.denoiser, "vae_scale_factor", 8),
        )
        self.targets[name] = []

    def _setup_optimizers(self) -> None:
        """One optimizer and one gradient scaler per role (the only place they are built)."""
        self.optimizers = {
            name: make_optimizer(self.cfg, params, self.role_specs[name].lr)
            for name, params in self.params.items()
        }
        # fp16 base weights: scale losses so tiny gradients (VSD: g / numel) do not underflow
        base_dtype = next(self.net.parameters()).dtype
        self.scalers = {name: make_grad_scaler(self.device, base_dtype) for name in self.optimizers}

    # ---- optimisation ---------------------------------------------------------------------
    def lr_scale(self, step: int) -> float:
        """Multiplier of every role's lr at ``step`` (0-based): linear warm-up over
        ``warmup_steps``, then constant (the paper) or a cosine decay that reaches 0 at
        ``max_steps``. All optimizers share it."""
        cfg = self.cfg
        w = cfg.warmup_steps
        if w > 0 and step < w:
            return (step + 1) / w
        if cfg.lr_schedule == "cosine":
            span = max(1, cfg.max_steps - w)
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - w) / span)))
        return 1.0

    def _set_lrs(self, scale: float) -> None:
        """Every role's lr = its base lr × ``scale``."""
        for name, optimizer in self.optimizers.items():
            base_lr = self.role_specs[name].lr
            for group in optimizer.param_groups:
                group["lr"] = base_lr * scale

    def _backward(self, name: str, loss: Tensor) -> None:
        """Accumulate the gradient of ``loss`` (with the adapter still selected: gradient
        checkpointing recomputes the forward during backward)."""
        with use_adapter(self.net, name):
            self.scalers[name].scale(loss).backward()

    def _optimizer_step(self, name: str) -> float:
        """Average the accumulated gradients of role ``name`` over ranks, unscale, clip,
        step, zero; after a student step, update the EMA. Returns the gradient norm."""
        opt, scaler, params = self.optimizers[name], self.scalers[name], self.params[name]
        max_norm = self.role_specs[name].max_grad_norm
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
        if name == STUDENT and self.ema is not None:
            self.ema.step(self.student_state())
        return float(norm)

    def _check(self, name: str, loss: Tensor) -> None:
        """Stop every rank together (:class:`TrainingDiverged`) when ``loss`` is not finite."""
        finite = torch.isfinite(loss.detach()).float().reshape(1)
        if self.topology.world > 1:  # every rank stops together
            finite = self.topology.mean(finite)
        if float(finite) < 1.0:
            raise TrainingDiverged(
                f"step {self.step + 1}: the {name} loss is {float(loss.detach())}; stopping (the last good "
                "checkpoint is kept; try a lower --lr / --fake-lr)"
            )

    # ---- the student ----------------------------------------------------------------------
    @contextlib.contextmanager
    def student(self) -> Iterator[Any]:
        """The student denoiser: the shared base with the student adapter selected, or the
        separate trainable copy of a ``full`` fine-tune."""
        if self.student_net is not None:
            yield self.student_denoiser
            return
        with use_adapter(self.net, STUDENT):
            yield self.denoiser

    def student_state(self) -> dict[str, Tensor]:
        """The student's trainable tensors (adapter file names, or the full state dict)."""
        if self.student_net is not None:
            return {k: v.detach() for k, v in self.student_net.state_dict().items()}
        return adapter_state_dict(self.net, STUDENT)

    @torch.no_grad()
    def load_student_state(self, tensors: dict[str, Tensor]) -> None:
        """Inverse of :meth:`student_state` (keys and shapes must match)."""
        if self.student_net is None:
            load_adapter_tensors(self.net, STUDENT, tensors)
            return
        try:
            self.student_net.load_state_dict({k: v.to(self.device) for k, v in tensors.items()}, strict=True)
        except RuntimeError as exc:
            raise MismatchError(f"full student state does not fit: {str(exc).splitlines()[0]}") from None

    def student_weights(self, ema: bool = False) -> dict[str, Tensor]:
        """A copy of the student's trainable tensors: its adapter, or every weight for
        ``--adapter full`` (the EMA copy with ``ema=True`` when enabled)."""
        if ema and self.ema is not None:
            return self.ema.weights()
        return {k: v.clone() for k, v in self.student_state().items()}

    def validate(self, run: Any) -> dict[str, Any] | None:
        """Validation during training into the run folder ``run``: a row of metrics, or
        ``None`` when the recipe writes none."""
        return None

    # ---- checkpoints ----------------------------------------------------------------------
    def checkpoint(self) -> Checkpoint:
        """Everything needed to continue from the current step (written by
        :func:`wadi_cli.distill.checkpoint.save_checkpoint`)."""
        adapters = {
            name: self.student_state() if name == STUDENT else adapter_state_dict(self.net, name)
            for name in self.role_specs
        }
        if self.ema is not None:
            adapters["ema"] = self.ema.state_dict()["shadow"]
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
        """Continue from ``ckpt`` (targets must match exactly). A checkpoint without an EMA
        (the run had none) starts the EMA from the student's weights."""
        for role in self.role_specs:
            if list(ckpt.targets.get(role, [])) != self.targets[role]:
                raise MismatchError(
                    f"cannot resume: the {role} targets of the checkpoint differ from this model's"
                )
            if role == STUDENT:
                self.load_student_state(ckpt.adapters[role])
            else:
                load_adapter_tensors(self.net, role, ckpt.adapters[role])
            self.optimizers[role].load_state_dict(ckpt.optimizers[role])
        if self.ema is not None:
            shadow = ckpt.adapters.get("ema") or self.student_state()
            state = {"decay": self.ema.decay, "optimization_step": ckpt.step, "shadow": shadow}
            self.ema.load_state_dict(state, device=self.device)
        for name, state in ckpt.extra.get("grad_scalers", {}).items():
            if self.scalers[name].is_enabled():
                self.scalers[name].load_state_dict(state)
        restore_rng(self.generator, ckpt.rng)
        self.stream.position = ckpt.data_position
        self.step = ckpt.step
