"""Rich progress pieces shared by the commands that show bars (imported on first use:
``rich.progress`` is not needed for ``--help``)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from rich.progress import ProgressColumn
from rich.text import Text


class CountColumn(ProgressColumn):
    """``done/total`` for the rows whose task has the field ``counted=True``; nothing for a
    row without a total (a stage whose length is unknown)."""

    def render(self, task: Any) -> Text:
        if not task.fields.get("counted") or task.total is None:
            return Text("")
        return Text(f"{int(task.completed)}/{int(task.total)}")


class EtaColumn(ProgressColumn):
    """``ETA h:mm:ss`` (from the recent speed) for the rows whose task has ``eta=True``,
    once rich has enough samples to estimate it."""

    def render(self, task: Any) -> Text:
        left = task.time_remaining
        if not task.fields.get("eta") or task.finished or left is None:
            return Text("")
        return Text(f"ETA {timedelta(seconds=int(left))}", style="progress.remaining")
