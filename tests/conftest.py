"""Shared pytest configuration and the fixtures many modules use; area-specific pieces
live in ``tests/_helpers_*.py``."""

import os

import pytest
import torch
from _helpers_sample import one_torch_thread, tiny_pipeline_dir

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def one_thread():
    """The test runs on one intra-op thread (see ``_helpers_sample.one_torch_thread``);
    modules of tiny-model tests use it for every test with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    with one_torch_thread():
        yield


@pytest.fixture(scope="session")
def pipe_dir():
    """The random tiny pipeline folder (``_helpers_sample.tiny_pipeline_dir``, built once)."""
    return tiny_pipeline_dir()
