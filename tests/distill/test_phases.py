"""Feedback from the first second of ``wadi distill``: the run-folder line first, then a line
and a bar for each phase before training (loading, text cache, regression pairs, reference
features), reported by :mod:`wadi_cli.distill.phases` and shown by the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from wadi_cli.distill.phases import PhaseEvent, Phases

ROOT = Path(__file__).resolve().parents[2]


def test_phases_report_start_progress_and_end():
    events: list[PhaseEvent] = []
    phases = Phases(events.append)
    with phases.phase("building 5 regression pairs", total=5) as advance:
        advance(2)
        advance(3)
    with pytest.raises(RuntimeError), phases.phase("loading the base model"):
        raise RuntimeError("no weights")
    kinds = [(e.kind, e.text.split()[0], e.done) for e in events]
    assert kinds == [("start", "building", 0), ("advance", "building", 2), ("advance", "building", 5),
                     ("end", "building", 5), ("start", "loading", 0), ("end", "loading", 0)]  # fmt: skip
    assert events[3].seconds >= events[2].seconds >= 0 and not events[3].failed and events[-1].failed
    with Phases(None).phase("quiet", total=1) as advance:  # no callback: nothing to call
        advance()


def test_phase_display_counts_and_finishes_each_phase():
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn

    from wadi_cli.cli.progress import CountColumn, EtaColumn, PhaseDisplay

    console = Console(record=True, width=120, force_terminal=False)
    progress = Progress(TextColumn("{task.description}"), BarColumn(), CountColumn(),
                        TextColumn("{task.fields[info]}"), EtaColumn(), console=console)  # fmt: skip
    display = PhaseDisplay(progress)
    with progress:
        phases = Phases(display)
        with phases.phase("building 64 regression pairs (2-step teacher)", total=64) as advance:
            advance(32)
            assert progress.tasks[0].completed == 32 and progress.tasks[0].total == 64
            advance(32)
        with phases.phase("loading the tiny base model"):
            pass
    text = console.export_text()
    assert "64/64" in text and text.count("done in") == 2 and "loading the tiny base model" in text


def test_run_folder_and_a_phase_line_come_before_any_training_step(tmp_path):
    """``wadi distill -b tiny --max-steps 1`` in a subprocess: the run-folder line arrives
    before the run has a metrics.csv, and a phase line comes before the training bar."""
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "wadi_cli", "distill", "-b", "tiny", "--max-steps", "1", "--out", str(run)]
    cmd += ["--regression-pairs", "8", "--regression-steps", "2", "--validate-every", "0", "--no-tensorboard"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"}
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    seen_run_line_early = None
    lines = []
    deadline = time.monotonic() + 300
    for line in proc.stderr:  # type: ignore[union-attr]
        lines.append(line.rstrip())
        if seen_run_line_early is None and line.startswith("run folder:"):
            seen_run_line_early = not (run / "metrics.csv").exists()
        assert time.monotonic() < deadline
    assert proc.wait(timeout=60) == 0, "\n".join(lines)
    assert seen_run_line_early, "\n".join(lines)
    first_run = next(i for i, x in enumerate(lines) if x.startswith("run folder:"))
    phase = next(i for i, x in enumerate(lines) if "regression pairs" in x or "loading" in x)
    training = next(i for i, x in enumerate(lines) if x.startswith("distill "))
    assert first_run == 0 and first_run < phase < training, "\n".join(lines)
