"""``wadi invert``: relation inversion (ReVersion), one new token's embedding learned from
exemplar images (a thin shell over :func:`wadi_cli.invert.invert`)."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from wadi_cli.cli.common import handle_errors, use_backbone_cpu_threads
from wadi_cli.cli.run_command import (
    launch,
    overrides_of,
    print_config,
    report_summary,
    run_to_resume,
    run_with_progress,
    schema_parameters,
)

if TYPE_CHECKING:
    from wadi_cli.distill import RunSummary
    from wadi_cli.invert import InvertConfig

HELP = """Learn a relation token `<R>` from exemplar images (ReVersion), base model frozen.

One new token's input embedding is trained, the text encoder and the denoiser stay frozen,
with ReVersion's objective: the base model's denoising loss (ε or v, as the backbone
predicts), plus the steering loss (InfoNCE pulling the token toward --positive-words,
preposition words, and away from the captions' other words, weight --steer-weight,
temperature --temperature), with timesteps drawn by relation-focal importance sampling
(p(t) ∝ 1 − α·cos(π t / T), α = --importance-alpha). Every exemplar has captions holding the
token: --captions FILE.json `{"0.png": "a red circle <R>", ...}` (default IMAGES/captions.json,
or ReVersion's IMAGES/text.json with "{}" for the token). Images of any size and mode are
converted to RGB, centre-cropped, resized and VAE-encoded once.

The result is RUN/learned_embeds.safetensors ({token: (1, D)}), read by diffusers'
load_textual_inversion, AUTOMATIC1111 and ComfyUI (which name it after the file). Sample it
with any weights: `wadi sample "a cat <R> a wall" --embedding RUN` (one step) or with --teacher.
Defaults: wadi_cli/configs/invert/NAME.toml (ReVersion's numbers; --dry-run prints them).
Run folders, checkpoints, --resume latest, Ctrl-C and the lock work as for `wadi distill`.
pixart is refused: diffusers' PixArt pipeline (T5) has no textual-inversion loader.

Examples:

  wadi invert -b tiny --images exemplars/ --token "<R>" --max-steps 5 --out runs/tiny-R

  wadi invert --out runs/tiny-R --resume latest --max-steps 8

  wadi sample "a yellow triangle <R>" -b tiny --embedding runs/tiny-R --out samples/R

  wadi invert -b sd15 --images painted_on/ --token "<R>" --init-word and --out runs/painted-on

  wadi invert -b tiny --images exemplars/ --dry-run
"""

COMMAND_PANEL = "Run folder and mode"
PANELS: dict[str, tuple[str, ...]] = {
    "Model and token": ("backbone", "model", "components", "token", "init_word"),
    "Exemplars": ("images", "captions"),
    "ReVersion objective": (
        "steer_weight", "temperature", "num_positives", "positive_words", "stop_words", "importance_alpha",
    ),
    "Length and checkpoints": (
        "max_steps", "batch_size", "grad_accum", "seed", "checkpoint_every", "keep_last", "log_every",
        "tensorboard",
    ),
    "Optimisation": (
        "lr", "adam_beta1", "adam_beta2", "adam_eps", "weight_decay", "max_grad_norm", "warmup_steps",
        "lr_schedule", "optimizer",
    ),
    "Device and precision": ("device", "mixed_precision"),
}  # fmt: skip
#: Where runs go without --out: ./runs/invert/NAME-YYYYmmdd-HHMMSS.
RUNS = Path("runs") / "invert"


def _opt(*names: str, help: str) -> Any:
    return typer.Option(*names, help=help, show_default=False, rich_help_panel=COMMAND_PANEL)


def register(app: typer.Typer) -> None:
    def invert_cmd(
        out: Annotated[
            Path | None,
            _opt("--out", "-o", help="Run folder; default: a new ./runs/invert/NAME-YYYYmmdd-HHMMSS."),
        ] = None,
        config: Annotated[str | None, _opt("--config", help="YAML or TOML file of config values.")] = None,
        resume: Annotated[
            str | None,
            _opt(
                "--resume", help="Continue a run: 'latest' (of --out, else the newest ./runs/invert/NAME-*)."
            ),
        ] = None,
        dry_run: Annotated[
            bool,
            typer.Option(
                "--dry-run", help="Print the resolved config, then exit.", rich_help_panel=COMMAND_PANEL
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
        from wadi_cli.errors import BadInputError
        from wadi_cli.invert import invert_config_for_run

        overrides = overrides_of(values)
        default_out = out is None
        if out is None and resume is not None:
            out = run_to_resume(resume, overrides.get("backbone"), RUNS, "wadi invert")
        cfg = invert_config_for_run(out or ".", resume, config, overrides)
        if dry_run:
            print_config(cfg.to_dict(), json_out)
            return
        if out is None:
            from wadi_cli.distill.launch import launched_world_size
            from wadi_cli.distill.run_dirs import new_run_dir

            if launched_world_size() > 1:
                raise BadInputError(
                    "under accelerate launch every process must write to the same run folder: pass --out RUN"
                )
            out = new_run_dir(cfg.backbone, RUNS)
        if num_processes is not None:
            launch("invert", num_processes, out if default_out else None)
            return
        use_backbone_cpu_threads(cfg.backbone, cfg.device)
        again = f"wadi invert -b {cfg.backbone}" if default_out else f"wadi invert --out {out}"
        summary = _run_with_progress(cfg, out, resume, f"{again} --resume latest")
        if summary.rank == 0:
            report_summary(summary, json_out, cfg.tensorboard, "images")
            if not summary.interrupted and not json_out:
                from wadi_cli.cli.common import console

                console.print(
                    f'embedding: {out / "learned_embeds.safetensors"} (use it: wadi sample "… {cfg.token} …" '
                    f"-b {cfg.backbone} --embedding {out})",
                    highlight=False,
                )

    command = handle_errors(invert_cmd)
    own = [
        p
        for p in inspect.signature(invert_cmd, eval_str=True).parameters.values()
        if p.kind is not inspect.Parameter.VAR_KEYWORD
    ]
    from wadi_cli.invert.config import SCHEMA, InvertConfig

    params = schema_parameters(InvertConfig, SCHEMA, PANELS, "wadi_cli/cli/invert.py")
    command.__signature__ = inspect.Signature([*own, *params])  # type: ignore[attr-defined]
    app.command("invert", help=HELP, no_args_is_help=False)(command)


def _run_with_progress(cfg: InvertConfig, out: Path, resume: str | None, again: str) -> RunSummary:
    import functools

    from wadi_cli.invert import invert

    def describe(result: Any, seconds: float) -> str:
        return (
            f"L {result.loss:.3g}  L_steer {result.loss_steer:.3g}  |e| {result.embedding_norm:.3g}  "
            f"{1.0 / max(seconds, 1e-9):.2f} step/s"
        )

    return run_with_progress(
        "invert", functools.partial(invert, cfg, out, resume=resume), out, again, describe
    )
