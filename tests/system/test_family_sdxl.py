"""SDXL (``-b sdxl``) from its real hub layout, every command, offline.

The miniature hub cache of ``_helpers_hub`` holds ``stabilityai/stable-diffusion-xl-base-1.0``
file for file (two CLIP text encoders, the second with its projection; SDXL's
``text_time`` U-Net; decoys wherever wadi must not read) and
``madebyollin/sdxl-vae-fp16-fix``. The conditioning is checked against diffusers' own
``StableDiffusionXLPipeline`` (``encode_prompt``, ``_get_add_time_ids`` and a one-step call
on the export), the independent reference; the family runs distill (2 steps, resumed to
3), export (merged, adapter, diffusers), sample (each export, the run, ``--teacher``),
analyze, swap and merge through the CLI.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from _helpers_cli import wadi
from _helpers_hub import COMMIT, SD15, SDXL, SDXL_VAE_FP16, hub_cache_in_use
from PIL import Image

from wadi_cli.backbones import get_backbone
from wadi_cli.io import open_checkpoint

SIDE = 16  # the miniature: latents 8 × 8, a two-level VAE (2× upsampling)
PROMPTS = ["a red cat", "a blue dog on top of a green house"]
SMALL_RUN = [*("--batch-size", "1", "--rank", "4", "--fake-rank", "2"), "--validate-every", "0"]
SMALL_RUN += ["--device", "cpu", "--no-tensorboard", "--prompts", "smoke", "--grad-accum", "1"]
SMALL_RUN += ["--no-gradient-checkpointing"]


@pytest.fixture(scope="module")
def hub_cache():
    with hub_cache_in_use() as cache:
        yield cache


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("sdxl")


def snapshot(cache: Path, repo: str) -> Path:
    return cache / f"models--{repo.replace('/', '--')}" / "snapshots" / COMMIT


def _image_side(folder: Path) -> int:
    img = np.asarray(Image.open(folder / "0000.png"))
    assert img.shape[0] == img.shape[1] and img.shape[2] == 3
    return img.shape[0]


def _reference_pipeline(cache: Path):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(str(snapshot(cache, SDXL)), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_conditioning_equals_diffusers_sdxl_pipeline(hub_cache):
    """Prompt embeddings (both encoders' penultimate states, concatenated), the pooled
    embedding, ∅ (zeros: force_zeros_for_empty_prompt) and the time ids against diffusers'
    ``encode_prompt`` / ``_get_add_time_ids``; then the U-Net's ε through wadi's denoiser
    against the U-Net called with diffusers' own added conditions."""
    from wadi_cli.pipeline import load_pipeline

    pipe = load_pipeline("sdxl", base=True)
    ref = _reference_pipeline(hub_cache)
    pe, npe, pooled, npooled = ref.encode_prompt(PROMPTS, device="cpu", do_classifier_free_guidance=True)
    cond, empty = pipe.prompt_encoder(PROMPTS), pipe.prompt_encoder.empty(len(PROMPTS))
    assert cond.embeds.shape[-1] == 32 + 48 and cond.pooled.shape == (2, 24)
    torch.testing.assert_close(cond.embeds, pe, rtol=0, atol=0)
    torch.testing.assert_close(cond.pooled, pooled, rtol=0, atol=0)
    torch.testing.assert_close(empty.embeds, npe, rtol=0, atol=0)
    torch.testing.assert_close(empty.pooled, npooled, rtol=0, atol=0)
    # a non-square image (16 × 12 px: latents 8 × 6), so height and width cannot be mixed up
    time_ids = ref._get_add_time_ids((SIDE, 12), (0, 0), (SIDE, 12), torch.float32, 24).repeat(2, 1)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 8, 6, generator=g)
    t = torch.tensor([999, 421])
    with torch.no_grad():
        mine = pipe.denoiser.eps(x, t, cond)
        theirs = ref.unet(
            x, t, encoder_hidden_states=pe, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}
        ).sample
    torch.testing.assert_close(mine, theirs, rtol=1e-6, atol=1e-6)
    # the tolerance above sees a wrong pooled embedding or wrong time ids (random miniature
    # weights make their effect small, ~1e-5, but far above float32 rounding)
    for text_embeds, ids in ((torch.zeros_like(pooled), time_ids), (pooled, time_ids * 2)):
        with torch.no_grad():
            other = ref.unet(
                x,
                t,
                encoder_hidden_states=pe,
                added_cond_kwargs={"text_embeds": text_embeds, "time_ids": ids},
            ).sample
        assert not torch.allclose(other, theirs, rtol=1e-6, atol=1e-6)


def test_fp16_takes_the_fp16_safe_vae(hub_cache):
    """In fp16 the VAE comes from madebyollin/sdxl-vae-fp16-fix (the base VAE's weights are
    not even fetched); in fp32 from the base pipeline."""
    from wadi_cli.pipeline.base import load_base_pipeline, resolve_pipeline_source

    b = get_backbone("sdxl")
    fp16 = resolve_pipeline_source(b, variant="fp16")
    assert fp16.vae_ref == SDXL_VAE_FP16 and fp16.vae_root == snapshot(hub_cache, SDXL_VAE_FP16)
    assert SDXL_VAE_FP16 in fp16.describe()
    assert resolve_pipeline_source(b).vae_root is None
    pipe = load_base_pipeline(b, fp16, torch.float16)
    vae = pipe.vae.state_dict()
    with open_checkpoint(snapshot(hub_cache, SDXL_VAE_FP16)) as fix:
        assert all(torch.equal(vae[k], fix.get(k).half()) for k in fix)
    assert pipe.text_encoder_2.dtype == torch.float16 and pipe.force_zeros_for_empty_prompt


_RUN: list[Path] = []


def distilled(work: Path) -> Path:
    """2 fp32 steps, resumed to 3 (shared by the tests below)."""
    if not _RUN:
        run = work / "run"
        wadi("distill", "-b", "sdxl", "--out", run, *SMALL_RUN, "--max-steps", "2", "--mixed-precision", "no")
        wadi("distill", "--out", run, "--resume", "latest", "--max-steps", "3")
        _RUN.append(run)
    return _RUN[0]


def test_distill_two_steps_and_resume(hub_cache, work):
    run = distilled(work)
    rows = (run / "metrics.csv").read_text().strip().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["1", "2", "3"]
    losses = [float(r.split(",")[1]) for r in rows[1:]]
    assert all(np.isfinite(losses))
    config = json.loads((run / "config.json").read_text())
    assert config["alpha_bar_T"] == pytest.approx(get_backbone("sdxl").alpha_bar_T)
    assert config["guidance"] == 8.0 and config["fake_guidance"] == 1.0


def test_bf16_and_resume_is_bit_identical(hub_cache, work):
    """A straight 3-step run holds the very adapters of the 2-step run resumed to 3; a bf16
    run gives finite losses."""
    from safetensors.torch import load_file

    straight = work / "straight"
    wadi(
        "distill", "-b", "sdxl", "--out", straight, *SMALL_RUN, "--max-steps", "3", "--mixed-precision", "no"
    )
    resumed = distilled(work)
    for name in ("student", "fake"):
        a = load_file(str(straight / "checkpoints" / "step-00000003" / f"{name}.safetensors"))
        b = load_file(str(resumed / "checkpoints" / "step-00000003" / f"{name}.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    bf16 = work / "bf16"
    wadi("distill", "-b", "sdxl", "--out", bf16, *SMALL_RUN, "--max-steps", "2", "--mixed-precision", "bf16")
    losses = [float(r.split(",")[1]) for r in (bf16 / "metrics.csv").read_text().strip().splitlines()[1:]]
    assert len(losses) == 2 and all(np.isfinite(losses))


_EXPORTS: dict[str, Path] = {}


def exported(work: Path) -> dict[str, Path]:
    if not _EXPORTS:
        run = distilled(work)
        out = {
            "merged": work / "merged.safetensors",
            "adapter": work / "adapter.safetensors",
            "diffusers": work / "diffusers",
        }
        for fmt, path in out.items():
            wadi("export", run, "--format", fmt, "--out", path)
        _EXPORTS.update(out)
    return _EXPORTS


def test_export_diffusers_is_an_sdxl_pipeline(hub_cache, work):
    """The folder holds both text encoders and tokenizers, model_index keeps
    force_zeros_for_empty_prompt, and diffusers' StableDiffusionXLPipeline answers the plain
    one-step call with ``wadi sample``'s image from the same noise."""
    from _helpers_onestep import PROMPTS as ONESTEP_PROMPTS
    from _helpers_onestep import diffusers_one_step, wadi_one_step

    paths = exported(work)
    folder = paths["diffusers"]
    names = sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))
    assert names == sorted(
        ["model_index.json", "README.md", "unet", "vae", "text_encoder", "text_encoder_2", "tokenizer",
         "tokenizer_2", "scheduler"]
    )  # fmt: skip
    index = json.loads((folder / "model_index.json").read_text())
    assert (
        index["_class_name"] == "StableDiffusionXLPipeline" and index["force_zeros_for_empty_prompt"] is True
    )
    assert index["text_encoder_2"] == ["transformers", "CLIPTextModelWithProjection"]
    z, x0, images = wadi_one_step("sdxl", folder)
    assert len(ONESTEP_PROMPTS) == z.shape[0]
    for guidance in (0.0, 1.0):
        latents, theirs = diffusers_one_step(folder, z, guidance, "StableDiffusionXLPipeline")
        torch.testing.assert_close(latents, x0, rtol=1e-5, atol=1e-5)
        assert np.abs(theirs.astype(int) - images.astype(int)).max() <= 1, guidance
    with open_checkpoint(paths["merged"]) as merged, open_checkpoint(folder, "unet") as unet:
        assert all(torch.equal(merged.get(k), unet.get(k)) for k in merged)


def test_single_file_in_sdxls_original_layout_reads_back_through_diffusers(hub_cache, work):
    """``--format single-file`` (export, and merge with the hub id) holds SDXL's original
    names (model.diffusion_model with label_emb, conditioner.embedders.0 / .1, first_stage_model)
    and diffusers' own ``StableDiffusionXLPipeline.from_single_file`` (configs from the local
    base, offline) gives back every tensor of the U-Net, VAE and both text encoders."""
    from diffusers import StableDiffusionXLPipeline

    paths = exported(work)
    snap = snapshot(hub_cache, SDXL)
    single, merged_single = work / "single.safetensors", work / "merge-single.safetensors"
    wadi("export", distilled(work), "--format", "single-file", "--out", single)
    wadi("merge", SDXL, paths["adapter"], "--format", "single-file", "--out", merged_single)
    for path in (single, merged_single):
        from safetensors import safe_open

        with safe_open(str(path), "pt") as src:
            keys = list(src.keys())
            assert src.metadata()["alpha_bar_T"] == str(get_backbone("sdxl").alpha_bar_T)
        for prefix in (
            "model.diffusion_model.label_emb.0.0.",
            "first_stage_model.",
            "conditioner.embedders.0.transformer.text_model.",
            "conditioner.embedders.1.model.text_projection",
        ):  # noqa: E501
            assert any(k.startswith(prefix) for k in keys), prefix
        pipe = StableDiffusionXLPipeline.from_single_file(str(path), config=str(snap), local_files_only=True)
        refs = {
            "unet": paths["merged"],
            "vae": snap / "vae",
            "text_encoder": snap / "text_encoder",
            "text_encoder_2": snap / "text_encoder_2",
        }
        for part, ref_path in refs.items():
            got = getattr(pipe, part).state_dict()
            with open_checkpoint(ref_path) as ref:
                names = [k for k in ref if not k.endswith("position_ids")]
                assert set(names) <= set(got), (part, sorted(set(names) - set(got))[:3])
                unequal = [k for k in names if not torch.equal(got[k], ref.get(k))]
                assert not unequal, (part, unequal[:3])


def test_single_file_without_the_second_text_encoder_is_refused(hub_cache, work, tmp_path):
    """A base folder without text_encoder_2/: one line, exit 2, no file."""
    import shutil

    base = tmp_path / "base"
    snap = snapshot(hub_cache, SDXL)
    for folder in ("unet", "vae", "text_encoder"):
        shutil.copytree(snap / folder, base / folder)
    out = tmp_path / "single.safetensors"
    r = wadi("merge", base, exported(work)["adapter"], "--format", "single-file", "--out", out, code=2)
    assert "text_encoder_2/" in r.stderr and len(r.stderr.strip().splitlines()) == 1 and not out.exists()


def test_sample_from_everything_and_the_teacher(hub_cache, work):
    paths = exported(work)
    alpha = get_backbone("sdxl").alpha_bar_T
    for name, weights in {"run": distilled(work), **paths}.items():
        out = work / f"sample-{name}"
        r = wadi("sample", PROMPTS[0], "-b", "sdxl", "-w", weights, "-o", out, "--json")
        summary = json.loads(r.stdout[r.stdout.index("{") :])
        assert summary["alpha_bar_T"] == pytest.approx(alpha), name
        assert summary["resolution"] == SIDE and _image_side(out) == SIDE, name
    teacher = work / "teacher"
    wadi("sample", PROMPTS[0], "-b", "sdxl", "--teacher", "--steps", "2", "-o", teacher)
    assert _image_side(teacher) == SIDE


def test_sample_without_weights_says_no_release_exists(hub_cache, work):
    out = work / "no-weights"
    r = wadi("sample", PROMPTS[0], "-b", "sdxl", "-o", out, code=2)
    assert "no one-step sdxl release exists" in r.stderr and "--weights" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not out.exists()


def test_swap_analyze_merge_with_the_hub_id(hub_cache, work):
    paths = exported(work)
    swapped = work / "swap.safetensors"
    wadi("swap", SDXL, paths["merged"], "--keep", "norm", "--out", swapped)
    assert swapped.is_file()
    r = wadi("analyze", SDXL, paths["merged"], "--json")
    assert json.loads(r.stdout[r.stdout.index("{") :])["overall"]
    merged = work / "merge.safetensors"
    wadi("merge", SDXL, paths["adapter"], "--out", merged)
    with open_checkpoint(merged) as mine, open_checkpoint(paths["merged"]) as ref:
        assert sorted(mine.keys()) == sorted(ref.keys())
        assert all(torch.equal(mine.get(k), ref.get(k)) for k in ref)


def test_weights_of_the_other_family_are_refused(hub_cache, work):
    """SD1.5 weights given as SDXL, and SDXL weights given as SD1.5: one line, exit 2,
    nothing written."""
    sd15_weights = snapshot(hub_cache, "gudaochangsheng/WaDi") / "rotated_unet-sdv1-5.safetensors"
    for backbone, weights in (("sdxl", sd15_weights), ("sd15", exported(work)["merged"])):
        out = work / f"wrong-{backbone}"
        r = wadi("sample", PROMPTS[0], "-b", backbone, "-w", weights, "-o", out, code=2)
        assert "does not fit the base model" in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and not out.exists()
    adapter = exported(work)["adapter"]
    out = work / "sdxl-into-sd15.safetensors"
    r = wadi("merge", SD15, adapter, "--out", out, code=2)
    assert "made for backbone 'sdxl'" in r.stderr and not out.exists()


@pytest.mark.eval
def test_eval_defaults_to_dmd2s_sdxl_protocol_and_labels_the_sizes(hub_cache, work):
    """``wadi eval -b sdxl`` (no --protocol): DMD2's SDXL protocol (noise per batch of 4, the
    images scored as 256-px squares, the protocol named in metrics.json) with the caption file
    and -n as given; the miniature's 16-px images are said not to be the papers' 1024 px."""
    pytest.importorskip("cleanfid")
    pytest.importorskip("open_clip")
    from _helpers_eval import clip_folder, inception_file, random_images, write_images

    root = work / "eval-inputs"
    root.mkdir(exist_ok=True)
    write_images(root / "real", random_images(6, 1, size=(40, 48)))
    (root / "captions.txt").write_text("".join(f"a photo of object {i}\n" for i in range(7)))
    out = work / "eval"
    r = wadi(
        "eval", "-b", "sdxl", "-w", distilled(work), "--captions", root / "captions.txt", "-n", "5",
        "--ref", root / "real", "--out", out, "--inception-weights", inception_file(root),
        "--clip-weights", clip_folder(root / "clip"), "--clip-model", "ViT-B-32", "--json", "--device", "cpu",
    )  # fmt: skip
    result = json.loads(r.stdout[r.stdout.index("{") :])
    assert result["protocol"]["name"] == "dmd2-sdxl" and result["seeding"] == "dmd2-sdxl: per batch of 4"
    assert result["num_images"] == 5
    assert {"fid", "kid", "clip", "precision", "recall"} <= set(result["metrics"])
    assert result["image_size"] == f"{SIDE}x{SIDE} → 256x256"
    assert any("generated at 1024x1024" in w for w in result["warnings"])
    manifest = json.loads((out / "manifest.json").read_text())
    assert [(e["seed"], e["row"]) for e in manifest["images"]] == [(0, 0), (0, 1), (0, 2), (0, 3), (1, 0)]
    assert json.loads((out / "metrics.json").read_text())["protocol"]["generated_size"] == 1024
