"""``wadi analyze TEACHER STUDENT``: thin shell over :func:`wadi_cli.analysis.analyze_checkpoints`."""

from __future__ import annotations

import contextlib
import json
import math
from typing import TYPE_CHECKING, Annotated, Any

import typer

from wadi_cli.cli.common import Device, JsonFlag, OutDir, console, err_console, handle_errors, require

if TYPE_CHECKING:
    from rich.table import Table

HELP = """Compare a teacher with its (one-step) student, row by row: how much did each
output unit's weight row change in norm, and how much in direction?

Every weight with >= 2 dims is a matrix of rows (Conv out x in·kh·kw). Per layer:
relative norm change |‖S_i‖-‖T_i‖|/‖T_i‖, direction change ‖d_S,i - d_T,i‖ (chord)
and angle in degrees, and the singular values of the direction residual D_S - D_T
(energy in the top k, rank90/93/99, effective rank). Per block and overall: the
layer-averaged means and the ratio direction change / norm change (the WaDi paper
reports ~22x for means, ~10x for standard deviations). All definitions are written
into summary.json.

Spectra: by default all singular values come from the eigenvalues of the smaller
Gram matrix (float32 product, float64 eigenvalues; agrees with --exact far below 1%);
--exact takes a float64 SVD of every residual (much slower).

Examples:

  wadi analyze sd21-unet.safetensors sd-turbo-unet.safetensors

  wadi analyze teacher.safetensors student.safetensors --out report/

  wadi analyze wadi_cli/assets/tiny/pipeline runs/tiny     (a run folder: its latest student)

  wadi analyze teacher.safetensors student.safetensors --filter 'attn|ff' --json > summary.json

  wadi analyze teacher.safetensors student.safetensors --rank-k 32 --exact --device cuda
"""


def _fmt(x: Any, spec: str = ".4g") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return format(x, spec)


def _summary_table(summary: dict[str, Any], rank_k: int) -> Table:
    from rich import box
    from rich.table import Table

    table = Table(
        title="norm vs direction change per block (means over layers; definitions in summary.json)",
        title_justify="left",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
    )
    for col in ("block", "n", "normΔ", "dirΔ", "dir/norm", "angle°", f"E@{rank_k}", "r93/side"):
        table.add_column(col, justify="left" if col == "block" else "right", no_wrap=True)

    def add(name: str, agg: dict[str, Any], style: str | None = None) -> None:
        table.add_row(
            name,
            str(agg["layers"]),
            _fmt(agg["norm_rel_change_mean"], ".3g"),
            _fmt(agg["direction_change_mean"], ".3g"),
            _fmt(agg["direction_to_norm_ratio_mean"], ".3g"),
            _fmt(agg["angle_deg_mean"], ".3g"),
            _fmt(agg["energy_at_k"], ".3f"),
            _fmt(agg["rank_frac93"], ".3f"),
            style=style,
        )

    for name, agg in summary["blocks"].items():
        add(name, agg)
    add("overall", summary["overall"], style="bold")
    return table


def _report_skipped(summary: dict[str, Any], limit: int = 5) -> None:
    skipped = summary["skipped"]
    for key, label in (
        ("only_in_teacher", "only in the teacher"),
        ("only_in_student", "only in the student"),
        ("shape_mismatch", "with different shapes"),
    ):
        items = skipped[key]
        if not items:
            continue
        names = [x["name"] if isinstance(x, dict) else x for x in items]
        shown = ", ".join(names[:limit]) + (f", ... (+{len(names) - limit})" if len(names) > limit else "")
        err_console.print(f"[yellow]skipped {len(names)} tensor(s) {label}:[/] {shown}", highlight=False)


def register(app: typer.Typer) -> None:
    """Register ``wadi analyze`` on ``app``."""

    @app.command("analyze", help=HELP, no_args_is_help=True)
    @handle_errors
    def analyze(
        teacher: Annotated[
            str | None,
            typer.Argument(help="Teacher checkpoint (file or folder); required.", show_default=False),
        ] = None,
        student: Annotated[
            str | None,
            typer.Argument(
                help="Student: checkpoint (file or folder), `wadi distill` run folder (its latest "
                "student) or LoRaD adapter (merged into TEACHER); required.",
                show_default=False,
            ),
        ] = None,
        out: OutDir = None,
        json_out: JsonFlag = False,
        filter_: Annotated[
            str | None,
            typer.Option("--filter", help="Only tensors whose name matches this regex (re.search)."),
        ] = None,
        exact: Annotated[
            bool, typer.Option("--exact", help="Full float64 SVD of every residual (slow reference).")
        ] = False,
        rank_k: Annotated[int, typer.Option("--rank-k", help="k of the energy_at_k column.")] = 64,
        top: Annotated[int, typer.Option("--top", help="Leading singular values kept per layer.")] = 8,
        device: Device = "cpu",
    ) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        from wadi_cli.analysis import AnalyzeOptions, analyze_checkpoints
        from wadi_cli.analysis.outputs import write_report_files
        from wadi_cli.distill.export import student_weights
        from wadi_cli.io import atomic_output_dir

        teacher = require(teacher, "no checkpoints given: compare two with `wadi analyze TEACHER STUDENT`")
        student = require(student, f"no student checkpoint given: `wadi analyze {teacher} STUDENT`")
        opts = AnalyzeOptions(
            rank_k=rank_k, top=top, filter=filter_, method="exact" if exact else "gram", device=device
        )
        opts.validate()
        with contextlib.ExitStack() as stack:
            # Claim --out first: a bad folder fails before minutes of work; on any error
            # the temporary folder goes away and nothing is left behind.
            folder = stack.enter_context(atomic_output_dir(out)) if out is not None else None
            bar = stack.enter_context(
                Progress(
                    TextColumn("[progress.description]{task.description}"),
                    BarColumn(),
                    MofNCompleteColumn(),
                    TimeElapsedColumn(),
                    console=err_console,
                    transient=True,
                )
            )
            task = bar.add_task("analyzing", total=None)

            def progress(name: str, done: int, total: int) -> None:
                bar.update(task, completed=done, total=total, description=name[-40:])

            student_path, from_run = stack.enter_context(student_weights(student))
            if from_run:
                err_console.print(
                    f"[dim]using the run's latest student ({student}), merged[/]", highlight=False
                )
            result = analyze_checkpoints(teacher, student_path, opts, progress)
            if from_run:
                result.student = f"{student} (latest student, merged)"
            if folder is not None:
                write_report_files(result, folder)
        summary = result.summary(include_layers=json_out)
        if json_out:
            print(json.dumps(summary, indent=2, allow_nan=False))
            return
        _report_skipped(summary)
        console.print(_summary_table(summary, rank_k))
        overall = summary["overall"]
        ratio_mean = _fmt(overall["direction_to_norm_ratio_mean"], ".3g")
        ratio_std = _fmt(overall["direction_to_norm_ratio_std"], ".3g")
        ratio_angle = _fmt(overall["angle_to_norm_ratio_mean"], ".3g")
        console.print(
            f"direction change / norm change: [bold]{ratio_mean}x[/] (means), {ratio_std}x (stds) over "
            f"{overall['layers']} layers; angle variant {ratio_angle}x ({result.seconds:.1f} s)",
            highlight=False,
        )
        if out is not None:
            console.print(f"wrote {out}/ (layers.csv, summary.json, spectra.npz, 2 plots)", highlight=False)
