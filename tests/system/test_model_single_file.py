"""``--model FILE.safetensors``: a community fine-tune in the original SD layout as the base
pipeline of ``sample``, ``eval`` and ``distill``, on the sd15 and sd21 miniatures.

The fine-tune is the miniature pipeline with every weight perturbed (so its images differ
from the base's), written as a single file by wadi's own writer (data tables) and read back
through diffusers' converters: the two mappings are independent, and the test compares
(1) the tensors with those of diffusers' ``StableDiffusionPipeline.from_single_file`` and
of the perturbed folder, (2) teacher images of ``--model FILE`` with those of the perturbed
pipeline folder passed as ``--model DIR``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from _helpers_cli import wadi
from _helpers_hub import SD15, SD21_BASE, hub_cache_in_use
from PIL import Image
from safetensors.torch import load_file, save_file

from wadi_cli.io import load_state_dict
from wadi_cli.io.sd_single_file_write import save_single_file

REPOS = {"sd15": SD15, "sd21": SD21_BASE}
SMALL_RUN = [*("--batch-size", "1", "--rank", "4", "--fake-rank", "2"), "--validate-every", "0"]
SMALL_RUN += ["--device", "cpu", "--no-tensorboard", "--prompts", "smoke", "--mixed-precision", "no"]


@pytest.fixture(scope="module")
def hub_cache():
    with hub_cache_in_use() as cache:
        yield cache


def _snapshot(cache: Path, repo: str) -> Path:
    return next((cache / f"models--{repo.replace('/', '--')}" / "snapshots").iterdir())


def _perturbed(state: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        k: v + 0.02 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
        for k, v in state.items()
    }


_FINE_TUNES: dict[str, tuple[Path, Path]] = {}


def fine_tune(cache: Path, family: str, work: Path) -> tuple[Path, Path]:
    """(pipeline folder, single file) of the family's miniature with every weight perturbed."""
    if family not in _FINE_TUNES:
        snap = _snapshot(cache, REPOS[family])
        folder = work / f"{family}-ft"
        shutil.copytree(snap, folder, symlinks=False)
        for seed, (sub, stem) in enumerate(
            (
                ("unet", "diffusion_pytorch_model"),
                ("vae", "diffusion_pytorch_model"),
                ("text_encoder", "model"),
            )
        ):
            for f in (folder / sub).glob("*.safetensors"):
                f.unlink()
            state = _perturbed(load_state_dict(snap / sub), 7 + seed)
            save_file(
                {k: v.contiguous() for k, v in state.items()}, str(folder / sub / f"{stem}.safetensors")
            )
        unet = load_state_dict(folder / "unet")
        cfg = json.loads((folder / "unet" / "config.json").read_text())
        single = work / f"{family}-community.safetensors"
        save_single_file(single, unet, cfg, folder, family)
        _FINE_TUNES[family] = folder, single
    return _FINE_TUNES[family]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("single-file-model")


def _image(folder: Path) -> np.ndarray:
    return np.asarray(Image.open(folder / "0000.png")).astype(np.int16)


@pytest.mark.parametrize("family", list(REPOS))
def test_weights_equal_the_fine_tune_and_diffusers_single_file_loader(hub_cache, work, family):
    from diffusers import StableDiffusionPipeline

    from wadi_cli.pipeline import load_pipeline

    folder, single = fine_tune(hub_cache, family, work)
    pipe = load_pipeline(family, model=single, teacher=True)
    assert pipe.model_file["sha256"] == __import__("hashlib").sha256(single.read_bytes()).hexdigest()
    ours = {
        "unet": next(m for m in pipe.denoiser.modules() if type(m).__name__ == "UNet2DConditionModel"),
        "vae": pipe.vae,
        "text_encoder": pipe.prompt_encoder.text_encoder,
    }
    theirs = StableDiffusionPipeline.from_single_file(
        str(single),
        config=str(_snapshot(hub_cache, REPOS[family])),
        local_files_only=True,
        safety_checker=None,
    )
    for name, model in ours.items():
        got = model.state_dict()
        ref = getattr(theirs, name).state_dict()
        assert set(got) == set(ref), name
        for k in ref:
            assert torch.equal(got[k], ref[k]), (name, k)
        folder_state = load_state_dict(folder / name)
        strip = {k.removeprefix("text_model."): v for k, v in got.items()}
        for k, v in folder_state.items():  # the perturbed folder the file was written from
            assert torch.equal(strip[k.removeprefix("text_model.")], v), (name, k)


@pytest.mark.parametrize("family", list(REPOS))
def test_sample_from_the_file_equals_sampling_the_fine_tuned_folder(hub_cache, work, family):
    folder, single = fine_tune(hub_cache, family, work)
    teacher = ["a cat", "-b", family, "--teacher", "--steps", "2", "--seed", "3"]
    a, b, base = work / f"{family}-file", work / f"{family}-folder", work / f"{family}-base"
    wadi("sample", *teacher, "--model", single, "-o", a)
    wadi("sample", *teacher, "--model", folder, "-o", b)
    wadi("sample", *teacher, "-o", base)
    assert np.array_equal(_image(a), _image(b))
    assert np.abs(_image(a) - _image(base)).max() > 10  # the file's weights were used, not the base's
    record = json.loads((a / "samples.json").read_text())["model_file"]
    assert record["file"] == single.name and record["bytes"] == single.stat().st_size
    # one step without --weights: the undistilled fine-tune (no released student was trained on it)
    one = work / f"{family}-one"
    r = wadi("sample", "a cat", "-b", family, "--model", single, "-o", one, "--json")
    assert json.loads(r.stdout)["weights"] is None


def test_distill_records_the_file_and_refuses_a_resume_from_another(hub_cache, work):
    _, single = fine_tune(hub_cache, "sd15", work)
    run = work / "sd15-ft-run"
    wadi("distill", "-b", "sd15", "--model", single, "--out", run, "--max-steps", "2", *SMALL_RUN)
    record = json.loads((run / "model_file.json").read_text())
    assert record["file"] == single.name and len(record["sha256"]) == 64
    assert json.loads((run / "config.json").read_text())["model"] == str(single)
    state = load_file(str(single))  # same path, other bytes: refused, nothing changes in the run
    key = next(k for k in state if k.startswith("model.diffusion_model."))
    state[key] = state[key] + 1
    changed = work / "changed.safetensors"
    save_file(state, str(changed))
    kept = single.read_bytes()
    shutil.copy(changed, single)
    try:
        before = sorted(p.name for p in run.rglob("*"))
        r = wadi("distill", "--out", run, "--resume", "latest", "--max-steps", "3", code=2)
        assert "refusing to resume" in r.stderr and len(r.stderr.strip().splitlines()) == 1
        assert sorted(p.name for p in run.rglob("*")) == before
    finally:
        single.write_bytes(kept)
    wadi("distill", "--out", run, "--resume", "latest", "--max-steps", "3")
    # export: the student merged into the FILE's U-Net (the fine-tune's), not the backbone's
    merged = work / "sd15-ft-merged.safetensors"
    wadi("export", run, "-f", "merged", "-o", merged)
    got, ft_unet = load_file(str(merged)), load_state_dict(work / "sd15-ft" / "unet")
    base_unet = load_state_dict(_snapshot(hub_cache, SD15) / "unet")
    assert torch.equal(got["conv_in.weight"], ft_unet["conv_in.weight"])  # not adapted: the fine-tune's
    assert not torch.equal(got["conv_in.weight"], base_unet["conv_in.weight"])
    r = wadi("export", run, "-f", "diffusers", "-o", work / "sd15-ft-diffusers", code=2)
    assert "single file" in r.stderr and not (work / "sd15-ft-diffusers").exists()


def test_finetune_takes_the_file_as_its_base(hub_cache, work, tmp_path):
    """``wadi finetune --model FILE``: the file is the base (recorded; the merged export keeps
    the fine-tune's untouched layers), like distill."""
    from PIL import Image

    _, single = fine_tune(hub_cache, "sd15", work)
    inst = tmp_path / "dog"
    inst.mkdir()
    rng = np.random.default_rng(1)
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(inst / f"{i}.png")
    run = tmp_path / "ft-run"
    wadi("finetune", "-b", "sd15", "--model", single, "--instance-images", inst, "--instance-prompt",
         "a photo of sks dog", "--max-steps", "1", "--rank", "2", "--batch-size", "1", "--device", "cpu",
         "--no-tensorboard", "--out", run)  # fmt: skip
    assert json.loads((run / "model_file.json").read_text())["file"] == single.name
    merged = tmp_path / "merged.safetensors"
    wadi("export", run, "-f", "merged", "-o", merged)
    got, ft_unet = load_file(str(merged)), load_state_dict(work / "sd15-ft" / "unet")
    base_unet = load_state_dict(_snapshot(hub_cache, SD15) / "unet")
    assert torch.equal(got["conv_in.weight"], ft_unet["conv_in.weight"])
    assert not torch.equal(got["conv_in.weight"], base_unet["conv_in.weight"])


def _one_line(r) -> str:
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    return lines[0]


def test_bad_single_files_fail_in_one_line_and_write_nothing(hub_cache, work):
    _, sd21 = fine_tune(hub_cache, "sd21", work)
    _, sd15 = fine_tune(hub_cache, "sd15", work)
    out = work / "bad-out"
    line = _one_line(wadi("sample", "a cat", "-b", "sd15", "--model", sd21, "--teacher", "-o", out, code=2))
    assert "SD 2.x" in line and "not a sd15 checkpoint" in line
    line = _one_line(wadi("sample", "a cat", "-b", "sd21", "--model", sd15, "--teacher", "-o", out, code=2))
    assert "SD 1.x" in line and "not a sd21 checkpoint" in line
    state = load_file(str(sd15))
    gone = sorted(k for k in state if k.startswith("first_stage_model."))[3]
    del state[gone]
    partial = work / "partial.safetensors"
    save_file(state, str(partial))
    line = _one_line(
        wadi("sample", "a cat", "-b", "sd15", "--model", partial, "--teacher", "-o", out, code=2)
    )
    assert "1 of the" in line and repr(gone) in line
    junk = work / "junk.safetensors"
    junk.write_bytes(b"\x80\x02not a safetensors file at all")
    line = _one_line(wadi("sample", "a cat", "-b", "sd15", "--model", junk, "--teacher", "-o", out, code=2))
    assert "junk.safetensors" in line
    run = work / "bad-run"
    wadi("distill", "-b", "sd15", "--model", partial, "--out", run, "--max-steps", "1", *SMALL_RUN, code=2)
    assert not out.exists() and not run.exists()
