"""``wadi swap``: hybrid checkpoints of the swap experiment (student + teacher norms, or
student + teacher directions), with optional side-by-side grids and tiny-model scores."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from wadi_cli.cli.common import (
    JsonFlag,
    console,
    err_console,
    handle_errors,
    require,
    use_backbone_cpu_threads,
)
from wadi_cli.cli.sampling_flags import sampling_flags

if TYPE_CHECKING:  # the CLI imports the library inside command bodies (start-up time)
    from wadi_cli.pipeline.options import SamplingOptions
    from wadi_cli.swap import SwapStats

HELP = """Give a student its teacher's row norms or row directions and write the
hybrid checkpoint.

Row by row, every Linear/Conv row W_i = g_i·d_i (norm g_i, unit direction
d_i) takes its norm from one model and its direction from the other (the
swap experiment of WaDi §1).

--keep direction: student directions with TEACHER NORMS (the paper: FID +0.7).
--keep norm: student norms with TEACHER DIRECTIONS (the paper: FID +241).

--alpha interpolates (0 = student, 1 = full swap): norms linearly,
directions along the great circle (slerp). --filter REGEX limits the swap
to matching tensor names; biases, norm layers and embeddings always stay
the student's. The output is a full student state dict (.safetensors,
written atomically with provenance metadata) that `wadi sample --weights`
and `wadi eval --weights` accept. STUDENT may be a merged file, a diffusers
folder, a `wadi distill` run folder, or a LoRaD adapter (merged into TEACHER).

With --sample PROMPT (repeatable) it also renders one grid per prompt, rows
= seeds, columns = teacher (multi-step) | student (one step) | student +
teacher norms | student + teacher directions, into --samples-dir (default
OUT_samples/ next to --out), with the generation code of `wadi sample`; for
--backbone tiny it scores the four variants with the code of `wadi eval`
(accuracy, fd) into swap_metrics.json. For anything else, run `wadi sample`
or `wadi eval` on the hybrid file itself.

Examples:

  wadi swap sd15-unet/ rotated_unet-sdv1-5.safetensors --keep direction
  --out student-teacher-norms.safetensors

  wadi swap sd15-unet/ rotated_unet-sdv1-5.safetensors --keep norm --alpha 0.5
  --filter "attentions" --out half-dirs.safetensors

  wadi swap wadi_cli/assets/tiny/pipeline runs/tiny --keep norm --out hybrid.safetensors
  --sample "a red circle at the top left" --sample "a blue square at the bottom right"
  --backbone tiny -n 500

  wadi eval -b tiny --weights hybrid.safetensors -n 256
"""


@contextlib.contextmanager
def _student_file(student: Path) -> Iterator[Path]:
    """A `wadi distill` run folder becomes its latest student, merged (a temporary file;
    :func:`wadi_cli.distill.export.student_weights`); anything else passes through."""
    from wadi_cli.distill.export import student_weights

    with student_weights(student) as (path, from_run):
        if from_run:
            err_console.print(
                f"[dim]using the run's latest student ({student}), merged[/]", highlight=False, soft_wrap=True
            )
        yield path


@contextlib.contextmanager
def _progress() -> Iterator[Any]:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err_console,
        transient=True,
    ) as bar:
        task = bar.add_task("loading", total=None)

        def update(description: str, done: int, total: int) -> None:
            bar.update(task, description=description, completed=done, total=total)

        yield update


def _print_stats(stats: SwapStats, out: Path) -> None:
    what = "teacher norms" if stats.keep == "direction" else "teacher directions"
    skipped = f", {stats.rows_skipped:,} rows left as the student's" if stats.rows_skipped else ""
    console.print(
        f"student + {what} (alpha {stats.alpha:g}"
        f"{', filter ' + repr(stats.filter) if stats.filter else ''}): swapped "
        f"{stats.tensors_swapped} of {stats.tensors_swappable} linear/conv weights "
        f"({stats.rows_swapped:,} rows{skipped}) -> [bold]{out}[/]",
        highlight=False,
    )


def _print_metrics(metrics: dict[str, dict[str, Any]], num_images: int) -> None:
    from rich.table import Table

    from wadi_cli.swap import VARIANT_LABELS

    table = Table(title=f"tiny backbone, {num_images} images per variant")
    for col in ("variant", "steps", "accuracy", "fd"):
        table.add_column(col, justify="left" if col == "variant" else "right")
    for name, row in metrics.items():
        table.add_row(VARIANT_LABELS[name], str(row["steps"]), f"{row['accuracy']:.3f}", f"{row['fd']:.2f}")
    console.print(table)


def register(app: typer.Typer) -> None:
    @app.command("swap", help=HELP)
    @handle_errors
    @sampling_flags("swap", fixed={"teacher": True})  # the grids' teacher column: --steps, --cfg
    def swap(
        teacher: Annotated[
            Path | None,
            typer.Argument(
                help="Teacher checkpoint (file or diffusers folder); required.", show_default=False
            ),
        ] = None,
        student: Annotated[
            Path | None,
            typer.Argument(
                help="One-step student: merged file, folder, run folder, or LoRaD adapter; required.",
                show_default=False,
            ),
        ] = None,
        keep: Annotated[
            str | None,
            typer.Option(
                "--keep",
                help="Required. direction: student directions + teacher norms; "
                "norm: student norms + teacher directions.",
                show_default=False,
            ),
        ] = None,
        out: Annotated[
            Path | None,
            typer.Option("--out", "-o", help="Output .safetensors file; required.", show_default=False),
        ] = None,
        alpha: Annotated[
            float, typer.Option("--alpha", help="Swap strength in [0, 1] (0 = student, 1 = full swap).")
        ] = 1.0,
        filter: Annotated[
            str | None, typer.Option("--filter", help="Swap only tensors whose name matches this regex.")
        ] = None,
        overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace --out if it exists.")] = False,
        sample: Annotated[
            list[str] | None,
            typer.Option("--sample", help="Render a 4-column comparison grid for this prompt (repeatable)."),
        ] = None,
        rows: Annotated[int, typer.Option("--rows", help="Seeds (grid rows) per prompt.")] = 4,
        samples_dir: Annotated[
            Path | None,
            typer.Option("--samples-dir", help="Folder for the grids (default: OUT_samples/ next to --out)."),
        ] = None,
        no_eval: Annotated[
            bool, typer.Option("--no-eval", help="Skip the tiny accuracy / fd scores.")
        ] = False,
        json_out: JsonFlag = False,
        *,
        sampling: SamplingOptions,
    ) -> None:
        from wadi_cli.errors import BadInputError
        from wadi_cli.swap import (
            SwapSampling,
            check_alpha,
            check_output,
            compile_filter,
            sample_swap,
            variant_of_keep,
            write_swap,
        )

        teacher = require(
            teacher, "no checkpoints given: `wadi swap TEACHER STUDENT --keep direction --out FILE`"
        )
        student = require(
            student, f"no student given: `wadi swap {teacher} STUDENT --keep direction --out FILE`"
        )
        keep = require(
            keep,
            "--keep is missing: student directions + teacher norms with --keep direction, "
            "student norms + teacher directions with --keep norm",
        )
        out = require(out, "--out is missing: name the hybrid checkpoint with --out FILE.safetensors")
        variant = variant_of_keep(keep)
        alpha = check_alpha(alpha)
        compile_filter(filter)
        out_path = check_output(out, overwrite=overwrite, inputs={"TEACHER": teacher, "STUDENT": student})
        grids = None
        if sample:
            folder = samples_dir if samples_dir is not None else out_path.parent / f"{out_path.stem}_samples"
            grids = SwapSampling(list(sample), folder, sampling, rows=rows, evaluate=not no_eval)
            grids.check()  # before any tensor is read
        elif any(v is not None for v in (sampling.steps, sampling.cfg, samples_dir, sampling.model)):
            raise BadInputError("--steps, --cfg, --model and --samples-dir apply with --sample only")
        with _student_file(student) as student_path:
            stats = write_swap(
                teacher, student_path, variant, out_path, alpha=alpha, filter=filter, overwrite=True,
                student_label=str(student),
            )  # fmt: skip
            result: dict[str, Any] = {"out": str(out_path), **stats.to_dict()}
            if not json_out:
                _print_stats(stats, out_path)
            if grids is not None:
                use_backbone_cpu_threads(grids.backbone, sampling.device)
                with _progress() as progress:
                    result["samples"] = sample_swap(
                        teacher, student_path, grids, alpha=alpha, filter=filter,
                        student_label=str(student), progress=progress,
                    )  # fmt: skip
        _report(result, json_out, grids.num_images if grids is not None else 0)


def _report(result: dict[str, Any], json_out: bool, num_images: int) -> None:
    """JSON on stdout, or the scores table and where the grids went."""
    if json_out:
        typer.echo(json.dumps(result, indent=2, default=str))
        return
    samples = result.get("samples")
    if samples:
        if samples["metrics"]:
            _print_metrics(samples["metrics"], num_images)
        console.print(f"{len(samples['grids'])} grid(s) -> [bold]{samples['out']}[/]", highlight=False)
