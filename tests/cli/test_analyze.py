"""``wadi analyze`` through Typer's CliRunner on small generated safetensors files."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch
from _helpers_analysis import planted_pair
from safetensors.torch import save_file
from typer.testing import CliRunner

from wadi_cli.analysis.report import CSV_COLUMNS
from wadi_cli.cli.main import app

runner = CliRunner()
ANGLE = 0.05


@pytest.fixture()
def pair(tmp_path):
    n = 12
    angles = torch.full((n,), ANGLE, dtype=torch.float64)
    scales = torch.full((n,), 1.002, dtype=torch.float64)
    t, s = {}, {}
    for name, shape in (
        ("down_blocks.0.attentions.0.to_k.weight", (n, 20)),
        ("up_blocks.1.resnets.0.conv1.weight", (n, 3, 3, 3)),
    ):
        cols = math.prod(shape[1:])
        tt, ss = planted_pair(n, cols, angles=angles, scales=scales, shape=shape, seed=len(t))
        t[name], s[name] = tt.float(), ss.float()
    t["conv_in.bias"], s["conv_in.bias"] = torch.zeros(n), torch.ones(n)
    t["teacher_only.weight"] = torch.ones(2, 2)
    save_file(t, tmp_path / "t.safetensors")
    save_file(s, tmp_path / "s.safetensors")
    return tmp_path / "t.safetensors", tmp_path / "s.safetensors"


def test_table_and_out_folder(pair, tmp_path):
    t, s = pair
    out = tmp_path / "report"
    res = runner.invoke(app, ["analyze", str(t), str(s), "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "overall" in res.stdout and "down_blocks.0" in res.stdout and "up_blocks.1" in res.stdout
    assert "teacher_only.weight" in res.stderr  # listed as skipped
    for f in ("layers.csv", "summary.json", "spectra.npz", "norm_vs_direction.png", "residual_spectra.png"):
        assert (out / f).is_file(), f
    with open(out / "layers.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == CSV_COLUMNS
    assert {r["kind"] for r in rows} == {"linear", "conv"}
    for r in rows:
        assert float(r["angle_deg_mean"]) == pytest.approx(math.degrees(ANGLE), rel=1e-5)
        assert float(r["norm_rel_change_mean"]) == pytest.approx(0.002, rel=1e-3)
    summary = json.loads((out / "summary.json").read_text())
    ratio = summary["overall"]["direction_to_norm_ratio_mean"]
    assert ratio == pytest.approx(2 * math.sin(ANGLE / 2) / 0.002, rel=1e-3)
    assert summary["skipped"]["only_in_teacher"] == ["teacher_only.weight"]


def test_json_goes_to_stdout_only(pair):
    t, s = pair
    res = runner.invoke(app, ["analyze", str(t), str(s), "--json", "--filter", "attentions", "--rank-k", "4"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)  # nothing else on stdout
    assert doc["options"]["rank_k"] == 4 and doc["options"]["filter"] == "attentions"
    assert [x["layer"] for x in doc["layers"]] == ["down_blocks.0.attentions.0.to_k.weight"]
    assert doc["skipped"]["filtered_out_count"] == 1


def test_exact_flag(pair):
    t, s = pair
    fast = json.loads(runner.invoke(app, ["analyze", str(t), str(s), "--json"]).stdout)
    exact = json.loads(runner.invoke(app, ["analyze", str(t), str(s), "--json", "--exact"]).stdout)
    assert exact["options"]["method"] == "exact"
    for a, b in zip(fast["layers"], exact["layers"], strict=True):
        assert a["top_singular_values"][:3] == pytest.approx(b["top_singular_values"][:3], rel=1e-5)
        assert a["rank93"] == b["rank93"]


def _assert_one_line_error(res, code=2):
    assert res.exit_code == code, res.output
    assert "Traceback" not in res.output
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), res.stderr


def test_no_common_tensor_is_one_line_exit_2_and_no_output(tmp_path):
    save_file({"a.weight": torch.ones(3, 3)}, tmp_path / "a.safetensors")
    save_file({"b.weight": torch.ones(3, 3)}, tmp_path / "b.safetensors")
    out = tmp_path / "out"
    res = runner.invoke(
        app, ["analyze", str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors"), "-o", str(out)]
    )
    _assert_one_line_error(res)
    assert "no weight matrix pairs" in res.stderr
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []


@pytest.mark.parametrize(
    "extra", [["--filter", "("], ["--filter", "nomatch"], ["--rank-k", "0"], ["--device", "nonsense"]]
)
def test_bad_flags(pair, tmp_path, extra):
    t, s = pair
    out = tmp_path / "out2"
    res = runner.invoke(app, ["analyze", str(t), str(s), "--out", str(out), *extra])
    _assert_one_line_error(res)
    assert not out.exists()


def test_missing_file(tmp_path, pair):
    t, _ = pair
    res = runner.invoke(app, ["analyze", str(t), str(tmp_path / "nope.safetensors")])
    _assert_one_line_error(res)


def test_help_has_examples():
    res = runner.invoke(app, ["analyze", "--help"])
    assert res.exit_code == 0
    assert (
        "Examples" in res.stdout
        and "wadi analyze teacher.safetensors student.safetensors --out" in res.stdout
    )
    assert "analyze" in runner.invoke(app, ["--help"]).stdout
