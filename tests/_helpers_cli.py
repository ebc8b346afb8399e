"""Running the ``wadi`` CLI in-process from tests."""

from __future__ import annotations

from typer.testing import CliRunner, Result

from wadi_cli.cli.main import app


def wadi(*args: object, code: int = 0) -> Result:
    """``wadi ARGS…`` through Typer's runner; asserts the exit code (``code``) and returns the
    result (``stdout``, ``stderr`` separate)."""
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == code, (args, result.output, result.stderr)
    return result
