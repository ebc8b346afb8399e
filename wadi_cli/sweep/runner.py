"""Running a sweep: every (cell, seed) of a :class:`~wadi_cli.sweep.grid.Grid` is a normal
``wadi distill`` run folder, then ``wadi eval --watch`` of it (every kept checkpoint scored
into ``RUN/eval.csv``: the convergence curve; its last row is the run's result).

Each command runs in a fresh ``python -m wadi_cli`` process (``--jobs`` of them side by side,
each with ``--threads`` CPU threads), its output appended to ``OUT/runs/CELL/seed-S.log``.
One row per (cell, seed) goes to ``OUT/results.csv`` (rewritten atomically after every
finished cell), so the sweep is resumable: a cell whose row says ``ok`` is never run again;
a run folder whose newest checkpoint reached ``max_steps`` is only scored; a run folder with
an earlier checkpoint continues from it (``--resume latest``); one killed before its first
checkpoint starts again. A cell that fails is recorded as ``failed`` with the last line its
command printed, and the sweep goes on. With ``[sweep] analyze = true`` each run is also
compared with its base (``wadi analyze RUN``): the ``nm`` / ``dm`` columns.
"""

from __future__ import annotations

import csv
import io
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol

from wadi_cli.sweep.grid import ANALYSIS_DIR, Cell, Grid, analyze_args, check_cells, distill_args, eval_args

RESULTS_CSV = "results.csv"
#: The first columns of ``results.csv`` (the axes follow, then the metrics, then :data:`TAIL`).
HEAD = ("cell", "seed", "status")
TAIL = ("step", "train_seconds", "eval_seconds", "run", "error")


class Wadi(Protocol):
    """Runs one ``wadi`` command line: ``(args, log) -> (exit code, its last output line)``."""

    def __call__(self, args: list[str], log: Path) -> tuple[int, str]: ...


def subprocess_wadi(threads: int = 1) -> Wadi:
    """``python -m wadi_cli ARGS`` in a child process with ``threads`` OMP / MKL threads, its
    stdout and stderr appended to ``log``."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}

    def run(args: list[str], log: Path) -> tuple[int, str]:
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("a", encoding="utf-8") as fh:
            fh.write("$ wadi " + " ".join(args) + "\n")
            fh.flush()
            code = subprocess.run(
                [sys.executable, "-m", "wadi_cli", *args], stdout=fh, stderr=fh, env=env, check=False
            ).returncode
        return code, last_line(log)

    return run


def last_line(log: Path) -> str:
    """The last non-empty line of ``log`` (the one-line error of a failed command)."""
    try:
        lines = [line.strip() for line in log.read_text(encoding="utf-8", errors="replace").splitlines()]
    except OSError:
        return ""
    return next((line for line in reversed(lines) if line), "")


def read_results(grid: Grid) -> list[dict[str, str]]:
    """The rows of ``OUT/results.csv`` ([] before the first finished cell)."""
    path = grid.out / RESULTS_CSV
    if not path.is_file():
        return []
    with path.open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def write_results(grid: Grid, rows: list[dict[str, Any]]) -> None:
    """Rewrite ``OUT/results.csv`` atomically: the head, the axes, every metric any row has, the tail."""
    from wadi_cli.io.atomic import write_text_atomic

    known = {*HEAD, *grid.fields, *TAIL}
    metrics = sorted({k for r in rows for k in r if k not in known})
    columns = [*HEAD, *grid.fields, *metrics, *TAIL]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, columns, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    grid.out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(grid.out / RESULTS_CSV, buf.getvalue())


def finished_run(run: Path) -> bool:
    """Whether the newest checkpoint of ``run`` reached the run's ``max_steps``."""
    from wadi_cli.distill.checkpoint import list_checkpoints, read_state
    from wadi_cli.errors import CheckpointError

    found = list_checkpoints(run)
    if not found:
        return False
    try:
        state = read_state(found[-1])
        return int(state["step"]) >= int(state["config"]["max_steps"])
    except (CheckpointError, KeyError, TypeError, ValueError):
        return False


def read_eval_csv(run: Path) -> list[dict[str, float]]:
    """The rows of ``RUN/eval.csv`` (step and metrics as numbers), oldest step first."""
    path = run / "eval.csv"
    if not path.is_file():
        return []
    out = []
    with path.open(newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            values = {}
            for k, v in row.items():
                try:
                    values[k] = float(v)
                except (TypeError, ValueError):
                    continue
            if "step" in values:
                out.append(values)
    return sorted(out, key=lambda r: r["step"])


def run_cell(grid: Grid, cell: Cell, seed: int, wadi: Wadi) -> dict[str, Any]:
    """Train (or continue, or skip when finished) and score ``cell`` with ``seed``: its row."""
    from wadi_cli.distill.checkpoint import list_checkpoints

    run = grid.run_dir(cell, seed)
    log = run.parent / f"seed-{seed}.log"
    row: dict[str, Any] = {"cell": cell.name, "seed": seed, **cell.as_dict(), "run": str(run)}
    row.update(status="failed", error="", train_seconds="", eval_seconds="", step="")
    t0 = time.perf_counter()
    if not finished_run(run):
        resume = bool(list_checkpoints(run))
        if run.exists() and not resume:  # a start killed before its first checkpoint: nothing to keep
            shutil.rmtree(run)
        code, last = wadi(distill_args(grid, cell, seed, run, resume=resume), log)
        row["train_seconds"] = round(time.perf_counter() - t0, 1)
        if code != 0 or not finished_run(run):
            row["error"] = f"wadi distill exited {code}: {last}" if code else "training stopped early"
            return row
    t1 = time.perf_counter()
    code, last = wadi(eval_args(grid, run), log)
    row["eval_seconds"] = round(time.perf_counter() - t1, 1)
    final = read_eval_csv(run)
    if code != 0 or not final:
        row["error"] = f"wadi eval exited {code}: {last}" if code else "wadi eval wrote no eval.csv"
        return row
    last_row = final[-1]
    row.update({k: v for k, v in last_row.items() if k != "step"}, step=int(last_row["step"]))
    if grid.analyze:
        code, last = 0, ""
        if not (run / ANALYSIS_DIR / "summary.json").is_file():
            code, last = wadi(analyze_args(run), log)
        changes = read_changes(run)
        if changes is None:
            row["error"] = f"wadi analyze exited {code}: {last}" if code else "wadi analyze wrote no summary"
            return row
        row.update(changes)
    row["status"] = "ok"
    return row


#: The columns ``[sweep] analyze = true`` adds, from ``RUN/analysis/summary.json`` (``overall``):
#: the layer-averaged relative norm change and direction change (chord) of the latest student
#: against its base — well-defined stand-ins for WaDi Table 2's "NM" and "DM".
CHANGE_COLUMNS = {"nm": "norm_rel_change_mean", "dm": "direction_change_mean"}


def read_changes(run: Path) -> dict[str, float] | None:
    """``{"nm": …, "dm": …}`` from the run's ``wadi analyze`` summary (``None`` when absent)."""
    import json

    try:
        overall = json.loads((run / ANALYSIS_DIR / "summary.json").read_text(encoding="utf-8"))["overall"]
        return {col: float(overall[key]) for col, key in CHANGE_COLUMNS.items()}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def run_sweep(
    grid: Grid,
    *,
    jobs: int = 1,
    wadi: Wadi | None = None,
    on_row: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Run every (cell, seed) of ``grid`` that has no ``ok`` row yet, ``jobs`` at a time;
    returns the rows written by this call (``results.csv`` holds them all)."""
    from wadi_cli.errors import BadInputError

    if jobs < 1:
        raise BadInputError("--jobs must be at least 1")
    check_cells(grid)
    wadi = wadi or subprocess_wadi()
    rows = read_results(grid)
    done = {
        (r["cell"], int(r["seed"]))
        for r in rows
        if r.get("status") == "ok" and (not grid.analyze or r.get("dm", "") != "")
    }  # a sweep that turns `analyze` on later only analyzes (and rescores) its finished runs
    # Seed-major: every cell gets seed s before any gets the next one, so a sweep stopped part-way
    # leaves arms with equal seed counts (paired differences over the seeds both have).
    pending = [(c, s) for s in grid.seeds for c in grid.cells if (c.name, s) not in done]
    lock, written = threading.Lock(), []

    def work(pair: tuple[Cell, int]) -> None:
        row = run_cell(grid, *pair, wadi)
        with lock:
            kept = [r for r in rows if (r["cell"], int(r["seed"])) != (row["cell"], row["seed"])]
            rows[:] = [*kept, row]
            write_results(grid, rows)
            written.append(row)
            if on_row is not None:
                on_row(row)

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        list(pool.map(work, pending))
    return written
