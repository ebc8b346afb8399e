"""``wadi demo``: options, figures maths, the report's reading, and one tiny end-to-end run."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from wadi_cli.cli.main import app
from wadi_cli.demo import DemoOptions
from wadi_cli.demo.figures import energy_curve
from wadi_cli.demo.report import report_markdown
from wadi_cli.errors import BadInputError


def test_options_defaults_and_quick():
    full = DemoOptions().resolved()
    assert (full.steps, full.num_images, full.quick) == (400, 500, False)
    quick = DemoOptions(quick=True).resolved()
    assert (quick.steps, quick.num_images) == (200, 256)
    assert DemoOptions(quick=True, steps=7).resolved().steps == 7


@pytest.mark.parametrize(
    "kw", [{"steps": 0}, {"num_images": 1}, {"jobs": 0}, {"teacher_steps": 0}, {"grid_rows": 0}]
)
def test_options_reject_bad_values(kw):
    with pytest.raises(BadInputError):
        DemoOptions(**kw).resolved()


def test_energy_curve_matches_a_hand_computed_spectrum():
    # one layer, squared singular values 3, 1 → cumulative share 0, .75, 1 at rank 0, 1/2, 1
    grid, curve = energy_curve({"a": np.array([3.0, 1.0])}, points=5)
    np.testing.assert_allclose(grid, [0, 0.25, 0.5, 0.75, 1])
    np.testing.assert_allclose(curve, [0, 0.375, 0.75, 0.875, 1])
    # the mean over layers; all-zero (unchanged) layers are left out
    _, two = energy_curve({"a": np.array([3.0, 1.0]), "b": np.array([1.0, 1.0]), "z": np.zeros(3)}, points=3)
    np.testing.assert_allclose(two, [0, (0.75 + 0.5) / 2, 1])


def test_energy_in_top_share_of_singular_values():
    from wadi_cli.demo.run import energy_in_top

    sq = np.array([1.0, 6.0, 2.0, 1.0])  # sorted: 6, 2, 1, 1 (total 10)
    assert energy_in_top(sq, 0.3) == pytest.approx((6 + 2) / 10)  # ceil(0.3 * 4) = 2 values
    assert energy_in_top(sq, 0.25) == pytest.approx(0.6)
    assert energy_in_top(sq, 1.0) == pytest.approx(1.0)


def _metrics(norms_fd: float, directions_fd: float) -> dict:
    student = {"label": "full fine-tune", "trainable_params": 10, "accuracy": 0.9, "fd": 20.0,
               "train_seconds": 1.0, "peak_rss_mb": 100.0, "recipe": "tiny_paper", "regression_weight": 0.0,
               "per_attribute_accuracy": {"color": 1.0, "shape": 0.96, "position": 1.0}}  # fmt: skip
    lorad = {**student, "label": "LoRaD (rank 16)"}
    per = {"norm_rel_change_mean": 0.01, "direction_change_mean": 0.1, "angle_deg_mean": 5.0,
           "direction_to_norm_ratio": 10.0, "rank_frac90": 0.5, "layers": 4, "layers_changed": 3,
           "rank_frac90_changed": 0.25, "energy_top30_changed": 0.9}  # fmt: skip
    return {
        "date": "2026-11-22 08:00 UTC",
        "machine": {"cpu": "cpu", "cores": 2, "torch": "2.13.0"},
        "options": {"quick": False, "steps": 400, "num_images": 500, "seed": 0, "jobs": 2},
        "timings": {"total_s": 300.0, "training_wall_s": 200.0},
        "teacher": {"accuracy": 0.98, "fd": 7.0, "steps": 25, "cfg": 3.0},
        "students": {"lorad": lorad, "full": student},
        "analysis": {
            "direction_to_norm_ratio": 10.0,
            "norm_rel_change_mean": 0.01,
            "direction_change_mean": 0.1,
            "lorad_norm_rel_change_max": 1e-8,
            "per_student": {
                "lorad": {**per, "norm_rel_change_mean": 0.0, "direction_to_norm_ratio": None},
                "full": per,
            },
        },  # fmt: skip
        "swap": {
            "student_metrics": {"accuracy": 0.9, "fd": 20.0},
            "teacher_norms": {"accuracy": 0.89, "fd": norms_fd},
            "teacher_directions": {
                "accuracy": 0.1,
                "fd": directions_fd,
                "per_attribute_accuracy": {"color": 0.99, "shape": 0.71, "position": 1.0},
            },
        },
    }


def test_report_reads_the_swap_from_the_numbers():
    text = report_markdown(_metrics(21.0, 250.0))
    assert "reproduces the paper's asymmetry" in text and "+1.00" in text and "+230.00" in text
    assert "changed directions 10.0× more than norms" in text
    assert "— (norms unchanged, below 1e-06)" in text  # LoRaD: no ratio over rounding
    assert "| 3 / 4 | 0.250 | 0.900 |" in text
    flipped = report_markdown(_metrics(250.0, 21.0))
    assert "does NOT show the paper's asymmetry" in flipped
    for fig in ("fig1a", "fig1b", "fig1c", "fig1d"):
        assert f"figures/{fig}_" in text


def test_report_states_the_objective_the_students_recorded():
    """The objective comes from the students' recorded config, not a fixed sentence."""
    m = _metrics(21.0, 250.0)
    text = report_markdown(m)
    assert "`wadi distill -b tiny --config tiny_paper` (regression_weight 0: the paper's VSD objective" in (
        text
    )
    assert "tiny recipe" not in text
    for s in m["students"].values():
        s.update(recipe="tiny", regression_weight=4.0)
    text = report_markdown(m)
    assert "--config tiny` (regression_weight 4: VSD plus a DMD-style regression" in text
    m["students"]["lorad"]["regression_weight"] = 0.5
    assert "(regression_weight LoRaD (rank 16) 0.5, full fine-tune 4: VSD plus" in report_markdown(m)


def test_swap_grid_caption_names_the_attribute_each_hybrid_loses():
    text = report_markdown(_metrics(21.0, 250.0))
    assert "With the teacher directions, shape accuracy falls 0.96 → 0.71 (look at the shapes" in text


def test_grid_rows_show_each_prompt_once_and_colours_are_fixed_per_kind():
    from wadi_cli.demo.figures import KIND_COLOURS, colour, distinct_rows

    assert distinct_rows(["a", "b", "a", "c", "b", "d"], 3) == [0, 1, 3]
    assert distinct_rows(["a", "a"], 6) == [0]
    assert colour("lorad") == KIND_COLOURS["lorad"] and len(set(KIND_COLOURS.values())) == len(KIND_COLOURS)


def test_cli_refuses_a_foreign_folder_and_bad_steps(tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("precious")
    res = CliRunner().invoke(app, ["demo", "--out", str(foreign)])
    assert res.exit_code == 2 and "not written by wadi" in res.output
    assert (foreign / "keep.txt").read_text() == "precious" and len(list(foreign.iterdir())) == 1
    res = CliRunner().invoke(app, ["demo", "--out", str(tmp_path / "new"), "--steps", "0"])
    assert res.exit_code == 2 and "--steps" in res.output and not (tmp_path / "new").exists()


def test_end_to_end_on_the_tiny_model_with_minimal_sizes(tmp_path):
    """The README's main job at toy size: every artefact appears, with the required keys,
    and LoRaD's norm change is zero to float32 rounding."""
    out = tmp_path / "demo"
    res = CliRunner().invoke(
        app, ["demo", "--out", str(out), "--quick", "--steps", "2", "-n", "8", "--teacher-steps", "2"]
    )
    assert res.exit_code == 0, res.output
    m = json.loads((out / "metrics.json").read_text())
    assert set(m["teacher"]) >= {"accuracy", "fd", "steps"} and m["teacher"]["steps"] == 2
    assert set(m["students"]) == {"lorad", "full"}
    for s in m["students"].values():
        assert set(s) >= {"accuracy", "fd", "trainable_params"} and s["steps"] == 2
    assert m["students"]["lorad"]["trainable_params"] == 165_632
    assert m["students"]["full"]["trainable_params"] == 1_077_572
    assert "direction_to_norm_ratio" in m["analysis"]
    assert m["analysis"]["per_student"]["lorad"]["norm_rel_change_mean"] < 1e-6
    assert m["analysis"]["norm_rel_change_mean"] > 1e-5  # the full fine-tune moved its norms
    for key in ("teacher_norms", "teacher_directions"):
        assert set(m["swap"][key]) >= {"accuracy", "fd"}
    for f in ("report.md", "figures/fig1a_norm_vs_direction.png", "figures/fig1b_residual_spectrum.png",
              "figures/fig1c_swap_metrics.png", "figures/fig1d_swap_grid.png", "students/lorad.safetensors",
              "swaps/full_teacher_norms.safetensors", "analysis/full/layers.csv"):  # fmt: skip
        assert (out / f).is_file(), f
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left behind


def test_the_spawned_workers_module_loads_without_torch():
    """A training worker of the demo imports ``wadi_cli.demo.students`` in a fresh
    interpreter and sets its thread count and environment before torch loads."""
    import subprocess
    import sys

    code = "import sys, wadi_cli.demo.students; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr[-2000:]


def _bars(display) -> dict[str, tuple[float, float | None]]:
    return {t.description.strip(): (t.completed, t.total) for t in display.progress.tasks}


def test_display_counts_every_students_steps_and_the_overall_bar():
    """The top row is the bar over all students' steps (not a stage that reads 1/1 from the
    first second); each student's row reaches its step count; finished rows stop."""
    from rich.console import Console

    from wadi_cli.cli.demo import _RichProgress

    display = _RichProgress(Console(record=True, width=160, force_terminal=False))
    with display:
        display.stage("distilling 2 students (7 steps each, 2 at a time)")
        display.training(["lorad", "full"], 7)
        assert _bars(display)["distilling 2 students (7 steps each, 2 at a time)"] == (0, 14)
        display.train_state("full", "loading")
        for step in (3, 7):
            display.train_step("full", step, 0.5, 0.25)
        display.train_state("full", "done in 9 s")
        display.train_step("lorad", 5, 0.5, 0.25)
        assert _bars(display)["distilling 2 students (7 steps each, 2 at a time)"] == (12, 14)
        display.train_step("lorad", 7, 0.5, 0.25)
        bars = _bars(display)
        assert bars["train lorad"] == bars["train full"] == (7, 7)
        assert bars["distilling 2 students (7 steps each, 2 at a time)"] == (14, 14)
        display.stage("plots and report")
    text = display.progress.console.export_text()
    assert "14/14" in text and text.count("7/7") == 2 and "done in 9 s" in text and "0/1" not in text


def test_students_steps_reach_the_display_while_the_side_job_runs():
    """The teacher's evaluation (the side job) runs while a student trains; the student's
    steps must reach the display meanwhile, not after it (the bars once froze for minutes)."""
    import time

    from wadi_cli.cli.demo import _RichProgress
    from wadi_cli.demo.students import STUDENTS, train_students

    display = _RichProgress()
    seen: dict[str, object] = {}

    def side_job() -> None:  # waits for the student's last step to show up on its bar
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and _bars(display)["train lorad"][0] < 3:
            time.sleep(0.2)
        seen["during"] = _bars(display)["train lorad"]

    with display:
        display.stage("distilling 1 student")
        display.training(["lorad"], 3)
        import tempfile
        from pathlib import Path

        with tempfile.TemporaryDirectory() as tmp:
            done = train_students([STUDENTS["lorad"]], 3, 0, Path(tmp), jobs=2, on_step=display.train_step,
                                  side_job=side_job, on_state=display.train_state)  # fmt: skip
    assert seen["during"] == (3, 3) and done["lorad"].steps == 3
