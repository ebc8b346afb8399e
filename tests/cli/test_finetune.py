"""``wadi finetune`` end to end on the tiny model: bad input is one line and nothing
written; a run exports in every format and `wadi sample --teacher -w RUN` samples the
fine-tuned model (the same images as its merged export, not the base's)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from _helpers_cli import wadi
from _helpers_sample import one_torch_thread
from PIL import Image

from wadi_cli.tiny.data import render_batch

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPT = "a green sks square at the top right"


@pytest.fixture(scope="module")
def inst(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("ft-cli") / "instance"
    folder.mkdir()
    for i, image in enumerate(
        render_batch([{"shape": "square", "color": "green", "position": "top right"}] * 4, 3)
    ):
        Image.fromarray(image).save(folder / f"{i}.png")
    return folder


@pytest.fixture(scope="module")
def run(inst) -> Path:
    out = inst.parent / "run"
    with one_torch_thread():
        small = ["--max-steps", "2", "--batch-size", "1", "--no-tensorboard", "--device", "cpu"]
        wadi(
            "finetune",
            "-b",
            "tiny",
            "--instance-images",
            inst,
            "--instance-prompt",
            PROMPT,
            *small,
            "--out",
            out,
        )
    return out


def test_bad_input_is_one_line_and_writes_nothing(tmp_path, inst):
    empty = tmp_path / "empty"
    empty.mkdir()
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "a.png").write_bytes(b"not a png at all")
    out = tmp_path / "out"
    cases = [
        (["--instance-images", empty, "--instance-prompt", PROMPT], "holds no images"),
        (["--instance-images", tmp_path / "missing", "--instance-prompt", PROMPT], "no such folder"),
        (["--instance-images", broken, "--instance-prompt", PROMPT], "not a readable image"),
        (["--instance-images", inst], "--instance-prompt is required"),
        (
            ["--instance-images", inst, "--instance-prompt", PROMPT, "--prior-loss-weight", "0.5"],
            "--class-prompt",
        ),
        (
            ["--instance-images", inst, "--instance-prompt", PROMPT, "--num-class-images", "4"],
            "--class-prompt",
        ),
    ]
    for args, needle in cases:
        result = wadi("finetune", "-b", "tiny", "--out", out, "--device", "cpu", *args, code=2)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and needle in lines[0], (args, result.stderr)
        assert not out.exists()


def test_dry_run_prints_the_recipe(inst):
    out = wadi(
        "finetune",
        "-b",
        "sd15",
        "--instance-images",
        inst,
        "--instance-prompt",
        PROMPT,
        "--dry-run",
        "--json",
    )
    assert '"lr": 0.0001' in out.stdout and '"max_steps": 800' in out.stdout


def test_run_exports_and_samples_with_the_teacher(run, tmp_path):
    from wadi_cli.io import open_checkpoint

    assert len((run / "metrics.csv").read_text().strip().splitlines()) == 3
    for fmt, name in (("adapter", "a.safetensors"), ("merged", "m.safetensors"), ("diffusers", "pipe")):
        wadi("export", run, "--format", fmt, "--out", tmp_path / name)
    with open_checkpoint(tmp_path / "m.safetensors") as src:
        assert "alpha_bar_T" not in src.metadata()  # not a one-step student
    # the diffusers folder keeps the base's multi-step scheduler and loads in diffusers
    from diffusers import DiffusionPipeline

    loaded = DiffusionPipeline.from_pretrained(str(tmp_path / "pipe"), local_files_only=True)
    assert (
        type(loaded.scheduler).__name__ != "DDIMScheduler"
        or loaded.scheduler.config.timestep_spacing != "trailing"
    )
    common = ["-b", "tiny", "--teacher", "--steps", "4", "--seed", "5"]
    with one_torch_thread():
        wadi("sample", PROMPT, *common, "-w", run, "-o", tmp_path / "from-run")
        wadi("sample", PROMPT, *common, "-w", tmp_path / "m.safetensors", "-o", tmp_path / "from-merged")
        wadi("sample", PROMPT, *common, "-o", tmp_path / "base")

    def img(folder: str) -> np.ndarray:
        return np.asarray(Image.open(tmp_path / folder / "0000.png")).astype(int)

    assert np.abs(img("from-run") - img("from-merged")).max() <= 1  # adapter applied == merged weights
    assert np.abs(img("from-run") - img("base")).max() > 1  # and they are not the base model's
    refused = wadi("sample", PROMPT, "-b", "tiny", "-w", run, "-o", tmp_path / "x", code=2)
    assert "add --teacher" in refused.stderr


@pytest.mark.slow
def test_two_processes_on_cpu_hold_identical_adapters(inst, tmp_path):
    """``wadi finetune --num-processes 2`` (accelerate launch, gloo on CPU), with prior
    preservation: rank 0 generates the class images, both ranks train the same adapter."""
    import json
    import os
    import subprocess
    import sys

    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "wadi_cli", "finetune", "-b", "tiny", "--instance-images", str(inst)]
    cmd += ["--instance-prompt", PROMPT, "--class-prompt", "a green square at the top right"]
    cmd += ["--num-class-images", "2", "--max-steps", "2", "--batch-size", "1", "--device", "cpu"]
    cmd += ["--no-tensorboard", "--out", str(run), "--num-processes", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    ranks = json.loads((run / "ranks.json").read_text())
    assert ranks["world_size"] == 2 and len(set(ranks["checksums"])) == 1
    assert len(list((run / "class_images").glob("*.png"))) == 2
