"""The one-step ᾱ_T is decided once, when a pipeline is built: ``--alpha-bar-t``, else the value
the weights record, else the registry's constant; the pipeline cannot be changed afterwards.

Expectations are planted here (a metadata value the test writes, the method's 0.0047), not
read back from the code under test."""

from __future__ import annotations

import dataclasses

import _helpers_sample
import pytest
import torch
from safetensors.torch import save_file

from wadi_cli.backbones import get_backbone
from wadi_cli.pipeline import SampleConfig, decide_alpha_bar_T, generate

METHOD_ALPHA_BAR_T = 0.0047  # WaDi's constant


@pytest.fixture
def recorded_file(tmp_path):
    path = tmp_path / "student.safetensors"
    save_file({"w": torch.zeros(2)}, str(path), metadata={"alpha_bar_T": "0.013"})
    return path


def test_flag_then_weights_then_registry(recorded_file):
    tiny = get_backbone("tiny")
    assert decide_alpha_bar_T(tiny).value == METHOD_ALPHA_BAR_T
    from_weights = decide_alpha_bar_T(tiny, recorded_file)
    assert (from_weights.value, from_weights.recorded, from_weights.warning) == (0.013, 0.013, None)
    asked = decide_alpha_bar_T(tiny, recorded_file, 0.021)
    assert (asked.value, asked.recorded) == (0.021, 0.013)
    assert "0.021" in asked.warning and "0.013" in asked.warning  # one warning, naming both
    assert decide_alpha_bar_T(tiny, recorded_file, 0.013).warning is None


def test_a_loaded_pipeline_is_decided_once_and_frozen():
    pipe = _helpers_sample.tiny_sampler()
    assert pipe.alpha_bar_T == METHOD_ALPHA_BAR_T and pipe.warnings == []
    with pytest.raises(dataclasses.FrozenInstanceError):
        pipe.alpha_bar = None  # type: ignore[misc]
    pipe.notes.append("changed")  # a copy: the pipeline's notes stay as loaded
    assert "changed" not in pipe.notes


def test_the_pipeline_value_reaches_generation_and_a_call_may_override_it():
    base = _helpers_sample.tiny_sampler()
    student_like = dataclasses.replace(base, requested_alpha_bar_T=0.013)  # a new pipeline, decided anew
    assert student_like.alpha_bar_T == 0.013 and base.alpha_bar_T == METHOD_ALPHA_BAR_T
    prompts = ["a red circle at the top left"]
    assert generate(student_like, prompts, SampleConfig(seed=1)).config.alpha_bar_T == 0.013
    assert generate(student_like, prompts, SampleConfig(seed=1, alpha_bar_T=0.02)).config.alpha_bar_T == 0.02
