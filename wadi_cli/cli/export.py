"""``wadi export``: a distillation run's student as merged weights, an adapter file or a
diffusers pipeline folder (a thin shell over :func:`wadi_cli.distill.export.export_run`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from wadi_cli.cli.common import JsonFlag, console, handle_errors, require
from wadi_cli.errors import BadInputError

HELP = """Export the one-step student of a `wadi distill` run.

Formats: merged = the full U-Net/transformer state dict (the authors' release format,
loads strictly into the base model); adapter = the LoRaD adapter file of `wadi merge`;
diffusers = a complete pipeline folder for `from_pretrained` and `wadi sample --weights`
(the base's own components only: no safety checker, one copy of each weight), whose
scheduler makes diffusers' plain one-step call `pipe(prompt, num_inference_steps=1,
guidance_scale=0)` sample t = 999 with the run's ᾱ_T, and a model card README.md
(--eval EVAL adds the metrics of a `wadi eval --out EVAL` folder);
single-file = the original Stable Diffusion checkpoint layout (U-Net + VAE + text encoder)
that ComfyUI and AUTOMATIC1111 load (sd15, sd21, sdxl); lora = a LoRA of the student's weight
change (truncated SVD per layer, --lora-rank R or --lora-energy E; kohya keys for
ComfyUI / AUTOMATIC1111 / diffusers' load_lora_weights, --lora-keys diffusers for PEFT
names) that applies the student to other checkpoints of the family. Every format records the run's ᾱ_T.
The EMA weights are used when the run kept them (--raw for the raw student).

Examples:

  wadi export runs/tiny --format merged --out tiny-onestep.safetensors

  wadi export runs/sd15 --format adapter --out sd15-student.safetensors --raw

  wadi export runs/sd15 --format diffusers --out sd15-onestep/ --eval eval/sd15

  wadi export runs/sd15 --format single-file --out wadi-sd15.safetensors

  wadi export runs/sd15 --format lora --lora-energy 0.9 --out wadi-sd15-lora.safetensors --json

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
            str, typer.Option("--format", "-f", help="merged, adapter, diffusers, single-file or lora.")
        ] = "merged",
        checkpoint: Annotated[
            str | None, typer.Option("--checkpoint", help="A checkpoint folder (default: the latest).")
        ] = None,
        raw: Annotated[bool, typer.Option("--raw", help="Export the raw student, not its EMA.")] = False,
        overwrite: Annotated[
            bool, typer.Option("--overwrite", help="Replace an existing output file or folder.")
        ] = False,
        lora_rank: Annotated[
            int | None,
            typer.Option("--lora-rank", help="--format lora: the rank of every layer.", show_default=False),
        ] = None,
        lora_energy: Annotated[
            float | None,
            typer.Option(
                "--lora-energy",
                help="--format lora: per layer, the smallest rank holding this fraction (0, 1] of "
                "the change's squared singular values (1 = exact).",
                show_default=False,
            ),
        ] = None,
        lora_keys: Annotated[
            str,
            typer.Option(
                "--lora-keys", help="--format lora: kohya (A1111/ComfyUI) or diffusers (PEFT names)."
            ),
        ] = "kohya",
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
        from wadi_cli.distill.export_lora import LoraRank

        lora = None
        if fmt == "lora":
            lora = LoraRank(rank=lora_rank, energy=lora_energy)
        elif lora_rank is not None or lora_energy is not None:
            raise BadInputError("--lora-rank / --lora-energy apply to --format lora only")
        summary = export_run(
            run,
            fmt,
            out,
            checkpoint=checkpoint,
            ema=not raw,
            overwrite=overwrite,
            eval_dir=eval_dir,
            lora=lora,
            lora_keys=lora_keys,
        )
        if json_out:
            console.print_json(json.dumps(summary))
        else:
            which = "EMA" if summary["ema"] else "raw"
            console.print(f"wrote {summary['out']} ({fmt}, {which} student of {summary['checkpoint']})")
            if "lora" in summary:
                rep = summary["lora"]
                ranks = [layer["rank"] for layer in rep["layers"]]
                console.print(
                    f"LoRA: {len(ranks)} layers, rank {min(ranks)}-{max(ranks)}, "
                    f"{rep['parameters']:,} parameters, "
                    f"total relative error {rep['total_rel_error']:.4f} (per layer: --json)"
                )
