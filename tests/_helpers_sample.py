"""Shared pieces of the sampling tests: a randomly initialised tiny pipeline folder (no
trained weights, no network), built once per test process and removed at exit.

``conftest.py`` wraps the most used ones in fixtures (``pipe_dir``, ``one_thread``)."""

from __future__ import annotations

import atexit
import contextlib
import functools
import shutil
import tempfile
from pathlib import Path

import pytest
import torch


@contextlib.contextmanager
def one_torch_thread():
    """One intra-op thread: the tiny models' ops are far too small to gain from two, and on
    a busy 2-core machine two threads wait at every op's barrier (~10x slower here)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


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
    from wadi_cli.pipeline import load_pipeline

    return load_pipeline("tiny", model=tiny_pipeline_dir(), teacher=True)


# ---- stand-ins for the hub's SD repos ---------------------------------------------------
HUB_COMMIT = "0123456789abcdef0123456789abcdef01234567"


def sd_shaped_components(seed: int = 0) -> dict:
    """Random components that run under an SD registry entry (77-token prompts, 64×64
    latents) yet stay small: the tiny VAE, a CLIP text encoder with 77 positions, and a
    U-Net whose attention sits at 16×16 (so 64×64 latents stay cheap on a CPU)."""
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    components = tiny_module().build_tiny_components(seed=seed)
    components["tokenizer"].model_max_length = 77
    text_cfg = components["text_encoder"].config
    text_cfg.max_position_embeddings = 77
    torch.manual_seed(seed)
    components["text_encoder"] = CLIPTextModel(text_cfg).eval()
    components["unet"] = UNet2DConditionModel(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
        mid_block_type="UNetMidBlock2DCrossAttn",
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        block_out_channels=(4, 8, 16),
        layers_per_block=1,
        cross_attention_dim=text_cfg.hidden_size,
        attention_head_dim=2,
        norm_num_groups=4,
        use_linear_projection=True,
    ).eval()
    return components


def plant_hub_repo(cache: Path, repo_id: str, files: dict[str, Path]) -> Path:
    """Lay ``files`` (snapshot path -> local file or folder) out as the hub cache holds a
    downloaded repo (``models--org--name/refs/main`` + ``snapshots/<commit>/…``), so that
    wadi finds them offline exactly as after `hf download`. Returns the snapshot folder."""
    root = cache / f"models--{repo_id.replace('/', '--')}"
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(HUB_COMMIT)
    snap = root / "snapshots" / HUB_COMMIT
    for rel, src in files.items():
        dest = snap / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        if Path(src).is_dir():
            shutil.copytree(src, dest, dirs_exist_ok=True)
        else:
            shutil.copy2(src, dest)
    return snap


@functools.lru_cache(maxsize=1)
def sd21_hub_cache() -> Path:
    """A hub cache holding stand-ins for what `wadi sample -b sd21` and `wadi distill -b sd21`
    fetch: the base pipeline repo and the authors' release file (a perturbed U-Net state
    dict in the release's format). Built once per test process."""
    import torch

    from wadi_cli.backbones import get_backbone
    from wadi_cli.io import save_safetensors

    sd21 = get_backbone("sd21")
    tmp = Path(tempfile.mkdtemp(prefix="wadi-test-hub-"))
    atexit.register(shutil.rmtree, tmp, True)
    components = sd_shaped_components(seed=0)
    pipeline = tiny_module().save_tiny_pipeline(components, tmp / "pipeline")
    gen = torch.Generator().manual_seed(1)
    release = {
        k: v + 0.01 * torch.randn(v.shape, generator=gen) for k, v in components["unet"].state_dict().items()
    }
    release_file = save_safetensors(release, tmp / sd21.release_file)
    cache = tmp / "cache"
    plant_hub_repo(cache, sd21.hub_id, {".": pipeline})
    plant_hub_repo(cache, sd21.release_repo, {sd21.release_file: release_file})
    return cache
