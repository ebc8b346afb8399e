"""What the training commands (``wadi distill``, ``wadi finetune``) share: flags generated
from a run config dataclass, the progress display of a run (phase lines before the first
step, then the step bar), the end-of-run summary and exit code, and the re-launch under
``accelerate launch`` for ``--num-processes``."""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from wadi_cli.cli.common import console, err_console

if TYPE_CHECKING:
    from wadi_cli.distill import RunSummary

ALIAS = "__alias"  # suffix of the parameter behind a field's hidden old spelling


def keyword(name: str, kind: type, option: Any) -> inspect.Parameter:
    """A keyword-only ``None``-default parameter typed ``kind | None`` with ``option``."""
    return inspect.Parameter(
        name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[kind | None, option]
    )


def config_parameters(
    config_class: type,
    help_of: Callable[[str], str],
    panel_of: Callable[[str], str],
    alias_of: Callable[[str], tuple[str | None, str | None]],
    kind_of: Callable[[str], type],
) -> list[inspect.Parameter]:
    """One keyword parameter per field of ``config_class``: its flag (``--field-name``, a
    ``--x/--no-x`` pair for booleans), help, help panel and type from the field's declaration."""
    from dataclasses import fields

    from wadi_cli.distill.config import flag_name

    params = []
    for f in fields(config_class):
        kind, flag = kind_of(f.name), flag_name(f.name)
        short, alias = alias_of(f.name)
        decls = [f"{flag}/--no-{flag[2:]}"] if kind is bool else [flag, *([short] if short else [])]
        option = typer.Option(
            *decls, help=help_of(f.name), show_default=False, rich_help_panel=panel_of(f.name)
        )
        params.append(keyword(f.name, kind, option))
        if alias:
            params.append(keyword(f.name + ALIAS, kind, typer.Option(alias, hidden=True)))
    return params


def schema_parameters(
    config_cls: type, schema: Any, panels: dict[str, tuple[str, ...]], where: str
) -> list[inspect.Parameter]:
    """:func:`config_parameters` of a run config declared with a distill ``Schema`` (finetune,
    invert): each field's help from its declaration (a recipe-required one says where its
    default is shown), its panel from ``panels`` (``where``: the module that declares them)."""
    from wadi_cli.distill.config import field_kind, option_alias

    def panel_of(name: str) -> str:
        for panel, names in panels.items():
            if name in names:
                return panel
        raise KeyError(f"config field {name!r} has no panel in {where} PANELS")

    def help_of(name: str) -> str:
        text = schema.fields[name].metadata["help"]
        return f"{text} (backbone default, see --dry-run)" if name in schema.required else text

    return config_parameters(
        config_cls, help_of, panel_of, lambda n: option_alias(n, schema), lambda n: field_kind(n, schema)
    )


def overrides_of(values: dict[str, Any]) -> dict[str, Any]:
    """The config values given as flags (a field's old spelling counts as the field)."""
    out = {k: v for k, v in values.items() if not k.endswith(ALIAS)}
    for key, value in values.items():
        if key.endswith(ALIAS) and out.get(key.removesuffix(ALIAS)) is None:
            out[key.removesuffix(ALIAS)] = value
    return out


def launch(command: str, num_processes: int, out: Path | None) -> None:
    """Re-run this ``command`` under `accelerate launch`; ``out``: the default run folder,
    chosen here once so that every process writes to the same one."""
    import sys

    from wadi_cli.distill.launch import run_launched, strip_option

    args = strip_option(sys.argv[sys.argv.index(command) + 1 :], "--num-processes")
    if out is not None:
        args += ["--out", str(out)]
    code = run_launched(num_processes, args, command)
    if code:
        raise typer.Exit(code)


def run_with_progress(
    title: str,
    start: Callable[..., RunSummary],
    out: Path,
    again: str,
    describe_step: Callable[[Any, float], str],
    on_validate: Callable[[Any, dict[str, Any]], None] | None = None,
) -> RunSummary:
    """Call ``start(on_step=, on_start=, on_phase=, on_run=[, on_validate=])`` with a progress
    display on stderr: the run folder (and how to continue it) once the base loaded, a line
    per phase before the first step, then a bar titled ``title`` whose info column is
    ``describe_step(result, seconds)``."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from wadi_cli.cli.progress import CountColumn, EtaColumn, PhaseDisplay

    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        CountColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        EtaColumn(),
        console=err_console,
        transient=False,
    )
    state: dict[str, Any] = {}

    def on_run(run: Path) -> None:  # the run folder is known: say it before anything slow
        state["announced"] = True
        progress.console.print(
            f"run folder: [bold]{out}[/] (continue it with: {again})", highlight=False, soft_wrap=True
        )

    def on_start(first: int, total: int) -> None:
        if not state.get("announced"):
            on_run(out)
        state["task"] = progress.add_task(
            f"[bold]{title}[/]", total=total, completed=first, info="", counted=True, eta=True
        )

    def on_step(result: Any, seconds: float) -> None:
        progress.update(state["task"], completed=result.step, info=describe_step(result, seconds))

    extra = {} if on_validate is None else {"on_validate": lambda row: on_validate(progress, row)}
    with progress:
        return start(
            on_step=on_step, on_start=on_start, on_phase=PhaseDisplay(progress), on_run=on_run, **extra
        )


def report_summary(summary: RunSummary, json_out: bool, tensorboard_asked: bool, units: str) -> None:
    """The end of a run on stdout (a line, or JSON; ``units``: the summary's name of its data
    count), and the shell's exit code of the signal that stopped it early."""
    info = {
        "run": str(summary.run),
        "steps": summary.step,
        "from_step": summary.start_step,
        "checkpoint": str(summary.checkpoint) if summary.checkpoint else None,
        "interrupted": summary.interrupted,
        "stopped_by": summary.stopped_by,
        "seconds": round(summary.seconds, 2),
        units: summary.prompts,
        "tensorboard": str(summary.tensorboard) if summary.tensorboard else None,
    }
    if json_out:
        console.print_json(json.dumps(info))
    else:
        how = {"SIGINT": "Ctrl-C"}.get(summary.stopped_by or "", summary.stopped_by)
        verb = f"stopped ({how}) at" if summary.interrupted else "reached"
        console.print(f"{summary.run}: {verb} step {summary.step}; checkpoint {info['checkpoint']}")
        if summary.tensorboard:
            console.print(f"TensorBoard: tensorboard --logdir {summary.tensorboard}")
        elif tensorboard_asked:
            console.print("TensorBoard logs skipped: pip install tensorboard to get them")
    if summary.interrupted:  # the shell's code for the signal: 128 + its number
        raise typer.Exit(143 if summary.stopped_by == "SIGTERM" else 130)


def run_to_resume(resume: str, backbone: str | None, runs: Path, command: str) -> Path:
    """The run folder ``--resume`` continues without ``--out``: for ``latest`` the newest
    default-named run under ``runs`` (of ``backbone``, or of any), else the run holding the
    checkpoint. ``command`` names the command in messages (``wadi finetune``)."""
    from wadi_cli.distill.checkpoint import find_checkpoint
    from wadi_cli.distill.run_dirs import latest_run_dir

    if resume == "latest":
        from wadi_cli.backbones import get_backbone

        name = get_backbone(backbone).name if backbone else None
        return latest_run_dir(name, runs, command=command)
    return find_checkpoint(".", resume).parent.parent


def print_config(config: dict[str, Any], as_json: bool) -> None:
    """``--dry-run``: the resolved config as a table on stdout, or as JSON."""
    if as_json:
        console.print_json(json.dumps({"config": config}, default=str))
        return
    from rich.table import Table

    table = Table(title="resolved config", show_header=False)
    for k, v in config.items():
        table.add_row(k, str(v))
    console.print(table)
