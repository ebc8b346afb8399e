"""The toolkit's three usage lines, run exactly as typed (argv from ``shlex.split`` of the
line), in a fresh working directory:

    wadi analyze teacher.safetensors student.safetensors
    wadi distill --backbone sd21 --prompts captions.txt
    wadi sample "a shiba inu wearing a beret"

(captions.txt: a few captions written into the working directory; a real backbone has no
default prompt set, so the line names its prompts.) SD2.1 cannot be downloaded here, so
its files are made available the way a user's machine has them after `hf download`: stand-
ins (small random SD-shaped pipeline, a release file in the authors' format) planted in a
hub cache, offline (HF_HUB_OFFLINE=1 from conftest). With an empty cache each line that
needs the hub ends in the one-line message naming the files
and the flags for local copies, and leaves nothing behind."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import threading
import time

import pytest
import torch
from _helpers_sample import sd21_hub_cache
from typer.testing import CliRunner

from wadi_cli.cli.main import app
from wadi_cli.io import save_safetensors

ANALYZE = "wadi analyze teacher.safetensors student.safetensors"
DISTILL = "wadi distill --backbone sd21 --prompts captions.txt"
SAMPLE = 'wadi sample "a shiba inu wearing a beret"'
RUN_NAME = re.compile(r"^sd21-\d{8}-\d{6}$")


def run_line(line: str, *extra: str):
    argv = shlex.split(line)
    assert argv[0] == "wadi"
    return CliRunner().invoke(app, [*argv[1:], *extra])


def _use_cache(monkeypatch, cache) -> None:
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))


@pytest.fixture
def cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def captions(cwd):
    """The ``captions.txt`` that the distill line names."""
    (cwd / "captions.txt").write_text("a photo of a red fox in snow\na lighthouse at sunset\n")
    return cwd / "captions.txt"


@pytest.fixture
def hub(monkeypatch):
    _use_cache(monkeypatch, sd21_hub_cache())


@pytest.fixture
def empty_hub(tmp_path_factory, monkeypatch):
    _use_cache(monkeypatch, tmp_path_factory.mktemp("empty-hub-cache"))


def test_analyze_line_prints_its_tables(cwd):
    gen = torch.Generator().manual_seed(0)
    teacher = {f"down_blocks.{i}.attn.to_q.weight": torch.randn(24, 16, generator=gen) for i in range(3)}
    student = {k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in teacher.items()}
    save_safetensors(teacher, cwd / "teacher.safetensors")
    save_safetensors(student, cwd / "student.safetensors")
    result = run_line(ANALYZE)
    assert result.exit_code == 0, result.output
    assert "norm vs direction change per block" in result.stdout
    assert "direction change / norm change" in result.stdout and "over 3 layers" in result.stdout
    assert sorted(p.name for p in cwd.iterdir()) == ["student.safetensors", "teacher.safetensors"]


def test_sample_line_writes_to_a_new_prompt_folder(cwd, hub):
    first = run_line(SAMPLE)
    assert first.exit_code == 0, first.output
    out = cwd / "wadi-samples" / "a-shiba-inu-wearing-a-beret"
    assert "wadi-samples/a-shiba-inu-wearing-a-beret" in first.stdout.replace("\n", "")
    record = json.loads((out / "samples.json").read_text())
    assert (record["backbone"], record["mode"], record["weights_kind"]) == ("sd21", "one-step", "merged")
    assert record["weights"].endswith("rotated_unet-sdv2-1.safetensors")  # the authors' release
    assert [im["prompt"] for im in record["images"]] == ["a shiba inu wearing a beret"]
    png = (out / "0000.png").read_bytes()
    again = run_line(SAMPLE)
    assert again.exit_code == 0, again.output
    assert (out / "0000.png").read_bytes() == png  # the earlier result is kept
    assert (cwd / "wadi-samples" / "a-shiba-inu-wearing-a-beret-2" / "0000.png").is_file()


@pytest.fixture
def sigint_handler():
    """Python's own SIGINT handler (a background pytest starts with SIG_IGN), restored after."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


def _ctrl_c_after_first_step(runs, timeout: float = 600.0) -> threading.Thread:
    """Press Ctrl-C (SIGINT to this process) once a run under ``runs`` has logged a step."""

    def watch() -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            logs = list(runs.glob("sd21-*/metrics.csv")) if runs.is_dir() else []
            if any(len(p.read_text().splitlines()) >= 2 for p in logs):
                os.kill(os.getpid(), signal.SIGINT)
                return
            time.sleep(0.05)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def test_distill_line_makes_a_run_folder_and_resume_latest_finds_it(cwd, captions, hub, sigint_handler):
    _ctrl_c_after_first_step(cwd / "runs")
    result = run_line(DISTILL)  # 20,000 steps by the paper's recipe: stopped by Ctrl-C
    assert result.exit_code == 130, result.output
    (run,) = list((cwd / "runs").iterdir())
    assert RUN_NAME.match(run.name), run.name
    assert f"run folder: runs/{run.name}" in result.stderr.replace("\n", "")
    assert "wadi distill -b sd21 --resume latest" in result.stderr.replace("\n", "")
    step = int(re.search(r"stopped \(Ctrl-C\) at step (\d+)", result.stdout)[1])
    assert step >= 1 and (run / "checkpoints" / f"step-{step:08d}").is_dir()
    assert json.loads((run / "config.json").read_text())["backbone"] == "sd21"

    resumed = run_line(DISTILL, "--resume", "latest", "--max-steps", str(step + 1), "--json")
    assert resumed.exit_code == 0, resumed.output
    summary = json.loads(resumed.stdout)
    assert (summary["run"], summary["from_step"], summary["steps"]) == (f"runs/{run.name}", step, step + 1)
    assert list((cwd / "runs").iterdir()) == [run]


@pytest.mark.parametrize(
    ("line", "needles"),
    [
        (
            SAMPLE,
            (
                "stabilityai/stable-diffusion-2-1-base",
                "rotated_unet-sdv2-1.safetensors",
                "gudaochangsheng/WaDi",
            ),
        ),
        (DISTILL, ("stabilityai/stable-diffusion-2-1-base", "hf download")),
    ],
)
def test_offline_each_line_names_the_files_and_the_flags(cwd, captions, empty_hub, line, needles):
    result = run_line(line)
    assert result.exit_code == 3, result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: offline or not on the hub"), result.stderr
    for needle in needles:
        assert needle in lines[0]
    flags = "--model DIR --weights rotated_unet-sdv2-1.safetensors" if "sample" in line else "--model DIR"
    assert lines[0].endswith(f"pass {'local copies' if 'sample' in line else 'a local copy'} with {flags}")
    assert [p.name for p in cwd.iterdir()] == ["captions.txt"]  # no half-made run or sample folder
