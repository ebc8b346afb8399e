"""Assembling a base pipeline from where its parts live: caches left by a diffusers
download are reused offline, a partial cache is one error line naming the folder and the
flag, PixArt-α's components can come from elsewhere, and a missing tokenizer package
is named."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import torch
from _helpers_hub import COMMIT, PIXART_256, PIXART_512, SD15, shared_hub_cache, use_hub_cache
from _helpers_sample import one_torch_thread
from typer.testing import CliRunner

from wadi_cli.cli.main import app
from wadi_cli.errors import BadInputError, HubError

SD15_FP32_DOWNLOAD = [  # what DiffusionPipeline.from_pretrained(SD1.5) leaves in the cache
    "model_index.json",
    "feature_extractor/preprocessor_config.json",
    "safety_checker/config.json",
    "safety_checker/model.safetensors",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
    "tokenizer/merges.txt",
    "tokenizer/special_tokens_map.json",
    "tokenizer/tokenizer_config.json",
    "tokenizer/vocab.json",
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
]


@pytest.fixture(scope="module")
def full_cache():
    with one_torch_thread():
        yield shared_hub_cache()


def _snapshot(cache: Path, repo: str) -> Path:
    return cache / f"models--{repo.replace('/', '--')}" / "snapshots" / COMMIT


def _partial_cache(full: Path, dest: Path, repo: str, files: list[str]) -> Path:
    """A hub cache holding only ``files`` of ``repo`` (copied from the full miniature)."""
    root = dest / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(COMMIT)
    for rel in files:
        target = root / "snapshots" / COMMIT / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(_snapshot(full, repo) / rel, target)
    return dest


def test_a_diffusers_download_in_the_cache_is_used_offline(full_cache, tmp_path, monkeypatch):
    from wadi_cli.pipeline import load_pipeline

    cache = _partial_cache(full_cache, tmp_path / "hub", SD15, SD15_FP32_DOWNLOAD)
    use_hub_cache(monkeypatch, cache)
    sampler = load_pipeline("sd15", teacher=True)
    assert sampler.latent_shape == (4, 8, 8) and sampler.resolution == 16


def test_only_fp16_copies_in_the_cache_serve_an_fp32_run(full_cache, tmp_path, monkeypatch):
    from wadi_cli.pipeline import load_pipeline

    fp16 = [
        f.replace(".safetensors", ".fp16.safetensors")
        if f.startswith(("unet/", "vae/", "text_encoder/m"))
        else f
        for f in SD15_FP32_DOWNLOAD
        if not f.startswith(("safety_checker", "feature_extractor"))
    ]
    cache = _partial_cache(full_cache, tmp_path / "hub", SD15, fp16)
    use_hub_cache(monkeypatch, cache)
    sampler = load_pipeline("sd15", teacher=True)  # fp32 on CPU, read from the fp16 files
    unet = sampler.denoiser.model
    assert unet.dtype == torch.float32
    from safetensors.torch import load_file

    ref = load_file(str(_snapshot(full_cache, SD15) / "unet" / "diffusion_pytorch_model.fp16.safetensors"))
    assert torch.equal(unet.conv_in.weight, ref["conv_in.weight"].float())


def test_a_partial_cache_names_the_missing_folder_and_the_flag(full_cache, tmp_path, monkeypatch):
    files = [f for f in SD15_FP32_DOWNLOAD if f != "vae/diffusion_pytorch_model.safetensors"]
    cache = _partial_cache(full_cache, tmp_path / "hub", SD15, files)
    use_hub_cache(monkeypatch, cache)
    r = CliRunner().invoke(app, ["sample", "a cat", "-b", "sd15", "--teacher", "-o", str(tmp_path / "o")])
    assert r.exit_code == 3, r.output
    line = r.stderr.strip()
    assert "\n" not in line and "'vae'" in line and "--model" in line and "local cache" in line
    assert not (tmp_path / "o").exists()


def test_pixart_components_from_a_local_folder(full_cache, tmp_path, monkeypatch):
    """--components takes a local copy of the 512 pipeline; --model a local transformer-only
    folder still takes its components from the registry's repo."""
    from wadi_cli.pipeline import load_pipeline

    use_hub_cache(monkeypatch, full_cache)
    local512 = tmp_path / "pixart512"
    shutil.copytree(_snapshot(full_cache, PIXART_512), local512)
    sampler = load_pipeline("pixart", teacher=True, components=str(local512))
    assert str(local512) in sampler.model_source and sampler.resolution == 16
    local256 = tmp_path / "pixart256"
    shutil.copytree(_snapshot(full_cache, PIXART_256), local256)
    sampler = load_pipeline("pixart", teacher=True, model=str(local256))
    assert sampler.model_source.endswith(f"+ {PIXART_512} (vae, text encoder, tokenizer, scheduler)")
    assert sampler.resolution == 16  # the 256 transformer's own sample size, not the 512's (32 px)


def test_missing_sentencepiece_is_one_line(full_cache, tmp_path, monkeypatch):
    use_hub_cache(monkeypatch, full_cache)
    monkeypatch.setitem(sys.modules, "sentencepiece", None)
    r = CliRunner().invoke(app, ["sample", "a cat", "-b", "pixart", "--teacher", "-o", str(tmp_path / "o")])
    assert r.exit_code == 2, r.output
    line = r.stderr.strip()
    assert "\n" not in line and "sentencepiece" in line and "pip install sentencepiece" in line


def test_tokenizer_package_check_names_each_missing_package(tmp_path, monkeypatch):
    from wadi_cli.pipeline import base as pipeline

    (tmp_path / "spiece.model").write_bytes(b"x")
    monkeypatch.setattr(pipeline, "_module_missing", lambda name: True)
    with pytest.raises(
        BadInputError,
        match="needs the sentencepiece and protobuf packages: pip install sentencepiece protobuf",
    ):
        pipeline.require_tokenizer_packages(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{}")  # a fast tokenizer file needs neither
    pipeline.require_tokenizer_packages(tmp_path)


def test_offline_without_cache_lists_both_pixart_repos(tmp_path, monkeypatch):
    from wadi_cli.pipeline import load_pipeline

    use_hub_cache(monkeypatch, tmp_path / "empty")
    with pytest.raises(HubError) as info:
        load_pipeline("pixart", teacher=True)
    msg = str(info.value)
    assert PIXART_256 in msg and "--model" in msg and "--components" in msg
