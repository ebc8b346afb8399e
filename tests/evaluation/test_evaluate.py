"""``evaluate_model`` with the downstream flags on the sd15 miniature: the images it generates
for its captions are those ``wadi sample`` makes with the same flags (a ControlNet with a
folder of control images, an init image, another size), the manifest records the flags, and
a resume with another control is refused."""

from __future__ import annotations

import json

import numpy as np
import pytest
from _helpers_cli import wadi
from _helpers_hub import hub_cache_in_use, miniature_controlnet
from PIL import Image

from wadi_cli.errors import BadInputError

CAPTIONS = ["a cat on a mat", "a red fox"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    from wadi_cli.pipeline import load_pipeline

    root = tmp_path_factory.mktemp("inputs")
    with hub_cache_in_use():
        miniature_controlnet(load_pipeline("sd15", teacher=True).denoiser.model).save_pretrained(root / "cn")
        rng = np.random.default_rng(5)
        (root / "ctrl").mkdir()
        for i in range(len(CAPTIONS)):
            image = rng.integers(0, 256, (24, 40, 3), dtype=np.uint8)
            Image.fromarray(image).save(root / "ctrl" / f"{i}.png")
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / "init.png")
        yield root


def _request(out, root, **extra):
    from wadi_cli.evaluation.evaluate import ModelRequest
    from wadi_cli.pipeline.images import image_files

    return ModelRequest(
        backbone="sd15", out=out, captions=CAPTIONS, base=True, seed=4, batch_size=2,
        controlnet=str(root / "cn"), control_scale=0.7,
        control_files=image_files(root / "ctrl", 2, "--control-image"),
        init_files=image_files(root / "init.png", 2, "--init-image"), strength=0.8, height=24, width=32,
        **extra,
    )  # fmt: skip


def test_eval_generates_what_sample_makes_with_the_same_flags(inputs, tmp_path):
    from wadi_cli.evaluation.evaluate import evaluate_model
    from wadi_cli.evaluation.parallel import Processes
    from wadi_cli.evaluation.run import EvalOptions

    with hub_cache_in_use():
        result = evaluate_model(_request(tmp_path / "e", inputs), EvalOptions(metrics=()), Processes())
        flags = ["--controlnet", inputs / "cn", "--control-image", inputs / "ctrl", "--control-scale", 0.7,
                 "--init-image", inputs / "init.png", "--strength", 0.8,
                 "--height", 24, "--width", 32]  # fmt: skip
        wadi("sample", *CAPTIONS, "-b", "sd15", "--base", "--seed", 4, *flags, "-o", tmp_path / "s")
    manifest = json.loads((tmp_path / "e" / "manifest.json").read_text())
    settings = manifest["settings"]
    assert settings["controlnet"] == str(inputs / "cn") and settings["control_scale"] == 0.7
    assert settings["control_image"] == str(inputs / "ctrl") and settings["strength"] == 0.8
    assert (settings["height"], settings["width"]) == (24, 32) and result["num_images"] == 2
    for i, entry in enumerate(manifest["images"]):
        ours = np.asarray(Image.open(tmp_path / "e" / entry["file"]))
        theirs = np.asarray(Image.open(tmp_path / "s" / f"{i:04d}.png"))
        assert ours.shape == (24, 32, 3)
        np.testing.assert_array_equal(ours, theirs)


def test_a_resume_with_another_control_is_refused(inputs, tmp_path):
    from wadi_cli.evaluation.evaluate import evaluate_model
    from wadi_cli.evaluation.parallel import Processes
    from wadi_cli.evaluation.run import EvalOptions

    with hub_cache_in_use():
        evaluate_model(_request(tmp_path / "e", inputs), EvalOptions(metrics=()), Processes())
        with pytest.raises(BadInputError, match="control_scale"):
            again = _request(tmp_path / "e", inputs)
            evaluate_model(
                type(again)(**{**again.__dict__, "control_scale": 0.5}), EvalOptions(metrics=()), Processes()
            )
