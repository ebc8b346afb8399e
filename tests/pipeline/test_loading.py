"""--weights: the authors' release format (a full denoiser state dict), LoRaD adapters
and exported folders, on a random tiny pipeline; mismatches are refused clearly."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _helpers_sample import tiny_module, tiny_pipeline_dir, tiny_sampler

from wadi_cli.errors import CheckpointError, MismatchError
from wadi_cli.io import save_safetensors
from wadi_cli.pipeline import SampleConfig, detect_weights_kind, generate, load_pipeline

PROMPTS = ["a red circle at the top left", "a yellow square at the bottom left"]


@pytest.fixture(scope="module")
def base_dir():
    return tiny_pipeline_dir()


@pytest.fixture(scope="module")
def perturbed(base_dir):
    """The tiny U-Net's state dict, every float tensor perturbed (seeded)."""
    sampler = tiny_sampler()
    g = torch.Generator().manual_seed(123)
    out = {}
    for k, v in sampler.denoiser.model.state_dict().items():
        noise = torch.randn(v.shape, generator=g, dtype=torch.float32)
        out[k] = (v.float() + 0.05 * noise * (v.float().std() if v.numel() > 1 else 1.0)).contiguous()
    return out


@pytest.fixture(scope="module")
def release_file(perturbed, tmp_path_factory):
    path = tmp_path_factory.mktemp("release") / "rotated_unet-test.safetensors"
    save_safetensors(perturbed, path)  # plain diffusers names, as the authors' files
    return path


def _images(sampler, seed=5):
    return generate(sampler, PROMPTS, SampleConfig(seed=seed, batch_size=2)).images


def test_release_format_equals_sampling_the_perturbed_model(base_dir, perturbed, release_file, tmp_path):
    assert detect_weights_kind(release_file) == "merged"
    s = load_pipeline("tiny", model=base_dir, weights=release_file)
    assert s.weights_kind == "merged" and s.notes == []
    for k, v in s.denoiser.model.state_dict().items():
        assert torch.equal(v, perturbed[k]), k
    got = _images(s)
    base = _images(tiny_sampler())
    assert not np.array_equal(got, base)
    # reference: a pipeline folder whose U-Net IS the perturbed model, sampled with no weights
    tiny = tiny_module()
    comps = tiny.build_tiny_components(seed=0)
    comps["unet"].load_state_dict(perturbed)
    ref_dir = tiny.save_tiny_pipeline(comps, tmp_path / "perturbed")
    ref = load_pipeline("tiny", model=ref_dir)
    assert np.array_equal(_images(ref), got)
    # the exported folder is accepted as --weights too, with the same result
    assert detect_weights_kind(ref_dir) == "folder"
    via_folder = load_pipeline("tiny", model=base_dir, weights=ref_dir)
    assert via_folder.weights_kind == "folder"
    assert np.array_equal(_images(via_folder), got)


def _rotate_reference(w: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Row-wise pair rotation written out with explicit indexing, in float64."""
    w, theta = w.double(), theta.double()
    out = w.clone()
    for k in range(theta.shape[1]):
        c, s = torch.cos(theta[:, k]), torch.sin(theta[:, k])
        a, b = w[:, 2 * k], w[:, 2 * k + 1]
        out[:, 2 * k] = c * a - s * b
        out[:, 2 * k + 1] = s * a + c * b
    return out


def test_adapter_is_merged_exactly(base_dir, tmp_path):
    from wadi_cli.lorad import LoRaDConfig, save_adapter

    base = tiny_sampler().denoiser.model.state_dict()
    targets = ["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", "mid_block.attentions.0.proj_in"]
    g = torch.Generator().manual_seed(7)
    tensors = {}
    for t in targets:
        m, n = base[t + ".weight"].shape
        tensors[t + ".lorad_A"] = 0.3 * torch.randn(m, 2, generator=g)
        tensors[t + ".lorad_B"] = torch.randn(2, n // 2, generator=g)
    path = save_adapter(tmp_path / "student.safetensors", tensors, LoRaDConfig(rank=2, backbone="tiny"))
    assert detect_weights_kind(path) == "adapter"
    s = load_pipeline("tiny", model=base_dir, weights=path)
    assert s.weights_kind == "adapter"
    state = s.denoiser.model.state_dict()
    for t in targets:
        theta = tensors[t + ".lorad_A"].double() @ tensors[t + ".lorad_B"].double()
        ref = _rotate_reference(base[t + ".weight"], theta)
        torch.testing.assert_close(state[t + ".weight"].double(), ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(state[t + ".weight"].norm(dim=1), base[t + ".weight"].norm(dim=1))
    untouched = [k for k in base if not any(k == t + ".weight" for t in targets)]
    assert all(torch.equal(state[k], base[k]) for k in untouched)
    assert not np.array_equal(_images(s), _images(tiny_sampler()))


def test_adapter_for_another_backbone_refused(base_dir, tmp_path):
    from wadi_cli.lorad import LoRaDConfig, save_adapter

    t = "mid_block.attentions.0.proj_in"
    w = tiny_sampler().denoiser.model.state_dict()[t + ".weight"]
    tensors = {t + ".lorad_A": torch.zeros(w.shape[0], 1), t + ".lorad_B": torch.ones(1, w.shape[1] // 2)}
    path = save_adapter(tmp_path / "a.safetensors", tensors, LoRaDConfig(rank=1, backbone="sd15"))
    with pytest.raises(MismatchError, match="sd15"):
        load_pipeline("tiny", model=base_dir, weights=path)


@pytest.mark.parametrize("defect", ["shape", "unknown", "missing"])
def test_merged_file_that_does_not_fit_is_refused(base_dir, perturbed, tmp_path, defect):
    bad = dict(perturbed)
    key = "conv_in.weight"
    if defect == "shape":
        bad[key] = torch.zeros(3, 3)
        match = "shape mismatch"
    elif defect == "unknown":
        bad["not.a.real.key"] = torch.zeros(1)
        match = "unexpected key"
    else:
        del bad[key]
        match = "missing key"
    path = save_safetensors(bad, tmp_path / "bad.safetensors")
    with pytest.raises(MismatchError, match=match) as info:
        load_pipeline("tiny", model=base_dir, weights=path)
    assert "\n" not in str(info.value)


def test_missing_or_unreadable_weights(base_dir, tmp_path):
    with pytest.raises(CheckpointError):
        load_pipeline("tiny", model=base_dir, weights=tmp_path / "nope.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError):
        load_pipeline("tiny", model=base_dir, weights=junk)
