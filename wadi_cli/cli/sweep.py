"""``wadi sweep``: run a grid of distillation runs and tabulate them (thin shell over
:mod:`wadi_cli.sweep`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from wadi_cli.cli.common import handle_errors

HELP = """Run a grid of distillation runs: every combination of the [grid] axes of
GRID.toml (any `wadi distill` config field: adapter kinds, ranks, lrs, ...) for every seed,
each a normal run folder under OUT/runs/ trained by `wadi distill` and scored by
`wadi eval --watch` (every kept checkpoint, for the convergence curves). Results go to
OUT/results.csv (one row per cell and seed) and OUT/summary.csv / summary.md (mean and 95 %
t interval over seeds; paired difference to the [sweep] baseline cell, matched by seed), with
bars.png, convergence.png and, for a two-axis grid, heatmap.png. Run it again to continue
after a crash or Ctrl-C: finished cells are never run again. See docs/sweeps.md.

Examples:

  wadi sweep analysis/ablations_tiny/kinds.toml --dry-run

  wadi sweep grid.toml --jobs 2 --threads 1

  wadi sweep grid.toml --report        (only remake the tables and plots)
"""


def register(app: typer.Typer) -> None:
    """Add ``wadi sweep`` to ``app``."""

    @app.command("sweep", help=HELP)
    @handle_errors
    def sweep(
        grid_file: Annotated[Path, typer.Argument(metavar="GRID.toml", help="The grid file.")],
        out: Annotated[
            Path | None,
            typer.Option(
                "--out", "-o", help="Sweep folder (default: the grid's [sweep] out, next to the file)."
            ),
        ] = None,
        jobs: Annotated[int, typer.Option("--jobs", "-j", help="Runs side by side.")] = 1,
        threads: Annotated[int, typer.Option("--threads", help="CPU threads of each run's process.")] = 1,
        dry_run: Annotated[
            bool, typer.Option("--dry-run", help="List the cells and their commands; run nothing.")
        ] = False,
        report: Annotated[bool, typer.Option("--report", help="Only rewrite the tables and plots.")] = False,
    ) -> None:
        from wadi_cli.errors import BadInputError
        from wadi_cli.io import check_writable
        from wadi_cli.sweep import check_cells, load_grid, run_sweep, subprocess_wadi, write_report
        from wadi_cli.sweep.grid import distill_args, eval_args
        from wadi_cli.sweep.runner import read_results

        if jobs < 1 or threads < 1:
            raise BadInputError("--jobs and --threads must be at least 1")
        grid = load_grid(grid_file, out)
        if dry_run:
            check_cells(grid)
            done = {(r["cell"], r["seed"]) for r in read_results(grid) if r.get("status") == "ok"}
            n = len(grid.cells) * len(grid.seeds)
            typer.echo(f"# {len(grid.cells)} cells × {len(grid.seeds)} seeds = {n} runs into {grid.out}")
            for cell in grid.cells:
                for seed in grid.seeds:
                    run = grid.run_dir(cell, seed)
                    mark = "  (done)" if (cell.name, str(seed)) in done else ""
                    typer.echo(f"{cell.name} seed {seed}{mark}")
                    typer.echo("  wadi " + " ".join(distill_args(grid, cell, seed, run)))
                    typer.echo("  wadi " + " ".join(eval_args(grid, run)))
            return
        check_cells(grid)
        check_writable(grid.out / "results.csv")  # an unwritable OUT fails now, in one line
        if not report:

            def show(row: dict) -> None:
                what = f"{grid.metric} {row.get(grid.metric)}" if row["status"] == "ok" else row["error"]
                typer.echo(
                    f"{row['cell']} seed {row['seed']}: {row['status']}: {what}", err=row["status"] != "ok"
                )

            written = run_sweep(grid, jobs=jobs, wadi=subprocess_wadi(threads), on_row=show)
        else:
            written = []
        paths = write_report(grid)
        typer.echo(f"wrote {', '.join(str(p) for p in paths)}")
        failed = [r for r in written if r["status"] != "ok"]
        if failed:
            raise typer.Exit(1)
