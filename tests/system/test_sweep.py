"""`wadi sweep` end to end on tiny (slow): two 2-step cells trained and scored by the real
`wadi distill` / `wadi eval --watch`; the sweep is killed (-9, with its children) after the
first cell finished, and the same command completes it without training that cell again."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time

import pytest

GRID = """
[sweep]
backbone = "tiny"
eval = "-n 16 --seed 0"
baseline = {adapter = "lorad"}
[fixed]
max_steps = 2
batch_size = 2
checkpoint_every = 1
regression_weight = 0.0
validate_every = 0
tensorboard = false
[grid]
adapter = ["lorad", "orthogonal"]
seed = [0]
"""


def _rows(out):
    path = out / "results.csv"
    return list(csv.DictReader(path.open())) if path.is_file() else []


@pytest.mark.slow
def test_sweep_runs_two_tiny_cells_and_resumes_after_kill_9(tmp_path):
    grid = tmp_path / "grid.toml"
    grid.write_text(GRID)
    out = tmp_path / "grid"
    cmd = [sys.executable, "-m", "wadi_cli", "sweep", str(grid)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        cmd, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 900
    while not _rows(out) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(1)
    assert len(_rows(out)) == 1 and proc.poll() is None  # the first cell finished, the second runs
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    first = _rows(out)[0]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr
    rows = {r["cell"]: r for r in _rows(out)}
    assert set(rows) == {"adapter=lorad", "adapter=orthogonal"}
    assert all(r["status"] == "ok" and r["step"] == "2" and float(r["fd"]) > 0 for r in rows.values())
    assert rows[first["cell"]] == first  # never run again
    log = out / "runs" / first["cell"].replace("=", "-") / "seed-0.log"
    assert log.read_text().count("$ wadi distill") == 1
    for name in ("summary.csv", "summary.md", "bars.png", "convergence.png"):
        assert (out / name).is_file()
    steps = [
        line.split(",")[0] for line in (out / "runs" / "adapter-orthogonal" / "seed-0" / "eval.csv").open()
    ]
    assert steps == ["step", "1", "2"]  # every checkpoint scored: the convergence curve


GRID_2X2X2 = """
[sweep]
backbone = "tiny"
eval = "-n 8 --seed 0 --batch-size 8"
baseline = {adapter = "lorad"}
analyze = true
[fixed]
max_steps = 1
batch_size = 1
checkpoint_every = 1
regression_weight = 0.0
validate_every = 0
tensorboard = false
[grid]
adapter = ["lorad", "lora"]
rank = [2, 3]
seed = [0, 1]
"""


class InProcessWadi:
    """The real ``wadi`` commands, run in this process (no interpreter start-up per run);
    ``die_after`` distill calls, the next one raises KeyboardInterrupt (a sweep killed)."""

    def __init__(self, die_after=None):
        self.calls, self.die_after = [], die_after

    def __call__(self, args, log):
        from typer.testing import CliRunner

        from wadi_cli.cli.main import app

        self.calls.append(list(args))
        distills = sum(c[0] == "distill" for c in self.calls)
        if args[0] == "distill" and self.die_after is not None and distills > self.die_after:
            raise KeyboardInterrupt
        result = CliRunner().invoke(app, args)
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("a") as fh:
            fh.write(result.output + result.stderr)
        lines = [line for line in (result.output + result.stderr).splitlines() if line.strip()]
        return result.exit_code, lines[-1] if lines else ""


def test_sweep_runs_a_2x2x2_tiny_grid_for_real_and_resumes_after_a_kill(tmp_path):
    """Eight real one-step tiny runs (distill, eval --watch, analyze) in process; the sweep is
    stopped after five trainings and the same call finishes the other three only."""
    from wadi_cli.sweep import load_grid, run_sweep
    from wadi_cli.sweep.report import summarise, write_report

    path = tmp_path / "grid.toml"
    path.write_text(GRID_2X2X2)
    grid = load_grid(path)
    first = InProcessWadi(die_after=5)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(grid, wadi=first)
    assert len(_rows(grid.out)) == 5
    second = InProcessWadi()
    run_sweep(grid, wadi=second)
    trained = [c[c.index("--out") + 1] for c in second.calls if c[0] == "distill"]
    assert len(trained) == 3  # the five finished runs are not trained again
    rows = _rows(grid.out)
    assert len(rows) == 8 and all(r["status"] == "ok" and r["step"] == "1" for r in rows)
    assert all(float(r["fd"]) > 0 and float(r["dm"]) > 0 and float(r["nm"]) >= 0 for r in rows)
    summary = {s["cell"]: s for s in summarise(grid)}
    assert summary["adapter=lora,rank=3"]["diff_seeds"] == 2 and summary["adapter=lorad,rank=2"]["seeds"] == 2
    names = {p.name for p in write_report(grid)}
    assert {"summary.csv", "summary.md", "bars.png", "convergence.png", "heatmap.png"} <= names
