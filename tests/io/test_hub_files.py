"""Fetch only what is used: the files wadi asks the hub for, checked against the real
repositories' file lists (``wadi_cli/configs/hub_files.json``), online (the hub's
listing and download are stand-ins that record the request) and offline (the cache)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from wadi_cli.backbones import get_backbone
from wadi_cli.io import hub
from wadi_cli.io.hub_files import (
    UNUSED_COMPONENTS,
    FetchPlan,
    folder_weights,
    include_patterns,
    recorded_repos,
    select_files,
)

SD15 = "stable-diffusion-v1-5/stable-diffusion-v1-5"
SD21_BASE = "stabilityai/stable-diffusion-2-1-base"
SD21 = "stabilityai/stable-diffusion-2-1"
PIX256, PIX512 = "PixArt-alpha/PixArt-XL-2-256x256", "PixArt-alpha/PixArt-XL-2-512x512"
CLIP_TOKENIZER = {
    f"tokenizer/{n}" for n in ("merges.txt", "special_tokens_map.json", "tokenizer_config.json", "vocab.json")
}
T5_TOKENIZER = {
    f"tokenizer/{n}"
    for n in ("added_tokens.json", "special_tokens_map.json", "spiece.model", "tokenizer_config.json")
}


def _sd(weights: dict[str, str], unet_weights: bool = True) -> set[str]:
    """Expected files of an SD pipeline, written out by hand from the real repo listing."""
    files = {
        "model_index.json",
        "scheduler/scheduler_config.json",
        "text_encoder/config.json",
        "unet/config.json",
        "vae/config.json",
        *CLIP_TOKENIZER,
    }
    for folder, name in weights.items():
        if folder != "unet" or unet_weights:
            files.add(f"{folder}/{name}")
    return files


SD_FP32 = {
    "unet": "diffusion_pytorch_model.safetensors",
    "vae": "diffusion_pytorch_model.safetensors",
    "text_encoder": "model.safetensors",
}
SD_FP16 = {
    "unet": "diffusion_pytorch_model.fp16.safetensors",
    "vae": "diffusion_pytorch_model.fp16.safetensors",
    "text_encoder": "model.fp16.safetensors",
}
PIX_TRANSFORMER = {"transformer/config.json", "transformer/diffusion_pytorch_model.safetensors"}
PIX_COMMON = {
    "model_index.json",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json",
    "vae/config.json",
    *T5_TOKENIZER,
}
PIX_FP32 = PIX_COMMON | {
    "text_encoder/model.safetensors.index.json",
    "vae/diffusion_pytorch_model.safetensors",
    *(f"text_encoder/model-0000{i}-of-00004.safetensors" for i in range(1, 5)),
}
PIX_FP16 = PIX_COMMON | {
    "text_encoder/model.safetensors.index.fp16.json",
    "vae/diffusion_pytorch_model.fp16.safetensors",
    *(f"text_encoder/model.fp16-0000{i}-of-00002.safetensors" for i in range(1, 3)),
}


@pytest.fixture
def online(monkeypatch, tmp_path):
    """The hub as seen by wadi: listings from the recorded real repositories; downloads
    record what was asked for and create those (empty) files."""
    import huggingface_hub

    requested: dict[str, set[str]] = {}

    class FakeApi:
        def list_repo_files(self, repo_id, revision=None):
            return list(recorded_repos()[repo_id]["files"])

    def fake_download(repo_id, revision=None, cache_dir=None, allow_patterns=None, **kwargs):
        files = set(recorded_repos()[repo_id]["files"])
        wanted = set(allow_patterns or [])
        assert wanted <= files, f"asked for files {repo_id} does not have: {sorted(wanted - files)}"
        requested.setdefault(repo_id, set()).update(wanted)
        root = tmp_path / repo_id.replace("/", "--")
        for rel in wanted:
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).touch()
        return str(root)

    monkeypatch.setattr(hub, "_local_only", lambda: False)
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    return requested


def _resolve(name, **kwargs):
    from wadi_cli.pipeline import resolve_pipeline_source

    return resolve_pipeline_source(get_backbone(name), **kwargs)


@pytest.mark.parametrize(
    ("name", "kwargs", "expected"),
    [
        ("sd15", {}, {SD15: _sd(SD_FP32)}),
        ("sd15", {"variant": "fp16"}, {SD15: _sd(SD_FP16)}),
        ("sd15", {"variant": "fp16", "denoiser_weights": False}, {SD15: _sd(SD_FP16, unet_weights=False)}),
        ("sd21", {}, {SD21_BASE: _sd(SD_FP32)}),
        ("sd21", {"variant": "fp16"}, {SD21_BASE: _sd(SD_FP32)}),  # the repo has no fp16 copies
        ("sd21", {"model": SD21}, {SD21: _sd(SD_FP32)}),
        ("pixart", {}, {PIX256: PIX_TRANSFORMER, PIX512: PIX_FP32}),
        ("pixart", {"variant": "fp16"}, {PIX256: PIX_TRANSFORMER, PIX512: PIX_FP16}),
        ("pixart", {"denoiser_weights": False}, {PIX256: {"transformer/config.json"}, PIX512: PIX_FP32}),
        ("pixart", {"with_components": False}, {PIX256: PIX_TRANSFORMER}),
        ("pixart", {"model": PIX512}, {PIX512: PIX_FP32 | PIX_TRANSFORMER}),  # a complete pipeline: all of it
    ],
)
def test_requested_files_are_exactly_the_used_ones(online, name, kwargs, expected):
    _resolve(name, **kwargs)
    assert online == expected


def test_selection_never_takes_what_no_command_uses():
    """Every recorded repo, every model folder, both precisions: no pickles, no root
    single files, no non-EMA copy, never two precisions of one folder."""
    for repo, info in recorded_repos().items():
        files = list(info["files"])
        folders = sorted({f.split("/")[0] for f in files if "/" in f} - {"asset", *UNUSED_COMPONENTS})
        for variant in (None, "fp16"):
            plan = FetchPlan(
                folders=tuple(folders), weights=tuple(folders), variant=variant, require_weights=False
            )
            chosen = select_files(files, plan)
            bad = [f for f in chosen if f.endswith((".bin", ".ckpt")) or "non_ema" in f]
            bad += [f for f in chosen if "/" not in f and f != "model_index.json"]
            assert not bad, (repo, variant, bad)
            for folder in folders:
                weights = [f for f in chosen if f.startswith(folder + "/") and f.endswith(".safetensors")]
                precisions = {".fp16" in w for w in weights}
                assert len(precisions) <= 1, (repo, folder, weights)


def test_folder_weights_prefers_the_asked_precision_and_falls_back():
    names = [
        "config.json",
        "diffusion_pytorch_model.safetensors",
        "diffusion_pytorch_model.fp16.safetensors",
        "diffusion_pytorch_model.non_ema.safetensors",
        "diffusion_pytorch_model.bin",
    ]
    assert folder_weights(names, "fp16") == (["diffusion_pytorch_model.fp16.safetensors"], "fp16")
    assert folder_weights(names, None) == (["diffusion_pytorch_model.safetensors"], None)
    only16 = ["config.json", "diffusion_pytorch_model.fp16.safetensors"]
    assert folder_weights(only16, None) == (["diffusion_pytorch_model.fp16.safetensors"], "fp16")
    assert folder_weights(["config.json", "diffusion_pytorch_model.bin"], None) == ([], None)


def test_a_repo_without_safetensors_is_one_line(online, monkeypatch):
    from wadi_cli.errors import HubError

    monkeypatch.setitem(
        recorded_repos(),
        "org/pickles",
        {"files": {"model_index.json": 1, "unet/config.json": 1, "unet/diffusion_pytorch_model.bin": 1}},
    )
    with pytest.raises(HubError, match=r"'unet' folder of 'org/pickles': no safetensors weights \(has only"):
        hub.resolve_repo("org/pickles", FetchPlan(folders=("unet",), weights=("unet",)))


def test_recorded_lists_are_well_formed():
    for repo, info in recorded_repos().items():
        assert re.fullmatch(r"[\w.-]+/[\w.-]+", repo) and info["source"]
        sizes = [v for v in info["files"].values() if v is not None]
        assert all(isinstance(v, int) and v > 0 for v in sizes), repo
    sd15 = recorded_repos()[SD15]["files"]
    assert sd15["v1-5-pruned.safetensors"] == 7703324286  # the 7.7 GB root single file exists


def test_local_folder_missing_component_is_one_line(tmp_path):
    from wadi_cli.errors import CheckpointError

    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text("{}")
    (tmp_path / "model_index.json").write_text("{}")
    with pytest.raises(CheckpointError, match=r"--model .*: unet/: no safetensors weights"):
        _resolve("sd15", model=str(tmp_path))
    assert Path(tmp_path).exists()


def test_info_says_where_each_part_comes_from_and_the_flag():
    from typer.testing import CliRunner

    from wadi_cli.cli.main import app

    r = CliRunner().invoke(app, ["info", "-b", "pixart", "--json"])
    sources = json.loads(r.stdout)["sources"]
    assert sources["denoiser"] == {"repo": PIX256, "folder": "transformer", "flag": "--model"}
    assert sources["components"]["repo"] == PIX512 and sources["components"]["flag"] == "--components"
    text = CliRunner().invoke(app, ["info", "-b", "sd21"], env={"COLUMNS": "200"}).stdout
    assert SD21_BASE in text and f"--model {SD21}" in text and "v-prediction" in text


@pytest.mark.parametrize(
    ("backbone", "flags", "repos"),
    [
        ("sd15", [], ["stable-diffusion-v1-5/stable-diffusion-v1-5"]),
        ("sd15", ["--dtype", "fp16"], ["stable-diffusion-v1-5/stable-diffusion-v1-5"]),
        ("sd21", [], ["stabilityai/stable-diffusion-2-1-base"]),
        ("pixart", [], ["PixArt-alpha/PixArt-XL-2-256x256"]),
    ],
)
def test_offline_hint_downloads_exactly_the_planned_files(tmp_path, monkeypatch, backbone, flags, repos):
    """With an empty cache, offline, `wadi sample --teacher` fails with one line whose
    `hf download REPO --include ...` patterns are exactly the files the fetch plan takes from
    the recorded file list: the denoiser, VAE and text encoder weights (one copy, fp16 with
    --dtype fp16), configs, tokenizer, scheduler, model_index.json; never the whole repo."""
    import shlex

    import huggingface_hub.constants as constants
    from typer.testing import CliRunner

    from wadi_cli.cli.main import app
    from wadi_cli.io.hub_files import FetchPlan, recorded_repos, select_files

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    r = CliRunner().invoke(
        app, ["sample", "x", "-b", backbone, "--teacher", "-o", str(tmp_path / "o"), *flags]
    )
    assert r.exit_code == 3 and len(r.stderr.strip().splitlines()) == 1, r.output
    line = r.stderr.replace("\n", " ")
    command = line[line.index("`hf download") + 1 :]
    words = shlex.split(command[: command.index("`")])
    assert words[:3] == ["hf", "download", repos[0]] and words[3] == "--include"
    sub = "transformer" if backbone == "pixart" else "unet"
    variant = "fp16" if "fp16" in flags else None
    if backbone == "pixart":  # a denoiser-only repo: its plan is the transformer alone
        plan = FetchPlan(folders=(sub,), weights=(sub,), variant=variant)
    else:
        folders = (sub, "vae", "text_encoder", "tokenizer", "scheduler")
        plan = FetchPlan(folders=folders, weights=(sub, "vae", "text_encoder"), variant=variant)
    files = recorded_repos()[repos[0]]["files"]
    assert sorted(words[4:]) == select_files(files, plan)
    assert not any("safety_checker" in w or w.endswith((".bin", ".ckpt")) for w in words[4:])
    weights = [w for w in words[4:] if w.endswith(".safetensors")]
    assert len(weights) == (1 if backbone == "pixart" else 3)
    assert all((".fp16." in w) == (variant == "fp16") for w in weights), weights


def test_include_patterns_of_an_unrecorded_repo_select_the_plan():
    """For a repo without a recorded file list the patterns are name globs; over a file list
    with decoys they select every planned file and no other weights."""
    from fnmatch import fnmatch

    from wadi_cli.io.hub_files import FetchPlan, include_patterns, select_files

    files = [
        "model_index.json",
        "README.md",
        "v1-5-pruned.safetensors",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "unet/diffusion_pytorch_model.non_ema.safetensors",
        "unet/diffusion_pytorch_model.bin",
        "vae/config.json",
        "vae/diffusion_pytorch_model.safetensors",
        "text_encoder/config.json",
        "text_encoder/model.safetensors.index.json",
        "text_encoder/model-00001-of-00002.safetensors",
        "text_encoder/model-00002-of-00002.safetensors",
        "tokenizer/vocab.json",
        "tokenizer/merges.txt",
        "safety_checker/model.safetensors",
    ]
    plan = FetchPlan(
        folders=("unet", "vae", "text_encoder", "tokenizer"), weights=("unet", "vae", "text_encoder")
    )
    patterns = include_patterns("someone/unrecorded", plan)
    chosen = sorted(f for f in files if any(fnmatch(f, p) for p in patterns))
    assert chosen == select_files(files, plan)


def test_a_controlnet_repository_takes_its_config_and_one_weights_copy_at_the_root():
    """lllyasviel/control_v11p_sd15_canny's layout: one model at the root, .bin and
    safetensors copies in fp32 and fp16, example images."""
    from wadi_cli.pipeline.control import controlnet_plan

    files = [
        "README.md",
        "config.json",
        "diffusion_pytorch_model.bin",
        "diffusion_pytorch_model.fp16.bin",
        "diffusion_pytorch_model.fp16.safetensors",
        "diffusion_pytorch_model.safetensors",
        "images/input.png",
    ]
    assert select_files(files, controlnet_plan("fp16")) == [
        "config.json",
        "diffusion_pytorch_model.fp16.safetensors",
    ]
    assert select_files(files, controlnet_plan(None)) == [
        "config.json",
        "diffusion_pytorch_model.safetensors",
    ]
    patterns = include_patterns("someone/some-controlnet", controlnet_plan(None))
    assert "diffusion_pytorch_model.safetensors" in patterns and "*.json" in patterns
    assert not any(p.startswith("/") for p in patterns)


def test_the_sd21_community_controlnet_on_main_has_no_safetensors_to_take():
    """thibaud/controlnet-sd21-canny-diffusers (recorded): only a pickled .bin on main, so the
    ControlNet plan refuses it, naming what is there, instead of unpickling it."""
    from wadi_cli.io.hub_files import MissingFiles
    from wadi_cli.pipeline.control import controlnet_plan

    files = list(recorded_repos()["thibaud/controlnet-sd21-canny-diffusers"]["files"])
    assert "config.json" in files and "diffusion_pytorch_model.bin" in files
    with pytest.raises(MissingFiles, match="no safetensors weights"):
        select_files(files, controlnet_plan(None))
    with pytest.raises(MissingFiles, match="no safetensors weights"):
        select_files(files, controlnet_plan("fp16"))
