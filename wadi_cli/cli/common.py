"""Shared pieces of the CLI: the error handler every command uses, console objects,
and ``Annotated`` option aliases reused across commands."""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console

from wadi_cli.errors import BadInputError, WadiError, WadiNote, WadiWarning

console = Console()  # stdout: tables, summaries
err_console = Console(stderr=True)  # stderr: progress bars, errors

F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T")


def debug_enabled() -> bool:
    """``WADI_DEBUG=1`` shows full tracebacks instead of one-line errors."""
    return os.environ.get("WADI_DEBUG", "") not in ("", "0", "false", "False")


def fail(message: str, code: int = 2) -> None:
    """Print one red line on stderr and exit with ``code``."""
    from rich.markup import escape

    # plain text: brackets ("[m, r]", `wadi-cli[eval]`) are not rich markup tags to swallow
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def print_warning(message: str, note: bool = False) -> None:
    """One ``warning:`` (yellow) or ``note:`` (dim) line on stderr, printed as plain text."""
    from rich.markup import escape

    head = "[dim]note:[/]" if note else "[bold yellow]warning:[/]"
    err_console.print(f"{head} {escape(message)}", highlight=False, soft_wrap=True)


def _show_warning(message: Warning | str, category: type[Warning], *args: Any, **kwargs: Any) -> None:
    """``warnings.showwarning`` while a command runs: wadi's own warnings are one line each."""
    if issubclass(category, WadiWarning):
        print_warning(str(message), note=issubclass(category, WadiNote))
    else:
        _SHOW_WARNING(message, category, *args, **kwargs)


_SHOW_WARNING = warnings.showwarning


def handle_errors(fn: F) -> F:
    """Decorator for command callbacks: ``WadiError`` -> one red line + its exit code
    (the table is ``docs/errors.md``); Ctrl-C -> exit 130; any other exception -> one line +
    exit 1 (traceback only under ``WADI_DEBUG=1``). Every :class:`WadiWarning` the library
    emits meanwhile is printed as one ``warning:`` / ``note:`` line."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with warnings.catch_warnings():
            warnings.simplefilter("always", WadiWarning)
            warnings.showwarning = _show_warning
            return _run(fn, args, kwargs)

    return wrapper  # type: ignore[return-value]


def _run(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Call ``fn``; turn what it raises into one line and an exit code."""
    try:
        return fn(*args, **kwargs)
    except typer.Exit:
        raise
    except WadiError as exc:
        if debug_enabled():
            raise
        fail(str(exc), exc.exit_code)
    except BrokenPipeError:
        # `wadi analyze --json | head`: the reader went away; not an error of ours.
        with contextlib.suppress(Exception):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        raise typer.Exit(0) from None
    except KeyboardInterrupt:
        if debug_enabled():
            raise
        fail("interrupted", 130)
    except Exception as exc:  # noqa: BLE001 - last line of defence for users
        if debug_enabled():
            raise
        fail(
            f"internal error: {type(exc).__name__}: {exc} (set WADI_DEBUG=1 for the traceback)",
            1,
        )


def require(value: T | None, message: str) -> T:
    """``value``, or (when the user did not give it) a one-line :class:`BadInputError`
    ``message`` that names what is missing and ends with the flag or command supplying it.

    Commands take their required inputs as optional parameters and check them with this,
    so a missing one is one line like any other error, not Click's usage box."""
    if value is None:
        raise BadInputError(message)
    return value


def echo_debug(msg: str) -> None:
    if debug_enabled():
        print(msg, file=sys.stderr)


# ---- shared option aliases -------------------------------------------------------
OutDir = Annotated[
    Path | None,
    typer.Option("--out", "-o", help="Output folder (written atomically: all or nothing)."),
]
Device = Annotated[str, typer.Option("--device", help="Torch device: cpu, cuda, cuda:1, mps.")]
JsonFlag = Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")]


@contextlib.contextmanager
def weights_for_sampling(
    weights: str | None, teacher: bool = False
) -> Iterator[tuple[str | None, str | None]]:
    """Yield ``(file, label)``: what ``--weights`` should mean to ``wadi sample`` / ``wadi
    eval``, and what to record as its source.

    A run folder becomes its latest student (EMA when kept), as
    :func:`wadi_cli.distill.export.run_weights` gives it; the label is then the
    checkpoint's student file (for LoRA / DoRA / full runs ``file`` is a temporary merge,
    whose name changes from call to call). A ``wadi distill`` run is a one-step student and a
    ``wadi finetune`` run a fine-tuned base for the multi-step sampler: each is refused with
    the other sampler (``teacher``). Anything else passes through unchanged.
    """
    from wadi_cli.distill.run_dirs import is_run_folder

    if not is_run_folder(weights):
        yield weights, weights
        return
    from wadi_cli.distill.export import run_student_file, run_weights, trains_one_step
    from wadi_cli.errors import BadInputError

    one_step = trains_one_step(run_student_file(weights)[1])
    if one_step and teacher:
        raise BadInputError(f"{weights} is a one-step student (wadi distill): drop --teacher")
    if not one_step and not teacher:
        raise BadInputError(
            f"{weights} is a fine-tuned base (wadi finetune), sampled with many steps: add --teacher"
        )
    with run_weights(weights) as (file, student, config):
        if file == student:
            from wadi_cli.lorad import load_adapter

            load_adapter(file)  # a broken file fails here, before the note below
            err_console.print(
                f"[dim]using the run's student adapter {file}[/]", highlight=False, soft_wrap=True
            )
        else:
            note = f"[dim]using the run's student ({config.get('adapter')}), merged[/]"
            err_console.print(note, highlight=False, soft_wrap=True)
        yield str(file), str(student)


def use_backbone_cpu_threads(backbone: str | None, device: str | None) -> None:
    """On CPU, apply the backbone's preferred intra-op thread count (``Backbone.cpu_threads``),
    unless the user chose one with ``OMP_NUM_THREADS``."""
    import torch

    from wadi_cli.backbones import get_backbone
    from wadi_cli.machine import resolve_device

    if os.environ.get("OMP_NUM_THREADS"):
        return
    if resolve_device(device).type != "cpu" or not backbone:
        return
    try:
        threads = get_backbone(backbone).cpu_threads
    except WadiError:
        return  # the command reports the unknown backbone itself
    if threads:
        torch.set_num_threads(threads)
