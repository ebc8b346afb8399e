"""What AUTOMATIC1111 and ComfyUI do with a single-file export, run with the library they
sample with (k-diffusion, which needs torchvision: the eval extra): the student U-Net of
``--format single-file``, wrapped by k-diffusion's discrete DDPM denoiser (ε or v), one
Euler step from σ_max, equals ``wadi sample`` from the same noise when the initial noise
is scaled by sqrt(1 + σ_max²) (ComfyUI's full-denoise scaling; A1111's "SGM noise
multiplier") and σ_max comes from the recorded ᾱ_T. The gaps of the other settings (the
schedule's own ᾱ_999, A1111's default noise × σ_max) are measured and printed.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from _helpers_cli import wadi
from _helpers_hub import SD21, hub_cache_in_use

k_diffusion = pytest.importorskip("k_diffusion")
pytestmark = pytest.mark.eval

ALPHA = 0.005  # a recorded ᾱ_T far from the schedule's ᾱ_999 = 0.00466, so a mix-up shows
FAMILIES = {"sd15": ("sd15", []), "sd21-768": ("sd21", ["--model", SD21])}


@pytest.fixture(scope="module")
def hub_cache():
    with hub_cache_in_use() as cache:
        yield cache


def _student(family, tmp_path):
    backbone, flags = FAMILIES[family]
    run = tmp_path / "run"
    small = [
        "--batch-size",
        "1",
        "--rank",
        "4",
        "--fake-rank",
        "2",
        "--validate-every",
        "0",
        "--device",
        "cpu",
    ]
    small += ["--no-tensorboard", "--max-steps", "1", "--mixed-precision", "no", "--alpha-bar-t", ALPHA]
    small += ["--prompts", "smoke"]  # the real backbones have no default prompt set
    wadi("distill", "-b", backbone, *flags, "--out", run, *small)
    single, merged = tmp_path / "single.safetensors", tmp_path / "merged.safetensors"
    wadi("export", run, "-f", "single-file", "-o", single)
    wadi("export", run, "-f", "merged", "-o", merged)
    return single, merged


def _unet_of_single_file(single, base_unet_config):
    """The U-Net as a UI builds it from the single file (original keys → diffusers names)."""
    from diffusers import UNet2DConditionModel

    from wadi_cli.io import open_checkpoint

    unet = UNet2DConditionModel.from_config(base_unet_config).eval()
    with open_checkpoint(single, ldm_config=base_unet_config) as src:
        unet.load_state_dict({k: src.get(k) for k in src}, strict=True)
    return unet


@pytest.mark.parametrize("family", list(FAMILIES))
def test_kdiffusion_euler_one_step_is_wadi_sample(hub_cache, tmp_path, family):
    from _helpers_onestep import PROMPTS, SEED
    from k_diffusion.external import DiscreteEpsDDPMDenoiser, DiscreteVDDPMDenoiser
    from k_diffusion.sampling import sample_euler

    from wadi_cli.pipeline import decode, initial_noise, load_pipeline, one_step_latents

    backbone, flags = FAMILIES[family]
    single, merged = _student(family, tmp_path)
    pipe = load_pipeline(backbone, model=flags[1] if flags else None, weights=merged)
    assert pipe.alpha_bar_T == ALPHA
    cond = pipe.prompt_encoder(PROMPTS)
    z = initial_noise([SEED + i for i in range(len(PROMPTS))], pipe.latent_shape)
    x0 = one_step_latents(pipe, cond, z, ALPHA)
    images = decode(pipe.vae, x0)

    unet = _unet_of_single_file(single, dict(pipe.denoiser.model.config))
    v_pred = pipe.scheduler.config.prediction_type == "v_prediction"
    wrapper = DiscreteVDDPMDenoiser if v_pred else DiscreteEpsDDPMDenoiser

    def ui_one_step(alphas_cumprod, noise_scale):
        model = wrapper(lambda x, t, cond: unet(x, t, cond).sample, alphas_cumprod, quantize=True)
        sigmas = model.get_sigmas(1)  # [σ_max, 0]: one Euler step from the top
        assert len(sigmas) == 2 and int(model.sigma_to_t(sigmas[0])) == 999
        x = z * noise_scale(float(sigmas[0]))
        with torch.no_grad():
            return sample_euler(model, x, sigmas, extra_args={"cond": cond.embeds}, disable=True)

    schedule = torch.as_tensor(pipe.scheduler.alphas_cumprod, dtype=torch.float32)
    recorded = schedule.clone()
    recorded[-1] = ALPHA
    comfy = lambda s: math.sqrt(1 + s * s)  # noqa: E731 - ComfyUI's noise scaling at full denoise
    a1111 = lambda s: s  # noqa: E731 - A1111's default (no "SGM noise multiplier")
    ours = ui_one_step(recorded, comfy)
    torch.testing.assert_close(ours, x0, rtol=1e-4, atol=1e-4)
    assert np.abs(decode(pipe.vae, ours).astype(int) - images.astype(int)).max() <= 1
    gaps = {}
    for name, alphas, scale in (("schedule_alpha", schedule, comfy), ("a1111_noise", recorded, a1111)):
        other = ui_one_step(alphas, scale)
        rel = float((other - x0).norm() / x0.norm())
        img = np.abs(decode(pipe.vae, other).astype(int) - images.astype(int))
        gaps[name] = {"latent_rel": rel, "image_max": int(img.max()), "image_mean": float(img.mean())}
        assert rel > 1e-4, name  # a measurable gap, not rounding: the matched settings matter
    print(f"\n{family} k-diffusion gaps vs wadi sample: {json.dumps(gaps)}")
