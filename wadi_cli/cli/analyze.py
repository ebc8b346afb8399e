"""``wadi analyze TEACHER STUDENT``: thin shell over :func:`wadi_cli.analysis.analyze_checkpoints`."""

from __future__ import annotations

import contextlib
import json
import math
from typing import TYPE_CHECKING, Annotated, Any

import typer

from wadi_cli.cli.common import Device, JsonFlag, OutDir, console, err_console, handle_errors, require
from wadi_cli.words import plural

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

  wadi analyze runs/tiny                                   (the same, against the run's own base)

  wadi analyze teacher.safetensors student.safetensors --filter 'attn|ff' --json > summary.json

  wadi analyze teacher.safetensors student.safetensors --rank-k 32 --exact --device cuda
"""


def _fmt(x: Any, spec: str = ".4g") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return format(x, spec)


def _legend(rank_k: int, out: str | None) -> str:
    """The words behind the table's columns (and where the full definitions are)."""
    from wadi_cli.analysis.report import NORM_FLOOR

    where = (
        f"Every definition: {out}/summary.json"
        if out is not None
        else "Every definition: --out DIR writes them to DIR/summary.json"
    )
    return (
        "normΔ: mean relative row-norm change |‖S_i‖-‖T_i‖|/‖T_i‖; dirΔ: mean direction change "
        "‖d_S,i-d_T,i‖ (chord, 0..2); dir/norm: dirΔ/normΔ ('unchanged': normΔ below "
        f"{NORM_FLOOR:g}, float32 rounding, so no ratio); angle°: mean angle between rows; "
        f"E@{rank_k}: share of the direction residual's energy in its top {rank_k} singular values; "
        "r93/side: fewest singular values holding 93 % of that energy, over min(rows, cols) "
        f"(small = low-rank change). {where}."
    )


def _ratio_cell(agg: dict[str, Any]) -> str:
    from wadi_cli.analysis.report import norms_unchanged

    if norms_unchanged(agg["norm_rel_change_mean"]):
        return "unchanged"
    return _fmt(agg["direction_to_norm_ratio_mean"], ".3g")


def _summary_table(summary: dict[str, Any], rank_k: int) -> Table:
    from rich import box
    from rich.table import Table

    table = Table(
        title="norm vs direction change per block (means over layers)",
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
            _ratio_cell(agg),
            _fmt(agg["angle_deg_mean"], ".3g"),
            _fmt(agg["energy_at_k"], ".3f"),
            _fmt(agg["rank_frac93"], ".3f"),
            style=style,
        )

    for name, agg in summary["blocks"].items():
        add(name, agg)
    add("overall", summary["overall"], style="bold")
    return table


def _headline(overall: dict[str, Any], seconds: float) -> str:
    """The overall direction/norm ratio, or, when the norms did not change (a LoRaD student),
    that fact: a ratio over float rounding (e.g. 3.22e+07x) says nothing."""
    from wadi_cli.analysis.report import NORM_FLOOR, norms_unchanged

    nm = overall["norm_rel_change_mean"]
    if norms_unchanged(nm):
        return (
            f"row norms unchanged: mean relative norm change {nm:.2g} is below {NORM_FLOOR:g} (float32 "
            f"rounding); mean direction change {_fmt(overall['direction_change_mean'], '.3g')} over "
            f"{plural(overall['layers'], 'layer')}: only directions changed ({seconds:.1f} s)"
        )
    ratio_mean = _fmt(overall["direction_to_norm_ratio_mean"], ".3g")
    ratio_std = _fmt(overall["direction_to_norm_ratio_std"], ".3g")
    ratio_angle = _fmt(overall["angle_to_norm_ratio_mean"], ".3g")
    return (
        f"direction change / norm change: [bold]{ratio_mean}x[/] (means), {ratio_std}x (stds) over "
        f"{plural(overall['layers'], 'layer')}; angle variant {ratio_angle}x ({seconds:.1f} s)"
    )


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
            typer.Argument(
                help="Teacher checkpoint (file or folder), or a `wadi distill` run folder alone (its "
                "latest student against the base it was trained from); required.",
                show_default=False,
            ),
        ] = None,
        student: Annotated[
            str | None,
            typer.Argument(
                help="Student: checkpoint (file or folder), `wadi distill` run folder (its latest "
                "student) or LoRaD adapter (merged into TEACHER); required unless TEACHER is a run folder.",
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
        plots: Annotated[
            bool, typer.Option("--plots/--no-plots", help="Write the two figures into --out.")
        ] = True,
    ) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        from wadi_cli.analysis import AnalyzeOptions, analyze_checkpoints
        from wadi_cli.analysis.outputs import write_report_files
        from wadi_cli.distill.export import student_weights
        from wadi_cli.distill.run_dirs import is_run_folder
        from wadi_cli.io import atomic_output_dir

        teacher = require(teacher, "no checkpoints given: compare two with `wadi analyze TEACHER STUDENT`")
        if student is None and is_run_folder(teacher):
            from wadi_cli.distill.export import run_base_weights

            teacher, student = str(run_base_weights(teacher)), teacher
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
                write_report_files(result, folder, plots=plots)
        summary = result.summary(include_layers=json_out)
        if json_out:
            print(json.dumps(summary, indent=2, allow_nan=False))
            return
        _report_skipped(summary)
        console.print(_summary_table(summary, rank_k))
        console.print(_legend(rank_k, None if out is None else str(out)), style="dim", highlight=False)
        console.print(_headline(summary["overall"], result.seconds), highlight=False)
        if out is not None:
            figures = ", 2 plots" if plots else ""
            console.print(f"wrote {out}/ (layers.csv, summary.json, spectra.npz{figures})", highlight=False)
