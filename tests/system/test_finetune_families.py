"""``wadi finetune`` on the miniature SD1.5 hub cache (tests/_helpers_hub.py): a real
family's layout, tokenizer and VAE; 2 steps with prior preservation, then the exports a user
takes to other tools (single-file, diffusers) and the teacher sampler on the run."""

from __future__ import annotations

import numpy as np
import pytest
from _helpers_hub import shared_hub_cache, use_hub_cache
from _helpers_sample import one_torch_thread
from PIL import Image
from typer.testing import CliRunner

from wadi_cli.cli.main import app


@pytest.fixture(scope="module")
def hub_cache():
    with one_torch_thread(), pytest.MonkeyPatch.context() as mp:
        cache = shared_hub_cache()
        use_hub_cache(mp, cache)
        yield cache


def wadi(*args: object, code: int = 0):
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == code, (args, result.output, result.stderr)
    return result


def test_sd15_miniature_finetunes_exports_and_samples(hub_cache, tmp_path):
    inst = tmp_path / "dog"
    inst.mkdir()
    rng = np.random.default_rng(0)
    for i, size in enumerate(((40, 40), (64, 48), (30, 50))):  # any size: centre-cropped and resized
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(inst / f"{i}.png")
    run = tmp_path / "run"
    flags = [
        "--batch-size",
        "1",
        "--rank",
        "2",
        "--no-tensorboard",
        "--device",
        "cpu",
        "--checkpoint-every",
        "1",
    ]
    prior = ["--class-prompt", "a photo of a dog", "--num-class-images", "1"]
    wadi("finetune", "-b", "sd15", "--instance-images", inst, "--instance-prompt", "a photo of sks dog",
         *prior, *flags, "--max-steps", "2", "--out", run)  # fmt: skip
    assert len(list((run / "class_images").glob("*.png"))) == 1
    rows = (run / "metrics.csv").read_text().strip().splitlines()
    assert len(rows) == 3 and all(np.isfinite(float(r.split(",")[1])) for r in rows[1:])
    wadi("export", run, "--format", "single-file", "--out", tmp_path / "sd15.safetensors")
    wadi("export", run, "--format", "diffusers", "--out", tmp_path / "pipe")
    out = tmp_path / "samples"
    wadi("sample", "a photo of sks dog", "-b", "sd15", "--teacher", "--steps", "2", "-w", run, "-o", out)
    assert (out / "0000.png").is_file()
