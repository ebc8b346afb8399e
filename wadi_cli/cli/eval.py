"""``wadi eval``: attribute accuracy and Fréchet distance of the tiny model's samples."""

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
    handle_errors,
    use_backbone_cpu_threads,
    weights_for_sampling,
)

HELP = """Evaluate the tiny backbone: draw N prompts ("a red circle at the
top left", …) with --seed, generate one image per prompt (one step with
--weights, by default the one-step student shipped with wadi; --base for
the undistilled model in one step; or the multi-step teacher with
--teacher), and score them with the shipped attribute classifier.

accuracy: share of images whose colour, shape and position all match the
prompt. fd: Fréchet distance between classifier features of the generated
images and of freshly rendered real images with the same attributes
(compare FDs only at equal N).

Examples:

  wadi eval -b tiny -n 500 --seed 0

  wadi eval -b tiny --base -n 500 --seed 0

  wadi eval --backbone tiny --weights student.safetensors -n 256 --seed 0

  wadi eval --backbone tiny --teacher --steps 25 -n 256 --seed 0 --json

  wadi eval -b tiny -w runs/tiny/adapter.safetensors -n 512 --out images/
"""


def register(app: typer.Typer) -> None:
    @app.command("eval", help=HELP)
    @handle_errors
    def eval_(
        backbone: Annotated[
            str, typer.Option("--backbone", "-b", help="Only 'tiny' can be evaluated.")
        ] = "tiny",
        weights: Annotated[
            Path | None,
            typer.Option(
                "--weights",
                "-w",
                help="One-step weights: merged file, LoRaD adapter or folder (default: the shipped student).",
            ),
        ] = None,
        base: Base = False,
        teacher: Annotated[bool, typer.Option("--teacher", help="Evaluate the multi-step teacher.")] = False,
        steps: Annotated[int | None, typer.Option("--steps", help="Teacher steps (default 25).")] = None,
        cfg: Annotated[
            float | None, typer.Option("--cfg", help="Teacher guidance scale (default 3).")
        ] = None,
        alpha_bar_t: Annotated[
            float | None, typer.Option("--alpha-bar-t", help="One-step ᾱ_T (default: registry, 0.0047).")
        ] = None,
        num_images: Annotated[
            int, typer.Option("--num-images", "-n", help="Images (= prompts) to draw.")
        ] = 256,
        seed: Seed = 0,
        real_seed: Annotated[
            int | None,
            typer.Option("--real-seed", help="Seed of the real reference images (default: --seed)."),
        ] = None,
        model: Annotated[
            str | None, typer.Option("--model", help="Tiny pipeline folder (default: the shipped one).")
        ] = None,
        batch_size: Annotated[int, typer.Option("--batch-size", help="Images per forward pass.")] = 32,
        device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda, mps.")] = "auto",
        classifier: Annotated[
            Path | None, typer.Option("--classifier", help="Classifier weights (default: the shipped one).")
        ] = None,
        out: OutDir = None,
        json_out: JsonFlag = False,
    ) -> None:
        from wadi_cli.errors import BadInputError
        from wadi_cli.sample.config import resolve_device
        from wadi_cli.sample.evaluate import evaluate_tiny
        from wadi_cli.sample.output import check_output_dir, save_samples

        if backbone.strip().lower() != "tiny":
            from wadi_cli.backbones import get_backbone

            get_backbone(backbone)  # unknown names get the registry's message
            raise BadInputError(f"wadi eval supports only --backbone tiny (got {backbone!r})")
        use_backbone_cpu_threads("tiny", device)
        if teacher and weights is not None:
            raise BadInputError("--teacher evaluates the base model: drop --weights (or drop --teacher)")
        if not teacher and (steps is not None or cfg is not None):
            raise BadInputError("--steps and --cfg apply to --teacher only")
        if out is not None:
            check_output_dir(out)
        with weights_for_sampling(weights) as run_weights:
            result, gen = evaluate_tiny(
                weights=run_weights,
                teacher=teacher,
                steps=steps,
                cfg=cfg,
                alpha_bar_T=alpha_bar_t,
                num_images=num_images,
                seed=seed,
                real_seed=real_seed,
                model=model,
                device=resolve_device(device),
                batch_size=batch_size,
                classifier=classifier,
                base=base,
            )
        if out is not None:
            save_samples(out, gen.images, gen.prompts, gen.seeds, result)
            result["out"] = str(out)
        if json_out:
            typer.echo(json.dumps(result, indent=2))
            return
        console.print(
            f"tiny {result['mode']}: accuracy [bold]{result['accuracy']:.3f}[/], "
            f"fd [bold]{result['fd']:.3f}[/] "
            f"({result['num_images']} images, seed {seed}, {result['seconds']:.1f} s)",
            highlight=False,
        )
