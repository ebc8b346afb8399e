"""``-b sdxl --model FILE.safetensors``: an SDXL fine-tune in SDXL's original layout
(``model.diffusion_model.*``, ``first_stage_model.*``, ``conditioner.embedders.0`` / ``.1``) as
the base pipeline of ``sample`` and ``distill`` (``eval`` loads it the same way), on the SDXL
miniature.

The fine-tune is the miniature with every weight perturbed, written as a single file by wadi's
own writer (data tables) and read back through diffusers' converters. The independent
reference is diffusers' ``StableDiffusionXLPipeline.from_single_file``: every tensor of the
U-Net, the VAE and both text encoders must equal its own, and the perturbed folder's.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from _helpers_cli import wadi
from _helpers_hub import COMMIT, SD15, SDXL, hub_cache_in_use
from PIL import Image
from safetensors.torch import load_file, save_file

from wadi_cli.io import load_state_dict
from wadi_cli.io.sd_single_file_write import save_single_file

PARTS = (
    ("unet", "diffusion_pytorch_model"),
    ("vae", "diffusion_pytorch_model"),
    ("text_encoder", "model"),
    ("text_encoder_2", "model"),
)
SMALL_RUN = [*("--batch-size", "1", "--rank", "4", "--fake-rank", "2"), "--validate-every", "0"]
SMALL_RUN += ["--device", "cpu", "--no-tensorboard", "--prompts", "smoke", "--mixed-precision", "no"]
SMALL_RUN += ["--no-gradient-checkpointing", "--grad-accum", "1"]


@pytest.fixture(scope="module")
def hub_cache():
    with hub_cache_in_use() as cache:
        yield cache


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("sdxl-single-file")


def _snapshot(cache: Path, repo: str) -> Path:
    return cache / f"models--{repo.replace('/', '--')}" / "snapshots" / COMMIT


def _perturbed(state: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        k: v + 0.02 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
        for k, v in state.items()
    }


_FINE_TUNE: list[tuple[Path, Path]] = []


def fine_tune(cache: Path, work: Path) -> tuple[Path, Path]:
    """(pipeline folder, single file) of the SDXL miniature with every weight perturbed."""
    if not _FINE_TUNE:
        snap = _snapshot(cache, SDXL)
        folder = work / "sdxl-ft"
        shutil.copytree(snap, folder, symlinks=False)
        for seed, (sub, stem) in enumerate(PARTS):
            for f in (folder / sub).glob("*.safetensors"):
                f.unlink()
            state = _perturbed(load_state_dict(snap / sub), 11 + seed)
            save_file(
                {k: v.contiguous() for k, v in state.items()}, str(folder / sub / f"{stem}.safetensors")
            )
        unet = load_state_dict(folder / "unet")
        cfg = json.loads((folder / "unet" / "config.json").read_text())
        single = work / "sdxl-community.safetensors"
        save_single_file(single, unet, cfg, folder, "sdxl")
        _FINE_TUNE.append((folder, single))
    return _FINE_TUNE[0]


def test_weights_equal_diffusers_sdxl_single_file_loader_and_the_fine_tune(hub_cache, work):
    from diffusers import StableDiffusionXLPipeline

    from wadi_cli.pipeline import load_pipeline

    folder, single = fine_tune(hub_cache, work)
    pipe = load_pipeline("sdxl", model=single, teacher=True)
    encoder = pipe.prompt_encoder
    ours = {
        "unet": next(m for m in pipe.denoiser.modules() if type(m).__name__ == "UNet2DConditionModel"),
        "vae": pipe.vae,
        "text_encoder": encoder.parts[0].text_encoder,
        "text_encoder_2": encoder.parts[1].text_encoder,
    }
    theirs = StableDiffusionXLPipeline.from_single_file(
        str(single), config=str(_snapshot(hub_cache, SDXL)), local_files_only=True
    )
    for name, model in ours.items():
        got, ref = model.state_dict(), getattr(theirs, name).state_dict()
        assert set(got) == set(ref), (name, sorted(set(got) ^ set(ref))[:3])
        unequal = [k for k in ref if not torch.equal(got[k], ref[k])]
        assert not unequal, (name, unequal[:3])
        for k, v in load_state_dict(folder / name).items():  # the perturbed folder the file came from
            assert torch.equal(got[k], v), (name, k)


def _image(folder: Path) -> np.ndarray:
    return np.asarray(Image.open(folder / "0000.png")).astype(np.int16)


def test_sample_and_distill_take_the_file(hub_cache, work):
    folder, single = fine_tune(hub_cache, work)
    teacher = ["a cat", "-b", "sdxl", "--teacher", "--steps", "2", "--seed", "3"]
    a, b, base = work / "file", work / "folder", work / "base"
    wadi("sample", *teacher, "--model", single, "-o", a)
    wadi("sample", *teacher, "--model", folder, "-o", b)
    wadi("sample", *teacher, "-o", base)
    assert np.array_equal(_image(a), _image(b))
    assert np.abs(_image(a) - _image(base)).max() > 10  # the file's weights, not the base's
    assert json.loads((a / "samples.json").read_text())["model_file"]["file"] == single.name

    run = work / "run"
    wadi("distill", "-b", "sdxl", "--model", single, "--out", run, "--max-steps", "1", *SMALL_RUN)
    assert json.loads((run / "model_file.json").read_text())["file"] == single.name
    merged = work / "merged.safetensors"
    wadi("export", run, "-f", "merged", "-o", merged)
    got, ft_unet = load_file(str(merged)), load_state_dict(folder / "unet")
    assert torch.equal(got["conv_in.weight"], ft_unet["conv_in.weight"])  # not adapted: the fine-tune's


def _one_line(r) -> str:
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    return lines[0]


def _sd15_file(cache: Path, work: Path) -> Path:
    snap = _snapshot(cache, SD15)
    path = work / "sd15.safetensors"
    if not path.exists():
        unet = load_state_dict(snap / "unet")
        save_single_file(path, unet, json.loads((snap / "unet" / "config.json").read_text()), snap, "sd15")
    return path


def test_bad_single_files_fail_in_one_line_and_write_nothing(hub_cache, work):
    _, sdxl = fine_tune(hub_cache, work)
    sd15 = _sd15_file(hub_cache, work)
    out = work / "bad-out"
    line = _one_line(wadi("sample", "a cat", "-b", "sdxl", "--model", sd15, "--teacher", "-o", out, code=2))
    assert "SD 1.x" in line and "not a sdxl checkpoint" in line
    for family in ("sd15", "sd21"):
        r = wadi("sample", "a cat", "-b", family, "--model", sdxl, "--teacher", "-o", out, code=2)
        line = _one_line(r)
        assert "SDXL (two text encoders)" in line and f"not a {family} checkpoint" in line
    state = load_file(str(sdxl))
    no_second = work / "no-second.safetensors"
    save_file(
        {k: v for k, v in state.items() if not k.startswith("conditioner.embedders.1.")}, str(no_second)
    )
    line = _one_line(
        wadi("sample", "a cat", "-b", "sdxl", "--model", no_second, "--teacher", "-o", out, code=2)
    )
    assert "without its second text encoder" in line and "conditioner.embedders.1.model." in line
    run = work / "bad-run"
    r = wadi(
        "distill", "-b", "sdxl", "--model", no_second, "--out", run, "--max-steps", "1", *SMALL_RUN, code=2
    )
    assert "without its second text encoder" in _one_line(r)
    r = wadi(
        "sample", "a cat", "-b", "sdxl", "--model", sdxl, "--teacher", "--height", "34", "-o", out, code=2
    )
    assert "--height 34: the sdxl denoiser takes multiples of 4 pixels" in _one_line(r)
    assert not out.exists() and not run.exists()
