"""``wadi invert`` on the miniature hub caches of tests/_helpers_hub.py (SD1.5 in the default
suite; SD2.1-768 with v-prediction as a slow test): fp32 and bf16 runs of a few steps, a
bit-exact resume on CPU, diffusers' ``load_textual_inversion`` taking the learned file into the
family's own pipeline, and ``wadi sample --embedding`` (one step and --teacher). PixArt is refused
(one line): diffusers' PixArt pipeline has no textual-inversion loader."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from _helpers_cli import wadi
from _helpers_hub import SD15, SD21, hub_cache_in_use
from PIL import Image
from safetensors.torch import load_file


@pytest.fixture(scope="module")
def hub_cache():
    with hub_cache_in_use() as cache:
        yield cache


FAMILIES = {"sd15": ("sd15", [], SD15), "sd21-768": ("sd21", ["--model", SD21], SD21)}
SMALL = ["--batch-size", "1", "--grad-accum", "1", "--no-tensorboard", "--device", "cpu",
         "--checkpoint-every", "1", "--keep-last", "5", "--init-word", "at"]  # fmt: skip


def _exemplars(folder):
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i, (size, mode) in enumerate((((40, 40), "RGB"), ((64, 48), "L"), ((30, 50), "RGBA"))):
        pixels = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
        Image.fromarray(pixels).convert(mode).save(folder / f"{i}.png")
    captions = {f"{i}.png": ["a red circle <R>", "a {} blue square"] for i in range(3)}
    (folder / "captions.json").write_text(json.dumps(captions))
    return folder


def _state(run, step):
    folder = run / "checkpoints" / f"step-{step:08d}"
    return {**load_file(folder / "student.safetensors"), **load_file(folder / "optim_student.safetensors")}


@pytest.mark.parametrize("family", ["sd15", pytest.param("sd21-768", marks=pytest.mark.slow)])
def test_miniature_inverts_resumes_loads_in_diffusers_and_samples(hub_cache, tmp_path, family):
    from diffusers import StableDiffusionPipeline

    from wadi_cli.io import resolve_model

    backbone, base, repo = FAMILIES[family]
    ex = _exemplars(tmp_path / "ex")
    straight, split = tmp_path / "straight", tmp_path / "split"
    wadi("invert", "-b", backbone, *base, "--images", ex, *SMALL, "--max-steps", "2", "--out", straight)
    wadi("invert", "-b", backbone, *base, "--images", ex, *SMALL, "--max-steps", "1", "--out", split)
    wadi("invert", "--out", split, "--resume", "latest", "--max-steps", "2")
    a, b = _state(straight, 2), _state(split, 2)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    learned = load_file(straight / "learned_embeds.safetensors")["<R>"]
    assert learned.shape == (1, 32) and torch.isfinite(learned).all()
    pipe = StableDiffusionPipeline.from_pretrained(str(resolve_model(repo)), safety_checker=None)
    pipe.load_textual_inversion(str(straight))
    row = pipe.text_encoder.get_input_embeddings().weight[pipe.tokenizer.convert_tokens_to_ids("<R>")]
    assert torch.equal(row.detach(), learned[0])
    bf16 = tmp_path / "bf16"
    wadi("invert", "-b", backbone, *base, "--images", ex, *SMALL, "--max-steps", "2",
         "--mixed-precision", "bf16", "--out", bf16)  # fmt: skip
    rows = (bf16 / "metrics.csv").read_text().strip().splitlines()
    assert len(rows) == 3 and all(np.isfinite(float(r.split(",")[1])) for r in rows[1:])
    # the learned token with any weights: one step (here the base's; a student's -w works alike) and teacher
    for k, mode in enumerate((["--base"], ["--teacher", "--steps", "2"])):
        out = tmp_path / f"samples{k}"
        prompt = "a green <R> triangle"
        wadi("sample", prompt, "-b", backbone, *base, *mode, "--embedding", straight, "-o", out)
        assert (out / "0000.png").is_file()
