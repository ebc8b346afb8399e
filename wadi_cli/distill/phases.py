"""The phases of a run before its first training step (loading the base model, encoding the
prompts, building the regression pairs, the reference features), reported as events so a
UI can show a line and a bar with the time left for each; the library prints nothing.

    phases = Phases(on_phase)                      # on_phase: a PhaseEvent callback or None
    with phases.phase("building 1,024 regression pairs (25-step teacher)", total=1024) as advance:
        for batch in ...:
            ...
            advance(len(batch))

A phase without ``total`` is one the caller cannot count (loading files): the UI shows it as
running, with its elapsed time.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class PhaseEvent:
    """One event of a phase: it started (``total`` known or ``None``), advanced to ``done``,
    or ended after ``seconds`` (``failed``: it raised)."""

    kind: Literal["start", "advance", "end"]
    text: str
    total: int | None = None
    done: int = 0
    seconds: float = 0.0
    failed: bool = False


PhaseCallback = Callable[[PhaseEvent], None]


class Phases:
    """Reports phases to ``on_phase`` (nothing when it is ``None``, e.g. on a run's
    non-main processes)."""

    def __init__(self, on_phase: PhaseCallback | None = None) -> None:
        self.on_phase = on_phase

    @contextlib.contextmanager
    def phase(self, text: str, total: int | None = None) -> Iterator[Callable[[int], None]]:
        """A phase named ``text`` (what it does, in words); yields ``advance(n)`` that
        counts ``n`` more of ``total`` done."""
        emit = self.on_phase or (lambda event: None)
        start = time.perf_counter()
        done = 0

        def advance(n: int = 1) -> None:
            nonlocal done
            done += n
            emit(PhaseEvent("advance", text, total, done, time.perf_counter() - start))

        emit(PhaseEvent("start", text, total))
        try:
            yield advance
        except BaseException:
            emit(PhaseEvent("end", text, total, done, time.perf_counter() - start, failed=True))
            raise
        emit(
            PhaseEvent("end", text, total, total if total is not None else done, time.perf_counter() - start)
        )
