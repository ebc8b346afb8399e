"""``wadi sample``: one-step generation (or the multi-step teacher) into a folder."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from wadi_cli.cli.common import (
    JsonFlag,
    OutDir,
    console,
    err_console,
    handle_errors,
    use_backbone_cpu_threads,
    weights_for_sampling,
)
from wadi_cli.cli.sampling_flags import sampling_flags
from wadi_cli.words import plural

if TYPE_CHECKING:  # the CLI imports the library inside command bodies (start-up time)
    from wadi_cli.pipeline import LoadedPipeline
    from wadi_cli.pipeline.options import SamplingOptions

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
student shipped with wadi. With --teacher, --weights (a `wadi finetune`
run folder, or its merged export) replace the base model in the
multi-step sampler. --base samples the undistilled base model in
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

  wadi sample "a photo of sks dog in a bucket" -b sd15 --teacher -w runs/dog

  wadi sample "a blue circle at the top left" -b tiny -w student.safetensors
  -o tiny/ --json

Image-to-image (one step at t = round(s·999); a folder of init images
pairs with the prompts in sorted order):

  wadi sample "a blue square at the bottom right" -b tiny
  --init-image red-circle.png --strength 0.8 -o edit/

  wadi sample --prompts prompts.txt -b sd21 --init-image photos/
  --strength 0.6 -o edits/

High resolution (a size the denoiser takes, or one step at the native size,
2× bicubic in pixels, then one refining img2img step):

  wadi sample "a lighthouse at dusk" -b sd21 --height 768 --width 1024

  wadi sample "a red circle at the top left" -b tiny --upscale 2

  wadi sample "a lighthouse at dusk" -b sd21 --upscale 2
  --refine-strength 0.3 -o big/

ControlNet (its residuals join the student's one step at t = 999, or each
teacher step; a folder of control images pairs with the prompts in sorted
order; tiny: `--controlnet tiny`, the shipped one, whose control is the
shape's silhouette, white on black):

  wadi sample "a red circle at the top left" -b tiny --controlnet tiny
  --control-image analysis/tiny_controlnet/mask.png

  wadi sample "a house by a lake" -b sd15 --controlnet
  lllyasviel/control_v11p_sd15_canny --control-image edges.png -o house/

  wadi sample --prompts prompts.txt -b sd21 --teacher --controlnet
  ./sd21-controlnet/ --control-image edges/ --control-scale 0.8
"""


def register(app: typer.Typer) -> None:
    @app.command("sample", help=HELP)
    @handle_errors
    @sampling_flags("sample")
    def sample(
        prompts: Annotated[list[str] | None, typer.Argument(help="Prompts (or use --prompts FILE).")] = None,
        out: OutDir = None,
        prompts_file: Annotated[
            Path | None,
            typer.Option(
                "--prompts",
                help="Prompt file: .txt (one per line, # comments), .jsonl, .csv, .parquet ('prompt').",
            ),
        ] = None,
        json_out: JsonFlag = False,
        embedding: Annotated[
            list[Path] | None,
            typer.Option(
                "--embedding",
                help="Textual-inversion file (a `wadi invert` run's learned_embeds.safetensors, the run "
                "folder, or any one-token diffusers/A1111 .safetensors): its token joins the prompts' "
                "vocabulary. Repeat for several.",
            ),
        ] = None,
        *,
        sampling: SamplingOptions,
    ) -> None:
        from wadi_cli.sample.output import default_output_dir
        from wadi_cli.sample.run import sample_to_folder

        use_backbone_cpu_threads(sampling.backbone, sampling.device)

        if out is None:
            out = default_output_dir(prompts or [], prompts_file)

        def loaded(pipe: LoadedPipeline) -> None:
            for note in pipe.notes:
                err_console.print(f"[yellow]note:[/] {note}", highlight=False)
            for warning in pipe.warnings:
                err_console.print(f"[bold yellow]warning:[/] {warning}", highlight=False)

        with weights_for_sampling(sampling.weights, sampling.teacher) as (run_weights, _):
            summary = sample_to_folder(
                out,
                prompts or [],
                prompts_file=prompts_file,
                options=dataclasses.replace(sampling, weights=run_weights),
                on_loaded=loaded,
                embeddings=embedding or (),
            )
        if json_out:
            typer.echo(json.dumps(summary, indent=2))
            return
        mode = f"teacher, {summary['steps']} steps, cfg {summary['cfg']}" if sampling.teacher else "one step"
        per = summary["seconds"] / max(1, summary["num_images"])
        console.print(
            f"wrote {plural(summary['num_images'], 'image')} ({mode}, {summary['backbone']}) "
            f"to [bold]{summary['out']}[/] in {summary['seconds']:.2f} s ({per:.3f} s/image)",
            highlight=False,
        )
