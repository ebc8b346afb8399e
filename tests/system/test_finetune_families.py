"""``wadi finetune`` on the miniature hub caches of tests/_helpers_hub.py (SD1.5; SD2.1-768
with v-prediction and PixArt as slow tests): a real family's layout, tokenizer and VAE; 2 steps
with prior preservation, then the exports a user takes to other tools (single-file, diffusers)
and the teacher sampler on the run."""

from __future__ import annotations

import numpy as np
import pytest
from _helpers_cli import wadi
from _helpers_hub import SD21, hub_cache_in_use
from PIL import Image


@pytest.fixture(scope="module")
def hub_cache():
    with hub_cache_in_use() as cache:
        yield cache


#: family -> (backbone, flags selecting the base, single-file export); sd15 in the default
#: suite, the v-prediction SD2.1-768 and the PixArt DiT (no single file) as slow tests
FAMILIES = {
    "sd15": ("sd15", [], True),
    "sd21-768": ("sd21", ["--model", SD21], True),
    "pixart": ("pixart", [], False),
}


@pytest.mark.parametrize(
    "family",
    [
        "sd15",
        pytest.param("sd21-768", marks=pytest.mark.slow),
        pytest.param("pixart", marks=pytest.mark.slow),
    ],
)
def test_miniature_finetunes_exports_and_samples(hub_cache, tmp_path, family):
    backbone, base, single_file = FAMILIES[family]
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
    prompt = ["--instance-prompt", "a photo of sks dog"]
    wadi("finetune", "-b", backbone, *base, "--instance-images", inst, *prompt, *prior, *flags,
         "--max-steps", "2", "--out", run)  # fmt: skip
    assert len(list((run / "class_images").glob("*.png"))) == 1
    rows = (run / "metrics.csv").read_text().strip().splitlines()
    assert len(rows) == 3 and all(np.isfinite(float(r.split(",")[1])) for r in rows[1:])
    if single_file:
        wadi("export", run, "--format", "single-file", "--out", tmp_path / "single.safetensors")
    wadi("export", run, "--format", "diffusers", "--out", tmp_path / "pipe")
    out = tmp_path / "samples"
    wadi(
        "sample",
        "a photo of sks dog",
        "-b",
        backbone,
        *base,
        "--teacher",
        "--steps",
        "2",
        "-w",
        run,
        "-o",
        out,
    )
    assert (out / "0000.png").is_file()
