"""analysis/relation_inversion_tiny/run.py: its exemplars show the relation only in the image
(the captions omit it), its position score against planted renders, and (slow) a two-step run
writing every results file."""

from __future__ import annotations

import json

import numpy as np
import pytest
from _helpers_scripts import load_analysis_script
from PIL import Image

from wadi_cli.tiny.data import render_batch

study = load_analysis_script("relation_inversion_tiny/run.py")


def test_exemplars_are_at_the_target_and_their_captions_omit_it(tmp_path):
    study.write_exemplars(tmp_path)
    captions = json.loads((tmp_path / "captions.json").read_text())
    assert len(captions) == len(study.EXEMPLARS) == 8
    assert all(c.endswith(" <R>") and "top" not in c and "left" not in c for c in captions.values())
    assert not any("yellow" in c or "triangle" in c for c in captions.values())  # unseen in the exemplars
    images = np.stack([np.asarray(Image.open(tmp_path / name)) for name in captions])
    assert study.position_accuracy(images, None) == 1.0


def test_position_accuracy_of_planted_renders():
    attrs = [
        {"color": "red", "shape": "circle", "position": p} for p in ("top left", "top right", "bottom left")
    ]
    images = render_batch(attrs * 2, 0)
    assert study.position_accuracy(images, None) == pytest.approx(1 / 3)


@pytest.mark.slow
def test_a_small_run_writes_every_results_file(tmp_path):
    args = [
        "--seeds",
        "2",
        "--steps",
        "2",
        "--per-prompt",
        "1",
        "--timing-images",
        "2",
        "--out",
        str(tmp_path),
    ]
    assert study.main(args) == 0
    result = json.loads((tmp_path / "results.json").read_text())
    assert len(result["rows"]) == 2 and set(result["summary"]) >= {"<R>", "words", "none"}
    for name in ("results.md", "positions.png"):
        assert (tmp_path / name).is_file()
