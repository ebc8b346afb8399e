"""The sweep runner with a fake `wadi` (no training): rows, resume after a kill, runs that
only need scoring or continuing, failed cells recorded while the sweep goes on."""

from __future__ import annotations

import csv

import pytest
from _helpers_sweep import FakeWadi

from wadi_cli.sweep.grid import load_grid
from wadi_cli.sweep.runner import read_results, run_sweep

GRID = """
[sweep]
backbone = "tiny"
baseline = {adapter = "lorad"}
[fixed]
max_steps = 4
[grid]
adapter = ["lorad", "lora"]
rank = [2, 8]
seed = [0, 1]
"""


def planted(args, seed, step):
    """fd: 10 + rank/10 (+3 for lora) + a seed effect, falling with the step."""
    rank = int(args[args.index("--rank") + 1])
    lora = 3.0 if "lora" in args[args.index("--adapter") + 1 :][:1] else 0.0
    return 10.0 + rank / 10 + lora + 2.5 * seed + 8.0 / step


@pytest.fixture
def grid(tmp_path):
    path = tmp_path / "grid.toml"
    path.write_text(GRID)
    return load_grid(path)


def _runs(fake):
    return {c[c.index("--out" if c[0] == "distill" else "--watch") + 1] for c in fake.calls}


def _distills(fake):
    return [(c[c.index("--out") + 1], "--resume" in c) for c in fake.calls if c[0] == "distill"]


def test_every_cell_and_seed_is_one_run_folder_and_one_row(grid):
    fake = FakeWadi(planted)
    rows = run_sweep(grid, wadi=fake)
    assert len(rows) == 8 and all(r["status"] == "ok" for r in rows)
    saved = read_results(grid)
    assert len(saved) == 8
    for r in saved:
        lora = 3.0 if r["adapter"] == "lora" else 0.0
        want = 10.0 + int(r["rank"]) / 10 + lora + 2.5 * int(r["seed"]) + 8.0 / 4
        assert float(r["fd"]) == pytest.approx(want, rel=1e-12) and r["step"] == "4"
        assert (grid.out / "runs").is_dir() and r["run"].endswith(f"seed-{r['seed']}")
    header = next(csv.reader((grid.out / "results.csv").open()))
    assert header[:5] == ["cell", "seed", "status", "adapter", "rank"]
    # a second run finds everything finished: no command at all
    again = FakeWadi(planted)
    assert run_sweep(grid, wadi=again) == [] and again.calls == []


def test_a_killed_sweep_continues_without_rerunning_finished_cells(grid):
    first = FakeWadi(planted)
    first.die_after = 3
    with pytest.raises(KeyboardInterrupt):
        run_sweep(grid, wadi=first)
    done = {(r["cell"], r["seed"]) for r in read_results(grid)}
    assert len(done) == 3
    second = FakeWadi(planted)
    run_sweep(grid, wadi=second)
    rerun = _runs(second)
    for cell, seed in done:
        folder = next(c for c in grid.cells if c.name == cell)
        assert str(grid.run_dir(folder, int(seed))) not in rerun
    assert len(_distills(second)) == 5 and len(read_results(grid)) == 8


def test_interrupted_runs_continue_and_finished_runs_are_only_scored(grid):
    cell = grid.cells[0]
    stopped = FakeWadi(planted)
    stopped.stop_at = 2  # the run wrote step 2 of 4, then stopped
    args = ["--rank", "2", "--adapter", "lorad"]
    stopped(["distill", "--out", str(grid.run_dir(cell, 0)), "--seed", "0", *args], grid.out / "x.log")
    done = FakeWadi(planted)  # a finished run with no results row (killed while scoring)
    done(["distill", "--out", str(grid.run_dir(cell, 1)), "--seed", "1", *args], grid.out / "x.log")
    empty = grid.run_dir(grid.cells[1], 0)  # killed before its first checkpoint
    empty.mkdir(parents=True)
    (empty / "config.json").write_text("{}")
    fake = FakeWadi(planted)
    run_sweep(grid, wadi=fake)
    distills = dict(_distills(fake))
    assert distills[str(grid.run_dir(cell, 0))] is True  # --resume latest
    assert str(grid.run_dir(cell, 1)) not in distills  # only `wadi eval`
    assert distills[str(empty)] is False and not (empty / "config.json").exists()
    assert len(distills) == 7 and all(r["status"] == "ok" for r in read_results(grid))


def test_a_failing_cell_is_recorded_and_the_sweep_goes_on(grid):
    fake = FakeWadi(planted)
    fake.fail = "--adapter lora --rank 8"
    rows = run_sweep(grid, wadi=fake, jobs=2)
    failed = [r for r in rows if r["status"] != "ok"]
    assert len(rows) == 8 and len(failed) == 2
    assert all(r["error"] == "wadi distill exited 2: error: --rank must be at least 1" for r in failed)
    from wadi_cli.sweep.report import write_report

    write_report(grid)
    md = (grid.out / "summary.md").read_text()
    assert "## Failed runs" in md and "| adapter=lora,rank=8 | 0 | wadi distill exited 2" in md
    assert "| adapter=lora,rank=8 | 0 (2 failed) |" in md
    fake.fail = None  # fixed: only the failed cell runs again
    again = FakeWadi(planted)
    run_sweep(grid, wadi=again)
    assert _runs(again) == {str(grid.run_dir(grid.cells[3], s)) for s in (0, 1)}
    assert all(r["status"] == "ok" for r in read_results(grid))


def test_runs_go_seed_by_seed_so_a_stopped_sweep_has_balanced_arms(grid):
    fake = FakeWadi(planted)
    run_sweep(grid, wadi=fake)
    seeds = [int(c[c.index("--seed") + 1]) for c in fake.calls if c[0] == "distill"]
    assert seeds == [0, 0, 0, 0, 1, 1, 1, 1]


def test_analyze_adds_norm_and_direction_changes_and_a_later_switch_only_analyzes(tmp_path):
    from wadi_cli.sweep.report import summarise

    path = tmp_path / "grid.toml"
    path.write_text(GRID)
    grid = load_grid(path)
    run_sweep(grid, wadi=FakeWadi(planted))
    path.write_text(GRID.replace('backbone = "tiny"', 'backbone = "tiny"\nanalyze = true'))
    grid = load_grid(path)
    fake = FakeWadi(planted)
    run_sweep(grid, wadi=fake)
    assert {c[0] for c in fake.calls} == {"eval", "analyze"}  # nothing trains again
    rows = read_results(grid)
    for r in rows:
        seed = int(r["seed"])
        assert float(r["nm"]) == pytest.approx(0.01 * (seed + 1))
        assert float(r["dm"]) == pytest.approx(0.3 + seed)
    means = {s["cell"]: (s["nm"], s["dm"]) for s in summarise(grid, rows)}
    assert means["adapter=lora,rank=8"] == pytest.approx((0.015, 0.8))  # seeds 0, 1
    # a third call finds every run analyzed: no command at all
    again = FakeWadi(planted)
    assert run_sweep(grid, wadi=again) == [] and again.calls == []
