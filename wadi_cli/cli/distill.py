"""``wadi distill`` (placeholder registration; replaced by the work item that implements it)."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    @app.command("distill", hidden=True)
    def _placeholder() -> None:
        """Not implemented yet."""
        raise typer.Exit(1)
