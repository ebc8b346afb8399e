"""`wadi sweep` on the command line: --dry-run lists every cell and seed with its commands,
bad input is one line on stderr with exit 2 and writes nothing, --report remakes the tables."""

from __future__ import annotations

from _helpers_sweep import FakeWadi
from typer.testing import CliRunner

from wadi_cli.cli.main import app
from wadi_cli.sweep import load_grid, run_sweep

runner = CliRunner()
GRID = """
[sweep]
backbone = "tiny"
baseline = {adapter = "lorad"}
[fixed]
max_steps = 3
[grid]
adapter = ["lorad", "dora-frozen-norm"]
seed = [0, 4]
"""


def test_dry_run_lists_cells_and_commands(tmp_path):
    grid = tmp_path / "g.toml"
    grid.write_text(GRID)
    result = runner.invoke(app, ["sweep", str(grid), "--dry-run"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].startswith("# 2 cells × 2 seeds = 4 runs into")
    assert [line for line in lines if not line.startswith(("  ", "#"))] == [
        "adapter=lorad seed 0", "adapter=lorad seed 4", "adapter=dora-frozen-norm seed 0",
        "adapter=dora-frozen-norm seed 4",
    ]  # fmt: skip
    assert sum(line.startswith("  wadi distill") for line in lines) == 4
    assert not (tmp_path / "g").exists()  # nothing written


def test_report_only_and_done_marks(tmp_path):
    path = tmp_path / "g.toml"
    path.write_text(GRID)
    run_sweep(
        load_grid(path), wadi=FakeWadi(lambda args, seed, step: 3.0 + seed + step, max_steps=3, every=1)
    )
    result = runner.invoke(app, ["sweep", str(path), "--dry-run"])
    assert "adapter=lorad seed 4  (done)" in result.stdout
    result = runner.invoke(app, ["sweep", str(path), "--report"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "g" / "summary.md").is_file() and (tmp_path / "g" / "bars.png").is_file()


def test_bad_input_is_one_line(tmp_path):
    cases = {
        "unknown field": GRID.replace("max_steps = 3", "max_stepz = 3"),
        "wrong type": GRID.replace("max_steps = 3", 'max_steps = "3"'),
        "empty axis": GRID.replace('adapter = ["lorad", "dora-frozen-norm"]', "adapter = []"),
        "cell does not resolve": GRID.replace('"dora-frozen-norm"', '"dorra"'),
    }
    for name, text in cases.items():
        path = tmp_path / f"{name.replace(' ', '_')}.toml"
        path.write_text(text.replace('baseline = {adapter = "lorad"}', ""))
        result = runner.invoke(app, ["sweep", str(path)])
        assert result.exit_code == 2, (name, result.output)
        assert len(result.stderr.strip().splitlines()) == 1, (name, result.stderr)
        assert not path.with_suffix("").exists(), name
    result = runner.invoke(app, ["sweep", str(tmp_path / "missing.toml")])
    assert result.exit_code == 2 and "cannot read grid file" in result.stderr
    ok = tmp_path / "ok.toml"
    ok.write_text(GRID)
    result = runner.invoke(app, ["sweep", str(ok), "--jobs", "0"])
    assert result.exit_code == 2 and "--jobs" in result.stderr
