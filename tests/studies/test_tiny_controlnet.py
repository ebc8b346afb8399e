"""analysis/tiny_controlnet/: the ControlNet its train.py builds (the teacher's weights where
they are shared, zero convolutions zero, the residuals' shapes the U-Net's), the 95 %
half-width of measure.py, and (slow) a small measuring run writing every results file."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from _helpers_scripts import load_analysis_script

train = load_analysis_script("tiny_controlnet/train.py")
measure = load_analysis_script("tiny_controlnet/measure.py")


def test_the_controlnet_starts_as_a_copy_of_the_teacher_encoder_with_zero_outputs():
    from diffusers import UNet2DConditionModel

    from wadi_cli.tiny.arch import TINY_PIPELINE_DIR

    unet = UNet2DConditionModel.from_pretrained(TINY_PIPELINE_DIR / "unet")
    net = train.build_controlnet(unet)
    theirs = unet.state_dict()
    shared = [k for k, v in net.state_dict().items() if k in theirs and theirs[k].shape == v.shape]
    assert len(shared) > 50
    for k in shared:
        torch.testing.assert_close(net.state_dict()[k], theirs[k], rtol=0, atol=0)
    assert not any(p.any() for p in net.controlnet_down_blocks.parameters())
    assert not any(p.any() for p in net.controlnet_mid_block.parameters())
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([999, 10])
    emb, cond = torch.randn(2, 5, 64), torch.rand(2, 3, 32, 32)
    down, mid = net(x, t, encoder_hidden_states=emb, controlnet_cond=cond, return_dict=False)
    skips = unet.down_blocks  # the U-Net's skip connections: conv_in, then each block's outputs
    assert len(down) == 1 + sum(len(b.resnets) + (b.downsamplers is not None) for b in skips)
    assert mid.shape == (2, 64, 4, 4) and all(not d.any() for d in down)


def test_half_width_is_1_96_standard_errors():
    x = np.array([0.2, 0.5, 0.9, 0.4])
    assert measure.half_width(x) == pytest.approx(1.96 * np.std(x, ddof=1) / 2)


@pytest.mark.slow
def test_a_small_run_writes_every_results_file(tmp_path):
    args = ["-n", "4", "--batch-size", "4", "--out", str(tmp_path), "--mask", str(tmp_path / "mask.png")]
    assert measure.main(args) == 0
    rows = list(csv.DictReader((tmp_path / "results.csv").open()))
    assert [(r["sampler"], r["control"]) for r in rows][:3] == [
        ("rendered", "(ceiling)"), ("student", "none"), ("student", "ControlNet")
    ]  # fmt: skip
    for name in ("results.md", "control.png", "run.json", "mask.png"):
        assert (tmp_path / name).is_file()
