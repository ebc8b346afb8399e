"""analysis/sweep.py, the one runner of the tiny studies, and the sweep files it reads
(``analysis/*/runs.toml``): every file parses and dry-runs, every run's flags resolve with
today's recipes to exactly the settings its committed CSV rows record (so a recipe change
that would make a listed command train something else fails here), every committed row
belongs to a listed run and seed and back, and each committed table is the one the CSV
makes. The slow test trains two 2-step runs through the runner."""

from __future__ import annotations

import csv
import json
import math

import pytest
from _helpers_scripts import ANALYSIS, load_analysis_script
from typer.testing import CliRunner

from wadi_cli.cli.main import app

sweep = load_analysis_script("sweep.py")
SWEEP_FILES = sorted(ANALYSIS.glob("*/runs.toml"))
runner = CliRunner()


def _ids(paths):
    return [p.parent.name for p in paths]


def test_the_studies_have_sweep_files():
    assert {"distill_tiny", "adapter_study"} <= {p.parent.name for p in SWEEP_FILES}


@pytest.mark.parametrize("path", SWEEP_FILES, ids=_ids(SWEEP_FILES))
def test_dry_run_prints_one_distill_and_one_eval_per_run_and_seed(path, capsys):
    s = sweep.load_sweep(path)
    assert sweep.main([str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    distills = [line for line in out.splitlines() if line.startswith("wadi distill")]
    pairs = [(r, seed) for r in s.runs for seed in r.seeds]
    assert len(distills) == len(pairs)
    for line, (run, seed) in zip(distills, pairs, strict=True):
        assert f"--out RUNS/{run.name}-seed{seed} --seed {seed} " in line
        assert line.endswith(" ".join([*s.flags, *run.flags]).strip())
    evals = [line for line in out.splitlines() if line.startswith("wadi eval")]
    with_ckpts = sum(1 for r, _ in pairs if r.checkpoints)
    assert len(evals) == len(pairs) + 2 * with_ckpts  # the run, then each checkpoint's student and EMA
    assert sweep.main([str(path), "--list"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == len(s.runs)


def _resolved(s, run, seed):
    result = runner.invoke(app, sweep.plan_args(s, run, seed))
    assert result.exit_code == 0, (run.name, result.output)
    return json.loads(result.stdout)


def _same(recorded: str, value) -> bool:
    if value is None:
        return recorded == ""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return recorded == str(value)
    return math.isclose(float(recorded), value, rel_tol=1e-12)


@pytest.mark.parametrize("path", SWEEP_FILES, ids=_ids(SWEEP_FILES))
def test_each_committed_row_is_what_its_listed_command_trains_today(path):
    s = sweep.load_sweep(path)
    rows = sweep.read_rows(s.results)
    assert rows and list(rows[0]) == sweep.csv_columns(s)
    listed = {(r.name, seed) for r in s.runs for seed in r.seeds}
    recorded = {(r["name"], int(r["seed"])) for r in rows}
    assert recorded == listed, f"rows of no listed run: {recorded - listed}; unmeasured: {listed - recorded}"
    configs = {(r.name, seed): _resolved(s, r, seed) for r in s.runs for seed in r.seeds}
    for row in rows:
        plan = configs[(row["name"], int(row["seed"]))]
        for column in s.columns:
            assert _same(row[column], plan["config"][column]), (
                f"{row['name']} seed {row['seed']}: {column} is {plan['config'][column]} today, the row "
                f"says {row[column]}: pin the old value in {path.name}"
            )
        assert int(row["trainable_params"]) == plan["plan"]["student"]["trainable_params"]
        assert row["group"] == s.run(row["name"]).group
    # every setting that differs between runs is a column (else the CSV hides what varied)
    fields = set(next(iter(configs.values()))["config"]) - sweep.NOT_SETTINGS
    varied = {f for f in fields if len({json.dumps(c["config"][f]) for c in configs.values()}) > 1}
    assert varied <= set(s.columns), f"varied but not recorded: {varied - set(s.columns)}"


@pytest.mark.parametrize("path", SWEEP_FILES, ids=_ids(SWEEP_FILES))
def test_the_committed_table_is_the_one_the_csv_makes(path):
    s = sweep.load_sweep(path)
    fix = f"run: python analysis/sweep.py {path} --table"
    assert s.table.read_text(encoding="utf-8") == sweep.markdown(s), fix


def test_checkpoint_rows_belong_to_runs_that_keep_checkpoints():
    s = sweep.load_sweep(ANALYSIS / "distill_tiny" / "runs.toml")
    rows = sweep.read_rows(s.checkpoint_results)
    assert rows and list(rows[0]) == sweep.CHECKPOINT_COLUMNS
    for row in rows:
        run = s.run(row["name"])
        assert run.checkpoints and int(row["seed"]) in run.seeds and row["weights"] in ("student", "ema")


def test_select_and_bad_files_fail_with_one_line(tmp_path, capsys):
    s = sweep.load_sweep(ANALYSIS / "adapter_study" / "runs.toml")
    pairs = sweep.select(s, ["recipe-full"], None, [5])
    assert [(r.name, seed) for r, seed in pairs] == [("recipe-full", 5)]
    assert {r.group for r, _ in sweep.select(s, None, "tiny recipe", None)} == {"tiny recipe"}
    with pytest.raises(SystemExit, match="no run called 'nope'"):
        sweep.select(s, ["nope"], None, None)
    bad = tmp_path / "runs.toml"
    head = '[sweep]\nbackbone = "tiny"\nresults = "r.csv"\n'
    bad.write_text(head + '[[run]]\nname = "a"\nflag = "--lr 1"\n')
    with pytest.raises(SystemExit, match="takes only"):
        sweep.load_sweep(bad)
    bad.write_text(head + '[[run]]\nname = "a"\n[[run]]\nname = "a"\n')
    with pytest.raises(SystemExit, match="two runs are called 'a'"):
        sweep.load_sweep(bad)
    bad.write_text("[sweep\n")
    with pytest.raises(SystemExit, match="cannot read sweep file"):
        sweep.load_sweep(bad)


@pytest.mark.slow
def test_a_two_step_sweep_trains_scores_and_writes_its_rows(tmp_path, capsys):
    """The runner end to end: two runs side by side, one scoring its checkpoints (~75 s on 2 cores)."""
    (tmp_path / "runs.toml").write_text(
        '[sweep]\nbackbone = "tiny"\nresults = "results/runs.csv"\n'
        'columns = ["lr", "ema_decay", "max_steps"]\n'
        'flags = "--config tiny_paper --validate-every 0 --no-tensorboard --max-steps 2 '
        '--checkpoint-every 1"\n'
        'eval = "-n 16 --seed 0"\n'
        '[[run]]\nname = "plain"\n'
        '[[run]]\nname = "ema"\nflags = "--ema-decay 0.5"\ncheckpoints = true\nseeds = [1]\n'
    )
    argv = [str(tmp_path / "runs.toml"), "--jobs", "2", "--keep-runs", str(tmp_path / "runs")]
    assert sweep.main(argv) == 0
    with (tmp_path / "results" / "runs.csv").open() as fh:
        rows = {r["name"]: r for r in csv.DictReader(fh)}
    assert set(rows) == {"plain", "ema"} and rows["ema"]["seed"] == "1" and rows["ema"]["ema_decay"] == "0.5"
    for row in rows.values():
        assert row["max_steps"] == "2" and 0 <= float(row["accuracy"]) <= 1
        assert math.isfinite(float(row["fd"]))
        assert float(row["train_seconds"]) > 0 and float(row["peak_rss_mb"]) > 0
    with (tmp_path / "results" / "checkpoints.csv").open() as fh:
        ckpts = list(csv.DictReader(fh))
    assert {(c["step"], c["weights"]) for c in ckpts} == {("1", "student"), ("1", "ema"), ("2", "student"),
                                                         ("2", "ema")}  # fmt: skip
    final = next(c for c in ckpts if c["step"] == "2" and c["weights"] == "ema")
    assert final["fd"] == rows["ema"]["fd"]  # `wadi eval RUN` scores the EMA of the last checkpoint
    assert "| plain | 0 |" in (tmp_path / "results" / "runs.md").read_text()
