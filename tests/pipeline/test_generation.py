"""One-step and teacher generation on a random tiny pipeline, against references built
from direct diffusers calls (and diffusers' own StableDiffusionPipeline for the teacher)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from _helpers_sample import tiny_sampler

from wadi_cli.errors import BadInputError
from wadi_cli.pipeline import SampleConfig, generate, initial_noise
from wadi_cli.sample import image_grid, read_prompts, save_samples

PROMPTS = [
    "a red circle at the top left",
    "a blue square at the bottom right",
    "a green triangle at the top right",
]


@pytest.fixture(scope="module")
def sampler():
    return tiny_sampler()


def test_initial_noise_one_generator_per_image():
    z = initial_noise([5, 6, 7], (4, 8, 8))
    assert z.shape == (3, 4, 8, 8) and z.dtype == torch.float32
    for i, s in enumerate([5, 6, 7]):
        ref = torch.randn((4, 8, 8), generator=torch.Generator().manual_seed(s))
        assert torch.equal(z[i], ref)
    assert torch.equal(initial_noise([6], (4, 8, 8))[0], z[1])


@torch.no_grad()
def test_one_step_matches_direct_reference(sampler):
    gen = generate(sampler, PROMPTS[:2], SampleConfig(seed=11, batch_size=2))
    unet, vae, tok, te = (
        sampler.denoiser.model,
        sampler.vae,
        sampler.prompt_encoder.tokenizer,
        sampler.prompt_encoder.text_encoder,
    )
    ids = tok(
        PROMPTS[:2], padding="max_length", max_length=tok.model_max_length, return_tensors="pt"
    ).input_ids
    emb = te(ids)[0]
    z = torch.stack([torch.randn((4, 8, 8), generator=torch.Generator().manual_seed(s)) for s in (11, 12)])
    eps = unet(z, torch.tensor([999, 999]), encoder_hidden_states=emb).sample
    ab = 0.0047  # method.md §3
    x0 = ((z.double() - math.sqrt(1 - ab) * eps.double()) / math.sqrt(ab)).float()
    img = vae.decode(x0 / vae.config.scaling_factor).sample
    ref = ((img.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert gen.images.shape == (2, 32, 32, 3) and gen.images.dtype == np.uint8
    assert gen.seeds == [11, 12] and gen.prompts == PROMPTS[:2]
    assert np.abs(gen.images.astype(int) - ref.astype(int)).max() <= 1


def assert_same_images(a: np.ndarray, b: np.ndarray) -> None:
    """Same seeds, different batch sizes: the noise is bit-identical, but batched CPU
    kernels may round differently (≈1e-6 in latents), which can flip a rare uint8 level."""
    diff = np.abs(a.astype(int) - b.astype(int))
    assert diff.max() <= 1 and (diff == 0).mean() >= 0.999, (diff.max(), (diff == 0).mean())


def test_same_seed_same_images_whatever_the_batch_size(sampler):
    from wadi_cli.pipeline import one_step_latents

    a = generate(sampler, PROMPTS, SampleConfig(seed=3, batch_size=3))
    b = generate(sampler, PROMPTS, SampleConfig(seed=3, batch_size=1))
    c = generate(sampler, PROMPTS, SampleConfig(seed=4, batch_size=3))
    assert_same_images(a.images, b.images)
    assert np.abs(a.images.astype(int) - c.images.astype(int)).mean() > 5
    z = initial_noise([3, 4, 5], sampler.latent_shape)
    cond = sampler.prompt_encoder(PROMPTS)
    x3 = one_step_latents(sampler, cond, z, 0.0047)
    x1 = torch.cat([one_step_latents(sampler, cond.index([i]), z[i : i + 1], 0.0047) for i in range(3)])
    torch.testing.assert_close(x3, x1, rtol=1e-4, atol=1e-4)


def test_alpha_bar_option_changes_output(sampler):
    a = generate(sampler, PROMPTS[:1], SampleConfig(seed=0))
    b = generate(sampler, PROMPTS[:1], SampleConfig(seed=0, alpha_bar_T=0.01))
    assert a.config.alpha_bar_T == 0.0047 and b.config.alpha_bar_T == 0.01
    assert not np.array_equal(a.images, b.images)


@torch.no_grad()
def test_teacher_matches_diffusers_pipeline(sampler):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    steps, cfg = 2, 3.0
    ours = generate(
        sampler, PROMPTS[:2], SampleConfig(teacher=True, steps=steps, cfg=cfg, seed=21, batch_size=2)
    )
    single = generate(
        sampler, PROMPTS[:2], SampleConfig(teacher=True, steps=steps, cfg=cfg, seed=21, batch_size=1)
    )
    assert_same_images(ours.images, single.images)
    pipe = StableDiffusionPipeline(
        vae=sampler.vae,
        text_encoder=sampler.prompt_encoder.text_encoder,
        tokenizer=sampler.prompt_encoder.tokenizer,
        unet=sampler.denoiser.model,
        scheduler=DDIMScheduler.from_config(sampler.scheduler.config, timestep_spacing="trailing"),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    latents = initial_noise([21, 22], (4, 8, 8))
    ref = pipe(
        PROMPTS[:2],
        num_inference_steps=steps,
        guidance_scale=cfg,
        latents=latents,
        height=32,
        width=32,
        output_type="np",
    ).images
    ref = np.round(ref * 255).astype(np.uint8)
    assert np.abs(ours.images.astype(int) - ref.astype(int)).max() <= 1
    one_step = generate(sampler, PROMPTS[:2], SampleConfig(seed=21))
    assert not np.array_equal(one_step.images, ours.images)


def test_teacher_defaults_resolved(sampler):
    cfg = SampleConfig(teacher=True).resolved(sampler.backbone)
    assert (cfg.steps, cfg.cfg, cfg.alpha_bar_T) == (25, 3.0, 0.0047)


def test_image_grid_against_slow_reference():
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 255, size=(5, 3, 4, 3), dtype=np.uint8)
    grid = image_grid(imgs, ncols=2, pad=1)
    assert grid.shape == (3 * 3 + 2, 2 * 4 + 1, 3)
    for i in range(5):
        r, c = i // 2, i % 2
        for y in range(3):
            for x in range(4):
                assert (grid[r * 4 + y, c * 5 + x] == imgs[i, y, x]).all()
    assert (grid[3, :] == 255).all() and (grid[:, 4] == 255).all()
    assert (grid[8:, 5:] == 255).all()  # empty sixth cell


def test_save_samples_writes_everything_atomically(tmp_path):
    from PIL import Image

    imgs = np.random.default_rng(1).integers(0, 255, size=(3, 8, 8, 3), dtype=np.uint8)
    out = save_samples(tmp_path / "out", imgs, ["a", "b", "c"], [0, 1, 2], {"backbone": "tiny"})
    names = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
    assert names == ["0000.png", "0001.png", "0002.png", "grid.png", "samples.json"]
    for i in range(3):
        assert np.array_equal(np.asarray(Image.open(out / f"{i:04d}.png")), imgs[i])
    record = json.loads((out / "samples.json").read_text())
    assert record["backbone"] == "tiny"
    assert record["images"][2] == {"file": "0002.png", "prompt": "c", "seed": 2}
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_grid_png_enlarges_small_images_by_whole_pixel_blocks(tmp_path):
    """32-px images (the tiny model's) appear in grid.png as k x k blocks per pixel, k the
    smallest whole factor reaching 128 px (here 4); the single PNGs keep their own size."""
    from PIL import Image

    imgs = np.random.default_rng(2).integers(0, 255, size=(2, 32, 30, 3), dtype=np.uint8)
    out = save_samples(tmp_path / "out", imgs, ["a", "b"], [0, 1], {})
    grid = np.asarray(Image.open(out / "grid.png"))
    k = 5  # ceil(128 / 30): the shorter side decides
    assert grid.shape == (32 * k, 2 * 30 * k + 2, 3)
    for y, x in [(0, 0), (31, 29), (7, 13)]:  # each source pixel is a k x k block, by hand
        assert (grid[y * k : (y + 1) * k, x * k : (x + 1) * k] == imgs[0, y, x]).all()
        left = 30 * k + 2
        assert (grid[y * k : (y + 1) * k, left + x * k : left + (x + 1) * k] == imgs[1, y, x]).all()
    assert np.asarray(Image.open(out / "0000.png")).shape == (32, 30, 3)
    big = np.zeros((1, 256, 256, 3), np.uint8)
    assert np.asarray(Image.open(save_samples(tmp_path / "big", big, ["c"], [0], {}) / "grid.png")).shape == (
        256,
        256,
        3,
    )


def test_read_prompts(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("# comment\n\na cat\n  a dog  \n", encoding="utf-8")
    assert read_prompts(["first"], f) == ["first", "a cat", "a dog"]
    empty = tmp_path / "empty.txt"
    empty.write_text("\n# nothing\n", encoding="utf-8")
    with pytest.raises(BadInputError, match="no prompts"):
        read_prompts([], empty)
    with pytest.raises(BadInputError, match="no such file"):
        read_prompts([], tmp_path / "missing.txt")


@pytest.mark.parametrize(
    "kwargs", [{"batch_size": 0}, {"steps": 0}, {"alpha_bar_T": 1.5}, {"cfg": -1.0}, {"seed": -1}]
)
def test_bad_config_refused(kwargs):
    with pytest.raises(BadInputError):
        SampleConfig(**kwargs)


@pytest.mark.parametrize(("steps", "expected"), [(1, [999]), (4, [999, 749, 499, 249])])
def test_teacher_timesteps_are_trailing(steps, expected):
    """Few-step teacher runs must start at t = 999 (not SD's leading t = 1 for one step)."""
    from types import SimpleNamespace

    from diffusers import DDPMScheduler

    from wadi_cli.pipeline.teacher import teacher_scheduler

    base = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1)
    scheduler = teacher_scheduler(SimpleNamespace(scheduler=base))
    scheduler.set_timesteps(steps)
    assert scheduler.timesteps.tolist() == expected


PIXART_SCHEDULER = {  # PixArt-α's scheduler_config.json: no clip_sample, no set_alpha_to_one
    "_class_name": "DPMSolverMultistepScheduler", "algorithm_type": "dpmsolver++", "beta_end": 0.02,
    "beta_schedule": "linear", "beta_start": 0.0001, "num_train_timesteps": 1000,
    "prediction_type": "epsilon", "solver_order": 2, "steps_offset": 0, "timestep_spacing": "linspace",
}  # fmt: skip


@pytest.mark.parametrize("scheduler", ["pixart", "sd"])
def test_teacher_ddim_never_clips_and_ends_on_the_schedule(scheduler):
    """Teacher DDIM (η = 0) against a float64 reference: x0 = (x − σ_t ε)/α_t is never
    clipped to [−1, 1], and the last step lands on ᾱ_0 of the schedule (not on 1), for
    PixArt's DPM-Solver config as for SD's — whose configs spell both settings out."""
    from types import SimpleNamespace

    from diffusers import DPMSolverMultistepScheduler, PNDMScheduler

    from wadi_cli.pipeline.teacher import teacher_scheduler

    if scheduler == "pixart":
        base = DPMSolverMultistepScheduler.from_config(PIXART_SCHEDULER)
    else:
        base = PNDMScheduler(  # SD1.5's scheduler_config.json
            beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, set_alpha_to_one=False,
            skip_prk_steps=True, steps_offset=1,
        )  # fmt: skip
    ddim = teacher_scheduler(SimpleNamespace(scheduler=base))
    ddim.set_timesteps(2)
    ac = base.alphas_cumprod.double()
    g = torch.Generator().manual_seed(0)
    x = 3.0 * torch.randn(1, 4, 8, 8, generator=g, dtype=torch.float64)  # x0 estimates far outside [-1, 1]
    ref = x.clone()
    for t in ddim.timesteps.tolist():
        eps = torch.randn(1, 4, 8, 8, generator=g, dtype=torch.float64)
        prev = t - 1000 // 2
        ab, ab_prev = ac[t], (ac[prev] if prev >= 0 else ac[0])
        x0 = (ref - (1 - ab).sqrt() * eps) / ab.sqrt()
        assert x0.abs().max() > 1.5
        ref = ab_prev.sqrt() * x0 + (1 - ab_prev).sqrt() * eps
        x = ddim.step(eps.float(), t, x.float()).prev_sample.double()
    torch.testing.assert_close(x, ref, rtol=1e-4, atol=1e-4)
