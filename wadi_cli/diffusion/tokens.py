"""New tokens in a frozen CLIP text encoder: a learned (or loaded) embedding per token.

:class:`TokenEmbedding` replaces the encoder's input token embedding: ids below the base
vocabulary size V read the frozen base table, id V + k reads row k of ``extra`` (a trainable
fp32 parameter while ``wadi invert`` learns it, a fixed tensor when ``wadi sample
--embedding`` uses it). The base table is never resized or written, so the base model is
untouched and the learned row is the only tensor that gets a gradient.

The tokenizer learns the token as an added token (``tokenizer.add_tokens``): it is split off
before BPE wherever it stands in a prompt ("a cat<R>wall" reads cat, <R>, wall), and gets the
id V + k. A token that the tokenizer already knows (a vocabulary entry, a word that is one
token, an added token) is refused: it would silently replace a word of the model. T5 encoders
(PixArt) are refused by the callers: diffusers' PixArt pipeline has no textual-inversion loader,
so a learned file could not be used outside wadi.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from wadi_cli.errors import BadInputError, MismatchError

#: Backbones whose text encoder takes a learned token (CLIP).
TOKEN_BACKBONES: tuple[str, ...] = ("sd15", "sd21", "tiny")


def check_token_backbone(backbone: str, flag: str) -> None:
    """Refuse a backbone whose text encoder wadi cannot give a new token (one line)."""
    if backbone not in TOKEN_BACKBONES:
        raise BadInputError(
            f"{flag}: not supported for {backbone} (T5 text encoder: diffusers' PixArt pipeline has no "
            f"textual-inversion loader, so the embedding could not be used elsewhere); use "
            f"{', '.join(TOKEN_BACKBONES)}"
        )


class TokenEmbedding(nn.Module):
    """The base token embedding ``base`` (V rows, frozen) followed by the rows of ``extra``
    ((K, D); a :class:`~torch.nn.Parameter` is trained, a tensor is fixed)."""

    def __init__(self, base: nn.Embedding, extra: Tensor) -> None:
        super().__init__()
        self.base = base
        if isinstance(extra, nn.Parameter):
            self.extra = extra
        else:
            self.register_buffer("extra", extra, persistent=False)

    @property
    def weight(self) -> Tensor:
        """The base table (what ``get_input_embeddings().weight`` callers read: dtype, width)."""
        return self.base.weight

    @property
    def num_embeddings(self) -> int:
        return int(self.base.num_embeddings) + int(self.extra.reshape(-1, self.base.embedding_dim).shape[0])

    def forward(self, ids: Tensor) -> Tensor:
        vocab = int(self.base.num_embeddings)
        out = self.base(ids.clamp(max=vocab - 1))
        new = ids >= vocab
        if not bool(new.any()):
            return out
        table = self.extra.reshape(-1, out.shape[-1]).to(device=out.device, dtype=out.dtype)
        rows = table[(ids - vocab).clamp(min=0)]
        return torch.where(new[..., None], rows, out)


def base_embedding(text_encoder: nn.Module) -> nn.Embedding:
    """The encoder's frozen base token table (under a :class:`TokenEmbedding` if installed)."""
    emb = text_encoder.get_input_embeddings()  # type: ignore[operator]
    return emb.base if isinstance(emb, TokenEmbedding) else emb


def token_is_known(tokenizer: object, token: str) -> bool:
    """Whether the tokenizer already reads ``token`` as something: a vocabulary entry (also
    as a word end, CLIP's ``</w>``), an added token, or a text that is one known token."""
    vocab = tokenizer.get_vocab()  # type: ignore[attr-defined]
    if token in vocab or f"{token}</w>" in vocab:
        return True
    ids = tokenizer(token, add_special_tokens=False)["input_ids"]  # type: ignore[operator]
    unk = getattr(tokenizer, "unk_token_id", None)
    return len(ids) == 1 and ids[0] != unk


def check_token_text(token: str) -> None:
    """A token is one word: non-empty, no whitespace."""
    if not token or token != token.strip() or any(c.isspace() for c in token):
        raise BadInputError(f'token {token!r}: must be one word without spaces, e.g. "<R>"')


def add_tokens(tokenizer: object, text_encoder: nn.Module, tokens: Mapping[str, Tensor]) -> TokenEmbedding:
    """Give the tokenizer and text encoder the new ``tokens`` ({token: (D,) vector, or an
    ``nn.Parameter`` to train}); returns the encoder's :class:`TokenEmbedding`. A token the
    tokenizer knows, or a vector of another width than the encoder's, is refused before
    anything changes."""
    base = base_embedding(text_encoder)
    width = int(base.weight.shape[-1])
    for token, vec in tokens.items():
        check_token_text(token)
        if token_is_known(tokenizer, token):
            raise BadInputError(
                f'token {token!r} is already in the tokenizer\'s vocabulary; choose a new one, e.g. "<R>"'
            )
        if int(vec.shape[-1]) != width:
            raise MismatchError(
                f"the embedding of {token!r} is {int(vec.shape[-1])} wide; this text encoder's tokens are "
                f"{width} wide (an embedding for another model?)"
            )
    current = text_encoder.get_input_embeddings()  # type: ignore[operator]
    old = current.extra if isinstance(current, TokenEmbedding) else None
    rows = [vec.reshape(-1, width)[0] for vec in tokens.values()]
    if len(tokens) == 1 and isinstance(next(iter(tokens.values())), nn.Parameter) and old is None:
        extra: Tensor = next(iter(tokens.values()))
    else:
        fixed = [r.detach().to(base.weight.device, torch.float32) for r in rows]
        extra = torch.stack(([*old.detach().reshape(-1, width)] if old is not None else []) + fixed)
    start = int(base.num_embeddings) + (0 if old is None else int(old.reshape(-1, width).shape[0]))
    for k, token in enumerate(tokens):
        tokenizer.add_tokens(token)  # type: ignore[attr-defined]
        got = tokenizer.convert_tokens_to_ids(token)  # type: ignore[attr-defined]
        if got != start + k:
            raise MismatchError(
                f"token {token!r} got id {got}, expected {start + k}: the tokenizer and the text encoder's "
                "vocabulary sizes differ"
            )
    module = TokenEmbedding(base, extra)
    text_encoder.set_input_embeddings(module)  # type: ignore[operator]
    return module


def token_ids(tokenizer: object, text: str) -> list[int]:
    """The ids of ``text`` without the special (BOS/EOS/pad) tokens."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])  # type: ignore[operator]


def read_embedding_files(paths: Sequence[str | os.PathLike[str]], backbone: str) -> dict[str, Tensor]:
    """{token: (D,) vector} of ``--embedding`` files (read before any model loads): one token
    per file, each token once, a backbone whose text encoder can take them."""
    from wadi_cli.io.embeddings import load_embedding

    if not paths:
        return {}
    check_token_backbone(backbone, "--embedding")
    out: dict[str, Tensor] = {}
    for path in paths:
        token, vectors, _ = load_embedding(path)
        if vectors.shape[0] != 1:
            raise BadInputError(
                f"--embedding {path}: {vectors.shape[0]} vectors for {token!r}; "
                "wadi reads one-vector embeddings"
            )
        if token in out:
            raise BadInputError(f"--embedding {path}: the token {token!r} is given twice")
        check_token_text(token)
        out[token] = vectors[0]
    return out


def use_embeddings(prompt_encoder: Any, tokens: Mapping[str, Tensor]) -> None:
    """Give the pipeline's prompt encoder the learned ``tokens`` (:func:`read_embedding_files`)."""
    if tokens:
        add_tokens(prompt_encoder.tokenizer, prompt_encoder.text_encoder, tokens)
