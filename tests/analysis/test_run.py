"""End-to-end library analysis on planted state dicts: pairing, per-layer numbers equal
the planted ones, aggregates and ratios against hand computations, report files."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch
from _helpers_analysis import planted_low_rank_pair, planted_pair

from wadi_cli.analysis import (
    AnalyzeOptions,
    DictSource,
    aggregate,
    analyze_sources,
    block_of,
    pair_tensors,
)
from wadi_cli.analysis.report import CSV_COLUMNS, LayerResult
from wadi_cli.errors import BadInputError, MismatchError

ANGLE = 0.1  # radians, every row of every layer
SCALE_DOWN, SCALE_UP = 0.98, 1.01


def planted_state_dicts() -> tuple[dict, dict]:
    """Three layers with planted angles/scalings + a bias, an orphan and a shape mismatch."""
    t, s = {}, {}
    n = 16
    alt = torch.tensor([SCALE_DOWN, SCALE_UP] * (n // 2), dtype=torch.float64)
    angles = torch.full((n,), ANGLE, dtype=torch.float64)
    t["down_blocks.0.attentions.0.to_q.weight"], s["down_blocks.0.attentions.0.to_q.weight"] = planted_pair(
        n, 24, angles=angles, scales=alt, seed=1
    )
    t["mid_block.resnets.0.conv1.weight"], s["mid_block.resnets.0.conv1.weight"] = planted_pair(
        n, 4 * 9, angles=2 * angles, scales=alt, shape=(n, 4, 3, 3), seed=2
    )
    low_t, low_s, _ = planted_low_rank_pair(n, 40, teacher_rank=2, extra_rank=3, seed=3)
    t["up_blocks.1.ff.proj.weight"], s["up_blocks.1.ff.proj.weight"] = low_t, low_s
    t["conv_in.bias"] = torch.ones(n)
    s["conv_in.bias"] = torch.ones(n) * 2
    t["only_teacher.weight"] = torch.ones(3, 3)
    s["only_student.weight"] = torch.ones(3, 3)
    t["mismatch.weight"], s["mismatch.weight"] = torch.ones(3, 4), torch.ones(4, 3)
    return t, s


def test_numbers_equal_the_planted_ones():
    t, s = planted_state_dicts()
    res = analyze_sources(DictSource(t), DictSource(s), AnalyzeOptions(rank_k=5))
    by = {x.layer: x for x in res.layers}
    assert list(by) == [
        "down_blocks.0.attentions.0.to_q.weight",
        "mid_block.resnets.0.conv1.weight",
        "up_blocks.1.ff.proj.weight",
    ]
    lin = by["down_blocks.0.attentions.0.to_q.weight"]
    assert (lin.kind, lin.rows, lin.cols, lin.block) == ("linear", 16, 24, "down_blocks.0")
    assert lin.angle_deg_mean == pytest.approx(math.degrees(ANGLE), rel=1e-9)
    assert lin.angle_deg_std == pytest.approx(0.0, abs=1e-7)
    assert lin.direction_change_mean == pytest.approx(2 * math.sin(ANGLE / 2), rel=1e-9)
    rel = np.abs(np.array([SCALE_DOWN, SCALE_UP] * 8) - 1)
    assert lin.norm_rel_change_mean == pytest.approx(rel.mean(), rel=1e-9)
    assert lin.norm_rel_change_std == pytest.approx(rel.std(), rel=1e-7)
    # every residual row has norm = chord, so ||R||_F = sqrt(rows) * chord
    assert lin.direction_residual_fro == pytest.approx(4 * 2 * math.sin(ANGLE / 2), rel=1e-6)
    conv = by["mid_block.resnets.0.conv1.weight"]
    assert (conv.kind, conv.rows, conv.cols) == ("conv", 16, 36)
    assert conv.angle_deg_mean == pytest.approx(math.degrees(2 * ANGLE), rel=1e-9)
    low = by["up_blocks.1.ff.proj.weight"]
    assert low.rank99 <= 5 and low.energy_at_k == pytest.approx(1.0, abs=1e-6)
    assert low.norm_rel_change_mean == pytest.approx(0.0, abs=1e-12)
    # pairing report
    p = res.pairing
    assert p.only_in_teacher == ["only_teacher.weight"] and p.only_in_student == ["only_student.weight"]
    assert p.shape_mismatch == [{"name": "mismatch.weight", "teacher": [3, 4], "student": [4, 3]}]
    assert p.not_matrix == ["conv_in.bias"]


def test_overall_ratio_is_defined_as_documented():
    t, s = planted_state_dicts()
    res = analyze_sources(DictSource(t), DictSource(s))
    summary = res.summary()
    overall = summary["overall"]
    layers = res.layers
    dir_mean = np.mean([x.direction_change_mean for x in layers])
    norm_mean = np.mean([x.norm_rel_change_mean for x in layers])
    assert overall["direction_to_norm_ratio_mean"] == pytest.approx(dir_mean / norm_mean, rel=1e-12)
    dir_std = np.mean([x.direction_change_std for x in layers])
    norm_std = np.mean([x.norm_rel_change_std for x in layers])
    assert overall["direction_to_norm_ratio_std"] == pytest.approx(dir_std / norm_std, rel=1e-12)
    ang = np.mean([math.radians(x.angle_deg_mean) for x in layers])
    assert overall["angle_to_norm_ratio_mean"] == pytest.approx(ang / norm_mean, rel=1e-12)
    assert set(summary["blocks"]) == {"down_blocks.0", "mid_block", "up_blocks.1"}
    assert summary["blocks"]["mid_block"]["layers"] == 1
    assert set(summary["kinds"]) == {"linear", "conv"}
    assert "direction_to_norm_ratio_mean" in summary["definitions"]
    json.dumps(summary, allow_nan=False)  # strict JSON


def test_exact_and_gram_agree():
    t, s = planted_state_dicts()
    fast = analyze_sources(DictSource(t), DictSource(s))
    exact = analyze_sources(DictSource(t), DictSource(s), AnalyzeOptions(method="exact"))
    for a, b in zip(fast.layers, exact.layers, strict=True):
        assert (a.rank90, a.rank93, a.rank99) == (b.rank90, b.rank93, b.rank99)
        np.testing.assert_allclose(a.top_singular_values[:3], b.top_singular_values[:3], rtol=1e-5)
        assert a.angle_deg_mean == b.angle_deg_mean


def test_filter_and_progress():
    t, s = planted_state_dicts()
    seen = []
    res = analyze_sources(
        DictSource(t), DictSource(s), AnalyzeOptions(filter=r"conv\d"), progress=lambda *a: seen.append(a)
    )
    assert [x.layer for x in res.layers] == ["mid_block.resnets.0.conv1.weight"]
    assert res.pairing.filtered_out == 2
    assert seen == [("mid_block.resnets.0.conv1.weight", 1, 1)]


def test_nothing_pairs_is_an_error():
    with pytest.raises(MismatchError, match="no weight matrix pairs"):
        pair_tensors(DictSource({"a.weight": torch.ones(2, 2)}), DictSource({"b.weight": torch.ones(2, 2)}))
    with pytest.raises(MismatchError):  # same names, only different shapes / vectors
        pair_tensors(
            DictSource({"a.weight": torch.ones(2, 3), "b": torch.ones(3)}),
            DictSource({"a.weight": torch.ones(3, 2), "b": torch.ones(3)}),
        )
    t, s = planted_state_dicts()
    with pytest.raises(BadInputError, match="matches none"):
        pair_tensors(DictSource(t), DictSource(s), "nothing-like-this")


@pytest.mark.parametrize(
    "opts",
    [
        AnalyzeOptions(rank_k=0),
        AnalyzeOptions(filter="("),
        AnalyzeOptions(method="svd"),
        AnalyzeOptions(top=-1),
    ],
)
def test_bad_options(opts):
    with pytest.raises(BadInputError):
        opts.validate()


def test_zero_and_nan_layers_are_reported_not_fatal():
    t = {"a.weight": torch.zeros(4, 5), "b.weight": torch.randn(4, 5)}
    s = {"a.weight": torch.zeros(4, 5), "b.weight": t["b.weight"].clone()}
    s["b.weight"][1, 2] = float("inf")
    res = analyze_sources(DictSource(t), DictSource(s))
    a, b = res.layers
    assert a.rows_zero == 4 and math.isnan(a.angle_deg_mean) and a.rank99 == 0
    assert b.rows_nonfinite == 1 and b.angle_deg_mean == pytest.approx(0.0, abs=1e-6)
    summary = res.summary()
    assert summary["overall"]["rows_zero"] == 4 and summary["overall"]["rows_nonfinite"] == 1
    json.dumps(summary, allow_nan=False)


def test_block_of():
    assert block_of("down_blocks.2.attentions.1.proj_in.weight") == "down_blocks.2"
    assert block_of("mid_block.resnets.0.conv1.weight") == "mid_block"
    assert block_of("up_blocks.0.resnets.2.conv2.weight") == "up_blocks.0"
    assert block_of("transformer_blocks.27.attn1.to_k.weight") == "transformer_blocks.27"
    assert block_of("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k.weight") == "down_blocks.0"
    assert block_of("mid_block.attentions.0.transformer_blocks.0.ff.net.2.weight") == "mid_block"
    assert block_of("conv_in.weight") == "conv_in"
    assert block_of("time_embedding.linear_1.weight") == "time_embedding"


def _layer(name: str, norm: float, dirc: float) -> LayerResult:
    nan = math.nan
    return LayerResult(name, block_of(name), "linear", 2, 2, 0, 0, norm, norm / 2, dirc, dirc / 4,
                       math.degrees(dirc), 0.0, 0.0, nan, 0, 0, 0, 0.0, 0.0, 0.0, nan)  # fmt: skip


def test_aggregate_means_over_layers_and_skips_nan():
    agg = aggregate([_layer("a.w", 0.1, 1.0), _layer("b.w", 0.3, 3.0), _layer("c.w", math.nan, math.nan)])
    assert agg["layers"] == 3
    assert agg["norm_rel_change_mean"] == pytest.approx(0.2)
    assert agg["direction_to_norm_ratio_mean"] == pytest.approx(10.0)
    assert agg["direction_to_norm_ratio_std"] == pytest.approx(0.5 / 0.1)
    assert math.isnan(agg["energy_at_k"])


def test_write_report(tmp_path):
    from wadi_cli.analysis.outputs import OUTPUT_FILES, write_report

    t, s = planted_state_dicts()
    res = analyze_sources(DictSource(t), DictSource(s))
    out = write_report(res, tmp_path / "rep")
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == sorted(OUTPUT_FILES)
    with open(out / "layers.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == CSV_COLUMNS
    assert float(rows[0]["angle_deg_mean"]) == pytest.approx(math.degrees(ANGLE))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["overall"]["layers"] == 3
    spectra = np.load(out / "spectra.npz", allow_pickle=False)
    assert sorted(spectra.files) == sorted(x.layer for x in res.layers)
    assert (out / "norm_vs_direction.png").stat().st_size > 10_000


def test_quantised_weights_are_analysed_with_one_warning_saying_what_the_numbers_mean():
    """int8 codes against float weights: the norm change is that of the codes (~100x here),
    so the analysis runs and says, once, that the file is quantised and what that means."""
    import warnings

    from wadi_cli.analysis import analyze_sources
    from wadi_cli.errors import WadiWarning
    from wadi_cli.io.tensor_map import DictSource

    g = torch.Generator().manual_seed(3)
    teacher = {f"l{i}.weight": torch.randn(8, 6, generator=g) * 0.02 for i in range(3)}
    codes = {k: (v / v.abs().max() * 127).round().to(torch.int8) for k, v in teacher.items()}
    codes["l2.weight"] = teacher["l2.weight"].clone()  # one layer left in float
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = analyze_sources(DictSource(teacher), DictSource(codes))
        analyze_sources(DictSource(teacher), DictSource(teacher))
    said = [str(w.message) for w in caught if issubclass(w.category, WadiWarning)]
    assert len(said) == 1 and said[0].startswith(
        "2 of the 3 paired student matrices are stored quantised (int8)"
    )
    assert "not the weights" in said[0]
    assert len(result.layers) == 3
