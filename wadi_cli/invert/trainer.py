"""The relation-inversion recipe: one new token's input embedding on the frozen base model
(text encoder and denoiser), trained with ReVersion's objective (:mod:`wadi_cli.invert.losses`).

:class:`Inverter` is an :class:`~wadi_cli.distill.recipe.AdapterRecipe` whose one trained
"adapter" is the token's embedding vector: it shares the optimizer, gradient scaler, lr
schedule, gradient averaging over ranks, RNG and checkpoint plumbing, and replaces the set-up
of adapters by the token (:func:`wadi_cli.diffusion.tokens.add_tokens`).
:func:`wadi_cli.invert.run.invert` drives it with the loop of :func:`wadi_cli.distill.run.run_loop`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from wadi_cli.diffusion import add_noise, alpha_bar_at, alphas_cumprod_of
from wadi_cli.diffusion.tokens import (
    add_tokens,
    base_embedding,
    check_token_backbone,
    token_ids,
    token_is_known,
)
from wadi_cli.distill.checkpoint import Checkpoint
from wadi_cli.distill.data import PromptStream
from wadi_cli.distill.recipe import STUDENT, AdapterRecipe, Role
from wadi_cli.distill.topology import Topology
from wadi_cli.errors import BadInputError, MismatchError
from wadi_cli.finetune.losses import denoising_loss, denoising_target
from wadi_cli.finetune.trainer import encode_latents
from wadi_cli.invert.config import InvertConfig
from wadi_cli.invert.losses import relation_focal_probabilities, sample_timesteps, steering_loss
from wadi_cli.io.embeddings import EMBEDDING_KIND

if TYPE_CHECKING:
    from wadi_cli.pipeline import LoadedPipeline

#: The columns of ``metrics.csv``: :class:`InvertStep` + seconds.
METRIC_FIELDS = ("step", "loss", "loss_denoise", "loss_steer", "grad_norm", "lr", "embedding_norm", "seconds")


@dataclass
class InvertStep:
    """Scalars of one inversion step."""

    step: int
    loss: float
    loss_denoise: float
    loss_steer: float
    grad_norm: float
    lr: float
    embedding_norm: float


def check_token(pipe: LoadedPipeline, cfg: InvertConfig) -> int:
    """Before a run starts: the token must be new to the pipeline's tokenizer and the text
    encoder a CLIP; returns the id of ``cfg.init_word``, which must be one token."""
    tokenizer = pipe.prompt_encoder.tokenizer
    check_token_backbone(pipe.backbone.name, "wadi invert")
    if token_is_known(tokenizer, cfg.token):
        raise BadInputError(
            f'--token {cfg.token!r} is already in the tokenizer\'s vocabulary; choose a new one, e.g. "<R>"'
        )
    init = token_ids(tokenizer, cfg.init_word)
    if len(init) != 1:
        raise BadInputError(
            f"--init-word {cfg.init_word!r} is {len(init)} tokens for this tokenizer; pick a word that is one"
        )
    return init[0]


class Inverter(AdapterRecipe):
    """State and step of a relation inversion. ``images``: uint8 (N, R, R, 3) exemplars at the
    backbone's resolution; ``captions[i]``: the captions of image i, each holding ``cfg.token``."""

    metric_fields = METRIC_FIELDS

    def __init__(
        self,
        cfg: InvertConfig,
        pipe: LoadedPipeline,
        images: np.ndarray,
        captions: list[list[str]],
        topology: Topology | None = None,
    ) -> None:
        self.images, self.captions = images, captions
        super().__init__(cfg, pipe, topology)

    def roles(self) -> list[Role]:
        """One trained role, the token's embedding (no layer of the denoiser is adapted)."""
        cfg = self.cfg
        return [Role(STUDENT, [], EMBEDDING_KIND, 1, 0, cfg.lr, cfg.max_grad_norm)]

    def setup(self) -> None:
        """The token (initialised from ``init_word``), its optimizer, the run's generator, the
        schedule and timestep distribution, the cached latents, and the steering's word banks."""
        cfg, pipe = self.cfg, self.pipe
        self.role_specs = {role.name: role for role in self.roles()}
        self.targets = {STUDENT: []}
        self.student_net = None
        encoder = pipe.prompt_encoder
        self.text_encoder = encoder.text_encoder
        self.text_encoder.requires_grad_(False)
        self.table = base_embedding(self.text_encoder)
        start = self.table.weight[check_token(pipe, cfg)].detach().float().clone()
        self.embedding = torch.nn.Parameter(start)
        add_tokens(encoder.tokenizer, self.text_encoder, {cfg.token: self.embedding})
        self.params = {STUDENT: [self.embedding]}
        self._setup_optimizers()
        self.ema = None
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.alphas_cumprod = alphas_cumprod_of(pipe.scheduler)
        self.timestep_probs = relation_focal_probabilities(len(self.alphas_cumprod), cfg.importance_alpha)
        self.latents = encode_latents(pipe, self.images)
        self.stream = PromptStream([str(i) for i in range(len(self.latents))], cfg.seed)
        self._word_banks()

    def _word_banks(self) -> None:
        """Token ids of each positive word, and of each caption's negative words (its tokens
        other than stop words, positive words and the token itself)."""
        cfg, tok = self.cfg, self.pipe.prompt_encoder.tokenizer
        self.positive_ids = [token_ids(tok, w) for w in cfg.positives]
        excluded = {i for w in (*cfg.positives, *cfg.stops) for i in token_ids(tok, w)}
        excluded.add(int(tok.convert_tokens_to_ids(cfg.token)))
        self.negative_ids = {
            c: [i for i in token_ids(tok, c) if i not in excluded] for caps in self.captions for c in caps
        }

    # ---- a step --------------------------------------------------------------------------
    def _batch(self) -> tuple[Tensor, list[str]]:
        """This rank's micro-batch: latents in the stream's order and one caption of each,
        drawn from the run's generator."""
        b, topo, g = self.cfg.batch_size, self.topology, self.generator
        picks = [int(i) for i in self.stream.next_batch(b * topo.world)]
        choice = [int(torch.randint(0, len(self.captions[i]), (1,), generator=g)) for i in picks]
        keep = slice(topo.rank * b, (topo.rank + 1) * b)
        picks, choice = picks[keep], choice[keep]
        return self.latents[picks], [self.captions[i][k] for i, k in zip(picks, choice, strict=True)]

    def _noise(self, n: int, shape: tuple[int, ...]) -> tuple[Tensor, Tensor]:
        """Relation-focal timesteps and ε ~ N(0, I) for ``n`` rows of every rank (this rank's slice)."""
        topo, g = self.topology, self.generator
        t = sample_timesteps(self.timestep_probs, n * topo.world, g)
        eps = torch.randn((n * topo.world, *shape), generator=g)
        keep = slice(topo.rank * n, (topo.rank + 1) * n)
        return t[keep].to(self.device), eps[keep].to(self.device)

    def _steer(self, captions: list[str]) -> Tensor:
        """L_steer of this micro-batch: ``num_positives`` positive words drawn from the run's
        generator (all ranks draw the same), the captions' negative words."""
        cfg = self.cfg
        order = torch.randperm(len(self.positive_ids), generator=self.generator)[: cfg.num_positives].tolist()
        pos = [i for k in order for i in self.positive_ids[k]]
        neg = [i for c in captions for i in self.negative_ids[c]]
        with torch.no_grad():
            weight = self.table.weight.float()
            positives = weight[torch.tensor(pos, dtype=torch.long, device=weight.device)]
            negatives = weight[torch.tensor(neg, dtype=torch.long, device=weight.device)]
        return steering_loss(self.embedding, positives, negatives, cfg.temperature)

    def train_step(self) -> InvertStep:
        """One optimizer step of ReVersion's loss, accumulated over ``grad_accum`` micro-batches."""
        cfg, k = self.cfg, self.cfg.grad_accum
        scale = self.lr_scale(self.step)
        self._set_lrs(scale)
        totals, denoises, steers = [], [], []
        for _ in range(k):
            x0, captions = self._batch()
            t, eps = self._noise(len(x0), tuple(x0.shape[1:]))
            ab = alpha_bar_at(self.alphas_cumprod, t.cpu()).to(self.device)
            x_t = add_noise(x0, eps, ab)
            cond = self.pipe.prompt_encoder.encode(captions)
            pred = self.denoiser(x_t, t, cond)
            target = denoising_target(x0, eps, ab, self.denoiser.prediction_type)
            denoise = denoising_loss(pred, target)
            steer = self._steer(captions) if cfg.steer_weight > 0 else torch.zeros((), device=denoise.device)
            loss = denoise + cfg.steer_weight * steer.to(denoise.device)
            self._check("inversion", loss)
            self.scalers[STUDENT].scale(loss / k).backward()
            totals.append(loss.detach())
            denoises.append(denoise.detach())
            steers.append(steer.detach())
        norm = self._optimizer_step(STUDENT)
        self.step += 1
        mean = self.topology.mean
        return InvertStep(
            self.step,
            float(mean(torch.stack(totals).mean())),
            float(mean(torch.stack(denoises).mean())),
            float(mean(torch.stack(steers).float().mean())),
            norm,
            cfg.lr * scale,
            float(self.embedding.detach().norm()),
        )

    # ---- the learned token ---------------------------------------------------------------
    def student_state(self) -> dict[str, Tensor]:
        """{token: (1, D)} float32: the embedding file's content."""
        return {self.cfg.token: self.embedding.detach().reshape(1, -1)}

    @torch.no_grad()
    def load_student_state(self, tensors: dict[str, Tensor]) -> None:
        """Inverse of :meth:`student_state` (the token and width must match)."""
        vec = tensors.get(self.cfg.token)
        if vec is None or vec.shape[-1] != self.embedding.shape[-1]:
            raise MismatchError(f"the checkpoint holds no {self.embedding.shape[-1]}-wide {self.cfg.token!r}")
        self.embedding.copy_(vec.reshape(-1).to(self.embedding))

    def checkpoint(self) -> Checkpoint:
        """The recipe's checkpoint, marked as an embedding (its student file is an embedding file)."""
        ckpt = super().checkpoint()
        ckpt.extra["kind"] = EMBEDDING_KIND
        ckpt.extra["token"] = self.cfg.token
        return ckpt

    def validate(self, run: Any) -> dict[str, Any] | None:
        """No validation during an inversion."""
        return None
