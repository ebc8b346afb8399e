"""``wadi merge``: bake a LoRaD adapter into a base checkpoint (on state dicts; the
network is never built)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from wadi_cli.cli.common import JsonFlag, console, handle_errors, require
from wadi_cli.errors import BadInputError

HELP = """Merge a LoRaD adapter or a LoRA into a base checkpoint and write one .safetensors
file (atomically, with provenance metadata). With an adapter every adapted weight W becomes
R(AB)·W; with a LoRA (kohya/AUTOMATIC1111 or PEFT/diffusers keys, as `wadi export --format
lora` writes) W + (alpha/rank)·up·down; every other tensor is copied unchanged. A LoRA
layer that matches no weight of BASE, or whose shape does not fit, is an error, and so
are adapter modules without a matching '<path>.weight' in BASE: nothing is written. A BASE
whose architecture is not the adapter's recorded backbone is refused (--any-backbone
merges it anyway).

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
            Path | None,
            typer.Argument(help="LoRaD adapter or LoRA .safetensors file; required.", show_default=False),
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
        if _is_lora_file(adapter):
            if fmt != "merged":
                raise BadInputError(f"--format {fmt}: a LoRA file is merged with --format merged only")
            from wadi_cli.distill.merge_lora import merge_lora_file
            from wadi_cli.lorad.adapter_io import parse_dtype

            summary = merge_lora_file(
                base, adapter, out, dtype=parse_dtype(dtype), prefix=prefix, overwrite=overwrite
            )
            _report(summary, json_out)
            return
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
        _report(summary, json_out)


def _is_lora_file(path: Path) -> bool:
    """Whether ``path`` is a plain LoRA (kohya / PEFT names) rather than a LoRaD adapter."""
    from wadi_cli.distill.merge_lora import is_lora
    from wadi_cli.io import open_checkpoint

    p = Path(path).expanduser()
    if not p.is_file():
        return False  # the adapter loader says what is wrong
    with open_checkpoint(p) as src:
        return is_lora(src.keys())


def _report(summary: dict, json_out: bool) -> None:
    if json_out:
        typer.echo(json.dumps(summary, indent=2))
    else:
        console.print(
            f"merged {summary['merged_layers']} layers (rank {summary['rank']}, {summary['role']}) "
            f"into {summary['tensors']} tensors -> [bold]{summary['out']}[/] (dtype: {summary['dtype']})"
        )
