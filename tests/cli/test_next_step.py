"""Every required input of every command, left out: the error is one line that names what
is missing and ENDS with the exact flag or command that supplies it (offline, empty hub
cache, fresh working directory)."""

from __future__ import annotations

import pytest
import torch
from _helpers_sample import tiny_pipeline_dir
from safetensors.torch import save_file
from typer.testing import CliRunner

from wadi_cli.cli.main import app

PROMPT = "a red circle at the top left"
TINY_BASE = "{tiny_base}"  # replaced by a random tiny pipeline folder

CASES = [
    # (argv, exit code, the line ends with)
    (["analyze", "--json"], 2, "`wadi analyze TEACHER STUDENT`"),
    (["analyze", "t.safetensors"], 2, "`wadi analyze t.safetensors STUDENT`"),
    (["swap", "--keep", "norm"], 2, "`wadi swap TEACHER STUDENT --keep direction --out FILE`"),
    (["swap", "t.safetensors"], 2, "`wadi swap t.safetensors STUDENT --keep direction --out FILE`"),
    (["swap", "t.safetensors", "s.safetensors", "-o", "h.safetensors"], 2, "with --keep norm"),
    (["swap", "t.safetensors", "s.safetensors", "--keep", "norm"], 2, "with --out FILE.safetensors"),
    (["merge", "--out", "m.safetensors"], 2, "`wadi merge BASE ADAPTER --out merged.safetensors`"),
    (["merge", "b.safetensors"], 2, "`wadi merge b.safetensors ADAPTER --out merged.safetensors`"),
    (["merge", "b.safetensors", "a.safetensors"], 2, "with --out FILE.safetensors"),
    (["export", "--out", "x.safetensors"], 2, "`wadi export RUN --format merged --out PATH`"),
    (["export", "runs/x", "-f", "adapter"], 2, "with --out PATH"),
    (["demo"], 2, "with --out demo/"),
    (["info", "--rank", "8"], 2, "need --backbone NAME"),
    # sample: the prompts, the one-step weights, the base model (each alone), both
    (["sample", "-b", "tiny", "--model", TINY_BASE], 2, "with --prompts FILE"),
    (
        ["sample", PROMPT, "-b", "sd15", "--model", TINY_BASE],
        3,
        "with --weights rotated_unet-sdv1-5.safetensors",
    ),
    (["sample", PROMPT, "-b", "sd21", "-w", "{weights}"], 3, "with --model DIR"),
    (["sample", PROMPT], 3, "with --model DIR --weights rotated_unet-sdv2-1.safetensors"),
    (["sample", PROMPT, "-b", "pixart", "--teacher"], 3, "with --model DIR --components DIR"),
    # eval: the classifier (the student has its own test in tests/tiny/test_student.py)
    (["eval", "--model", TINY_BASE, "--classifier", "none.safetensors", "-n", "4"], 2, "--classifier FILE"),
    # distill: the base model; the run to resume
    (["distill", "-b", "sd15", "--prompts", "smoke"], 3, "with --model DIR"),
    (["distill", "-b", "sd15"], 2, "--prompts FILE"),
    (["distill", "--resume", "latest"], 2, "name the run folder with --out RUN"),
    (["distill", "-b", "tiny", "--resume", "latest"], 2, "name the run folder with --out RUN"),
]


@pytest.fixture
def offline_cwd(tmp_path, monkeypatch):
    import huggingface_hub.constants

    cache = tmp_path / "empty-hub-cache"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return work


@pytest.mark.parametrize(("argv", "code", "ending"), CASES, ids=[" ".join(c[0][:3]) for c in CASES])
def test_a_missing_input_names_the_next_step(offline_cwd, argv, code, ending):
    weights = offline_cwd / "w.safetensors"
    save_file({"conv_in.weight": torch.zeros(2, 2)}, str(weights))  # a readable merged file: the hub error
    fill = {
        "tiny_base": str(tiny_pipeline_dir()) if TINY_BASE in argv else "",
        "weights": str(weights),
    }
    result = CliRunner().invoke(app, [a.format(**fill) for a in argv])
    assert result.exit_code == code, (result.exit_code, result.output)
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert lines[0].endswith(ending), lines[0]
    assert "Traceback" not in result.output
    assert sorted(p.name for p in offline_cwd.iterdir()) == ["w.safetensors"]  # nothing written
