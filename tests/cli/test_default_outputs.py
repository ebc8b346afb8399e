"""Default output places: `wadi sample` without --out (./wadi-samples/PROMPT-SLUG, numbered,
never replacing an earlier result) and `wadi distill` without --out
(./runs/NAME-YYYYmmdd-HHMMSS; `--resume latest` finds the newest run of a backbone)."""

from __future__ import annotations

import datetime as dt

import pytest

from wadi_cli.distill.run_dirs import latest_run_dir, new_run_dir
from wadi_cli.errors import BadInputError
from wadi_cli.io import unused_path
from wadi_cli.sample.output import default_output_dir, prompt_slug


@pytest.mark.parametrize(
    ("prompt", "slug"),
    [
        ("a shiba inu wearing a beret", "a-shiba-inu-wearing-a-beret"),
        ("  A Red Circle, at the TOP-left!  ", "a-red-circle-at-the-top-left"),
        ("Café crème", "cafe-creme"),
        ("日本の猫", "samples"),
        ("", "samples"),
        ("x" * 59 + " yz", "x" * 59),  # cut at 60 characters, no trailing dash
    ],
)
def test_prompt_slug(prompt, slug):
    assert prompt_slug(prompt) == slug


def test_sample_folders_are_numbered_never_reused(tmp_path):
    root = tmp_path / "wadi-samples"
    first = default_output_dir(["a red circle"], root=root)
    assert first == root / "a-red-circle" and not root.exists()  # creates nothing
    first.mkdir(parents=True)
    assert default_output_dir(["a red circle", "a blue square"], root=root) == root / "a-red-circle-2"
    (root / "a-red-circle-2").mkdir()
    (root / "a-red-circle-3").write_text("a file takes the name too")
    assert default_output_dir(["a red circle"], root=root) == root / "a-red-circle-4"
    assert default_output_dir([], tmp_path / "My Prompts.txt", root=root) == root / "my-prompts"


def test_unused_path(tmp_path):
    assert unused_path(tmp_path / "x") == tmp_path / "x"
    (tmp_path / "x").mkdir()
    assert unused_path(tmp_path / "x") == tmp_path / "x-2"


def test_new_run_dir_is_named_after_backbone_and_time(tmp_path):
    now = dt.datetime(2026, 11, 30, 5, 45, 9)
    run = new_run_dir("sd21", tmp_path / "runs", now)
    assert run == tmp_path / "runs" / "sd21-20261130-054509" and not run.exists()
    run.mkdir(parents=True)
    assert new_run_dir("sd21", tmp_path / "runs", now).name == "sd21-20261130-054509-2"


def _run(root, name, checkpoint=True):
    path = root / name
    (path / "checkpoints" / "step-00000002" if checkpoint else path).mkdir(parents=True)
    return path


def test_latest_run_dir_picks_the_newest_run_with_a_checkpoint(tmp_path):
    root = tmp_path / "runs"
    _run(root, "sd21-20261129-235959")
    _run(root, "sd21-20261130-054509")
    newest_sd21 = _run(root, "sd21-20261130-054509-2")  # same second, started later
    _run(root, "sd21-20261201-000000", checkpoint=False)  # crashed before its first checkpoint
    _run(root, "my-sd21-run")  # not a default name: only found with --out
    newest = _run(root, "tiny-20261202-101010")
    (root / "sd21-20261203-000000").write_text("a file, not a run")
    assert latest_run_dir("sd21", root) == newest_sd21
    assert latest_run_dir(None, root) == newest
    with pytest.raises(BadInputError) as info:
        latest_run_dir("pixart", root)
    msg = str(info.value)
    assert "no pixart run" in msg and "`wadi distill -b pixart`" in msg and msg.endswith("--out RUN")
    with pytest.raises(BadInputError, match="no run with a checkpoint"):
        latest_run_dir(None, tmp_path / "nothing-here")
