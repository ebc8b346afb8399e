"""CUDA paths (fp16/bf16, channels_last, torch.compile) on the random tiny pipeline.
Marked ``gpu``: deselected by default, run with ``pytest -m gpu`` on a CUDA machine."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _helpers_sample import tiny_pipeline_dir, tiny_sampler

from wadi_cli.pipeline import SampleConfig, generate, load_pipeline

pytestmark = pytest.mark.gpu
PROMPTS = ["a red circle at the top left", "a blue square at the bottom right"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("compile_", [False, True])
def test_cuda_half_precision_close_to_cpu_fp32(dtype, compile_):
    base = tiny_pipeline_dir()
    ref = generate(tiny_sampler(), PROMPTS, SampleConfig(seed=1, batch_size=2)).images
    s = load_pipeline("tiny", model=base, device="cuda", dtype=dtype, compile=compile_)
    assert s.denoiser.model.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    got = generate(s, PROMPTS, SampleConfig(seed=1, batch_size=2)).images
    diff = np.abs(got.astype(int) - ref.astype(int))
    assert diff.mean() < 3 and np.percentile(diff, 99) <= 16
