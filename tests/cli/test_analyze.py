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
    # --no-plots: the same files without the two figures
    bare = tmp_path / "bare"
    res = runner.invoke(app, ["analyze", str(t), str(s), "--out", str(bare), "--no-plots"])
    assert res.exit_code == 0, res.output
    names = sorted(p.name for p in bare.iterdir() if not p.name.startswith("."))
    assert names == ["layers.csv", "spectra.npz", "summary.json", "timings.json"]
    assert json.loads((bare / "summary.json").read_text())["overall"] == summary["overall"]


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


def _rotated_pair(tmp_path, scale: float):
    """Two layers whose rows turn by ANGLE and scale by ``scale`` (1: a LoRaD-like student)."""
    n = 12
    t, s = {}, {}
    names = ("down_blocks.0.attentions.0.to_k.weight", "up_blocks.1.attentions.0.to_v.weight")
    for i, name in enumerate(names):
        tt, ss = planted_pair(n, 24, angles=torch.full((n,), ANGLE, dtype=torch.float64),
                              scales=torch.full((n,), scale, dtype=torch.float64), seed=i)  # fmt: skip
        t[name], s[name] = tt.float(), ss.float()
    save_file(t, tmp_path / "t.safetensors")
    save_file(s, tmp_path / "s.safetensors")
    return str(tmp_path / "t.safetensors"), str(tmp_path / "s.safetensors")


def test_unchanged_norms_are_said_not_divided(tmp_path):
    """A rotation-only student: the norms moved by float32 rounding only, so the output says
    'unchanged (below 1e-06)' instead of a ratio such as 3.22e+07x."""
    t, s = _rotated_pair(tmp_path, 1.0)
    res = runner.invoke(app, ["analyze", t, s], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    assert "row norms unchanged: mean relative norm change" in res.stdout and "below 1e-06" in res.stdout
    assert "x (means)" not in res.stdout and "unchanged" in res.stdout.split("overall")[1].split("\n")[0]
    # just above the floor the ratio is printed (3e-6 > 1e-6)
    t, s = _rotated_pair(tmp_path, 1.0 + 3e-6)
    res = runner.invoke(app, ["analyze", t, s], env={"COLUMNS": "200"})
    assert "direction change / norm change:" in res.stdout and "row norms unchanged" not in res.stdout


def test_header_and_legend_tell_the_truth_about_summary_json(pair, tmp_path):
    t, s = pair
    res = runner.invoke(app, ["analyze", str(t), str(s), "--rank-k", "5"], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    assert "definitions in summary.json" not in res.stdout
    assert "--out DIR writes them to DIR/summary.json" in res.stdout
    words = " ".join(res.stdout.split())
    assert "E@5: share of the direction residual's energy in its top 5 singular values" in words
    assert "r93/side: fewest singular values holding 93 % of that energy, over min(rows, cols)" in words
    out = tmp_path / "rep"
    res = runner.invoke(app, ["analyze", str(t), str(s), "--out", str(out)], env={"COLUMNS": "200"})
    assert f"Every definition: {out}/summary.json" in " ".join(res.stdout.split())
    assert "norm_floor" in json.loads((out / "summary.json").read_text())["definitions"]


def _layer_rows(rows: list[tuple[str, float, float]]) -> list:
    from wadi_cli.analysis.report import LayerResult, block_of

    nan = float("nan")
    return [
        LayerResult(
            name,
            block_of(name),
            "linear",
            4,
            4,
            0,
            0,
            norm,
            nan,
            dirc,
            nan,
            nan,
            nan,
            1.0,
            1.0,
            1,
            1,
            1,
            0.25,
            0.25,
            0.25,
            1.0,
        )  # fmt: skip
        for name, norm, dirc in rows
    ]


def test_plots_explain_the_floor_and_keep_full_layer_names():
    import numpy as np

    from wadi_cli.analysis.plots import norm_vs_direction_figure, residual_spectra_figure

    layers = _layer_rows([("down_blocks.0.a.weight", 0.0, 0.03), ("down_blocks.0.b.weight", 2e-8, 0.02),
                         ("up_blocks.0.c.weight", 0.01, 0.05)])  # fmt: skip
    fig = norm_vs_direction_figure(layers)
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert "2 layers: norm change below 1e-06 (unchanged: float32 rounding), drawn at 1e-07" in labels
    xs = np.concatenate([c.get_offsets()[:, 0] for c in fig.axes[0].collections if hasattr(c, "get_offsets")])
    assert sorted(set(np.round(xs, 12))) == [1e-7, 0.01]  # nothing at an unexplained 1e-12
    long = "up_blocks.3.attentions.2.transformer_blocks.0.attn2.to_out.0.weight"
    fig = residual_spectra_figure({long: np.array([4.0, 1.0, 0.5]), "mid_block.x.weight": np.array([1.0])})
    assert long in [t.get_text() for t in fig.legends[0].get_texts()]
