"""analysis/downstream_tiny/run.py: its image measures against planted images, and (slow) a
two-prompt run writing every results file."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from _helpers_scripts import load_analysis_script

study = load_analysis_script("downstream_tiny/run.py")


def test_laplacian_of_planted_images():
    flat = np.full((2, 8, 8, 3), 90, np.uint8)
    assert study.laplacian(flat) == 0.0
    dot = flat.copy()
    dot[0, 4, 4] = 190  # one pixel 100 brighter: |4·100| at it, |−100| at its 4 neighbours
    inner = 2 * 6 * 6  # interior pixels of both images
    assert study.laplacian(dot) == pytest.approx((400 + 4 * 100) / inner)


def test_down_is_a_box_average():
    img = np.zeros((1, 64, 64, 3), np.uint8)
    img[0, :2, :2] = [200, 100, 40]  # one 2x2 block → one 32-px pixel, its mean
    img[0, 2, 2] = 120  # a quarter of the next block
    out = study.down(img)
    assert out.shape == (1, 32, 32, 3)
    assert out[0, 0, 0].tolist() == [200, 100, 40] and out[0, 1, 1].tolist() == [30, 30, 30]


@pytest.mark.slow
def test_a_small_run_writes_every_results_file(tmp_path):
    assert study.main(["-n", "2", "--batch-size", "2", "--out", str(tmp_path)]) == 0
    rows = list(csv.DictReader((tmp_path / "results.csv").open()))
    assert {r["part"] for r in rows} == {"img2img", "highres"}
    assert len([r for r in rows if r["part"] == "img2img"]) == 2 * (1 + len(study.STRENGTHS))
    for name in ("results.md", "img2img.png", "highres.png", "run.json"):
        assert (tmp_path / name).is_file()
