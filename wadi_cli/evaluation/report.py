"""Showing an evaluation: rich progress bars (images/s and ETA) and the results table."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

#: Table rows: (key in ``metrics``, label, format, better).
ROWS: tuple[tuple[str, str, str, str], ...] = (
    ("fid", "FID", "{:.3f}", "↓"),
    ("kid", "KID", "{:.5f}", "↓"),
    ("clip", "CLIP score", "{:.4f}", "↑"),
    ("precision", "precision", "{:.4f}", "↑"),
    ("recall", "recall", "{:.4f}", "↑"),
    ("accuracy", "accuracy (tiny classifier)", "{:.4f}", "↑"),
    ("fd", "fd (tiny classifier)", "{:.3f}", "↓"),
)
_HOW = {"fid": "fid", "kid": "kid", "clip": "clip", "precision": "pr", "recall": "pr"}


class _Rate(ProgressColumn):
    """Images per second of a task."""

    def render(self, task: Task) -> Text:
        return Text(f"{task.speed:.2f} img/s" if task.speed else "- img/s", style="progress.data.speed")


def progress_bars(console: Console, enabled: bool = True) -> Callable[..., Any]:
    """A progress factory for :mod:`wadi_cli.evaluation.run`: ``bars(description, total)``
    is a context yielding ``advance(n)``. Bars draw on ``console`` (stderr) only when it is
    a terminal, and vanish when done, so an error stays the one line on stderr."""
    enabled = enabled and console.is_terminal

    @contextlib.contextmanager
    def bars(description: str, total: int) -> Iterator[Callable[[int], None]]:
        if not enabled or total == 0:
            yield lambda n: None
            return
        columns = (
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            _Rate(),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
        )
        with Progress(*columns, console=console, transient=True, speed_estimate_period=60) as prog:
            task = prog.add_task(description, total=total)
            yield lambda n: prog.advance(task, n)

    return bars


def results_table(result: dict[str, Any]) -> Table:
    """One row per metric: value, direction, and how it was computed."""
    what = result.get("weights") or result.get("images") or result.get("mode", "")
    table = Table(title=f"wadi eval: {result.get('backbone', '')} {what} ({result['num_images']} images)")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_column("")
    table.add_column("how", overflow="fold")
    how = result.get("how", {})
    for key, label, fmt, better in ROWS:
        if key not in result["metrics"]:
            continue
        h = how.get(_HOW.get(key, key), how.get("tiny_classifier", {}))
        text = ", ".join(str(h[k]) for k in ("library", "function", "feature_extractor") if h.get(k))
        table.add_row(label, fmt.format(result["metrics"][key]), better, text)
    return table
