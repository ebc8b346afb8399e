"""The ``wadi`` Typer application. This module only registers commands: each lives in
its own module under ``wadi_cli.cli`` and is a thin shell over a library call."""

from __future__ import annotations

import typer

from wadi_cli import __version__
from wadi_cli.cli.help_format import format_examples, patch_typer_help
from wadi_cli.quiet import quiet_third_party_logs

quiet_third_party_logs()
patch_typer_help()

app = typer.Typer(
    name="wadi",
    help=format_examples(
        "Weight-direction-aware one-step distillation of diffusion models (WaDi, CVPR 2026).\n\n"
        "Examples:\n\n"
        "    wadi analyze teacher.safetensors student.safetensors\n"
        "    wadi distill --backbone sd21 --prompts captions.txt\n"
        '    wadi sample "a shiba inu wearing a beret"\n'
        "    wadi demo --out demo/\n"
        "    wadi info --backbone sd15\n"
        '    wadi sample "a red circle at the top left" --backbone tiny --teacher --out samples/\n'
        "    wadi eval --backbone tiny --teacher --steps 25 --num-images 200 --json\n"
        "    wadi distill --backbone tiny --out runs/tiny\n"
        "    wadi export runs/tiny --format adapter --out student.safetensors\n"
        "    wadi merge unet/ student.safetensors --out merged.safetensors\n"
        "    wadi swap unet/ student.safetensors --keep direction --out hybrid.safetensors\n\n"
        "Every command has more examples in `wadi CMD --help`. Set WADI_DEBUG=1 to see full tracebacks."
    ),
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode="markdown",
)


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"wadi {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version_callback, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Weight-direction-aware one-step distillation of diffusion models."""


def _paths_read_by_wadi(command: typer.models.CommandInfo) -> None:
    """Turn off Click's own readability check of every path parameter of ``command``: an
    unreadable input then reaches wadi, which refuses it in one line (exit 2) like any other
    bad input, instead of Click's usage box. Declarations stay as they are (applies to
    options written by hand and to those generated from config dataclasses alike)."""
    import inspect
    from typing import get_args

    from typer.models import ParameterInfo

    if command.callback is None:
        return
    # the annotations are strings (``from __future__ import annotations``), evaluated anew on
    # every read: evaluate them once, switch the check off, and pin that signature
    signature = inspect.signature(command.callback, eval_str=True)
    for param in signature.parameters.values():
        for info in [param.default, *get_args(param.annotation)[1:]]:
            if isinstance(info, ParameterInfo):
                info.readable = False
    command.callback.__signature__ = signature  # type: ignore[attr-defined]


def _register() -> None:
    # Each command module exposes ``register(app)``. Imported lazily so ``wadi --help``
    # stays fast and one broken optional dependency does not take down every command.
    from wadi_cli.cli import (
        analyze,
        demo,
        distill,
        eval,
        export,
        finetune,
        info,
        invert,
        merge,
        sample,
        swap,
        sweep,
    )

    for module in (demo, analyze, info, merge, swap, sample, eval, distill, finetune, invert, export, sweep):
        module.register(app)
    # One-line summaries for `wadi --help`: the first sentence of each docstring, reflowed
    # (docstrings are wrapped at ~90 columns, which rich would otherwise keep).
    for command in app.registered_commands:
        if command.help:  # examples as a code block that breaks with `\` before 80 columns
            command.help = format_examples(command.help)
        _paths_read_by_wadi(command)
        doc = command.help or (command.callback.__doc__ if command.callback else None)
        if command.short_help is None and doc:
            first = " ".join(doc.strip().split("\n\n")[0].split())
            command.short_help = first.split(". ")[0].rstrip(".:")


_register()


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
