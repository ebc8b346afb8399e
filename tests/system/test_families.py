"""Every backbone family from its real hub layout, every command, offline.

The miniature hub cache of ``_helpers_hub`` (built once per session) holds SD1.5,
SD2.1-base, SD2.1 (768, v-prediction), PixArt-α 256 (transformer only) + 512 (its
VAE/T5/tokenizer/scheduler) and the authors' release repo, file for file as on the hub,
with decoys wherever wadi must not read. Each family runs, through the CLI and with no
``--model`` unless the family is a choice (SD2.1 768): distill (fp32, bf16, resume),
export (merged, adapter, diffusers, single-file for SD), sample from each export, from
the run folder, from the release and as teacher, swap, analyze, merge.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from _helpers_cli import wadi
from _helpers_hub import (
    COMMIT,
    PIXART_256,
    PIXART_512,
    SD15,
    SD21,
    SD21_BASE,
    hub_cache_in_use,
)
from PIL import Image

from wadi_cli.io import load_state_dict, open_checkpoint

#: family -> (backbone, extra flags selecting the base, image side in px, prediction type)
FAMILIES = {
    "sd15": ("sd15", [], 16, "epsilon"),
    "sd21": ("sd21", [], 16, "epsilon"),
    "sd21-768": ("sd21", ["--model", SD21], 24, "v_prediction"),
    "pixart": ("pixart", [], 16, "epsilon"),
}
BASE_REPO = {"sd15": SD15, "sd21": SD21_BASE, "sd21-768": SD21, "pixart": PIXART_256}
ALPHA = 0.005  # a non-default ᾱ_T: every export must carry it to sampling
PROMPT = "a cat"


@pytest.fixture(scope="module")
def hub_cache():
    with hub_cache_in_use() as cache:
        yield cache


def _metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return dict(f.metadata() or {})


def _keys(path: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return list(f.keys())


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("families")


def _image_side(folder: Path) -> int:
    img = np.asarray(Image.open(folder / "0000.png"))
    assert img.shape[0] == img.shape[1] and img.shape[2] == 3
    return img.shape[0]


_RUNS: dict[str, Path] = {}
#: a student visibly apart from the base in its images (an export that silently wrote the
#: base weights would pass every picture comparison): the miniature's VSD gradients are
#: ~1e-10, so AdamW's ε 1e-8 would turn lr 1e-4 into steps of ~1e-10 (the recipes' 3-step
#: export equals the base bit for bit); ε 1e-20 and lr 0.1 make each step ~0.1, the fake
#: score's CFG 1 (teacher 1.5) a nonzero gradient from step 1, EMA 0.5 keeps the EMA in use
STUDENT_DIFFERS = ["--lr", "0.1", "--adam-eps", "1e-20", "--fake-guidance", "1", "--ema-decay", "0.5"]
#: a run small enough for a miniature: batch 1, ranks 4 / 2, no validation, CPU
SMALL_RUN = [*("--batch-size", "1", "--rank", "4", "--fake-rank", "2"), "--validate-every", "0"]
SMALL_RUN += ["--device", "cpu", "--no-tensorboard", "--prompts", "smoke"]  # a real family names its prompts


def distilled(family: str, work: Path) -> Path:
    """The family's fp32 run: 2 steps, then resumed to 3 (shared by the tests below)."""
    if family not in _RUNS:
        backbone, flags, _, _ = FAMILIES[family]
        run = work / f"{family}-run"
        fp32 = [
            "--max-steps",
            "2",
            "--checkpoint-every",
            "1",
            "--mixed-precision",
            "no",
            "--alpha-bar-t",
            ALPHA,
            *STUDENT_DIFFERS,
        ]
        wadi("distill", "-b", backbone, *flags, "--out", run, *SMALL_RUN, *fp32)
        wadi("distill", "--out", run, "--resume", "latest", "--max-steps", "3")
        _RUNS[family] = run
    return _RUNS[family]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_distill_fp32_resume_and_bf16(hub_cache, work, family):
    backbone, flags, _, _ = FAMILIES[family]
    run = distilled(family, work)
    rows = (run / "metrics.csv").read_text().strip().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["1", "2", "3"]
    config = json.loads((run / "config.json").read_text())
    assert config["alpha_bar_T"] == ALPHA and config["max_steps"] == 3
    bf16 = work / f"{family}-bf16"
    wadi(
        "distill",
        "-b",
        backbone,
        *flags,
        "--out",
        bf16,
        *SMALL_RUN,
        "--max-steps",
        "3",
        "--mixed-precision",
        "bf16",
    )
    losses = [float(r.split(",")[1]) for r in (bf16 / "metrics.csv").read_text().strip().splitlines()[1:]]
    assert len(losses) == 3 and all(np.isfinite(losses))


_EXPORTS: dict[str, dict[str, Path]] = {}


def exported(family: str, work: Path) -> dict[str, Path]:
    if family not in _EXPORTS:
        run = distilled(family, work)
        out = {
            "merged": work / f"{family}-merged.safetensors",
            "adapter": work / f"{family}-adapter.safetensors",
            "diffusers": work / f"{family}-diffusers",
        }
        if FAMILIES[family][0] != "pixart":
            out["single-file"] = work / f"{family}-single.safetensors"
        for fmt, path in out.items():
            wadi("export", run, "--format", fmt, "--out", path)
        _EXPORTS[family] = out
    return _EXPORTS[family]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_exports_carry_alpha_and_only_the_pipeline(hub_cache, work, family):
    paths = exported(family, work)
    if family == "pixart":  # the original SD layout has no PixArt counterpart: one line, no file
        bad = work / "pixart-single.safetensors"
        r = wadi("export", distilled(family, work), "--format", "single-file", "--out", bad, code=2)
        assert "sd15, sd21" in r.stderr and not bad.exists()
    for fmt in ("merged", "adapter", "single-file"):
        if fmt in paths:
            assert _metadata(paths[fmt])["alpha_bar_T"] == str(ALPHA), fmt
    folder = paths["diffusers"]
    sub = "transformer" if family == "pixart" else "unet"
    assert sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) == sorted(
        ["model_index.json", "README.md", sub, "vae", "text_encoder", "tokenizer", "scheduler"]
    )
    weights = sorted(
        str(p.relative_to(folder)) for p in folder.rglob("*") if p.suffix in (".safetensors", ".bin")
    )
    assert not any(".fp16" in w or ".bin" in w for w in weights), weights
    index = json.loads((folder / "model_index.json").read_text())
    assert index.get("safety_checker", [None, None]) == [None, None]
    with open_checkpoint(folder, sub) as src:
        assert src.metadata()["alpha_bar_T"] == str(ALPHA)
    # diffusers itself loads the exported folder
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(folder), local_files_only=True)
    with open_checkpoint(paths["merged"]) as src:
        net = getattr(pipe, sub).state_dict()
        assert all(torch.equal(net[k], src.get(k)) for k in src)


#: the pipeline class diffusers users load each family's export with
PIPELINES = {"sd15": "StableDiffusionPipeline", "sd21": "StableDiffusionPipeline"}
PIPELINES |= {"sd21-768": "StableDiffusionPipeline", "pixart": "PixArtAlphaPipeline"}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_diffusers_plain_one_step_call_is_wadi_sample(hub_cache, work, family):
    """The export answers ``pipe(prompt, num_inference_steps=1, guidance_scale=0 or 1)``
    with ``wadi sample``'s image from the same noise (t = 999 and the recorded ᾱ_T = ALPHA,
    not the schedule's 0.00466). Tolerance: latents to float32 rounding; images within one
    level of 255 (diffusers and wadi round the same value from [−1, 1] by different formulas)."""
    from _helpers_onestep import diffusers_one_step, wadi_one_step

    backbone, flags, _, _ = FAMILIES[family]
    folder = exported(family, work)["diffusers"]
    z, x0, images = wadi_one_step(backbone, folder, model=flags[1] if flags else None)
    for guidance, cls in ((0.0, "DiffusionPipeline"), (1.0, PIPELINES[family])):
        latents, theirs = diffusers_one_step(folder, z, guidance, cls)
        torch.testing.assert_close(latents, x0, rtol=1e-5, atol=1e-5)
        assert np.abs(theirs.astype(int) - images.astype(int)).max() <= 1, (family, guidance)
    card = (folder / "README.md").read_text()
    assert f"base_model: {BASE_REPO[family]}" in card and f"ᾱ_T = {ALPHA:g}" in card


@pytest.mark.parametrize("family", list(FAMILIES))
def test_sample_from_everything(hub_cache, work, family):
    backbone, flags, side, prediction = FAMILIES[family]
    paths = exported(family, work)
    sources = {
        "run": distilled(family, work),
        "merged": paths["merged"],
        "adapter": paths["adapter"],
        "diffusers": paths["diffusers"],
    }
    for name, weights in sources.items():
        out = work / f"{family}-sample-{name}"
        r = wadi("sample", PROMPT, "-b", backbone, *flags, "-w", weights, "-o", out, "--json")
        summary = json.loads(r.stdout[r.stdout.index("{") :])
        assert summary["alpha_bar_T"] == ALPHA and summary["alpha_bar_T_recorded"] == ALPHA, name
        assert summary["resolution"] == side and summary["prediction_type"] == prediction
        assert _image_side(out) == side, name
    teacher = work / f"{family}-teacher"
    wadi("sample", PROMPT, "-b", backbone, *flags, "--teacher", "--steps", "2", "-o", teacher)
    assert _image_side(teacher) == side
    # a conflicting --alpha-bar-t is used, with a warning naming both values
    out = work / f"{family}-sample-conflict"
    r = wadi(
        "sample", PROMPT, "-b", backbone, *flags, "-w", paths["adapter"], "--alpha-bar-t", "0.01", "-o", out
    )
    assert "warning:" in r.stderr and "0.01" in r.stderr and str(ALPHA) in r.stderr


@pytest.mark.parametrize("family", ["sd15", "sd21", "pixart"])
def test_sample_the_release_by_default(hub_cache, work, family):
    backbone, _, side, _ = FAMILIES[family]
    out = work / f"{family}-release"
    r = wadi("sample", PROMPT, "-b", backbone, "-o", out, "--json")
    summary = json.loads(r.stdout[r.stdout.index("{") :])
    assert "gudaochangsheng--WaDi" in summary["weights"] and summary["weights_kind"] == "merged"
    assert summary["alpha_bar_T"] == 0.0047 and _image_side(out) == side


@pytest.mark.parametrize("family", list(FAMILIES))
def test_swap_analyze_merge_with_hub_ids(hub_cache, work, family):
    backbone, _, _, _ = FAMILIES[family]
    paths = exported(family, work)
    base = BASE_REPO[family]
    swapped = work / f"{family}-swap.safetensors"
    wadi("swap", base, paths["merged"], "--keep", "norm", "--out", swapped)
    with open_checkpoint(swapped) as src:
        assert src.metadata()["alpha_bar_T"] == str(ALPHA)
    r = wadi("analyze", base, paths["merged"], "--json")
    assert json.loads(r.stdout[r.stdout.index("{") :])["overall"]
    merged = work / f"{family}-merge.safetensors"
    wadi("merge", base, paths["adapter"], "--out", merged)
    with open_checkpoint(merged) as mine, open_checkpoint(paths["merged"]) as ref:
        assert mine.metadata()["alpha_bar_T"] == str(ALPHA)
        assert sorted(mine.keys()) == sorted(ref.keys())
        assert all(torch.equal(mine.get(k), ref.get(k)) for k in ref)


def test_merge_refuses_an_sd21_adapter_on_an_sd15_base(hub_cache, work):
    """An adapter recorded as sd21 merged into SD1.5 (whose proj_in are 1×1 convs where SD2.1
    has Linear layers): one line, exit 2, no file; --any-backbone is the deliberate transfer."""
    adapter = exported("sd21", work)["adapter"]
    out = work / "sd21-into-sd15.safetensors"
    r = wadi("merge", SD15, adapter, "--out", out, code=2)
    assert "made for backbone 'sd21'" in r.stderr and "--any-backbone" in r.stderr and not out.exists()
    assert len(r.stderr.strip().splitlines()) == 1
    wadi("merge", SD15, adapter, "--out", out, "--any-backbone")
    assert out.is_file()


@pytest.mark.parametrize("family", ["sd15", "sd21", "sd21-768"])
def test_single_file_converts_back_through_diffusers(hub_cache, work, family):
    """``--format single-file`` (export and merge) read back with diffusers' own
    ``from_single_file`` (configs from the local base pipeline, offline): every tensor of
    the U-Net, VAE and text encoder comes back equal; the U-Net alone
    (``UNet2DConditionModel.from_single_file``) is the merged export tensor for tensor."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    paths = exported(family, work)
    snap = hub_cache / f"models--{BASE_REPO[family].replace('/', '--')}" / "snapshots" / COMMIT
    merged_single = work / f"{family}-merge-single.safetensors"
    wadi("merge", BASE_REPO[family], paths["adapter"], "--format", "single-file", "--out", merged_single)
    for single in (paths["single-file"], merged_single):
        keys = _keys(single)
        assert any(k.startswith("model.diffusion_model.") for k in keys)
        assert any(k.startswith("first_stage_model.") for k in keys)
        assert any(k.startswith("cond_stage_model.") for k in keys)
        pipe = StableDiffusionPipeline.from_single_file(
            str(single), config=str(snap), local_files_only=True, safety_checker=None
        )
        unet = UNet2DConditionModel.from_single_file(
            str(single), config=str(snap), subfolder="unet", local_files_only=True
        ).state_dict()
        merged = load_state_dict(paths["merged"])
        assert sorted(unet) == sorted(merged)
        assert not [k for k in merged if not torch.equal(unet[k], merged[k])]
        refs = {"unet": paths["merged"], "vae": snap / "vae", "text_encoder": snap / "text_encoder"}
        for part, ref_path in refs.items():
            got = getattr(pipe, part).state_dict()
            with open_checkpoint(ref_path) as ref:
                names = [k for k in ref if not k.endswith("position_ids")]
                assert set(names) <= set(got), (part, sorted(set(names) - set(got))[:3])
                unequal = [k for k in names if not torch.equal(got[k], ref.get(k))]
                assert not unequal, (part, unequal[:3])


def _snapshot(hub_cache: Path, repo: str) -> Path:
    return hub_cache / f"models--{repo.replace('/', '--')}" / "snapshots" / COMMIT


def _base_pipeline(family: str, hub_cache: Path):
    """The family's base pipeline as a diffusers user loads it (its own class, from the hub
    snapshots; PixArt-α 256's transformer in the 512 repo's pipeline, as wadi composes them)."""
    from diffusers import PixArtAlphaPipeline, PixArtTransformer2DModel, StableDiffusionPipeline

    kw = dict(local_files_only=True, use_safetensors=True)
    if family == "pixart":
        net = PixArtTransformer2DModel.from_pretrained(
            str(_snapshot(hub_cache, PIXART_256)), subfolder="transformer", **kw
        )
        return PixArtAlphaPipeline.from_pretrained(
            str(_snapshot(hub_cache, PIXART_512)), transformer=net, **kw
        )
    snap = _snapshot(hub_cache, BASE_REPO[family])
    return StableDiffusionPipeline.from_pretrained(str(snap), safety_checker=None, **kw)


def _denoiser(pipe):
    return pipe.transformer if hasattr(pipe, "transformer") and pipe.transformer is not None else pipe.unet


LORA_RANK = 2  # below every changed layer's rank, so the LoRA is a true truncation


def _exported_lora(family: str, work: Path) -> Path:
    """``--format lora --lora-rank 2`` of the family's run (PEFT names for PixArt, whose
    layers the kohya layout cannot name)."""
    out = work / f"{family}-lora.safetensors"
    if not out.exists():
        keys = ["--lora-keys", "diffusers"] if family == "pixart" else []
        wadi(
            "export",
            distilled(family, work),
            "--format",
            "lora",
            "--lora-rank",
            LORA_RANK,
            *keys,
            "--out",
            out,
        )
    return out


def _fuse_lora(pipe, lora: Path) -> None:
    """Apply a LoRA file with diffusers' ``load_lora_weights`` + ``fuse_lora``; PixArt's
    pipeline has no LoRA loader in diffusers, so there peft's own injection and merge."""
    if hasattr(pipe, "load_lora_weights"):
        pipe.load_lora_weights(str(lora.parent), weight_name=lora.name)
        pipe.fuse_lora()
        pipe.unload_lora_weights()
        return
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
    from peft.tuners.lora import LoraLayer
    from safetensors.torch import load_file

    state = {k.removeprefix("transformer."): v for k, v in load_file(str(lora)).items()}
    targets = sorted({k.rsplit(".lora_", 1)[0] for k in state})
    config = LoraConfig(r=LORA_RANK, lora_alpha=LORA_RANK, target_modules=targets)
    net = inject_adapter_in_model(config, pipe.transformer)
    assert not set_peft_model_state_dict(net, state).unexpected_keys
    layers = [m for m in net.modules() if isinstance(m, LoraLayer)]
    assert len(layers) == len(targets)
    for m in layers:
        m.merge()


def _low_rank(delta: torch.Tensor, rank: int) -> torch.Tensor:
    """numpy's float64 rank-r truncation of ``delta`` (a conv as out × (in·kh·kw))."""
    mat = delta.double().reshape(delta.shape[0], -1).numpy()
    u, s, vh = np.linalg.svd(mat, full_matrices=False)
    return torch.from_numpy((u[:, :rank] * s[:rank]) @ vh[:rank]).reshape(delta.shape)


def _assert_same_image(ours, theirs, what):
    """Latents within 1e-5 (|x0| ≤ ~50, where float32's spacing is 3.8e-6); images within 1
    level of 255 (diffusers and wadi round [−1, 1] to bytes by different formulas)."""
    (x0, images), (latents, pictures) = ours, theirs
    torch.testing.assert_close(latents, x0, rtol=0, atol=1e-5, msg=lambda m: f"{what}: {m}")
    assert np.abs(pictures.astype(int) - images.astype(int)).max() <= 1, what


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_export_gives_diffusers_own_one_step_image(hub_cache, work, family):
    """For every export format, the one-step image (``wadi sample`` from the export) equals the
    image diffusers' own pipeline class makes from the same weights and noise, with diffusers'
    DDIM stepping once at t = 999 on a planted ᾱ_999 = ALPHA (:func:`one_step_scheduler`):
    merged (the base pipeline with the merged U-Net/transformer loaded strictly), adapter (the
    same picture), single-file (``from_single_file`` with the base's configs, offline) and
    lora (rank 2: the base with diffusers' ``load_lora_weights`` + ``fuse_lora``, compared
    with wadi's image of base + ΔW_2, ΔW_2 numpy's SVD of merged − base, not with the student).
    The diffusers folder's plain call is ``test_diffusers_plain_one_step_call_is_wadi_sample``.
    Tolerance: latents to 1e-5 absolute (measured: 0.0 for merged, adapter and single-file,
    1.9e-6 for the LoRA, whose fused weights are float32 sums in another order than ΔW_r; the
    student is 7e-3 (sd15) to 1.9 (pixart) from the base), images within 1 level of 255."""
    from _helpers_onestep import one_step_scheduler, pipeline_one_step, wadi_one_step
    from diffusers import StableDiffusionPipeline

    from wadi_cli.io import save_safetensors

    backbone, flags, _, _ = FAMILIES[family]
    model = flags[1] if flags else None
    paths = exported(family, work)
    z, x0, images = wadi_one_step(backbone, paths["merged"], model=model)

    def diffusers_image(pipe):
        pipe.scheduler = one_step_scheduler(pipe.scheduler, ALPHA)
        return pipeline_one_step(pipe, z)

    pipe = _base_pipeline(family, hub_cache)
    base_state = {k: v.clone() for k, v in _denoiser(pipe).state_dict().items()}
    merged = load_state_dict(paths["merged"])
    _denoiser(pipe).load_state_dict(merged, strict=True)
    reference = diffusers_image(pipe)
    _assert_same_image((x0, images), reference, f"{family} merged")
    _, x0_adapter, images_adapter = wadi_one_step(backbone, paths["adapter"], model=model)
    _assert_same_image((x0_adapter, images_adapter), reference, f"{family} adapter")
    if "single-file" in paths:
        single = StableDiffusionPipeline.from_single_file(
            str(paths["single-file"]),
            config=str(_snapshot(hub_cache, BASE_REPO[family])),
            local_files_only=True,
            safety_checker=None,
        )
        _assert_same_image((x0, images), diffusers_image(single), f"{family} single-file")
    # lora: diffusers' loader on the base vs wadi's image of base + ΔW_r
    pipe = _base_pipeline(family, hub_cache)
    base_latents, _ = diffusers_image(pipe)
    _fuse_lora(pipe, _exported_lora(family, work))
    truncated = {}
    for k, w in base_state.items():
        delta = merged[k].double() - w.double()
        truncated[k] = (w.double() + _low_rank(delta, LORA_RANK)).float() if delta.any() else w
    changed = [k for k in base_state if not torch.equal(truncated[k], base_state[k])]
    assert len(changed) > 4
    reference_file = work / f"{family}-base-plus-lora.safetensors"
    save_safetensors(truncated, reference_file, {"alpha_bar_T": str(ALPHA)})
    _, x0_lora, images_lora = wadi_one_step(backbone, reference_file, model=model)
    _assert_same_image((x0_lora, images_lora), diffusers_image(pipe), f"{family} lora")
    # the comparisons can tell: base, rank-2 LoRA and student are 2e-3 to 2 apart in the latents
    assert not torch.allclose(base_latents, x0, rtol=0, atol=1e-4), "the student is the base"
    assert not torch.allclose(x0_lora, x0, rtol=0, atol=1e-4), "rank 2 reproduces the student"


def test_pixart_teacher_resolves_its_repos_in_a_fresh_process(hub_cache, tmp_path):
    """The Done-when command, as a user types it: no --model, offline, real process."""
    out = tmp_path / "cat"
    env = {**os.environ, "HF_HUB_CACHE": str(hub_cache), "HF_HUB_OFFLINE": "1"}
    cmd = [
        sys.executable,
        "-m",
        "wadi_cli",
        "sample",
        "-b",
        "pixart",
        PROMPT,
        "--teacher",
        "--steps",
        "2",
        "-o",
        str(out),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert _image_side(out) == 16
    record = json.loads((out / "samples.json").read_text())
    assert record["model"].startswith(PIXART_256) and PIXART_512 in record["model"]
