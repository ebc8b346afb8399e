"""The WaDi distillation recipe (§4): a LoRaD student and a LoRaD fake score on ONE frozen
base that serves as the teacher, trained with the VSD losses.

:class:`Distiller` is an :class:`~wadi_cli.distill.recipe.AdapterRecipe` (which holds the
adapters, optimizers, scalers, EMA, RNG and checkpoints) with what is particular to
distillation: its two roles, the prompt stream and text-condition cache, the random
draws of a step, the fixed teacher pairs of the regression term, and the step itself.
:func:`wadi_cli.distill.run.distill` drives it.
"""

from __future__ import annotations

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
)
from wadi_cli.distill.config import DistillConfig, adapter_options
from wadi_cli.distill.data import PromptStream
from wadi_cli.distill.losses import (
    fake_score_loss,
    generator_loss,
    guided_eps,
    regression_loss,
    vsd_gradient,
)
from wadi_cli.distill.phases import Phases
from wadi_cli.distill.recipe import AdapterRecipe, Role
from wadi_cli.distill.topology import Topology
from wadi_cli.lorad.multi_adapter import use_adapter

if TYPE_CHECKING:
    from wadi_cli.pipeline import LoadedPipeline

#: The columns of ``metrics.csv`` (and the TensorBoard scalars): :class:`StepResult` + seconds.
METRIC_FIELDS = ("step", "loss_g", "loss_fake", "grad_norm_g", "grad_norm_fake", "lr", "fake_lr", "seconds")


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


class Distiller(AdapterRecipe):
    """State and step of a WaDi run. ``pipe`` is a :class:`wadi_cli.pipeline.LoadedPipeline` of
    the base pipeline (teacher weights, frozen); its denoiser network gets both adapters."""

    metric_fields = METRIC_FIELDS

    def __init__(
        self,
        cfg: DistillConfig,
        pipe: LoadedPipeline,
        prompts: list[str],
        topology: Topology | None = None,
        phases: Phases | None = None,
    ) -> None:
        self.prompts = prompts
        self.phases = phases or Phases()  # setup() reports its slow parts here
        super().__init__(cfg, pipe, topology)

    def roles(self) -> list[Role]:
        """The student (``cfg.adapter``: LoRaD, or a baseline) and the fake score (LoRaD), each
        on its backbone's target rule, with its own rank, init seed, lr and clipping."""
        cfg, backbone = self.cfg, self.pipe.backbone
        return [
            Role(
                "student",
                backbone.target_modules(self.net, "student"),
                cfg.adapter,
                cfg.rank,
                cfg.init_seed,
                cfg.lr,
                cfg.max_grad_norm,
                adapter_options(cfg),
            ),
            Role(
                "fake",
                backbone.target_modules(self.net, "fake"),
                "lorad",
                cfg.fake_rank,
                cfg.init_seed + 1,
                cfg.fake_lr,
                cfg.fake_max_grad_norm,
            ),
        ]

    def setup(self) -> None:
        """The recipe's state, then the schedule, the prompt stream, the text-condition cache
        and (with a regression weight) the fixed teacher pairs."""
        super().setup()
        cfg, pipe = self.cfg, self.pipe
        self.alphas_cumprod = alphas_cumprod_of(pipe.scheduler)
        self.t_last = last_timestep(pipe.scheduler)
        self.stream = PromptStream(self.prompts, cfg.seed)
        self._text_cache: dict[str, TextCondition] = {}
        self.pairs: dict[str, Any] | None = None
        if cfg.regression_weight > 0:
            self.pairs = self._teacher_pairs(self.prompts)

    def validate(self, run: Any) -> dict[str, Any] | None:
        """One-step validation images (+ tiny metrics) of the student
        (:func:`wadi_cli.distill.validate.validate`)."""
        from wadi_cli.distill.validate import validate

        return validate(self, run)

    # ---- pieces of a step ------------------------------------------------------------
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
        what = f"building {n:,} regression pairs ({cfg.regression_steps}-step teacher)"
        with self.phases.phase(what, total=n) as advance:
            for start in range(0, n, 64):
                cond = self.encode(texts[start : start + 64])
                zb = z[start : start + 64].to(self.device)
                x0.append(teacher_latents(self.pipe, cond, zb, cfg.regression_steps, cfg.guidance).float())
                advance(len(zb))
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
        self._set_lrs(scale)
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
        norm_g = self._optimizer_step("student")  # and the EMA
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
            norm_f = self._optimizer_step("fake")
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


def _drop_prompts(cond: TextCondition, empty: TextCondition, drop: Tensor) -> TextCondition:
    """``cond`` with the rows where ``drop`` is true replaced by ∅."""
    keep = ~drop.reshape(-1, 1, 1)
    embeds = torch.where(keep, cond.embeds, empty.embeds.to(cond.embeds.dtype))
    mask = None
    if cond.mask is not None and empty.mask is not None:
        mask = torch.where(keep[:, :, 0], cond.mask, empty.mask)
    pooled = None
    if cond.pooled is not None and empty.pooled is not None:  # SDXL's pooled text embedding
        pooled = torch.where(keep[:, :, 0], cond.pooled, empty.pooled.to(cond.pooled.dtype))
    return TextCondition(embeds, mask, pooled)
