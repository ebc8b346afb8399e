"""Prompts for image-free distillation (WaDi §4 trains on captions only).

Sources: ``.txt`` (one prompt per line), ``.jsonl`` / ``.csv`` / ``.parquet`` (a named
column), the built-in smoke set, or, for ``--backbone tiny``, prompts drawn from the tiny
model's attribute grammar. :class:`PromptStream` turns a list into a deterministic,
resumable stream of batches: the order of epoch ``e`` is a permutation drawn from
``(seed, e)``, so the data position alone (a sample index) restores it exactly.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from wadi_cli.errors import BadInputError

#: A small built-in prompt set for smoke runs of the SD / PixArt backbones.
SMOKE_PROMPTS: tuple[str, ...] = (
    "a photo of a red fox sitting in fresh snow",
    "an astronaut riding a horse on the moon, digital art",
    "a bowl of ramen with a soft-boiled egg, studio lighting",
    "a lighthouse on a cliff at sunset, oil painting",
    "a close-up portrait of an old fisherman, black and white photo",
    "a cozy reading nook with a window and rain outside",
    "a futuristic city skyline at night with neon lights",
    "a watercolor painting of a hummingbird and flowers",
    "a wooden cabin in a pine forest, morning fog",
    "a corgi wearing sunglasses on a beach",
    "a steaming cup of coffee on a rustic table",
    "a mountain lake reflecting snowy peaks, landscape photography",
    "a vintage red car parked on a cobblestone street",
    "a bouquet of sunflowers in a glass vase",
    "an isometric illustration of a tiny island with a castle",
    "a macro photo of a dew drop on a green leaf",
)

PROMPT_SUFFIXES: tuple[str, ...] = (".txt", ".jsonl", ".csv", ".parquet")


def tiny_prompts(n: int = 1024, seed: int = 0) -> list[str]:
    """``n`` prompts of the tiny model's grammar (``"a red circle at the top left"``)."""
    from wadi_cli.tiny.data import prompt_for, sample_attributes

    return [prompt_for(a) for a in sample_attributes(n, seed)]


def _clean(values: Sequence[object], where: str) -> list[str]:
    out = []
    for v in values:
        if v is None or (isinstance(v, float) and v != v):  # missing / NaN cells
            continue
        s = " ".join(str(v).split())
        if s:
            out.append(s)
    if not out:
        raise BadInputError(f"{where}: holds no prompts (empty or whitespace only)")
    return out


def _column(rows: list[dict], column: str, where: str) -> list[object]:
    if rows and column not in rows[0]:
        raise BadInputError(
            f"{where}: no column {column!r} (has {', '.join(map(str, rows[0]))}); set --prompt-column"
        )
    return [r.get(column) for r in rows]


def read_prompt_file(path: str | os.PathLike[str], column: str = "prompt") -> list[str]:
    """Prompts of a ``.txt`` / ``.jsonl`` / ``.csv`` / ``.parquet`` file, whitespace
    normalised, blank entries skipped. :class:`BadInputError` if unreadable or empty."""
    p = Path(path).expanduser()
    where = f"--prompts {p}"
    if not p.is_file():
        raise BadInputError(f"{where}: no such file")
    suffix = p.suffix.lower()
    if suffix not in PROMPT_SUFFIXES:
        raise BadInputError(f"{where}: unsupported type; use one of {', '.join(PROMPT_SUFFIXES)}")
    try:
        if suffix == ".parquet":
            import pandas as pd

            frame = pd.read_parquet(p)
            if column not in frame.columns:
                cols = ", ".join(map(str, frame.columns))
                raise BadInputError(f"{where}: no column {column!r} (has {cols}); set --prompt-column")
            return _clean(frame[column].tolist(), where)
        text = p.read_text(encoding="utf-8")
    except BadInputError:
        raise
    except (OSError, UnicodeDecodeError, ValueError, ImportError) as exc:
        raise BadInputError(
            f"{where}: cannot read ({str(exc).splitlines()[0] if str(exc) else exc})"
        ) from None
    if suffix == ".txt":
        return _clean(text.splitlines(), where)
    if suffix == ".jsonl":
        rows = []
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                raise BadInputError(f"{where}: line {i} is not valid JSON") from None
            if not isinstance(row, dict):
                raise BadInputError(f"{where}: line {i} is not a JSON object")
            rows.append(row)
        missing = [i for i, r in enumerate(rows, 1) if column not in r]
        if rows and len(missing) == len(rows):
            raise BadInputError(f"{where}: no row has the key {column!r}; set --prompt-column")
        return _clean([r.get(column) for r in rows], where)
    import csv
    import io

    rows = list(csv.DictReader(io.StringIO(text)))
    return _clean(_column(rows, column, where), where)


def load_prompts(
    prompts: str | os.PathLike[str] | None, column: str = "prompt", backbone: str = "tiny", seed: int = 0
) -> list[str]:
    """The run's prompts: the file if given, else the tiny grammar for ``tiny``, else
    :data:`SMOKE_PROMPTS`."""
    if prompts is not None:
        return read_prompt_file(prompts, column)
    if backbone == "tiny":
        return tiny_prompts(1024, seed)
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
