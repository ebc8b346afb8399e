"""``wadi swap`` through Typer's CliRunner: bad input is one line + exit 2 + nothing
written; the tiny end-to-end run writes a loadable hybrid, grids and scores."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from wadi_cli.cli.main import app
from wadi_cli.io import load_state_dict, save_safetensors

runner = CliRunner()
TINY_UNET = "wadi_cli/assets/tiny/pipeline/unet"
TINY_PIPELINE = "wadi_cli/assets/tiny/pipeline"


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    """(teacher folder, student file): the shipped tiny U-Net and a perturbed copy."""
    teacher = load_state_dict(TINY_UNET)
    gen = torch.Generator().manual_seed(0)
    student = {
        k: v + 0.03 * torch.randn(v.shape, generator=gen) if v.dim() >= 2 else v for k, v in teacher.items()
    }
    path = tmp_path_factory.mktemp("swap") / "student.safetensors"
    save_safetensors(student, path)
    return TINY_UNET, path


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _one_line_error(result, needle: str) -> None:
    assert result.exit_code == 2, (result.stdout, result.stderr)
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], result.stderr
    assert "Traceback" not in result.output


def test_bad_alpha_is_one_line_and_writes_nothing(tiny_pair, tmp_path):
    teacher, student = tiny_pair
    out = tmp_path / "h.safetensors"
    res = runner.invoke(
        app, ["swap", teacher, str(student), "--keep", "norm", "--alpha", "1.5", "--out", str(out)]
    )
    _one_line_error(res, "--alpha must lie in [0, 1]")
    assert list(tmp_path.iterdir()) == []


def test_different_architectures_and_bad_flags(tiny_pair, tmp_path):
    teacher, student = tiny_pair
    sd = load_state_dict(student)
    sd["conv_in.weight"] = torch.zeros(64, 4, 3, 3)
    del sd["conv_out.bias"]
    other = tmp_path / "other.safetensors"
    save_safetensors(sd, other)
    out = tmp_path / "h.safetensors"
    res = runner.invoke(app, ["swap", teacher, str(other), "--keep", "direction", "--out", str(out)])
    _one_line_error(res, "teacher and student are different architectures: 1 keys only in the teacher")
    assert "shape differs for conv_in.weight: (32, 4, 3, 3) vs (64, 4, 3, 3)" in res.stderr
    for args, needle in (
        (["--keep", "angle"], "--keep must be"),
        (["--keep", "norm", "--filter", "(bad"], "not a valid regular expression"),
        (["--keep", "norm", "--filter", "no_such_layer"], "matches none of the 119 swappable"),
    ):
        res = runner.invoke(app, ["swap", teacher, str(student), *args, "--out", str(out)])
        _one_line_error(res, needle)
    assert not out.exists()


def test_unwritable_out_fails_before_any_work(tiny_pair, tmp_path):
    teacher, student = tiny_pair
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    res = runner.invoke(
        app, ["swap", teacher, str(student), "--keep", "norm", "--out", str(blocker / "h.safetensors")]
    )
    _one_line_error(res, "cannot be created")
    res = runner.invoke(app, ["swap", teacher, str(student), "--keep", "norm", "--out", str(tmp_path)])
    _one_line_error(res, "is a folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


def test_swap_json_writes_a_loadable_hybrid(tiny_pair, tmp_path):
    teacher, student = tiny_pair
    out = tmp_path / "h.safetensors"
    args = ["swap", teacher, str(student), "--keep", "direction", "--alpha", "0.25", "--filter", "attentions"]
    res = runner.invoke(app, [*args, "--out", str(out), "--json"])
    assert res.exit_code == 0, res.stderr
    summary = json.loads(res.stdout)
    assert summary["out"] == str(out) and summary["keep"] == "direction" and summary["alpha"] == 0.25
    assert 0 < summary["tensors_swapped"] < summary["tensors_swappable"] == 119
    hybrid, base = load_state_dict(out), load_state_dict(student)
    assert set(hybrid) == set(base)
    changed = {k for k in base if not torch.equal(hybrid[k], base[k])}
    assert changed and all("attentions" in k for k in changed)
    again = runner.invoke(app, [*args, "--out", str(out)])
    _one_line_error(again, "already exists")


def test_sample_end_to_end_on_tiny(tiny_pair, tmp_path, restore_threads):
    teacher, student = tiny_pair
    out = tmp_path / "hybrid.safetensors"
    prompts = ["a red circle at the top left", "a blue square at the bottom right"]
    args = ["swap", TINY_PIPELINE, str(student), "--keep", "norm", "--out", str(out)]
    for p in prompts:
        args += ["--sample", p]
    args += ["--backbone", "tiny", "-n", "8", "--steps", "2", "--rows", "2", "--seed", "5"]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.stderr
    assert "teacher directions" in res.stdout and "accuracy" in res.stdout
    folder = tmp_path / "hybrid_samples"
    grids = sorted(folder.glob("*.png"))
    assert [g.name for g in grids] == [
        "00_a_red_circle_at_the_top_left.png",
        "01_a_blue_square_at_the_bottom_right.png",
    ]
    w, h = Image.open(grids[0]).size
    assert w > 4 * 32 and h > 2 * 32  # 4 labelled columns, 2 rows (upscaled 32-px images)
    metrics = json.loads((folder / "swap_metrics.json").read_text())
    assert list(metrics) == ["teacher", "student", "teacher_norms", "teacher_directions"]
    assert metrics["teacher"]["steps"] == 2 and all(0 <= m["accuracy"] <= 1 for m in metrics.values())
    record = json.loads((folder / "swap_samples.json").read_text())
    assert record["grids"][1]["seeds"] == [7, 8] and record["labels"][0] == "teacher (2 steps)"
    hybrid = load_state_dict(out)
    w_name = "up_blocks.1.attentions.0.proj_out.weight"
    d = hybrid[w_name].double() / hybrid[w_name].double().norm(dim=1, keepdim=True)
    t = load_state_dict(TINY_UNET)[w_name].double()
    torch.testing.assert_close(d, t / t.norm(dim=1, keepdim=True), rtol=0, atol=1e-6)


def test_help_has_examples():
    res = runner.invoke(app, ["swap", "--help"])
    assert res.exit_code == 0 and "Examples" in res.stdout and "--keep direction" in res.stdout


def test_sampling_flags_need_sample(tiny_pair, tmp_path):
    teacher, student = tiny_pair
    out = tmp_path / "h.safetensors"
    res = runner.invoke(
        app, ["swap", teacher, str(student), "--keep", "norm", "--out", str(out), "--steps", "3"]
    )
    _one_line_error(res, "apply with --sample only")
    res = runner.invoke(
        app,
        ["swap", teacher, str(student), "--keep", "norm", "--out", str(out), "--sample", "x", "--rows", "0"],
    )
    _one_line_error(res, "--rows must be at least 1")
    assert not out.exists()


def test_run_folder_student(tmp_path, restore_threads):
    """A `wadi distill` run as STUDENT is its merged latest student; its LoRaD layers only
    rotate rows, so teacher norms leave them as they are (to fp32 rounding)."""
    run = tmp_path / "run"
    trained = runner.invoke(
        app, ["distill", "--out", str(run), "--backbone", "tiny", "--device", "cpu", "--batch-size", "2"]
        + ["--max-steps", "1", "--regression-weight", "0"],
    )  # fmt: skip
    assert trained.exit_code == 0, trained.stderr
    merged = tmp_path / "merged.safetensors"
    assert runner.invoke(app, ["export", str(run), "--format", "merged", "--out", str(merged)]).exit_code == 0
    out = tmp_path / "h.safetensors"
    res = runner.invoke(app, ["swap", TINY_PIPELINE, str(run), "--keep", "direction", "--out", str(out)])
    assert res.exit_code == 0, res.stderr
    hybrid, student = load_state_dict(out), load_state_dict(merged)
    assert set(hybrid) == set(student)
    for k in hybrid:
        torch.testing.assert_close(hybrid[k], student[k], rtol=1e-5, atol=1e-6)
