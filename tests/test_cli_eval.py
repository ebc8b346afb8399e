"""``wadi eval`` on a random tiny pipeline with a random classifier: the JSON agrees with
the library metrics computed directly; bad input is refused in one line."""

from __future__ import annotations

import json
import math

import _helpers_sample as helpers
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from wadi_cli.cli.main import app
from wadi_cli.io import save_safetensors


@pytest.fixture(scope="module")
def base_dir():
    return str(helpers.tiny_pipeline_dir())


@pytest.fixture(scope="module")
def classifier_file(tmp_path_factory):
    from wadi_cli.tiny.classifier import TinyClassifier

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("clf") / "classifier.safetensors"
    save_safetensors(TinyClassifier().state_dict(), path)
    return path


def run(*args: str):
    return CliRunner().invoke(app, ["eval", *args])


def test_eval_json_matches_library(base_dir, classifier_file, tmp_path):
    from wadi_cli.sample import SampleConfig, generate
    from wadi_cli.tiny.classifier import load_classifier
    from wadi_cli.tiny.data import prompt_for, sample_attributes
    from wadi_cli.tiny.metrics import evaluate_images

    out = tmp_path / "imgs"
    r = run(
        "-b",
        "tiny",
        "--model",
        base_dir,
        "--classifier",
        str(classifier_file),
        "-n",
        "6",
        "--seed",
        "3",
        "--batch-size",
        "4",
        "--json",
        "--out",
        str(out),
    )
    assert r.exit_code == 0, r.output + r.stderr
    got = json.loads(r.stdout)
    assert got["mode"] == "one-step" and got["num_images"] == 6
    assert 0.0 <= got["accuracy"] <= 1.0 and math.isfinite(got["fd"]) and got["fd"] >= 0
    # independent recomputation: prompts from the data module, images from generate()
    attrs = sample_attributes(6, 3)
    gen = generate(helpers.tiny_sampler(), [prompt_for(a) for a in attrs], SampleConfig(seed=3))
    ref = evaluate_images(gen.images, attrs, real_seed=3, classifier=load_classifier(classifier_file))
    assert got["accuracy"] == pytest.approx(ref["accuracy"]) and got["fd"] == pytest.approx(
        ref["fd"], rel=1e-6
    )
    assert len(list(out.glob("0*.png"))) == 6
    record = json.loads((out / "samples.json").read_text())
    assert [im["prompt"] for im in record["images"]] == [prompt_for(a) for a in attrs]


@pytest.mark.slow  # the teacher loop is covered by test_sample_generate; this is the CLI flag
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
        (["--teacher", "-w", "x.safetensors"], "drop --weights"),
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
