"""Image-to-image and the two-stage high-resolution run: the one-step latent maths against a
float64 reference written from the formula (ε and v), the teacher against diffusers' own
``StableDiffusionImg2ImgPipeline`` on the sd15 miniature, the VAE encoding against the
encoder's layers, sizes the denoiser cannot take, and the upscale-and-refine stage against
its pieces done by hand."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from _helpers_hub import shared_hub_cache, use_hub_cache
from _helpers_sample import one_torch_thread, tiny_sampler

from wadi_cli.errors import BadInputError
from wadi_cli.pipeline import SampleConfig, generate, initial_noise
from wadi_cli.pipeline.img2img import (
    encode,
    one_step_img2img_latents,
    refine_noise,
    strength_timestep,
    teacher_start,
)

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPTS = ["a red circle at the top left", "a blue square at the bottom right"]


def scaled_linear_alpha_bar(t: int) -> float:
    """ᾱ_t of SD's "scaled_linear" schedule (β from 0.00085 to 0.012, T = 1000), in float64
    from its definition: β_i = (sqrt(β0) + i (sqrt(β1) − sqrt(β0)) / 999)², ᾱ_t = Π (1 − β_i)."""
    a, b = math.sqrt(0.00085), math.sqrt(0.012)
    prod = 1.0
    for i in range(t + 1):
        prod *= 1.0 - (a + i * (b - a) / 999) ** 2
    return prod


class PlantedDenoiser:
    """A denoiser whose output is a known function of its input: 0.3 x_t + 0.1 t/1000 + 0.05."""

    def __init__(self, prediction_type: str) -> None:
        self.prediction_type = prediction_type
        self.calls: list[int] = []

    def __call__(self, x_t: torch.Tensor, t: int, cond: object) -> torch.Tensor:
        self.calls.append(int(t))
        return 0.3 * x_t + 0.1 * t / 1000 + 0.05


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("strength", [0.37, 1.0])
def test_one_step_img2img_matches_a_float64_reference(prediction_type, strength):
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    den = PlantedDenoiser(prediction_type)
    pipe = SimpleNamespace(scheduler=scheduler, denoiser=den)
    g = torch.Generator().manual_seed(3)
    x0_init, noise = torch.randn((2, 4, 6, 6), generator=g), torch.randn((2, 4, 6, 6), generator=g)
    out = one_step_img2img_latents(pipe, None, x0_init, noise, strength)

    t = round(strength * 999)
    assert den.calls == [t]
    ab = scaled_linear_alpha_bar(t)
    x_t = math.sqrt(ab) * x0_init.double() + math.sqrt(1 - ab) * noise.double()
    pred = 0.3 * x_t + 0.1 * t / 1000 + 0.05
    if prediction_type == "epsilon":
        ref = (x_t - math.sqrt(1 - ab) * pred) / math.sqrt(ab)
    else:
        ref = math.sqrt(ab) * x_t - math.sqrt(1 - ab) * pred
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


def test_strength_timestep_and_teacher_start():
    assert strength_timestep(1.0, 1000) == 999 and strength_timestep(0.3, 1000) == 300
    assert strength_timestep(0.5, 1000) == 500  # round(499.5): half to even
    assert teacher_start(25, 0.5) == 13 and teacher_start(4, 1.0) == 0 and teacher_start(10, 0.29) == 8
    for bad in (0.0, -0.2, 1.01):
        with pytest.raises(BadInputError, match="--strength"):
            strength_timestep(bad, 1000)
    with pytest.raises(BadInputError, match="0 teacher steps"):
        teacher_start(10, 0.05)


@torch.no_grad()
def test_encode_is_the_posterior_mean_scaled():
    sampler = tiny_sampler()
    vae = sampler.vae
    images = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).double() / 255 * 2 - 1
    moments = vae.quant_conv(vae.encoder(x.float()))
    ref = moments[:, :4] * vae.config.scaling_factor
    torch.testing.assert_close(encode(vae, images), ref, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_generate_with_init_images_is_the_one_step_reference():
    """The whole run (init image → encode → noise at t → one step → decode) by hand."""
    sampler = tiny_sampler()
    init = np.random.default_rng(1).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    gen = generate(sampler, PROMPTS, SampleConfig(seed=5, strength=0.42, batch_size=2), init_images=init)
    unet, vae, enc = sampler.denoiser.model, sampler.vae, sampler.prompt_encoder
    x0_init = encode(vae, init).double()
    z = initial_noise([5, 6], (4, 8, 8)).double()
    t, ab = 420, scaled_linear_alpha_bar(420)
    x_t = math.sqrt(ab) * x0_init + math.sqrt(1 - ab) * z
    eps = unet(x_t.float(), torch.tensor([t, t]), encoder_hidden_states=enc(PROMPTS).embeds).sample
    x0 = (x_t - math.sqrt(1 - ab) * eps.double()) / math.sqrt(ab)
    img = vae.decode(x0.float() / vae.config.scaling_factor).sample
    ref = ((img.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert np.abs(gen.images.astype(int) - ref.astype(int)).max() <= 1
    # one batch or two: the same images (each image's own init and noise)
    single = generate(sampler, PROMPTS, SampleConfig(seed=5, strength=0.42, batch_size=1), init_images=init)
    assert np.abs(single.images.astype(int) - gen.images.astype(int)).max() <= 1


@pytest.fixture(scope="module")
def sd15():
    from wadi_cli.pipeline import load_pipeline

    mp = pytest.MonkeyPatch()
    with one_torch_thread():
        use_hub_cache(mp, shared_hub_cache())
        yield load_pipeline("sd15", teacher=True)
    mp.undo()


@torch.no_grad()
@pytest.mark.parametrize("strength", [0.6, 0.3])
def test_teacher_img2img_matches_diffusers_img2img_pipeline(sd15, strength):
    """diffusers' StableDiffusionImg2ImgPipeline with the teacher's DDIM settings, given the
    same init latents (a 4-channel ``image`` is used as latents) and one generator per image.
    (The one-step path has no diffusers counterpart: its pipeline returns the DDIM step's
    x_{t−1}, not x0; the float64 references above check it.)"""
    from diffusers import DDIMScheduler, StableDiffusionImg2ImgPipeline

    from wadi_cli.pipeline.teacher import TEACHER_DDIM, teacher_latents

    steps, cfg = 5, 2.5
    init_images = np.random.default_rng(2).integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    ours = generate(
        sd15,
        PROMPTS,
        SampleConfig(teacher=True, steps=steps, cfg=cfg, seed=7, strength=strength, batch_size=2),
        init_images=init_images,
    )
    pipe = StableDiffusionImg2ImgPipeline(
        vae=sd15.vae,
        text_encoder=sd15.prompt_encoder.text_encoder,
        tokenizer=sd15.prompt_encoder.tokenizer,
        unet=sd15.denoiser.model,
        scheduler=DDIMScheduler.from_config(sd15.scheduler.config, **TEACHER_DDIM),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    init = encode(sd15.vae, init_images)
    kwargs = {"strength": strength, "num_inference_steps": steps, "guidance_scale": cfg}

    def gens():
        return [torch.Generator().manual_seed(s) for s in (7, 8)]

    ref = pipe(PROMPTS, image=init, generator=gens(), output_type="np", **kwargs).images
    ref = np.round(ref * 255).astype(np.uint8)
    assert ours.images.shape == ref.shape == (2, 16, 16, 3)
    assert np.abs(ours.images.astype(int) - ref.astype(int)).max() <= 1
    # the latents themselves, to float32 round-off
    ref_latents = pipe(PROMPTS, image=init, generator=gens(), output_type="latent", **kwargs).images
    cond = sd15.prompt_encoder(PROMPTS)
    latents = teacher_latents(sd15, cond, initial_noise([7, 8], (4, 8, 8)), steps, cfg, init, strength)
    torch.testing.assert_close(latents, ref_latents, rtol=1e-4, atol=1e-5)


def test_sizes_the_denoiser_cannot_take(sd15):
    sampler = tiny_sampler()
    assert sampler.size_multiple == 8  # VAE ×4, U-Net with two blocks ×2
    assert sampler.latent_shape_for(48, 64) == (4, 12, 16)
    assert sampler.latent_shape_for(None, None) == (4, 8, 8)
    with pytest.raises(BadInputError, match=r"--width 36: the tiny denoiser takes multiples of 8.*32 or 40"):
        sampler.latent_shape_for(None, 36)
    assert sd15.size_multiple == 4  # the miniature's VAE ×2, U-Net ×2
    with pytest.raises(BadInputError, match="--height 6"):
        sd15.latent_shape_for(6, None)


def test_dit_size_multiple_is_vae_times_patch():
    from wadi_cli.pipeline.loaded import LoadedPipeline

    config = SimpleNamespace(patch_size=2)
    fake = SimpleNamespace(denoiser=SimpleNamespace(model=SimpleNamespace(config=config)), vae_scale=8)
    assert LoadedPipeline.size_multiple.fget(fake) == 16


@torch.no_grad()
def test_direct_large_sampling_and_upscale_refine():
    sampler = tiny_sampler()
    big = generate(sampler, PROMPTS[:1], SampleConfig(seed=2, height=48, width=64))
    assert big.images.shape == (1, 48, 64, 3)

    two = generate(sampler, PROMPTS[:1], SampleConfig(seed=2, upscale=2, refine_strength=0.35))
    assert two.images.shape == (1, 64, 64, 3) and two.config.refine_strength == 0.35
    # by hand: native one step, PIL bicubic ×2, encode, noise drawn after the native one, one step
    from PIL import Image

    native = generate(sampler, PROMPTS[:1], SampleConfig(seed=2)).images
    large = np.asarray(Image.fromarray(native[0]).resize((64, 64), Image.Resampling.BICUBIC))[None]
    g = torch.Generator().manual_seed(2)
    torch.randn((4, 8, 8), generator=g)
    noise = torch.randn((4, 16, 16), generator=g)[None]
    torch.testing.assert_close(refine_noise([2], (4, 8, 8), (4, 16, 16)), noise, rtol=0, atol=0)
    cond = sampler.prompt_encoder(PROMPTS[:1])
    x0 = one_step_img2img_latents(sampler, cond, encode(sampler.vae, large), noise, 0.35)
    from wadi_cli.pipeline import decode

    ref = decode(sampler.vae, x0)
    assert np.abs(two.images.astype(int) - ref.astype(int)).max() <= 1
    assert SampleConfig(upscale=2).resolved(sampler.backbone).refine_strength == 0.3
    # a teacher refine with no step left names the flag that set it, before any sampling
    few = SampleConfig(seed=2, teacher=True, steps=2, upscale=2, refine_strength=0.3)
    message = r"^--refine-strength 0.3 with --steps 2 .*raise --refine-strength"
    with pytest.raises(BadInputError, match=message):
        generate(sampler, PROMPTS[:1], few)


@pytest.mark.parametrize(
    "kwargs",
    [{"strength": 0.0}, {"strength": 1.5}, {"refine_strength": -0.1}, {"upscale": 1}, {"height": 0}],
)
def test_bad_values_refused(kwargs):
    with pytest.raises(BadInputError):
        SampleConfig(**kwargs)
