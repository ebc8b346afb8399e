"""``wadi export``: a distillation run's student as merged weights, an adapter file or a
diffusers pipeline folder (a thin shell over :func:`wadi_cli.distill.export.export_run`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from wadi_cli.cli.common import JsonFlag, console, handle_errors, require

HELP = """Export the one-step student of a `wadi distill` run.

Formats: merged = the full U-Net/transformer state dict (the authors' release format,
loads strictly into the base model); adapter = the LoRaD adapter file of `wadi merge`;
diffusers = a complete pipeline folder for `from_pretrained` and `wadi sample --weights`
(the base's own components only: no safety checker, one copy of each weight), whose
scheduler makes diffusers' plain one-step call `pipe(prompt, num_inference_steps=1,
guidance_scale=0)` sample t = 999 with the run's ᾱ_T, and a model card README.md
(--eval EVAL adds the metrics of a `wadi eval --out EVAL` folder);
single-file = the original Stable Diffusion checkpoint layout (U-Net + VAE + text encoder)
that ComfyUI and AUTOMATIC1111 load (sd15, sd21). Every format records the run's ᾱ_T.
The EMA weights are used when the run kept them (--raw for the raw student).

Examples:

  wadi export runs/tiny --format merged --out tiny-onestep.safetensors

  wadi export runs/sd15 --format adapter --out sd15-student.safetensors --raw

  wadi export runs/sd15 --format diffusers --out sd15-onestep/ --eval eval/sd15

  wadi export runs/sd15 --format single-file --out wadi-sd15.safetensors

  wadi export runs/sd15 -f merged -o m.safetensors --checkpoint runs/sd15/checkpoints/step-00001000
"""


def register(app: typer.Typer) -> None:
    @app.command("export", help=HELP, no_args_is_help=True)
    @handle_errors
    def export_cmd(
        run: Annotated[
            Path | None,
            typer.Argument(help="Run folder written by `wadi distill`; required.", show_default=False),
        ] = None,
        out: Annotated[
            Path | None,
            typer.Option(
                "--out",
                "-o",
                help="Output file (merged/adapter/single-file) or folder (diffusers); required.",
                show_default=False,
            ),
        ] = None,
        fmt: Annotated[
            str, typer.Option("--format", "-f", help="merged, adapter, diffusers or single-file.")
        ] = "merged",
        checkpoint: Annotated[
            str | None, typer.Option("--checkpoint", help="A checkpoint folder (default: the latest).")
        ] = None,
        raw: Annotated[bool, typer.Option("--raw", help="Export the raw student, not its EMA.")] = False,
        overwrite: Annotated[
            bool, typer.Option("--overwrite", help="Replace an existing output file.")
        ] = False,
        eval_dir: Annotated[
            Path | None,
            typer.Option(
                "--eval",
                help="A `wadi eval --out` folder whose metrics go into the model card (diffusers).",
                show_default=False,
            ),
        ] = None,
        json_out: JsonFlag = False,
    ) -> None:
        from wadi_cli.distill.export import export_run

        run = require(run, f"no run folder given: `wadi export RUN --format {fmt} --out PATH`")
        out = require(
            out,
            "--out is missing: name the output file (merged, adapter, single-file) or folder (diffusers) "
            "with --out PATH",
        )
        summary = export_run(
            run, fmt, out, checkpoint=checkpoint, ema=not raw, overwrite=overwrite, eval_dir=eval_dir
        )
        if json_out:
            console.print_json(json.dumps(summary))
        else:
            which = "EMA" if summary["ema"] else "raw"
            console.print(f"wrote {summary['out']} ({fmt}, {which} student of {summary['checkpoint']})")
