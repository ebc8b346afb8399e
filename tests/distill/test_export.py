"""``export_run``: merged (strict load into the base U-Net), adapter, diffusers folder."""

from __future__ import annotations

import pytest
import torch
from _helpers_sample import one_torch_thread, tiny_pipeline_dir

from wadi_cli.distill import distill, list_checkpoints, load_checkpoint, resolve_config
from wadi_cli.distill.export import export_run
from wadi_cli.errors import BadInputError, CheckpointError
from wadi_cli.io import load_state_dict
from wadi_cli.lorad import apply_adapter, load_adapter

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    pipe = tiny_pipeline_dir()
    run = tmp_path_factory.mktemp("export") / "run"
    cfg = resolve_config(
        overrides=dict(model=str(pipe), batch_size=2, max_steps=2, device="cpu", ema_decay=0.5, lr=1e-2)
        | {"regression_weight": 0.0}
    )
    with one_torch_thread():
        distill(cfg, run)
    return run, pipe


def _base_unet(pipe):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(str(pipe), subfolder="unet").eval()


def test_merged_loads_strictly_and_equals_the_adapted_base(run_dir, tmp_path):
    run, pipe = run_dir
    out = tmp_path / "merged.safetensors"
    summary = export_run(run, "merged", out, ema=False)
    assert summary["ema"] is False
    merged = _base_unet(pipe)
    merged.load_state_dict(load_state_dict(out), strict=True)
    # independent reference: the base U-Net wrapped by lorad's own LoRaDLinear layers
    ref = _base_unet(pipe)
    raw = load_checkpoint(list_checkpoints(run)[-1]).adapters["student"]
    apply_adapter(ref, raw)
    g = torch.Generator().manual_seed(0)
    x, emb = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 16, 64, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(merged(x, 999, emb).sample, ref(x, 999, emb).sample, rtol=1e-4, atol=1e-5)
        assert not torch.allclose(merged(x, 999, emb).sample, _base_unet(pipe)(x, 999, emb).sample)


def test_adapter_export_is_the_ema_by_default(run_dir, tmp_path):
    run, _ = run_dir
    export_run(run, "adapter", tmp_path / "a.safetensors")
    export_run(run, "adapter", tmp_path / "raw.safetensors", ema=False)
    ckpt = load_checkpoint(list_checkpoints(run)[-1])
    ema, cfg = load_adapter(tmp_path / "a.safetensors")
    raw, _ = load_adapter(tmp_path / "raw.safetensors")
    assert cfg.role == "student" and cfg.rank == 16 and cfg.backbone == "tiny"
    for k, v in ckpt.adapters["ema"].items():
        assert torch.equal(ema[k], v) and torch.equal(raw[k], ckpt.adapters["student"][k])
    assert any(not torch.equal(ema[k], raw[k]) for k in raw)
    with pytest.raises(BadInputError, match="already exists"):
        export_run(run, "adapter", tmp_path / "a.safetensors")


def test_diffusers_folder_loads_and_is_accepted_by_sample(run_dir, tmp_path):
    from diffusers import StableDiffusionPipeline

    from wadi_cli.backbones import get_backbone
    from wadi_cli.pipeline import apply_weights

    run, pipe = run_dir
    out = tmp_path / "pipe"
    export_run(run, "diffusers", out)
    export_run(run, "merged", tmp_path / "m.safetensors")
    loaded = StableDiffusionPipeline.from_pretrained(str(out), safety_checker=None, local_files_only=True)
    merged = load_state_dict(tmp_path / "m.safetensors")
    for k, v in loaded.unet.state_dict().items():
        assert torch.equal(v, merged[k]), k
    unet = _base_unet(pipe)
    assert apply_weights(unet, out, get_backbone("tiny")) == "folder"
    assert torch.equal(unet.state_dict()["conv_in.weight"], merged["conv_in.weight"])


def test_bad_export_input(run_dir, tmp_path):
    run, _ = run_dir
    with pytest.raises(BadInputError, match="--format"):
        export_run(run, "onnx", tmp_path / "x")
    with pytest.raises(CheckpointError):
        export_run(tmp_path, "adapter", tmp_path / "y.safetensors")


@pytest.mark.parametrize("kind", ["lora", "dora", "full"])
def test_baseline_runs_resume_and_export_merged(tmp_path, kind):
    """--adapter lora|dora|full: same loop, checkpoints, export; the merged U-Net reproduces
    the trained student's forward."""
    from wadi_cli.distill.run import build_distiller, config_for_run

    pipe = tiny_pipeline_dir()
    run = tmp_path / "run"
    over = dict(model=str(pipe), batch_size=2, max_steps=2, device="cpu", adapter=kind, rank=4, lr=1e-2)
    over["regression_weight"] = 0.0  # the tiny default's 1024 teacher pairs: not needed here
    with one_torch_thread():
        distill(resolve_config(overrides=over), run)
        distill(config_for_run(run, "latest", None, {"max_steps": 3}), run, resume="latest")
    export_run(run, "merged", tmp_path / "m.safetensors", ema=False)
    merged = _base_unet(pipe)
    merged.load_state_dict(load_state_dict(tmp_path / "m.safetensors"), strict=True)
    ckpt = load_checkpoint(list_checkpoints(run)[-1])
    d = build_distiller(resolve_config(overrides=over), ["x"])
    d.load(ckpt)
    g = torch.Generator().manual_seed(0)
    x, emb = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 16, 64, generator=g)
    with torch.no_grad(), d.student() as student:
        ref = student.model(x, 999, emb).sample
    with torch.no_grad():
        torch.testing.assert_close(merged(x, 999, emb).sample, ref, rtol=1e-4, atol=1e-5)
        assert not torch.allclose(ref, _base_unet(pipe)(x, 999, emb).sample)
