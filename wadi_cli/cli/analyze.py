"""``wadi analyze`` (placeholder registration; implemented by the analyze work item)."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    @app.command("analyze", hidden=True)
    def analyze() -> None:
        """Not implemented yet."""
        raise typer.Exit(1)
