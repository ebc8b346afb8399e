"""``wadi distill``: LoRaD + VSD one-step distillation (a thin shell over
:func:`wadi_cli.distill.distill`)."""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from wadi_cli.cli.common import console, handle_errors, use_backbone_cpu_threads
from wadi_cli.cli.run_command import (
    config_parameters,
    launch,
    overrides_of,
    report_summary,
    run_with_progress,
)

if TYPE_CHECKING:  # the CLI imports the library inside command bodies (start-up time)
    from wadi_cli.distill import DistillConfig, RunSummary, StepResult

HELP = """Distil a one-step student with LoRaD + variational score distillation (WaDi §4).

One frozen base serves teacher, student and fake score. Every default comes from the
backbone's recipe, wadi_cli/configs/distill/NAME.toml: the paper's values for sd15, sd21
and pixart; for tiny, values tuned to the small model plus a DMD-style regression to
teacher samples that the paper does not have (--config tiny_paper gives the paper's
objective on tiny). --dry-run prints the resolved values, `wadi info -b NAME` the recipe.
Any value can be set in a YAML/TOML --config file (a path, or the name of a shipped
recipe) or by a flag (flags win).

Without --out the run goes to a new folder ./runs/NAME-YYYYmmdd-HHMMSS (NAME = the
backbone), printed when training starts; `--resume latest` without --out continues the
newest such run of --backbone (of any backbone when -b is not given).

Examples:

  wadi distill --backbone sd21 --prompts captions.txt

  wadi distill --backbone sd21 --prompts smoke --max-steps 10 --out runs/smoke

  wadi distill --backbone tiny --resume latest

  wadi distill --backbone tiny --out runs/tiny

  wadi distill --backbone tiny --out runs/tiny --dry-run

  wadi distill --backbone tiny --config tiny_paper --out runs/tiny-paper

  wadi distill --backbone sd15 --prompts captions.jsonl --prompt-column caption --out runs/sd15

  wadi distill --out runs/tiny --resume latest --max-steps 1500

  wadi distill --config recipe.yaml --rank 64 --out runs/r64

  wadi distill --backbone tiny --adapter lora --rank 8 --out runs/tiny-lora

  wadi distill --backbone sd15 --num-processes 8 --out runs/sd15

  accelerate launch --multi_gpu --num_processes 8 -m wadi_cli distill --backbone sd15 --out runs/sd15
"""

#: The options of the command itself; every other option is a field of the run's config.
COMMAND_OPTIONS: tuple[str, ...] = ("--out", "--config", "--resume", "--dry-run", "--json", "--num-processes")

#: ``wadi distill --help`` in panels: the command's own options first, then the config's
#: fields by what they set (every field in exactly one panel; a test keeps it so).
COMMAND_PANEL = "Run folder and mode"
PANELS: dict[str, tuple[str, ...]] = {
    "Model and student": (
        "backbone", "model", "components", "adapter", "orthogonal_map", "rank", "fake_rank", "init_seed",
    ),
    "Data": ("prompts", "prompt_column", "text_cache"),
    "Length, checkpoints, validation": (
        "max_steps", "batch_size", "grad_accum", "seed", "checkpoint_every", "keep_last", "log_every",
        "validate_every", "tensorboard",
    ),
    "Optimisation (student and fake score)": (
        "lr", "fake_lr", "adam_beta1", "adam_beta2", "adam_eps", "weight_decay", "max_grad_norm",
        "fake_max_grad_norm", "warmup_steps", "lr_schedule", "optimizer", "ema_decay",
    ),
    "VSD objective (WaDi §4)": (
        "guidance", "fake_guidance", "t_min", "t_max", "fake_t_min", "fake_t_max", "alpha_bar_T",
        "prompt_dropout", "fake_updates",
    ),
    "Regression to teacher samples (not in the paper)": (
        "regression_weight", "regression_pairs", "regression_steps",
    ),
    "Device and precision": (
        "device", "mixed_precision", "gradient_checkpointing", "lorad_exact_low_precision",
    ),
}  # fmt: skip


def panel_of(field_name: str) -> str:
    """The help panel of a config field (:data:`PANELS`)."""
    for panel, names in PANELS.items():
        if field_name in names:
            return panel
    raise KeyError(f"config field {field_name!r} has no panel in wadi_cli/cli/distill.py PANELS")


def _opt(*names: str, help: str) -> Any:
    return typer.Option(*names, help=help, show_default=False, rich_help_panel=COMMAND_PANEL)


def _config_parameters() -> list[inspect.Parameter]:
    """One keyword parameter per :class:`~wadi_cli.distill.config.DistillConfig` field: its
    flag, help and type come from the field's declaration (``None``: not given)."""
    from wadi_cli.distill.config import DistillConfig, field_kind, option_alias, option_help

    return config_parameters(DistillConfig, option_help, panel_of, option_alias, field_kind)


def register(app: typer.Typer) -> None:
    def distill_cmd(
        out: Annotated[
            Path | None,
            typer.Option(
                "--out",
                "-o",
                help="Run folder (checkpoints, metrics, config); default: a new ./runs/NAME-YYYYmmdd-HHMMSS.",
                rich_help_panel=COMMAND_PANEL,
            ),
        ] = None,
        config: Annotated[
            str | None,
            _opt(
                "--config",
                help="YAML or TOML file of config values, or a shipped recipe's name (tiny_paper).",
            ),
        ] = None,
        resume: Annotated[
            str | None,
            _opt(
                "--resume",
                help="Continue a run: 'latest' (of --out, else the newest ./runs/NAME-*) or a checkpoint.",
            ),
        ] = None,
        dry_run: Annotated[
            bool,
            typer.Option(
                "--dry-run",
                help="Print the resolved config and parameter plan, then exit.",
                rich_help_panel=COMMAND_PANEL,
            ),
        ] = False,
        json_out: Annotated[
            bool,
            typer.Option(
                "--json", help="Print --dry-run output / the summary as JSON.", rich_help_panel=COMMAND_PANEL
            ),
        ] = False,
        num_processes: Annotated[
            int | None, _opt("--num-processes", help="Launch N processes through `accelerate launch`.")
        ] = None,
        **values: Any,
    ) -> None:
        from wadi_cli.distill import config_for_run
        from wadi_cli.distill.plan import parameter_plan
        from wadi_cli.errors import BadInputError

        overrides = overrides_of(values)
        backbone = overrides["backbone"]
        default_out = out is None
        if out is None and resume is not None:
            out = _run_to_resume(resume, backbone)
        cfg = (
            config_for_run(out, resume, config, overrides)
            if resume
            else config_for_run(out or ".", None, config, overrides)
        )
        from wadi_cli.distill.prompt_sets import prompt_source, require_prompts

        if dry_run:
            from wadi_cli.distill.memory import predict_memory

            plan = {**parameter_plan(cfg), "prompts": prompt_source(cfg.prompts, cfg.backbone)}
            plan["memory"] = predict_memory(cfg, plan).to_dict()
            _print_plan(cfg.to_dict(), plan, json_out)
            return
        require_prompts(cfg.prompts, cfg.backbone)
        if out is None:
            from wadi_cli.distill.launch import launched_world_size

            if launched_world_size() > 1:
                raise BadInputError(
                    "under accelerate launch every process must write to the same run folder: pass --out RUN"
                )
            from wadi_cli.distill.run_dirs import new_run_dir

            out = new_run_dir(cfg.backbone)
        if num_processes is not None:
            launch("distill", num_processes, out if default_out else None)
            return
        use_backbone_cpu_threads(cfg.backbone, cfg.device)
        again = f"wadi distill -b {cfg.backbone}" if default_out else f"wadi distill --out {out}"
        summary = _run_with_progress(cfg, out, resume, f"{again} --resume latest")
        if summary.rank != 0:
            return
        report_summary(summary, json_out, cfg.tensorboard, "prompts")

    command = handle_errors(distill_cmd)
    own = [
        p
        for p in inspect.signature(distill_cmd, eval_str=True).parameters.values()
        if p.kind is not inspect.Parameter.VAR_KEYWORD
    ]
    command.__signature__ = inspect.Signature([*own, *_config_parameters()])  # type: ignore[attr-defined]
    app.command("distill", help=HELP, no_args_is_help=False)(command)


def _run_to_resume(resume: str, backbone: str | None) -> Path:
    """The run folder that ``--resume`` continues when no ``--out`` is given: for
    ``latest`` the newest default-named run (of ``backbone``, or of any), otherwise the
    run that holds the given checkpoint (or the given run folder itself)."""
    from wadi_cli.distill.checkpoint import find_checkpoint
    from wadi_cli.distill.run_dirs import latest_run_dir

    if resume == "latest":
        if backbone is None:
            return latest_run_dir(None)
        from wadi_cli.backbones import get_backbone

        return latest_run_dir(get_backbone(backbone).name)
    return find_checkpoint(".", resume).parent.parent


def _print_plan(config: dict[str, Any], plan: dict[str, Any], as_json: bool) -> None:
    if as_json:
        console.print_json(json.dumps({"config": config, "plan": plan}, default=str))
        return
    from rich.table import Table

    table = Table(title="resolved config", show_header=False)
    for k, v in config.items():
        table.add_row(k, str(v))
    console.print(table)
    plan_table = Table(title=f"parameter plan ({plan['backbone']})")
    for col in ("role", "rank", "layers", "trainable params"):
        plan_table.add_column(col)
    for role in ("student", "fake"):
        r = plan[role]
        rank = str(r["rank"])
        if r["rank"] is None:  # the kinds without a rank
            rank = (
                f"orthogonal, {r['orthogonal_map']} (n×n)" if "orthogonal_map" in r else "full (every weight)"
            )
        plan_table.add_row(role, rank, str(r["layers"]), f"{r['trainable_params']:,}")
    console.print(plan_table)
    console.print(f"base parameters (frozen): {plan['base_params']:,}")
    console.print(f"trains on: {plan['prompts']}", highlight=False)
    from wadi_cli.distill.memory import MemoryPrediction, memory_lines

    memory = {k: v for k, v in plan["memory"].items() if k in MemoryPrediction.__dataclass_fields__}
    for line in memory_lines(MemoryPrediction(**memory)):
        console.print(line, highlight=False)


def _run_with_progress(cfg: DistillConfig, out: Path, resume: str | None, again: str) -> RunSummary:
    import functools

    from wadi_cli.distill import distill

    def describe(result: StepResult, seconds: float) -> str:
        return (
            f"L_G {result.loss_g:.3g}  L_fake {result.loss_fake:.3g}  {1.0 / max(seconds, 1e-9):.2f} step/s"
        )

    def on_validate(progress: Any, row: dict[str, Any]) -> None:
        progress.console.print(
            f"step {row['step']}: tiny eval accuracy {row['accuracy']:.3f}, fd {row['fd']:.2f} "
            f"({'EMA' if row['student'] == 'ema' else 'raw'} student)"
        )

    start = functools.partial(distill, cfg, out, resume=resume)
    return run_with_progress("distill", start, out, again, describe, on_validate)
