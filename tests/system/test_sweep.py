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
