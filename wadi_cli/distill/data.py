"""Prompts for image-free distillation (WaDi §4 trains on captions only).

Sources: ``.txt`` (one prompt per line), ``.jsonl`` / ``.csv`` / ``.parquet`` (a named
column), the built-in smoke set, or, for ``--backbone tiny``, prompts drawn from the tiny
model's attribute grammar. :class:`PromptStream` turns a list into a deterministic,
resumable stream of batches: the order of epoch ``e`` is a permutation drawn from
``(seed, e)``, so the data position alone (a sample index) restores it exactly.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from wadi_cli.distill.prompt_sets import (  # noqa: F401 (SMOKE_PROMPTS re-exported)
    SMOKE_PROMPTS,
    SMOKE_SET,
    TINY_PROMPT_COUNT,
)
from wadi_cli.errors import BadInputError
from wadi_cli.io.prompts import PROMPT_SUFFIXES, read_prompt_file  # noqa: F401 (re-exported)
from wadi_cli.tiny.data import prompt_for, sample_attributes


def tiny_prompts(n: int = 1024, seed: int = 0) -> list[str]:
    """``n`` prompts of the tiny model's grammar (``"a red circle at the top left"``)."""

    return [prompt_for(a) for a in sample_attributes(n, seed)]


def load_prompts(
    prompts: str | os.PathLike[str] | None, column: str = "prompt", backbone: str = "tiny", seed: int = 0
) -> list[str]:
    """The run's prompts: the file if given (``smoke``: :data:`SMOKE_PROMPTS`), else the tiny
    grammar for ``tiny``, else :data:`SMOKE_PROMPTS` (the CLI refuses that case first)."""
    if prompts is not None and str(prompts) == SMOKE_SET:
        return list(SMOKE_PROMPTS)
    if prompts is not None:
        return read_prompt_file(prompts, column)
    if backbone == "tiny":
        return tiny_prompts(TINY_PROMPT_COUNT, seed)
    return list(SMOKE_PROMPTS)


class PromptStream:
    """Deterministic shuffled batches over ``prompts``, resumable from a sample index.

    Sample ``i`` of the stream is ``prompts[perm_e[i mod N]]`` with ``e = i // N`` and
    ``perm_e`` a permutation drawn from a generator seeded with ``(seed, e)``.
    """

    def __init__(self, prompts: Sequence[str], seed: int, position: int = 0) -> None:
        if not prompts:
            raise BadInputError("no prompts to train on")
        self.prompts = list(prompts)
        self.seed = int(seed)
        self.position = int(position)
        self._epoch = -1
        self._perm: list[int] = []

    def _permutation(self, epoch: int) -> list[int]:
        if epoch != self._epoch:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = torch.randperm(len(self.prompts), generator=gen).tolist()
            self._epoch = epoch
        return self._perm

    def next_batch(self, batch_size: int) -> list[str]:
        """The next ``batch_size`` prompts (crossing epoch boundaries as needed)."""
        n = len(self.prompts)
        out = []
        for i in range(self.position, self.position + batch_size):
            out.append(self.prompts[self._permutation(i // n)[i % n]])
        self.position += batch_size
        return out

    @property
    def epoch(self) -> float:
        """Fractional epochs consumed."""
        return self.position / len(self.prompts)
