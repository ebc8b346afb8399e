"""The one-step student shipped with the tiny model (``wadi_cli/assets/tiny/student.safetensors``):
its metadata names the recipe it was trained by, it is what `wadi eval -b tiny` and
`wadi sample -b tiny` use without --weights, and it holds the recipe's accuracy bar."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from wadi_cli.cli.main import app
from wadi_cli.distill import resolve_config
from wadi_cli.io import open_checkpoint
from wadi_cli.tiny import TINY_STUDENT_PATH

BAR = 0.85  # the accuracy the tiny recipe is held to (analysis/distill_tiny/README.md)


@pytest.fixture(scope="module")
def metadata() -> dict[str, str]:
    with open_checkpoint(TINY_STUDENT_PATH) as src:
        return dict(src.metadata())


def test_metadata_names_the_recipe(metadata):
    assert metadata["recipe"].startswith("tiny defaults")
    assert metadata["train_command"] == "wadi distill -b tiny --seed 0"
    assert metadata["seed"] == "0" and metadata["backbone"] == "tiny" and metadata["role"] == "student"
    assert metadata["adapter"] == "lorad" and metadata["wadi_version"]
    trained = json.loads(metadata["distill_config"])
    recipe = resolve_config(overrides={"backbone": "tiny", "seed": 0}).to_dict()
    # fields added to the config after the student was made, at the value that keeps the
    # old behaviour; any other field missing from the student's config is a recipe change
    added_later = {"lorad_exact_low_precision": False, "components": None, "orthogonal_map": "cayley"}
    differs = {k for k in recipe if trained.get(k, added_later.get(k, "missing")) != recipe[k]}
    assert not differs, f"the tiny recipe changed since the student was made ({sorted(differs)}): re-run " + (
        "python analysis/tiny_student/ship_student.py"
    )
    assert metadata["train_step"] == str(recipe["max_steps"])
    assert metadata["eval_command"] == "wadi eval -b tiny -n 500 --seed 0"
    ev = json.loads(metadata["eval"])
    assert ev["num_images"] == 500 and ev["accuracy"] >= BAR


def _eval(*args: str) -> dict:
    result = CliRunner().invoke(app, ["eval", "-b", "tiny", "-n", "64", "--seed", "0", "--json", *args])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_eval_uses_the_shipped_student_and_it_holds_the_bar():
    student = _eval()
    assert student["weights"] == str(TINY_STUDENT_PATH) and student["weights_kind"] == "adapter"
    assert student["accuracy"] >= BAR
    base = _eval("--base")  # the undistilled model in one step stays reachable
    assert base["weights"] is None and base["accuracy"] < student["accuracy"]  # 0.83 vs 0.95


def test_sample_without_flags_writes_a_one_step_image_from_the_student(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["sample", "-b", "tiny", "a red circle at the top left"])
    assert result.exit_code == 0, result.output
    out = tmp_path / "wadi-samples" / "a-red-circle-at-the-top-left"
    record = json.loads((out / "samples.json").read_text())
    assert (record["mode"], record["steps"], record["weights"]) == ("one-step", 1, str(TINY_STUDENT_PATH))
    assert (out / "0000.png").is_file()


def test_a_missing_student_names_the_flags_that_replace_it(tmp_path, monkeypatch):
    import wadi_cli.tiny

    monkeypatch.setattr(wadi_cli.tiny, "TINY_STUDENT_PATH", tmp_path / "gone.safetensors")
    result = CliRunner().invoke(app, ["eval", "-b", "tiny", "-n", "8"])
    assert result.exit_code == 2
    (line,) = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert "gone.safetensors" in line and line.endswith(
        "--weights FILE, or sample the undistilled model with --base"
    )
