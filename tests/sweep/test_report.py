"""Sweep tables and plots from planted results: per-cell means and intervals, paired
differences against the baseline (scipy.stats), convergence means per step, the PNGs."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from _helpers_sweep import FakeWadi
from scipy import stats

from wadi_cli.sweep.grid import load_grid
from wadi_cli.sweep.report import convergence_curves, convergence_table, every_pair, summarise, write_report
from wadi_cli.sweep.runner import run_sweep
from wadi_cli.sweep.stats import detectable_difference

GRID = """
[sweep]
backbone = "tiny"
baseline = {adapter = "lorad"}
[fixed]
max_steps = 4
[grid]
adapter = ["lorad", "lora"]
rank = [2, 8]
seed = [0, 1, 2]
"""
NOISE = {(a, r, s): n for (a, r, s), n in np.ndenumerate(np.random.default_rng(7).normal(size=(2, 9, 3)))}


def planted(args, seed, step):
    rank = int(args[args.index("--rank") + 1])
    lora = args[args.index("--adapter") + 1] == "lora"
    return 10.0 + rank / 10 + 1.3 * lora + 4.0 * seed + 0.2 * NOISE[(int(lora), rank, seed)] + 8.0 / step


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    path = tmp_path_factory.mktemp("sweep") / "grid.toml"
    path.write_text(GRID)
    grid = load_grid(path)
    run_sweep(grid, wadi=FakeWadi(planted))
    return grid, write_report(grid)


def _final(adapter, rank):
    return [planted(["--rank", str(rank), "--adapter", adapter], s, 4) for s in (0, 1, 2)]


def test_summary_means_intervals_and_paired_differences(swept):
    grid, _ = swept
    summary = {s["cell"]: s for s in summarise(grid)}
    for adapter in ("lorad", "lora"):
        for rank in (2, 8):
            s = summary[f"adapter={adapter},rank={rank}"]
            x = _final(adapter, rank)
            ci = stats.ttest_1samp(x, 0).confidence_interval()
            assert s["seeds"] == 3 and s["mean"] == pytest.approx(np.mean(x), rel=1e-12)
            assert (s["low"], s["high"]) == pytest.approx((ci.low, ci.high), rel=1e-9)
            assert s["baseline"] == f"adapter=lorad,rank={rank}"
    lora = summary["adapter=lora,rank=8"]
    d = stats.ttest_rel(_final("lora", 8), _final("lorad", 8)).confidence_interval()
    assert (lora["diff_low"], lora["diff_high"]) == pytest.approx((d.low, d.high), rel=1e-9)
    assert lora["diff_low"] > 0  # the planted +1.3 is resolved by pairing (seed effect 4 per seed)
    assert summary["adapter=lorad,rank=8"]["diff_mean"] == ""  # the baseline itself
    rows = list(csv.DictReader((grid.out / "summary.csv").open()))
    assert [r["cell"] for r in rows] == [c.name for c in grid.cells]
    md = (grid.out / "summary.md").read_text()
    assert "| adapter=lora,rank=8 | 3 |" in md and "resolved" in md


def test_plots_and_convergence_curves(swept):
    grid, paths = swept
    names = sorted(p.name for p in paths)
    assert names == [
        "bars.png", "convergence.csv", "convergence.png", "heatmap.png", "pairs.csv", "summary.csv",
        "summary.md",
    ]  # fmt: skip
    for p in paths:
        if p.suffix == ".png":
            assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000
    curves = convergence_curves(grid)
    steps = [s for s, _ in curves["adapter=lora,rank=2"]]
    assert steps == [2.0, 4.0]
    want = np.mean([planted(["--rank", "2", "--adapter", "lora"], s, 2) for s in (0, 1, 2)])
    assert curves["adapter=lora,rank=2"][0][1] == pytest.approx(want, rel=1e-12)


def test_every_pair_and_the_detectable_difference(swept):
    grid, _ = swept
    pairs = {(p["cell"], p["minus"]): p for p in every_pair(grid)}
    names = [c.name for c in grid.cells]
    assert len(pairs) == 6 and all(names.index(m) < names.index(c) for c, m in pairs)
    # a pair across both axes: lora rank 8 minus lorad rank 2 (planted +1.3 + 0.6)
    a, b = _final("lora", 8), _final("lorad", 2)
    p = pairs[("adapter=lora,rank=8", "adapter=lorad,rank=2")]
    ref = stats.ttest_rel(a, b).confidence_interval()
    assert p["diff_seeds"] == 3 and p["diff_mean"] == pytest.approx(np.mean(a) - np.mean(b), rel=1e-12)
    assert (p["diff_low"], p["diff_high"]) == pytest.approx((ref.low, ref.high), rel=1e-9)
    sd = float(np.std(np.subtract(a, b), ddof=1))
    assert p["diff_detectable"] == pytest.approx(detectable_difference(3, sd), rel=1e-9)
    lora = next(s for s in summarise(grid) if s["cell"] == "adapter=lora,rank=2")
    sd = float(np.std(np.subtract(_final("lora", 2), _final("lorad", 2)), ddof=1))
    assert lora["diff_detectable"] == pytest.approx(detectable_difference(3, sd), rel=1e-9)
    rows = list(csv.DictReader((grid.out / "pairs.csv").open()))
    assert [(r["cell"], r["minus"]) for r in rows] == list(pairs)
    md = (grid.out / "summary.md").read_text()
    assert "## Every pair" in md and "| adapter=lora,rank=8 | adapter=lorad,rank=2 | 3 |" in md


def test_convergence_table_pairs_each_step_with_the_baseline(swept):
    grid, _ = swept
    table = {(r["cell"], r["step"]): r for r in convergence_table(grid)}
    assert sorted({step for _, step in table}) == [2.0, 4.0] and len(table) == 8

    def at(adapter, rank, step):
        return [planted(["--rank", str(rank), "--adapter", adapter], s, step) for s in (0, 1, 2)]

    row = table[("adapter=lora,rank=8", 2.0)]
    a, b = at("lora", 8, 2), at("lorad", 8, 2)
    ci, d = stats.ttest_1samp(a, 0).confidence_interval(), stats.ttest_rel(a, b).confidence_interval()
    assert row["seeds"] == 3 and row["mean"] == pytest.approx(np.mean(a), rel=1e-12)
    assert (row["low"], row["high"]) == pytest.approx((ci.low, ci.high), rel=1e-9)
    assert row["baseline"] == "adapter=lorad,rank=8"
    assert (row["diff_low"], row["diff_high"]) == pytest.approx((d.low, d.high), rel=1e-9)
    assert table[("adapter=lorad,rank=8", 4.0)]["diff_mean"] == ""
    rows = list(csv.DictReader((grid.out / "convergence.csv").open()))
    assert len(rows) == 8 and float(rows[0]["step"]) == 2.0


def test_convergence_counts_only_finished_runs(swept):
    grid, _ = swept
    rows = list(csv.DictReader((grid.out / "results.csv").open()))
    for r in rows:
        if r["cell"] == "adapter=lora,rank=2" and r["seed"] == "1":
            r["status"] = "failed"
    curves = convergence_curves(grid, rows)
    want = np.mean([planted(["--rank", "2", "--adapter", "lora"], s, 2) for s in (0, 2)])
    assert curves["adapter=lora,rank=2"][0][1] == pytest.approx(want, rel=1e-12)
    assert {r["seeds"] for r in convergence_table(grid, rows) if r["cell"] == "adapter=lora,rank=2"} == {2}
