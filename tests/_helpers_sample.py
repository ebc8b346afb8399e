"""Shared pieces of the sampling tests: a randomly initialised tiny pipeline folder (no
trained weights, no network), built once per test process and removed at exit.

Test modules wrap these in fixtures (pytest fixtures cannot be imported across modules
without a conftest entry)."""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path

import pytest


def tiny_module():
    """``wadi_cli.tiny``, or skip the test with a clear reason."""
    return pytest.importorskip("wadi_cli.tiny", reason="wadi_cli.tiny (the tiny model) is not there yet")


@functools.lru_cache(maxsize=1)
def tiny_components() -> dict:
    """Random tiny components (unet, vae, text_encoder, tokenizer, scheduler), seed 0."""
    return tiny_module().build_tiny_components(seed=0)


@functools.lru_cache(maxsize=1)
def tiny_pipeline_dir() -> Path:
    """A diffusers StableDiffusionPipeline folder of the tiny spec with random weights."""
    tiny = tiny_module()
    root = Path(tempfile.mkdtemp(prefix="wadi-test-tiny-"))
    atexit.register(shutil.rmtree, root, True)
    return tiny.save_tiny_pipeline(tiny.build_tiny_components(seed=0), root / "pipeline")


@functools.lru_cache(maxsize=1)
def tiny_sampler():
    """A sampler on the random tiny pipeline (base weights, CPU, fp32). Do not modify it."""
    from wadi_cli.sample import load_sampler

    return load_sampler("tiny", model=tiny_pipeline_dir(), teacher=True)
