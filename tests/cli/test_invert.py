"""``wadi invert`` and ``wadi sample --embedding`` on the tiny model: the --help examples run
as typed (in a folder holding ``exemplars/``), and bad input is one line on stderr, a non-zero
exit and nothing written."""

from __future__ import annotations

import json
import shlex

import pytest
import torch
from _helpers_cli import wadi
from PIL import Image

from wadi_cli.cli.invert import HELP
from wadi_cli.io.embeddings import save_embedding
from wadi_cli.tiny.data import render_batch

pytestmark = pytest.mark.usefixtures("one_thread")


def _exemplars(folder):
    folder.mkdir()
    attrs = [{"color": c, "shape": "circle", "position": "top left"} for c in ("red", "blue", "green")]
    for i, image in enumerate(render_batch(attrs, 5)):
        Image.fromarray(image).save(folder / f"{i}.png")
    captions = {f"{i}.png": f"a {a['color']} circle <R>" for i, a in enumerate(attrs)}
    (folder / "captions.json").write_text(json.dumps(captions))


def test_help_examples_on_tiny_run_as_typed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _exemplars(tmp_path / "exemplars")
    lines = [line.strip() for line in HELP.split("Examples:")[1].splitlines() if line.strip()]
    tiny = [line for line in lines if "-b tiny" in line or "runs/tiny-R" in line]
    assert len(tiny) == 4 and all(line.startswith("wadi ") for line in tiny)
    for line in tiny:
        wadi(*shlex.split(line)[1:])
    assert (tmp_path / "runs/tiny-R/checkpoints/step-00000008").is_dir()
    assert (tmp_path / "samples/R/0000.png").is_file()
    recorded = json.loads((tmp_path / "samples/R/samples.json").read_text())
    assert "<R>" in json.dumps(recorded)


@pytest.mark.parametrize(
    "key, vector, words",
    [
        ("<R>", torch.zeros(768), "768 wide; this text encoder's tokens are 64 wide"),
        ("red", torch.zeros(64), "already in the tokenizer's vocabulary"),
    ],
)
def test_sample_refuses_an_embedding_that_does_not_fit(tmp_path, key, vector, words):
    save_embedding(tmp_path / "e.safetensors", key, vector)
    out = tmp_path / "out"
    r = wadi("sample", f"a {key}", "-b", "tiny", "--embedding", tmp_path / "e.safetensors", "-o", out, code=2)
    assert words in r.stderr and len(r.stderr.strip().splitlines()) == 1 and not out.exists()


def test_invert_bad_input_is_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    for args, words in (
        (["-b", "pixart", "--images", tmp_path / "empty"], "not supported for pixart"),
        (["-b", "tiny", "--images", tmp_path / "empty"], "no image"),
        (["-b", "tiny", "--images", tmp_path / "empty", "--token", "<R> x"], "without spaces"),
        (["-b", "tiny", "--images", tmp_path / "empty", "--importance-alpha", "2"], "[0, 1]"),
    ):
        r = wadi("invert", *args, "--out", tmp_path / "run", code=2)
        assert words in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert not (tmp_path / "run").exists()
