"""``wadi sample``: one-step generation (or the multi-step teacher) into a folder."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from wadi_cli.cli.common import (
    Base,
    JsonFlag,
    OutDir,
    Seed,
    console,
    err_console,
    handle_errors,
    use_backbone_cpu_threads,
    weights_for_sampling,
)

HELP = """Generate images in ONE step with WaDi weights,
x0 = (z − sqrt(1 − ᾱ_T)·ε̂(z, 999, c)) / sqrt(ᾱ_T), or with the base
model's multi-step teacher (--teacher) for side-by-side comparison.

The backbone is sd21 (SD2.1-base, the paper's showcase) unless --backbone
says otherwise.

Writes --out DIR atomically (default: a new folder
./wadi-samples/PROMPT-SLUG/, numbered -2, -3, … when taken; printed at the
end): 0000.png, 0001.png, …, grid.png and samples.json (prompt, seed and
settings of every image). Image i has its own random generator seeded
SEED + i: the same seed gives the same images whatever --batch-size (up
to last-bit rounding of batched kernels).

--weights takes the authors' merged release file (e.g.
rotated_unet-sdv2-1.safetensors), a LoRaD adapter file, or an exported
diffusers folder. Without --weights, sd15 / sd21 / pixart use the authors'
release from the hub repo gudaochangsheng/WaDi, and tiny the one-step
student shipped with wadi; --base samples the undistilled base model in
one step instead (the "before" of distillation).

Examples:

  wadi sample "a shiba inu wearing a beret"

  wadi sample "a red circle at the top left" -b tiny

  wadi sample "a red circle at the top left" -b tiny --base -o before/

  wadi sample "a photo of a cat" --backbone sd21 --out cats/

  wadi sample "a red fox" -b sd15 -w rotated_unet-sdv1-5.safetensors
  --model ./sd15-pipeline/ -o fox/

  wadi sample --prompts prompts.txt -b sd21 -n 4 --batch-size 8
  --dtype fp16 --device cuda --compile -o out/

  wadi sample "a corgi" -b sd21 --teacher --steps 25 --cfg 7.5 -o teacher/

  wadi sample "a blue circle at the top left" -b tiny -w student.safetensors
  -o tiny/ --json
"""


def register(app: typer.Typer) -> None:
    @app.command("sample", help=HELP)
    @handle_errors
    def sample(
        prompts: Annotated[list[str] | None, typer.Argument(help="Prompts (or use --prompts FILE).")] = None,
        out: OutDir = None,
        backbone: Annotated[
            str, typer.Option("--backbone", "-b", help="sd15, sd21 (the default), pixart or tiny.")
        ] = "sd21",
        weights: Annotated[
            Path | None,
            typer.Option(
                "--weights",
                "-w",
                help="Merged release file, LoRaD adapter, exported diffusers folder, "
                "or a `wadi distill` run folder (its latest student, EMA when kept).",
            ),
        ] = None,
        model: Annotated[
            str | None,
            typer.Option(
                "--model",
                help="Base model: diffusers pipeline folder or hub id, or one holding only the "
                "denoiser (default: registry; see `wadi info -b NAME`).",
            ),
        ] = None,
        components: Annotated[
            str | None,
            typer.Option(
                "--components",
                help="Where the VAE, text encoder, tokenizer and scheduler come from: folder or hub id "
                "(default: the --model pipeline; pixart: PixArt-alpha/PixArt-XL-2-512x512).",
            ),
        ] = None,
        prompts_file: Annotated[
            Path | None,
            typer.Option(
                "--prompts",
                help="Prompt file: .txt (one per line, # comments), .jsonl, .csv, .parquet ('prompt').",
            ),
        ] = None,
        seed: Seed = 0,
        num_images: Annotated[int, typer.Option("--num-images", "-n", help="Images per prompt.")] = 1,
        batch_size: Annotated[int, typer.Option("--batch-size", help="Images per forward pass.")] = 4,
        device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda, cuda:1, mps.")] = "auto",
        dtype: Annotated[
            str, typer.Option("--dtype", help="auto (fp32 on CPU, fp16/bf16 on GPU), fp32, fp16, bf16.")
        ] = "auto",
        teacher: Annotated[
            bool, typer.Option("--teacher", help="Sample the base model with a multi-step DDIM scheduler.")
        ] = False,
        base: Base = False,
        steps: Annotated[
            int | None, typer.Option("--steps", help="Teacher steps (default: 25; 20 for pixart).")
        ] = None,
        cfg: Annotated[
            float | None,
            typer.Option(
                "--cfg", help="Teacher guidance scale (default: sd15 3, sd21 7.5, pixart 4.5, tiny 3)."
            ),
        ] = None,
        alpha_bar_t: Annotated[
            float | None,
            typer.Option(
                "--alpha-bar-t",
                help="One-step ᾱ_T (default: the value the weights record, else the registry's 0.0047).",
            ),
        ] = None,
        compile_: Annotated[
            bool, typer.Option("--compile", help="torch.compile the denoiser (pays off on GPUs).")
        ] = False,
        json_out: JsonFlag = False,
    ) -> None:
        from wadi_cli.errors import BadInputError
        from wadi_cli.sample.config import SampleConfig
        from wadi_cli.sample.output import default_output_dir
        from wadi_cli.sample.run import sample_to_folder

        use_backbone_cpu_threads(backbone, device)

        if out is None:
            out = default_output_dir(prompts or [], prompts_file)
        if not teacher and (steps is not None or cfg is not None):
            raise BadInputError("--steps and --cfg apply to --teacher sampling only")
        config = SampleConfig(
            teacher=teacher, steps=steps, cfg=cfg, alpha_bar_T=alpha_bar_t, seed=seed, batch_size=batch_size
        )

        def loaded(pipe: object) -> None:
            for note in getattr(pipe, "notes", []):
                err_console.print(f"[yellow]note:[/] {note}", highlight=False)
            for warning in getattr(pipe, "warnings", []):
                err_console.print(f"[bold yellow]warning:[/] {warning}", highlight=False)

        with weights_for_sampling(weights) as (run_weights, _):
            summary = sample_to_folder(
                out,
                prompts or [],
                prompts_file=prompts_file,
                backbone=backbone,
                model=model,
                components=components,
                weights=run_weights,
                config=config,
                num_images=num_images,
                device=device,
                dtype=dtype,
                compile=compile_,
                on_loaded=loaded,
                base=base,
            )
        if json_out:
            typer.echo(json.dumps(summary, indent=2))
            return
        mode = f"teacher, {summary['steps']} steps, cfg {summary['cfg']}" if teacher else "one step"
        per = summary["seconds"] / max(1, summary["num_images"])
        console.print(
            f"wrote {summary['num_images']} images ({mode}, {summary['backbone']}) "
            f"to [bold]{summary['out']}[/] in {summary['seconds']:.2f} s ({per:.3f} s/image)",
            highlight=False,
        )
