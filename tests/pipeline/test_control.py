"""ControlNet with the student and the teacher on the sd15 miniature: a miniature
``ControlNetModel`` built from the miniature U-Net (its zero convolutions given random
weights, so the control changes the output), the teacher against diffusers' own
``StableDiffusionControlNetPipeline``, the one step against the same residual injection done
by hand with a float64 x0, and a ControlNet of another model refused in one line."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from _helpers_hub import miniature_controlnet, shared_hub_cache, use_hub_cache
from _helpers_sample import one_torch_thread
from PIL import Image
from typer.testing import CliRunner

from wadi_cli.cli.main import app
from wadi_cli.errors import BadInputError
from wadi_cli.pipeline import SampleConfig, generate, initial_noise, one_step_latents, teacher_latents
from wadi_cli.pipeline.control import check_fits, control_tensor, with_controlnet

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPTS = ["a red circle at the top left", "a blue square at the bottom right"]


@pytest.fixture(scope="module")
def sd15_cn():
    from wadi_cli.pipeline import load_pipeline

    mp = pytest.MonkeyPatch()
    with one_torch_thread():
        use_hub_cache(mp, shared_hub_cache())
        pipe = load_pipeline("sd15", teacher=True)
        net = miniature_controlnet(pipe.denoiser.model)
        yield pipe, net
    mp.undo()


def control_images(n: int = 2, side: int = 16) -> np.ndarray:
    return np.random.default_rng(4).integers(0, 256, (n, side, side, 3), dtype=np.uint8)


@torch.no_grad()
def test_teacher_with_controlnet_matches_diffusers_pipeline(sd15_cn):
    from diffusers import DDIMScheduler, StableDiffusionControlNetPipeline

    from wadi_cli.pipeline.teacher import TEACHER_DDIM

    base, net = sd15_cn
    pipe = with_controlnet(base, net, 0.7)
    steps, cfg, ctrl = 3, 2.5, control_images()
    ours = generate(
        pipe, PROMPTS, SampleConfig(teacher=True, steps=steps, cfg=cfg, seed=3), control_images=ctrl
    )
    ref_pipe = StableDiffusionControlNetPipeline(
        vae=base.vae,
        text_encoder=base.prompt_encoder.text_encoder,
        tokenizer=base.prompt_encoder.tokenizer,
        unet=base.denoiser.model,
        controlnet=net,
        scheduler=DDIMScheduler.from_config(base.scheduler.config, **TEACHER_DDIM),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    ref_pipe.set_progress_bar_config(disable=True)
    kwargs = {
        "image": control_tensor(ctrl),
        "num_inference_steps": steps,
        "guidance_scale": cfg,
        "controlnet_conditioning_scale": 0.7,
        "latents": initial_noise([3, 4], (4, 8, 8)),
        "height": 16,
        "width": 16,
    }
    ref = ref_pipe(PROMPTS, output_type="np", **kwargs).images
    ref = np.round(ref * 255).astype(np.uint8)
    assert np.abs(ours.images.astype(int) - ref.astype(int)).max() <= 1
    # the latents, to float32 round-off (the random miniature VAE hides small changes)
    ref_latents = ref_pipe(PROMPTS, output_type="latent", **kwargs).images
    cond, z = base.prompt_encoder(PROMPTS), initial_noise([3, 4], (4, 8, 8))
    pipe.denoiser.use(control_tensor(ctrl))
    latents = teacher_latents(pipe, cond, z, steps, cfg)
    torch.testing.assert_close(latents, ref_latents, rtol=1e-4, atol=1e-5)
    plain = teacher_latents(base, cond, z, steps, cfg)
    assert (plain - latents).abs().mean() > 0.01  # the control acts: 10x the tolerance above


@torch.no_grad()
def test_one_step_with_controlnet_is_the_residual_injection_by_hand(sd15_cn):
    base, net = sd15_cn
    pipe = with_controlnet(base, net, 0.6)
    ctrl = control_images()
    ours = generate(pipe, PROMPTS, SampleConfig(seed=9), control_images=ctrl)
    unet, vae = base.denoiser.model, base.vae
    emb = base.prompt_encoder(PROMPTS).embeds
    z = initial_noise([9, 10], (4, 8, 8))
    t = torch.tensor([999, 999])
    cond = torch.from_numpy(ctrl).permute(0, 3, 1, 2).float() / 255
    down, mid = net(z, t, encoder_hidden_states=emb, controlnet_cond=cond, return_dict=False)
    eps = unet(
        z,
        t,
        encoder_hidden_states=emb,
        down_block_additional_residuals=[d * 0.6 for d in down],
        mid_block_additional_residual=mid * 0.6,
    ).sample
    ab = base.alpha_bar_T
    x0 = (z.double() - math.sqrt(1 - ab) * eps.double()) / math.sqrt(ab)
    img = vae.decode(x0.float() / vae.config.scaling_factor).sample
    ref = ((img.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert np.abs(ours.images.astype(int) - ref.astype(int)).max() <= 1
    cond_text = base.prompt_encoder(PROMPTS)
    pipe.denoiser.use(control_tensor(ctrl))
    latents = one_step_latents(pipe, cond_text, z, ab)
    torch.testing.assert_close(latents.double(), x0, rtol=1e-4, atol=1e-4)
    plain = one_step_latents(base, cond_text, z, ab)
    assert (plain - latents).abs().mean() > 0.01  # the control acts: 10x the tolerance above


def test_a_controlnet_of_another_model_is_refused(sd15_cn):
    from diffusers import ControlNetModel

    base, net = sd15_cn
    other = ControlNetModel(**{**dict(net.config), "cross_attention_dim": 48})
    with pytest.raises(BadInputError, match=r"made for another model \(cross-attention width 48"):
        check_fits(other, base.denoiser.model, "x", "sd15")
    check_fits(net, base.denoiser.model, "x", "sd15")


@pytest.mark.parametrize("family", ["sd15", "sd21"])
def test_controlnet_through_the_cli(family, tmp_path, monkeypatch):
    """Both SD families end to end: a miniature ControlNet folder of the family's U-Net, the
    student (one step) through ``wadi sample``; then bad input, one line, nothing written."""
    from wadi_cli.pipeline import load_pipeline

    use_hub_cache(monkeypatch, shared_hub_cache())
    folder = tmp_path / "cn"
    miniature_controlnet(load_pipeline(family, teacher=True).denoiser.model).save_pretrained(folder)
    ctrl = tmp_path / "ctrl.png"
    Image.fromarray(control_images(1, 40)[0]).save(ctrl)
    out = tmp_path / "o"
    args = [
        "sample",
        "a cat",
        "-b",
        family,
        "--base",
        "--controlnet",
        str(folder),
        "--control-image",
        str(ctrl),
    ]
    r = CliRunner().invoke(app, [*args, "--control-scale", "0.5", "-o", str(out)])
    assert r.exit_code == 0, r.output + r.stderr
    record = json.loads((out / "samples.json").read_text())
    assert record["controlnet"] == str(folder) and record["control_scale"] == 0.5
    assert record["images"][0]["control_image"] == str(ctrl)
    for extra, needle in [
        (["--controlnet", str(folder)], "--controlnet and --control-image go together"),
        (["--controlnet", str(tmp_path / "none"), "--control-image", str(ctrl)], "no such file"),
        (["--controlnet", str(folder), "--control-image", str(folder)], "holds 0 images"),
        (
            ["--controlnet", str(folder), "--control-image", str(ctrl), "-b", "pixart"],
            "not supported for pixart",
        ),
    ]:
        r = CliRunner().invoke(
            app, ["sample", "a cat", "-b", family, "--base", *extra, "-o", str(tmp_path / "x")]
        )
        assert r.exit_code != 0 and needle in r.stderr, r.stderr
        assert "Traceback" not in r.output + r.stderr and not (tmp_path / "x").exists()


def test_the_shipped_tiny_controlnet_is_a_diffusers_controlnet_of_the_tiny_teacher():
    """wadi_cli/assets/tiny/controlnet: diffusers' own loader reads it (safetensors, a few
    hundred KB), and it fits the shipped tiny U-Net; ``--controlnet tiny`` names it."""
    from diffusers import ControlNetModel, UNet2DConditionModel

    from wadi_cli.pipeline.control import BUILTIN_CONTROLNETS
    from wadi_cli.tiny.arch import TINY_CONTROLNET_DIR, TINY_PIPELINE_DIR

    assert BUILTIN_CONTROLNETS["tiny"] == TINY_CONTROLNET_DIR
    weights = TINY_CONTROLNET_DIR / "diffusion_pytorch_model.safetensors"
    assert (TINY_CONTROLNET_DIR / "config.json").is_file() and 100_000 < weights.stat().st_size < 1_000_000
    net = ControlNetModel.from_pretrained(TINY_CONTROLNET_DIR, torch_dtype=torch.float32)
    unet = UNet2DConditionModel.from_pretrained(TINY_PIPELINE_DIR / "unet")
    check_fits(net, unet, "tiny", "tiny")
    assert any(p.abs().sum() > 0 for p in net.controlnet_down_blocks.parameters())  # trained: not zero


def test_the_shipped_tiny_controlnet_steers_the_one_step_student():
    """24 tiny prompts with silhouettes of the same attributes: the shipped student with the
    shipped ControlNet follows the silhouettes (model-free IoU) better than without it."""
    from wadi_cli.pipeline import load_pipeline
    from wadi_cli.pipeline.control import load_controlnet
    from wadi_cli.tiny.data import mask_images, prompt_for, render_with_masks, sample_attributes
    from wadi_cli.tiny.metrics import mask_iou, shape_masks

    attrs = sample_attributes(24, 71)
    _, masks = render_with_masks(attrs, 71)
    prompts, config = [prompt_for(a) for a in attrs], SampleConfig(seed=5, batch_size=24)
    student = load_pipeline("tiny")
    plain = generate(student, prompts, config).images
    controlled = generate(
        with_controlnet(student, load_controlnet("tiny", student), 1.0), prompts, config,
        control_images=mask_images(masks),
    ).images  # fmt: skip
    gain = mask_iou(shape_masks(controlled), masks) - mask_iou(shape_masks(plain), masks)
    assert gain.mean() > 0.05, gain
