"""``wadi eval`` on a random tiny pipeline with a random classifier: the JSON agrees with
the library metrics computed directly; bad input is refused in one line."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from _helpers_sample import tiny_pipeline_dir
from typer.testing import CliRunner

from wadi_cli.cli.main import app
from wadi_cli.io import save_safetensors


@pytest.fixture(scope="module")
def base_dir():
    return str(tiny_pipeline_dir())


@pytest.fixture(scope="module")
def classifier_file(tmp_path_factory):
    from wadi_cli.tiny.classifier import TinyClassifier

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("clf") / "classifier.safetensors"
    save_safetensors(TinyClassifier().state_dict(), path)
    return path


def run(*args: str):
    return CliRunner().invoke(app, ["eval", *args])


def test_eval_json_and_outputs(base_dir, classifier_file, tmp_path):
    """The command end to end on a random pipeline: JSON fields, images and records."""
    from wadi_cli.tiny.data import prompt_for, sample_attributes

    out = tmp_path / "imgs"
    args = ["-b", "tiny", "--model", base_dir, "--classifier", str(classifier_file), "-n", "6", "--seed", "3"]
    r = run(*args, "--batch-size", "4", "--json", "--out", str(out))
    assert r.exit_code == 0, r.output + r.stderr
    got = json.loads(r.stdout)
    assert got["mode"] == "one-step" and got["num_images"] == 6
    assert 0.0 <= got["accuracy"] <= 1.0 and math.isfinite(got["fd"]) and got["fd"] >= 0
    assert len(list(out.glob("0*.png"))) == 6
    record = json.loads((out / "samples.json").read_text())
    assert [im["prompt"] for im in record["images"]] == [prompt_for(a) for a in sample_attributes(6, 3)]


def _planted_generate(wrong: set[int]):
    """A stand-in for ``generate`` that returns, for each prompt, a real render of what the
    prompt says (parsed from its text, jitter from the run's seed, as the FD reference is
    drawn) except at the indices ``wrong``, which get the next shape in the vocabulary."""
    from wadi_cli.pipeline.generation import Generation
    from wadi_cli.tiny.data import ATTRIBUTES, parse_prompt, render_batch

    def fake(sampler, prompts, config, **kwargs):
        attrs = [parse_prompt(p) for p in prompts]
        shapes = ATTRIBUTES["shape"]
        for i in wrong:
            attrs[i] = {**attrs[i], "shape": shapes[(shapes.index(attrs[i]["shape"]) + 1) % len(shapes)]}
        images = render_batch(attrs, config.seed)
        return Generation(images, list(prompts), [config.seed + i for i in range(len(prompts))], config)

    return fake


@pytest.mark.parametrize(("wrong", "accuracy"), [(set(), 1.0), ({1, 4}, 0.75)])
def test_eval_scores_planted_images(base_dir, monkeypatch, wrong, accuracy):
    """Planted ground truth, scored by the SHIPPED (trained) classifier: images that are
    the real reference renders of their prompts score accuracy 1 and FD 0; with 2 of 8
    images showing the wrong shape, accuracy is exactly 6/8 and FD is positive."""
    import wadi_cli.evaluation.tiny as evaluate

    monkeypatch.setattr(evaluate, "generate", _planted_generate(wrong))
    r = run("-b", "tiny", "--model", base_dir, "-n", "8", "--seed", "5", "--json")
    assert r.exit_code == 0, r.output + r.stderr
    got = json.loads(r.stdout)
    assert got["accuracy"] == accuracy and got["num_images"] == 8
    if wrong:
        assert got["fd"] > 1.0 and got["per_attribute_accuracy"]["shape"] == 0.75
        assert got["per_attribute_accuracy"]["color"] == got["per_attribute_accuracy"]["position"] == 1.0
    else:
        assert abs(got["fd"]) < 1e-3


def test_eval_teacher(base_dir, classifier_file):
    r = run(
        "-b",
        "tiny",
        "--model",
        base_dir,
        "--classifier",
        str(classifier_file),
        "-n",
        "2",
        "--teacher",
        "--steps",
        "2",
    )
    assert r.exit_code == 0, r.stderr
    assert "teacher" in r.stdout and "accuracy" in r.stdout


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["-b", "sd15"], "--captions FILE is required"),
        (["-b", "nope"], "unknown backbone"),
        (["-n", "1"], "at least 2"),
        (["--base", "-w", "x.safetensors"], "--base"),
        (["--steps", "3"], "--teacher"),
    ],
)
def test_eval_bad_input(base_dir, classifier_file, args, needle):
    r = run("--model", base_dir, "--classifier", str(classifier_file), *args)
    assert r.exit_code == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0]


def test_eval_missing_classifier_fails_before_generating(base_dir, tmp_path):
    r = run("--model", base_dir, "--classifier", str(tmp_path / "none.safetensors"), "-n", "4")
    assert r.exit_code == 2 and "classifier" in r.stderr


def test_help_has_examples():
    r = CliRunner().invoke(app, ["eval", "--help"])
    assert r.exit_code == 0 and "Examples" in r.stdout and np.char.count(r.stdout, "wadi eval") >= 2


def test_tiny_eval_with_the_shipped_controlnet_reports_the_control_iou(tmp_path):
    """--controlnet tiny with a folder of silhouettes of the drawn prompts: control_iou is the
    model-free IoU of the images it saved against those silhouettes, recomputed here."""
    from PIL import Image

    from wadi_cli.tiny.data import mask_images, render_with_masks, sample_attributes
    from wadi_cli.tiny.metrics import control_adherence

    _, masks = render_with_masks(sample_attributes(4, 2), 9)
    (tmp_path / "masks").mkdir()
    for i, image in enumerate(mask_images(masks)):
        Image.fromarray(image).save(tmp_path / "masks" / f"{i}.png")
    flags = ["--controlnet", "tiny", "--control-image", str(tmp_path / "masks"), "--control-scale", "0.9"]
    r = run("-b", "tiny", "-n", "4", "--seed", "2", *flags, "--json", "--out", str(tmp_path / "o"))
    assert r.exit_code == 0, r.output + r.stderr
    got = json.loads(r.stdout)
    assert got["controlnet"] == "tiny" and got["control_scale"] == 0.9
    images = np.stack([np.asarray(Image.open(tmp_path / "o" / f"{i:04d}.png")) for i in range(4)])
    want = control_adherence(images, masks)
    assert got["control_iou"] == pytest.approx(want["iou"]) and got["control_iou_ci95"] == pytest.approx(
        want["iou_ci95"]
    )


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--height", "64"], "the tiny classifier scores 32-px images"),
        (["--controlnet", "tiny"], "--controlnet and --control-image go together"),
        (["--strength", "0.5"], "--strength applies to --init-image only"),
        (["--images", ".", "--init-image", "x.png"], "applies to generated images, not to --images"),
    ],
)
def test_eval_downstream_bad_input(args, needle, tmp_path):
    r = run("-b", "tiny", "-n", "2", *args)
    assert r.exit_code != 0 and needle in r.stderr, r.stderr
    assert "Traceback" not in r.output + r.stderr
