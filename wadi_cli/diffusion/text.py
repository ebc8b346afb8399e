"""Prompt encoding for the two text-encoder families (CLIP for SD, T5 for PixArt).

One rule, used for the prompts AND for the empty prompt ∅, in training AND in sampling
(the authors' release masks training prompts but not ∅ nor inference prompts; we do not
repeat that):

- CLIP (SD 1.5 / 2.1 / tiny): tokens padded to ``max_length``; the encoder gets the
  attention mask only when its config asks for one (``use_attention_mask``, as the SD
  pipelines do); the denoiser gets no mask (SD U-Nets were trained on the full padded
  sequence).
- T5 (PixArt): tokens padded to ``max_length`` (120); the attention mask goes to the
  encoder and, through :class:`TextCondition.mask`, to the transformer's cross-attention.
- Two CLIPs (SDXL, :class:`DualCLIPPromptEncoder`): as diffusers'
  ``StableDiffusionXLPipeline.encode_prompt``, each encoder reads its own tokens (padded to
  77, no mask) and gives its penultimate hidden states; the two are concatenated along the
  features (768 + 1280 = 2048), and the second encoder's projected pooled output
  (``text_embeds``) is :class:`TextCondition.pooled`. ∅ is all zeros when the pipeline's
  ``force_zeros_for_empty_prompt`` is set (SDXL base: it was trained with zeroed text
  conditions), else the encoded empty prompt.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from wadi_cli.errors import BadInputError, warn

TextEncoderKind = Literal["clip", "t5"]


@dataclass
class TextCondition:
    """Encoded prompts: ``embeds`` (B, L, D) and an optional cross-attention mask (B, L),
    1 = attend, 0 = padding. ``mask is None`` means "attend to every token". ``pooled``
    (B, P): SDXL's pooled text embedding (the U-Net's ``text_embeds``), else ``None``."""

    embeds: torch.Tensor
    mask: torch.Tensor | None = None
    pooled: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.embeds.shape[0])

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> TextCondition:
        """Move to ``device``; cast the embeddings (never the mask) to ``dtype``."""
        embeds = self.embeds.to(device=device, dtype=dtype)
        mask = None if self.mask is None else self.mask.to(device=device)
        pooled = None if self.pooled is None else self.pooled.to(device=device, dtype=dtype)
        return TextCondition(embeds, mask, pooled)

    def index(self, idx: slice | Sequence[int] | torch.Tensor) -> TextCondition:
        """Rows ``idx`` of the batch."""
        if not isinstance(idx, slice):
            idx = torch.as_tensor(idx, dtype=torch.long, device=self.embeds.device)
        return TextCondition(
            self.embeds[idx],
            None if self.mask is None else self.mask[idx],
            None if self.pooled is None else self.pooled[idx],
        )

    @staticmethod
    def cat(conditions: Sequence[TextCondition]) -> TextCondition:
        """Concatenate along the batch (all masked or none masked)."""
        if not conditions:
            raise ValueError("nothing to concatenate")
        masks = [c.mask for c in conditions]
        if any(m is None for m in masks) and not all(m is None for m in masks):
            raise ValueError("cannot concatenate masked and unmasked text conditions")
        pooled = [c.pooled for c in conditions]
        if any(p is None for p in pooled) and not all(p is None for p in pooled):
            raise ValueError("cannot concatenate text conditions with and without pooled embeddings")
        embeds = torch.cat([c.embeds for c in conditions])
        mask = None if masks[0] is None else torch.cat(masks)  # type: ignore[arg-type]
        return TextCondition(embeds, mask, None if pooled[0] is None else torch.cat(pooled))  # type: ignore[arg-type]

    def expand(self, n: int) -> TextCondition:
        """This one-row condition repeated ``n`` times (a view, no copy)."""
        return TextCondition(
            self.embeds.expand(n, *self.embeds.shape[1:]),
            None if self.mask is None else self.mask.expand(n, *self.mask.shape[1:]),
            None if self.pooled is None else self.pooled.expand(n, *self.pooled.shape[1:]),
        )


#: no tokenizer wadi uses makes a token of fewer than one character of text, so the first
#: ``max_length * 32`` characters of a prompt that tokenize to more than ``max_length``
#: tokens give the encoder exactly what the whole prompt would
CHARS_PER_TOKEN_BOUND = 32


class PromptEncoder:
    """Callable ``prompts -> TextCondition`` with the masking rule of the module docstring.

    ``encoder.empty(n)`` gives ∅ repeated n times (encoded once, cached per device).
    """

    def __init__(
        self,
        tokenizer: object,
        text_encoder: torch.nn.Module,
        kind: TextEncoderKind,
        max_length: int | None = None,
    ) -> None:
        if kind not in ("clip", "t5"):
            raise BadInputError(f"unknown text encoder kind {kind!r}; expected 'clip' or 't5'")
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.kind = kind
        self.max_length = int(max_length or tokenizer.model_max_length)  # type: ignore[attr-defined]
        self._empty: TextCondition | None = None
        self._warned = False  # truncation is said once per encoder

    @property
    def device(self) -> torch.device:
        return next(self.text_encoder.parameters()).device

    def _encoder_wants_mask(self) -> bool:
        if self.kind == "t5":
            return True
        return bool(getattr(self.text_encoder.config, "use_attention_mask", False))

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str]) -> TextCondition:
        """Encode a batch of prompts (strings, possibly empty)."""
        return self.encode(prompts)

    def encode(self, prompts: Sequence[str]) -> TextCondition:
        """:meth:`__call__` with autograd on (a learned token's embedding gets gradients:
        ``wadi invert``)."""
        ids, mask = self.tokens(prompts)
        encoder_mask = mask if self._encoder_wants_mask() else None
        embeds = self.text_encoder(ids, attention_mask=encoder_mask)[0]
        return TextCondition(embeds, mask if self.kind == "t5" else None)

    def tokens(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and attention mask (B, max_length) of ``prompts``, on the encoder's device."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if len(prompts) == 0:
            raise BadInputError("no prompts to encode")
        tokens = self.tokenizer(  # type: ignore[operator]
            [self._within_limit(p) for p in prompts],
            padding="max_length",
            max_length=self.max_length,
            truncation=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        return tokens.input_ids.to(self.device), tokens.attention_mask.to(self.device)

    def _within_limit(self, prompt: str) -> str:
        """``prompt``, or the start of it that holds more tokens than the encoder reads (the
        tokens it keeps are the same: tokenizing megabytes only to drop them took minutes);
        warns once per encoder, with the token count, when a prompt is truncated."""
        cut = prompt[: self.max_length * CHARS_PER_TOKEN_BOUND]
        n = len(self.tokenizer(cut, truncation=False)["input_ids"])  # type: ignore[operator]
        if n <= self.max_length:  # (a short prompt, or a long run of whitespace: keep it all)
            return prompt
        if not self._warned:
            self._warned = True
            whole = len(cut) == len(prompt)
            count = f"{n} tokens" if whole else f"over {n} tokens ({len(prompt):,} characters)"
            warn(
                f"a prompt is {count}; the text encoder reads only the first {self.max_length} "
                "(the rest is ignored)"
            )
        return cut

    def empty(self, n: int) -> TextCondition:
        """∅ (the empty prompt) repeated ``n`` times, encoded by exactly the same rule."""
        if self._empty is None or self._empty.embeds.device != self.device:
            self._empty = self([""])
        return self._empty.expand(n)


class DualCLIPPromptEncoder:
    """SDXL's prompt encoding (the module docstring): callable ``prompts -> TextCondition``
    with ``pooled`` set; ``encoder.empty(n)`` gives ∅ (zeros when ``zero_empty``)."""

    kind = "clip-l+clip-g"

    def __init__(
        self,
        tokenizers: Sequence[object],
        text_encoders: Sequence[torch.nn.Module],
        max_length: int | None = None,
        zero_empty: bool = True,
    ) -> None:
        if len(tokenizers) != 2 or len(text_encoders) != 2:
            raise BadInputError("SDXL prompt encoding needs two tokenizers and two text encoders")
        self.parts = [
            PromptEncoder(t, e, "clip", max_length) for t, e in zip(tokenizers, text_encoders, strict=True)
        ]
        self.max_length = self.parts[0].max_length
        self.zero_empty = zero_empty
        self._empty: TextCondition | None = None

    @property
    def text_encoder(self) -> torch.nn.Module:
        """The first text encoder (its device and dtype are the pair's)."""
        return self.parts[0].text_encoder

    @property
    def device(self) -> torch.device:
        return self.parts[0].device

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str]) -> TextCondition:
        """Encode a batch of prompts: penultimate hidden states of both encoders,
        concatenated, and the second encoder's projected pooled output."""
        hidden, pooled = [], None
        for part in self.parts:
            ids, _ = part.tokens(prompts)
            out = part.text_encoder(ids.to(part.device), output_hidden_states=True)
            if out[0].ndim == 2:  # CLIPTextModelWithProjection: text_embeds (B, projection_dim)
                pooled = out[0]
            hidden.append(out.hidden_states[-2])
        if pooled is None:
            raise BadInputError("SDXL's second text encoder must be a CLIPTextModelWithProjection")
        embeds = torch.cat([h.to(hidden[0].device) for h in hidden], dim=-1)
        return TextCondition(embeds, None, pooled.to(embeds.device))

    def empty(self, n: int) -> TextCondition:
        """∅ repeated ``n`` times: zeros of the prompts' shapes when ``zero_empty`` (as
        diffusers' SDXL pipeline with ``force_zeros_for_empty_prompt``), else ``""`` encoded."""
        if self._empty is None or self._empty.embeds.device != self.device:
            e = self([""])
            if self.zero_empty:
                e = TextCondition(torch.zeros_like(e.embeds), None, torch.zeros_like(e.pooled))
            self._empty = e
        return self._empty.expand(n)
