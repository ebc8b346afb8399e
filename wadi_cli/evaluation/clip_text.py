"""Token ids of the CLIP score's text, two ways (:data:`~wadi_cli.evaluation.protocol.TOKENIZATIONS`):

- ``joined``: the model's tokenizer on the string ``prefix + caption`` (wadi's first protocol);
- ``spliced``: the rule of GigaGAN's and DMD2's CLIP score. The caption alone is tokenized
  with OpenAI's BPE (start token, words, end token, zero padding to 77; a longer caption
  is cut at 77 with the end token in the last place); the prefix's word tokens are inserted
  right after the start token; the row is cut back to 77 and, when its last place holds
  any token, that token becomes the end token.

Both use the tokenizer OpenCLIP gives the model (for OpenAI-style models, OpenCLIP's
``SimpleTokenizer``: OpenAI's BPE vocabulary and cleaning). On plain captions the two give
the same ids; the measured comparison is in ``docs/evaluation-protocols.md``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

Tokenizer = Callable[[list[str]], torch.Tensor]


def _special_ids(tokenizer: Tokenizer) -> tuple[int, int]:
    """(start, end) token ids of an OpenCLIP tokenizer: the first id of an empty text, and
    the id right after it."""
    row = tokenizer([""])[0]
    return int(row[0]), int(row[1])


def prefix_ids(tokenizer: Tokenizer, prefix: str) -> torch.Tensor:
    """The word tokens of ``prefix`` (between its start and end tokens)."""
    row = tokenizer([prefix])[0]
    _, end = _special_ids(tokenizer)
    stop = int((row == end).nonzero()[0])
    return row[1:stop]


def joined(tokenizer: Tokenizer, captions: Sequence[str], prefix: str) -> torch.Tensor:
    """(N, L) ids of ``prefix + caption`` tokenized as one string."""
    return tokenizer([prefix + c for c in captions])


def spliced(tokenizer: Tokenizer, captions: Sequence[str], prefix: str) -> torch.Tensor:
    """(N, L) ids by GigaGAN's / DMD2's rule (see the module docstring)."""
    tokens = tokenizer(list(captions))
    length = tokens.shape[1]
    words = prefix_ids(tokenizer, prefix).to(tokens.dtype)
    _, end = _special_ids(tokenizer)
    rows = torch.cat([tokens[:, :1], words.expand(len(tokens), -1), tokens[:, 1:]], dim=1)[:, :length]
    last = rows[:, -1]
    rows[:, -1] = torch.where(last > 0, torch.full_like(last, end), last)
    return rows


def tokenize(tokenizer: Tokenizer, captions: Sequence[str], prefix: str, how: str) -> torch.Tensor:
    """Ids of the CLIP score's text under tokenization ``how`` (``joined`` / ``spliced``)."""
    if how == "joined":
        return joined(tokenizer, captions, prefix)
    if how == "spliced":
        return spliced(tokenizer, captions, prefix)
    raise ValueError(f"unknown tokenization {how!r}")
