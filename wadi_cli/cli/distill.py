"""``wadi distill``: LoRaD + VSD one-step distillation (a thin shell over
:func:`wadi_cli.distill.distill`)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any

import typer

from wadi_cli.cli.common import console, err_console, handle_errors, use_backbone_cpu_threads

HELP = """Distil a one-step student with LoRaD + variational score distillation (WaDi §4).

One frozen base serves teacher, student and fake score. Defaults are the paper's recipe
(student rank 256 / 128 PixArt, fake rank 32, lr 1e-4 / 1e-2, CFG 1.5, ᾱ_T = 0.0047);
--backbone tiny has its own tuned recipe (lr 1e-2 / 1e-3, CFG 3 / 1, no EMA, fake rank 64,
1000 steps) and adds a DMD-style regression to teacher samples that the paper does not have
(--regression-weight 4; 0 gives the paper's objective; see --dry-run). Every value can be
set in a YAML/TOML --config file or by a flag (flags win).

Without --out the run goes to a new folder ./runs/NAME-YYYYmmdd-HHMMSS (NAME = the
backbone), printed when training starts; `--resume latest` without --out continues the
newest such run of --backbone (of any backbone when -b is not given).

Examples:

  wadi distill --backbone sd21

  wadi distill --backbone tiny --resume latest

  wadi distill --backbone tiny --out runs/tiny

  wadi distill --backbone tiny --out runs/tiny --dry-run

  wadi distill --backbone sd15 --prompts captions.jsonl --prompt-column caption --out runs/sd15

  wadi distill --out runs/tiny --resume latest --max-steps 1500

  wadi distill --config recipe.yaml --rank 64 --out runs/r64

  wadi distill --backbone tiny --adapter lora --rank 8 --out runs/tiny-lora

  wadi distill --backbone sd15 --num-processes 8 --out runs/sd15

  accelerate launch --multi_gpu --num_processes 8 -m wadi_cli distill --backbone sd15 --out runs/sd15
"""


def _opt(*names: str, help: str) -> Any:
    return typer.Option(*names, help=help, show_default=False)


def register(app: typer.Typer) -> None:
    @app.command("distill", help=HELP, no_args_is_help=False)
    @handle_errors
    def distill_cmd(
        out: Annotated[
            Path | None,
            typer.Option(
                "--out",
                "-o",
                help="Run folder (checkpoints, metrics, config); default: a new ./runs/NAME-YYYYmmdd-HHMMSS.",
            ),
        ] = None,
        config: Annotated[Path | None, _opt("--config", help="YAML or TOML file of config values.")] = None,
        resume: Annotated[
            str | None,
            _opt(
                "--resume",
                help="Continue a run: 'latest' (of --out, else the newest ./runs/NAME-*) or a checkpoint.",
            ),
        ] = None,
        dry_run: Annotated[
            bool, typer.Option("--dry-run", help="Print the resolved config and parameter plan, then exit.")
        ] = False,
        json_out: Annotated[
            bool, typer.Option("--json", help="Print --dry-run output / the summary as JSON.")
        ] = False,
        backbone: Annotated[
            str | None, _opt("--backbone", "-b", help="sd15, sd21, pixart or tiny (default tiny).")
        ] = None,
        model: Annotated[
            str | None, _opt("--model", help="Base pipeline folder or hub id (default: the backbone's).")
        ] = None,
        components: Annotated[
            str | None,
            _opt(
                "--components",
                help="VAE / text encoder / tokenizer / scheduler source, folder or hub id "
                "(default: the --model pipeline; pixart: PixArt-alpha/PixArt-XL-2-512x512).",
            ),
        ] = None,
        adapter: Annotated[
            str | None,
            _opt("--adapter", help="Student: lorad (the method); lora, dora (peft) or full (baselines)."),
        ] = None,
        rank: Annotated[
            int | None, _opt("--rank", help="Student LoRaD rank (default: the backbone's).")
        ] = None,
        fake_rank: Annotated[
            int | None, _opt("--fake-rank", help="Fake-score LoRaD rank (default 32).")
        ] = None,
        lr: Annotated[float | None, _opt("--lr", help="Student learning rate (1e-4).")] = None,
        fake_lr: Annotated[float | None, _opt("--fake-lr", help="Fake-score learning rate (1e-2).")] = None,
        guidance: Annotated[float | None, _opt("--guidance", help="Teacher CFG scale (1.5).")] = None,
        fake_guidance: Annotated[
            float | None, _opt("--fake-guidance", help="Fake-score CFG scale (1.5).")
        ] = None,
        alpha_bar_t: Annotated[float | None, _opt("--alpha-bar-T", help="One-step ᾱ_T (0.0047).")] = None,
        prompt_dropout: Annotated[
            float | None, _opt("--prompt-dropout", help="∅ rate in the fake update (0.1).")
        ] = None,
        ema_decay: Annotated[
            float | None, _opt("--ema-decay", help="Student EMA decay; 0 = off (0.999).")
        ] = None,
        batch_size: Annotated[
            int | None, _opt("--batch-size", help="Prompts per micro-batch and process.")
        ] = None,
        grad_accum: Annotated[
            int | None, _opt("--grad-accum", help="Micro-batches accumulated per optimizer step (1).")
        ] = None,
        fake_updates: Annotated[
            int | None, _opt("--fake-updates", help="Fake-score updates per generator update (1).")
        ] = None,
        text_cache: Annotated[
            int | None,
            _opt("--text-cache", help="Cache the encodings of up to N distinct prompts; 0 = on the fly."),
        ] = None,
        regression_weight: Annotated[
            float | None,
            _opt(
                "--regression-weight",
                help="DMD-style regression to teacher samples, not in the paper (0 = off; tiny default 4).",
            ),
        ] = None,
        regression_pairs: Annotated[
            int | None,
            _opt("--regression-pairs", help="Fixed (noise, teacher sample) pairs of the regression term."),
        ] = None,
        lr_schedule: Annotated[
            str | None, _opt("--lr-schedule", help="constant (the paper) or cosine (decays to 0).")
        ] = None,
        tensorboard: Annotated[
            bool | None,
            typer.Option(
                "--tensorboard/--no-tensorboard",
                help="TensorBoard logs in RUN/tensorboard (needs the tensorboard package).",
                show_default=False,
            ),
        ] = None,
        max_steps: Annotated[
            int | None, _opt("--max-steps", help="Stop after this many steps (total).")
        ] = None,
        seed: Annotated[int | None, _opt("--seed", help="Seed of noise, timesteps and data order.")] = None,
        checkpoint_every: Annotated[
            int | None, _opt("--checkpoint-every", help="Checkpoint every N steps.")
        ] = None,
        keep_last: Annotated[
            int | None, _opt("--keep-last", help="Keep only the newest K checkpoints (2).")
        ] = None,
        prompts: Annotated[
            str | None, _opt("--prompts", help="Prompt file: .txt, .jsonl, .csv or .parquet.")
        ] = None,
        prompt_column: Annotated[
            str | None, _opt("--prompt-column", help="Column/key of the prompts (prompt).")
        ] = None,
        device: Annotated[str | None, _opt("--device", help="auto, cpu, cuda, cuda:1.")] = None,
        mixed_precision: Annotated[
            str | None, _opt("--mixed-precision", help="auto, no, fp16, bf16.")
        ] = None,
        gradient_checkpointing: Annotated[
            bool | None,
            typer.Option(
                "--gradient-checkpointing/--no-gradient-checkpointing",
                help="Recompute activations in backward (less memory).",
                show_default=False,
            ),
        ] = None,
        optimizer: Annotated[
            str | None, _opt("--optimizer", help="adamw or adamw8bit (bitsandbytes).")
        ] = None,
        validate_every: Annotated[
            int | None,
            _opt("--validate-every", help="Validation images (+ tiny metrics) every N steps; 0 = off."),
        ] = None,
        num_processes: Annotated[
            int | None, _opt("--num-processes", help="Launch N processes through `accelerate launch`.")
        ] = None,
    ) -> None:
        from wadi_cli.distill import config_for_run
        from wadi_cli.distill.plan import parameter_plan
        from wadi_cli.errors import BadInputError

        overrides = {
            "backbone": backbone, "model": model, "components": components, "adapter": adapter, "rank": rank,
            "fake_rank": fake_rank,
            "lr": lr, "fake_lr": fake_lr, "guidance": guidance, "fake_guidance": fake_guidance,
            "alpha_bar_T": alpha_bar_t, "prompt_dropout": prompt_dropout, "ema_decay": ema_decay,
            "batch_size": batch_size, "max_steps": max_steps, "seed": seed,
            "checkpoint_every": checkpoint_every, "keep_last": keep_last, "prompts": prompts,
            "prompt_column": prompt_column, "device": device, "mixed_precision": mixed_precision,
            "gradient_checkpointing": gradient_checkpointing, "optimizer": optimizer,
            "validate_every": validate_every, "grad_accum": grad_accum, "fake_updates": fake_updates,
            "text_cache": text_cache, "tensorboard": tensorboard, "lr_schedule": lr_schedule,
            "regression_weight": regression_weight, "regression_pairs": regression_pairs,
        }  # fmt: skip
        default_out = out is None
        if out is None and resume is not None:
            out = _run_to_resume(resume, backbone)
        cfg = (
            config_for_run(out, resume, config, overrides)
            if resume
            else config_for_run(out or ".", None, config, overrides)
        )
        if dry_run:
            _print_plan(cfg.to_dict(), parameter_plan(cfg), json_out)
            return
        if out is None:
            if int(os.environ.get("WORLD_SIZE", "1")) > 1:
                raise BadInputError(
                    "under accelerate launch every process must write to the same run folder: pass --out RUN"
                )
            from wadi_cli.distill.run_dirs import new_run_dir

            out = new_run_dir(cfg.backbone)
        if num_processes is not None:
            _launch(num_processes, out if default_out else None)
            return
        use_backbone_cpu_threads(cfg.backbone, cfg.device)
        again = f"wadi distill -b {cfg.backbone}" if default_out else f"wadi distill --out {out}"
        summary = _run_with_progress(cfg, out, resume, f"{again} --resume latest")
        if summary.rank != 0:
            return
        info = {
            "run": str(summary.run),
            "steps": summary.step,
            "from_step": summary.start_step,
            "checkpoint": str(summary.checkpoint) if summary.checkpoint else None,
            "interrupted": summary.interrupted,
            "seconds": round(summary.seconds, 2),
            "prompts": summary.prompts,
            "tensorboard": str(summary.tensorboard) if summary.tensorboard else None,
        }
        if json_out:
            console.print_json(json.dumps(info))
        else:
            verb = "stopped (Ctrl-C) at" if summary.interrupted else "reached"
            console.print(f"{summary.run}: {verb} step {summary.step}; checkpoint {info['checkpoint']}")
            if summary.tensorboard:
                console.print(f"TensorBoard: tensorboard --logdir {summary.tensorboard}")
            elif cfg.tensorboard:
                console.print("TensorBoard logs skipped: pip install tensorboard to get them")
        if summary.interrupted:
            raise typer.Exit(130)


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


def _launch(num_processes: int, out: Path | None) -> None:
    """Re-run this command under `accelerate launch`; ``out``: the default run folder,
    chosen here once so that every process writes to the same one."""
    import subprocess
    import sys

    from wadi_cli.distill.launch import accelerate_command, strip_option

    args = strip_option(sys.argv[sys.argv.index("distill") + 1 :], "--num-processes")
    if out is not None:
        args += ["--out", str(out)]
    code = subprocess.call(accelerate_command(num_processes, args))
    if code:
        raise typer.Exit(code)


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
        rank = "full (every weight)" if r["rank"] is None else str(r["rank"])
        plan_table.add_row(role, rank, str(r["layers"]), f"{r['trainable_params']:,}")
    console.print(plan_table)
    console.print(f"base parameters (frozen): {plan['base_params']:,}")


def _run_with_progress(cfg: Any, out: Path, resume: str | None, again: str) -> Any:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from wadi_cli.distill import distill

    progress = Progress(
        TextColumn("[bold]distill[/]"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TextColumn(
            "L_G {task.fields[loss_g]:.3g}  L_fake {task.fields[loss_f]:.3g}  {task.fields[rate]:.2f} step/s"
        ),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err_console,
        transient=False,
    )
    state: dict[str, Any] = {}

    def on_start(start: int, total: int) -> None:
        progress.console.print(
            f"run folder: [bold]{out}[/] (continue it with: {again})", highlight=False, soft_wrap=True
        )
        if cfg.prompts is None and cfg.backbone != "tiny":
            from wadi_cli.distill.data import SMOKE_PROMPTS

            progress.console.print(
                f"[yellow]note:[/] no --prompts: training on wadi's {len(SMOKE_PROMPTS)} built-in smoke-test "
                "prompts; for a real run pass a caption file with --prompts FILE",
                highlight=False,
            )
        state["task"] = progress.add_task(
            "distill", total=total, completed=start, loss_g=0.0, loss_f=0.0, rate=0.0
        )

    def on_step(result: Any, seconds: float) -> None:
        progress.update(
            state["task"],
            completed=result.step,
            loss_g=result.loss_g,
            loss_f=result.loss_fake,
            rate=1.0 / max(seconds, 1e-9),
        )

    def on_validate(row: dict[str, Any]) -> None:
        progress.console.print(
            f"step {row['step']}: tiny eval accuracy {row['accuracy']:.3f}, fd {row['fd']:.2f} "
            f"({'EMA' if row['student'] == 'ema' else 'raw'} student)"
        )

    with progress:
        return distill(cfg, out, resume=resume, on_step=on_step, on_start=on_start, on_validate=on_validate)
