"""The DreamBooth recipe: one adapter (LoRaD, LoRA, DoRA, or every weight) on the frozen base
denoiser, trained with the base model's denoising loss (:mod:`wadi_cli.finetune.losses`).

:class:`FineTuner` is an :class:`~wadi_cli.distill.recipe.AdapterRecipe` (adapters, optimizer,
scaler, EMA, RNG and checkpoints) with what is particular to DreamBooth: one trained role,
the instance (and class) latents encoded by the VAE once at set-up, the two text conditions
encoded once (the text encoder stays frozen), and the step. :func:`wadi_cli.finetune.run.finetune`
drives it with the loop of :func:`wadi_cli.distill.run.run_loop`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from wadi_cli.diffusion import TextCondition, add_noise, alpha_bar_at, alphas_cumprod_of
from wadi_cli.distill.config import adapter_options
from wadi_cli.distill.data import PromptStream
from wadi_cli.distill.recipe import STUDENT, AdapterRecipe, Role
from wadi_cli.distill.topology import Topology
from wadi_cli.finetune.config import FinetuneConfig
from wadi_cli.finetune.losses import denoising_target, dreambooth_loss

if TYPE_CHECKING:
    from wadi_cli.pipeline import LoadedPipeline

#: The columns of ``metrics.csv``: :class:`FinetuneStep` + seconds.
METRIC_FIELDS = ("step", "loss", "loss_instance", "loss_prior", "grad_norm", "lr", "seconds")
#: Seed of the validation noise (teacher samples of the instance prompt).
VALIDATION_SEED = 20261
VALIDATION_IMAGES = 4


@dataclass
class FinetuneStep:
    """Scalars of one fine-tune step (``loss_prior`` is NaN without prior preservation)."""

    step: int
    loss: float
    loss_instance: float
    loss_prior: float
    grad_norm: float
    lr: float


@torch.no_grad()
def encode_latents(pipe: LoadedPipeline, images: np.ndarray, batch: int = 16) -> Tensor:
    """VAE latents of uint8 images (N, H, W, 3), scaled as the denoiser sees them:
    ``(mode of q(z|x) − shift) · scaling_factor`` (the inverse of
    :func:`wadi_cli.pipeline.decode`), float32 on the pipeline's device."""
    vae = pipe.vae
    config = vae.config  # type: ignore[attr-defined]
    dtype = next(vae.parameters()).dtype
    out = []
    for i in range(0, len(images), batch):
        x = torch.from_numpy(images[i : i + batch]).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        dist = vae.encode(x.to(pipe.device, dtype)).latent_dist  # type: ignore[operator]
        z = dist.mode().float()
        shift = getattr(config, "shift_factor", None)
        if shift:
            z = z - float(shift)
        out.append(z * float(config.scaling_factor))
    return torch.cat(out)


class FineTuner(AdapterRecipe):
    """State and step of a DreamBooth fine-tune. ``instance`` / ``klass`` are uint8 images
    (N, R, R, 3) at the backbone's resolution (``klass``: ``None`` without prior preservation);
    ``pipe`` is the frozen base pipeline whose denoiser gets the adapter."""

    metric_fields = METRIC_FIELDS

    def __init__(
        self,
        cfg: FinetuneConfig,
        pipe: LoadedPipeline,
        instance: np.ndarray,
        klass: np.ndarray | None = None,
        topology: Topology | None = None,
    ) -> None:
        self.instance_images, self.class_images = instance, klass
        super().__init__(cfg, pipe, topology)

    def roles(self) -> list[Role]:
        """One trained role, the student: ``cfg.adapter`` on the backbone's student targets."""
        cfg = self.cfg
        targets = self.pipe.backbone.target_modules(self.net, STUDENT)
        options = adapter_options(cfg)
        return [
            Role(STUDENT, targets, cfg.adapter, cfg.rank, cfg.init_seed, cfg.lr, cfg.max_grad_norm, options)
        ]

    def setup(self) -> None:
        """The recipe's state, the schedule, the cached latents and text conditions, and the
        instance stream (a shuffled, resumable order of the instance images)."""
        super().setup()
        cfg, pipe = self.cfg, self.pipe
        self.alphas_cumprod = alphas_cumprod_of(pipe.scheduler)
        self.timesteps = len(self.alphas_cumprod)
        self.latents = encode_latents(pipe, self.instance_images)
        self.class_latents = None if self.class_images is None else encode_latents(pipe, self.class_images)
        self.stream = PromptStream([str(i) for i in range(len(self.latents))], cfg.seed)
        encoder = pipe.prompt_encoder
        with torch.no_grad():
            self.cond = encoder([cfg.instance_prompt]).to(self.device)
            self.class_cond = (
                None if cfg.class_prompt is None else encoder([cfg.class_prompt]).to(self.device)
            )

    # ---- a step --------------------------------------------------------------------------
    def _batch(self) -> tuple[Tensor, TextCondition, int]:
        """This rank's micro-batch: instance latents in the stream's order, then (with prior
        preservation) as many class latents drawn from the run's generator; the conditions;
        the number of instance rows."""
        cfg, topo, g = self.cfg, self.topology, self.generator
        b = cfg.batch_size
        picks = [int(i) for i in self.stream.next_batch(b * topo.world)][topo.rank * b : (topo.rank + 1) * b]
        x0 = self.latents[picks]
        cond = TextCondition.cat([self.cond] * b)
        if self.class_latents is not None and cfg.prior:
            idx = torch.randint(0, len(self.class_latents), (b * topo.world,), generator=g)
            idx = idx[topo.rank * b : (topo.rank + 1) * b]
            x0 = torch.cat([x0, self.class_latents[idx.to(self.class_latents.device)]])
            cond = TextCondition.cat([cond] + [self.class_cond] * b)
        return x0, cond, b

    def _noise(self, n: int, shape: tuple[int, ...]) -> tuple[Tensor, Tensor]:
        """Timesteps t ~ U{0, …, T−1} and ε ~ N(0, I) for ``n`` rows of every rank, from the
        run's generator (this rank's slice)."""
        topo, g = self.topology, self.generator
        t = torch.randint(0, self.timesteps, (n * topo.world,), generator=g)
        eps = torch.randn((n * topo.world, *shape), generator=g)
        keep = slice(topo.rank * n, (topo.rank + 1) * n)
        return t[keep].to(self.device), eps[keep].to(self.device)

    def train_step(self) -> FinetuneStep:
        """One optimizer step of DreamBooth's loss, accumulated over ``grad_accum`` micro-batches."""
        cfg, k = self.cfg, self.cfg.grad_accum
        scale = self.lr_scale(self.step)
        self._set_lrs(scale)
        totals, instances, priors = [], [], []
        for _ in range(k):
            x0, cond, n_inst = self._batch()
            t, eps = self._noise(len(x0), tuple(x0.shape[1:]))
            ab = alpha_bar_at(self.alphas_cumprod, t.cpu()).to(self.device)
            x_t = add_noise(x0, eps, ab)
            with self.student() as student:
                pred = student(x_t, t, cond)
            target = denoising_target(x0, eps, ab, self.denoiser.prediction_type)
            loss, inst, prior = dreambooth_loss(pred, target, n_inst, cfg.prior_loss_weight)
            self._check("fine-tune", loss)
            self._backward(STUDENT, loss / k)
            totals.append(loss.detach())
            instances.append(inst.detach())
            if prior is not None:
                priors.append(prior.detach())
        norm = self._optimizer_step(STUDENT)
        self.step += 1
        mean = self.topology.mean
        return FinetuneStep(
            self.step,
            float(mean(torch.stack(totals).mean())),
            float(mean(torch.stack(instances).mean())),
            float(mean(torch.stack(priors).mean())) if priors else float("nan"),
            norm,
            cfg.lr * scale,
        )

    # ---- validation ----------------------------------------------------------------------
    @torch.no_grad()
    def validate(self, run: Any) -> dict[str, Any] | None:
        """Teacher samples (the sampling recipe's steps and CFG; EMA weights when kept) of the
        instance prompt from fixed seeds, as ``run/validation/step-NNNNNNNN.png``. No metrics."""
        from PIL import Image

        from wadi_cli.backbones.recipes import teacher_defaults
        from wadi_cli.distill.validate import ema_weights
        from wadi_cli.io import atomic_file
        from wadi_cli.pipeline import decode, initial_noise
        from wadi_cli.pipeline.teacher import teacher_latents
        from wadi_cli.sample.output import image_grid

        steps, guidance = teacher_defaults(self.cfg.backbone)
        seeds = [VALIDATION_SEED + i for i in range(VALIDATION_IMAGES)]
        with ema_weights(self, True), self.student() as student:
            pipe = dataclasses.replace(self.pipe, denoiser=student)
            z = initial_noise(seeds, pipe.latent_shape, self.device)
            cond = TextCondition.cat([self.cond] * len(seeds))
            images = decode(pipe.vae, teacher_latents(pipe, cond, z.to(pipe.dtype), steps, guidance))
        with atomic_file(Path(run) / "validation" / f"step-{self.step:08d}.png") as tmp:
            Image.fromarray(image_grid(images)).save(tmp, format="PNG")
        return None
