"""``wadi merge``: bake a LoRaD adapter into a base checkpoint (on state dicts; the
network is never built)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from wadi_cli.cli.common import JsonFlag, console, handle_errors, require

HELP = """Merge a LoRaD adapter into a base checkpoint and write one .safetensors file
(atomically, with provenance metadata). Every adapted weight W becomes R(AB)·W; every
other tensor is copied unchanged. Adapter modules without a matching '<path>.weight'
in BASE are an error and nothing is written, and so is a BASE whose architecture is not
the adapter's recorded backbone (--any-backbone merges it anyway).

Examples:

  wadi merge sd15-unet.safetensors student.safetensors --out merged-unet.safetensors

  wadi merge unet/diffusion_pytorch_model.safetensors adapter.safetensors --out m.safetensors --dtype fp16

  wadi merge model.safetensors adapter.safetensors --out m.safetensors --prefix unet. --json

  wadi merge stable-diffusion-v1-5/stable-diffusion-v1-5 student.safetensors --format single-file
  --out wadi-sd15.safetensors     (original SD layout for ComfyUI / AUTOMATIC1111: U-Net + VAE + CLIP)
"""


def register(app: typer.Typer) -> None:
    @app.command("merge", help=HELP)
    @handle_errors
    def merge(
        base: Annotated[
            str | None,
            typer.Argument(
                help="Base checkpoint (anything wadi can read, or a hub id); required.", show_default=False
            ),
        ] = None,
        adapter: Annotated[
            Path | None, typer.Argument(help="LoRaD adapter .safetensors file; required.", show_default=False)
        ] = None,
        out: Annotated[
            Path | None,
            typer.Option("--out", "-o", help="Output .safetensors file; required.", show_default=False),
        ] = None,
        dtype: Annotated[
            str | None,
            typer.Option("--dtype", help="Cast floating tensors to fp16, bf16 or fp32 (default: keep)."),
        ] = None,
        prefix: Annotated[
            str | None,
            typer.Option("--prefix", help="Prefix of the adapted modules' keys in BASE (default: detect)."),
        ] = None,
        overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace --out if it exists.")] = False,
        fmt: Annotated[
            str,
            typer.Option(
                "--format",
                "-f",
                help="merged (diffusers names) or single-file (original SD layout, sd15/sd21; "
                "BASE must then be a pipeline folder or hub id).",
            ),
        ] = "merged",
        any_backbone: Annotated[
            bool,
            typer.Option(
                "--any-backbone",
                help="Merge an adapter into a base of another architecture than its recorded "
                "backbone (a deliberate transfer; by default refused).",
            ),
        ] = False,
        json_out: JsonFlag = False,
    ) -> None:
        from wadi_cli.lorad import merge_adapter_file

        base = require(base, "no checkpoints given: `wadi merge BASE ADAPTER --out merged.safetensors`")
        adapter = require(adapter, f"no adapter given: `wadi merge {base} ADAPTER --out merged.safetensors`")
        out = require(out, "--out is missing: name the merged checkpoint with --out FILE.safetensors")
        summary = merge_adapter_file(
            base,
            adapter,
            out,
            dtype=dtype,
            prefix=prefix,
            overwrite=overwrite,
            fmt=fmt,
            any_backbone=any_backbone,
        )
        if json_out:
            typer.echo(json.dumps(summary, indent=2))
        else:
            console.print(
                f"merged {summary['merged_layers']} layers (rank {summary['rank']}, {summary['role']}) "
                f"into {summary['tensors']} tensors -> [bold]{summary['out']}[/] (dtype: {summary['dtype']})"
            )
