"""Rich progress pieces shared by the commands that show bars (imported on first use:
``rich.progress`` is not needed for ``--help``)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from rich.progress import ProgressColumn
from rich.table import Column
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
    once rich has enough samples to estimate it (never split over two lines: a narrow
    terminal squeezes the other columns instead)."""

    def __init__(self) -> None:
        super().__init__(table_column=Column(no_wrap=True))

    def render(self, task: Any) -> Text:
        left = task.time_remaining
        if not task.fields.get("eta") or task.finished or left is None:
            return Text("")
        return Text(f"ETA {timedelta(seconds=int(left))}", style="progress.remaining")


class PhaseDisplay:
    """Shows :class:`~wadi_cli.distill.phases.PhaseEvent` s on a rich ``Progress`` whose
    columns include :class:`CountColumn` and :class:`EtaColumn` (and a ``{task.fields[info]}``
    text column): a row per phase, counted with the time left when the phase has a total,
    ``done in N s`` at its end."""

    def __init__(self, progress: Any) -> None:
        self.progress = progress
        self.tasks: dict[str, Any] = {}

    def __call__(self, event: Any) -> None:
        if event.kind == "start":
            self.tasks[event.text] = self.progress.add_task(
                event.text, total=event.total, info="", counted=event.total is not None, eta=True
            )
            return
        task = self.tasks.get(event.text)
        if task is None:
            return
        if event.kind == "advance":
            self.progress.update(task, completed=event.done)
        elif event.failed:  # the error line says what went wrong: leave no half-done row above it
            self.progress.remove_task(task)
        else:
            info = f"done in {event.seconds:.1f} s"
            total = event.total if event.total is not None else 1
            self.progress.update(task, total=total, completed=total, info=info)
            self.progress.stop_task(task)
