"""``export_run``: merged (strict load into the base U-Net), adapter, diffusers folder."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from _helpers_sample import one_torch_thread, tiny_pipeline_dir

from wadi_cli.distill import distill, list_checkpoints, load_checkpoint, resolve_config
from wadi_cli.distill.export import export_run
from wadi_cli.distill.export_lora import LoraRank
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


def test_diffusers_folder_follows_the_overwrite_rule_of_files(run_dir, tmp_path):
    """An existing export folder is kept unless --overwrite; an empty folder made beforehand is
    filled; the CLI says it in one line."""
    from typer.testing import CliRunner

    from wadi_cli.cli.main import app

    run, _ = run_dir
    empty = tmp_path / "made-first"
    empty.mkdir()
    export_run(run, "diffusers", empty)
    assert (empty / "model_index.json").is_file()
    out = tmp_path / "pipe"
    export_run(run, "diffusers", out, ema=False)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(BadInputError, match="already exists"):
        export_run(run, "diffusers", out)
    r = CliRunner().invoke(app, ["export", str(run), "-f", "diffusers", "-o", str(out)])
    assert r.exit_code == 2 and "--overwrite" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    export_run(run, "diffusers", out, overwrite=True)  # now the EMA student
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after.keys() == before.keys() and after != before
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(BadInputError, match="not written by wadi"):
        export_run(run, "diffusers", foreign, overwrite=True)


def test_bad_export_input(run_dir, tmp_path):
    run, _ = run_dir
    with pytest.raises(BadInputError, match="--format"):
        export_run(run, "onnx", tmp_path / "x")
    with pytest.raises(CheckpointError):
        export_run(tmp_path, "adapter", tmp_path / "y.safetensors")


@pytest.mark.parametrize("kind", ["lora", "dora", "dora-frozen-norm", "orthogonal", "full"])
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


def test_diffusers_plain_one_step_call_is_wadi_sample(run_dir, tmp_path):
    """``pipe(prompt, num_inference_steps=1, guidance_scale=0 or 1)`` on the export samples
    t = 999 and gives ``wadi sample``'s image from the same noise. Tolerance: latents to
    float32 rounding (rtol 1e-5), images within 1 level of 255 (diffusers maps [−1, 1] to
    [0, 1] then ×255, wadi (x + 1) × 127.5: the same value rounded on either side of .5)."""
    from _helpers_onestep import diffusers_one_step, wadi_one_step

    run, pipe = run_dir
    out = tmp_path / "pipe"
    summary = export_run(run, "diffusers", out)
    z, x0, images = wadi_one_step("tiny", out, model=str(pipe))
    for guidance, cls in ((0.0, "DiffusionPipeline"), (1.0, "StableDiffusionPipeline")):
        latents, theirs = diffusers_one_step(out, z, guidance, cls)
        torch.testing.assert_close(latents, x0, rtol=1e-5, atol=1e-5)
        assert np.abs(theirs.astype(int) - images.astype(int)).max() <= 1
    sched = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    betas = torch.tensor(sched["trained_betas"], dtype=torch.float64)
    assert abs(float(torch.cumprod(1 - betas, 0)[-1]) / summary["alpha_bar_T"] - 1) < 1e-5
    card = (out / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: diffusers" in card
    assert "pipeline_tag: text-to-image" in card and "- one-step" in card
    assert "num_inference_steps=1" in card and f"{summary['alpha_bar_T']:g}" in card


def test_model_card_metrics_from_an_eval_folder(run_dir, tmp_path):
    from typer.testing import CliRunner

    from wadi_cli.cli.main import app

    run, _ = run_dir
    ev = tmp_path / "eval"
    ev.mkdir()
    result = {"num_images": 64, "metrics": {"accuracy": 0.8125, "fd": 3.25}}
    (ev / "metrics.json").write_text(json.dumps(result))
    out = tmp_path / "pipe"
    r = CliRunner().invoke(app, ["export", str(run), "-f", "diffusers", "-o", str(out), "--eval", str(ev)])
    assert r.exit_code == 0, r.output
    card = (out / "README.md").read_text()
    assert "| accuracy | 0.8125 |" in card and "| fd | 3.25 |" in card and "64 images" in card
    # bad input: one line, exit 2, nothing written
    for args in (["-f", "diffusers", "--eval", str(tmp_path)], ["-f", "merged", "--eval", str(ev)]):
        bad = tmp_path / "bad"
        r = CliRunner().invoke(app, ["export", str(run), "-o", str(bad), *args])
        assert r.exit_code == 2 and "--eval" in r.stderr and len(r.stderr.strip().splitlines()) == 1
        assert not bad.exists()


def _numpy_low_rank(delta: torch.Tensor, rank: int) -> torch.Tensor:
    """Independent reference: numpy's float64 SVD truncated to ``rank``."""
    mat = delta.double().reshape(delta.shape[0], -1).numpy()
    u, s, vh = np.linalg.svd(mat, full_matrices=False)
    return torch.from_numpy((u[:, :rank] * s[:rank]) @ vh[:rank]).reshape(delta.shape)


def _fused_unet(pipe_dir, lora_file):
    """The base pipeline with ``lora_file`` loaded by diffusers' ``load_lora_weights`` and fused:
    the U-Net's effective weights."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(pipe_dir), safety_checker=None, local_files_only=True)
    pipe.load_lora_weights(str(lora_file.parent), weight_name=lora_file.name)
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    return {k: v.double() for k, v in pipe.unet.state_dict().items()}


@pytest.mark.parametrize("keys", ["kohya", "diffusers"])
def test_lora_export_loads_in_diffusers_as_base_plus_truncated_change(run_dir, tmp_path, keys):
    """``--format lora`` read by diffusers' ``load_lora_weights`` on the base pipeline: every
    effective weight is base + ΔW_r with ΔW_r numpy's float64 rank-3 SVD of merged − base;
    the reported per-layer errors are ‖ΔW − ΔW_r‖/‖ΔW‖ of that reference."""
    run, pipe = run_dir
    out = tmp_path / "lora.safetensors"
    summary = export_run(run, "lora", out, lora=LoraRank(rank=3), lora_keys=keys)
    export_run(run, "merged", tmp_path / "m.safetensors")
    merged = load_state_dict(tmp_path / "m.safetensors")
    base = {k: v.double() for k, v in _base_unet(pipe).state_dict().items()}
    fused = _fused_unet(pipe, out)
    errors = {row["layer"]: row for row in summary["lora"]["layers"]}
    changed = 0
    for k, w in base.items():
        delta = merged[k].double() - w
        if not delta.any():
            torch.testing.assert_close(fused[k], w, rtol=0, atol=1e-6)
            continue
        changed += 1
        ref = _numpy_low_rank(delta, 3)
        torch.testing.assert_close(fused[k], w + ref, rtol=0, atol=2e-6)
        row = errors[k[: -len(".weight")]]
        assert row["rank"] == 3
        assert row["rel_error"] == pytest.approx(float((delta - ref).norm() / delta.norm()), rel=1e-6)
    assert changed == len(errors) > 10


def test_lora_of_planted_changes_covers_convs_and_the_energy_rule(pipe_dir, tmp_path):
    """Planted ΔW of known spectrum on a resnet conv, a 1×1 conv and Linear layers: the energy
    rule picks the smallest rank holding the fraction (numpy reference), diffusers' loader
    gives base + ΔW_r (convs included), and full energy reproduces the change exactly."""
    from safetensors.torch import save_file

    from wadi_cli.distill.export_lora import extract_lora

    base = _base_unet(pipe_dir).state_dict()
    g = torch.Generator().manual_seed(5)
    student = {k: v.clone() for k, v in base.items()}
    planted = [
        k for k in base if k.endswith(("resnets.0.conv1.weight", "attn1.to_q.weight", "ff.net.2.weight"))
    ]
    planted = planted[:4]
    spectrum = torch.tensor([1.0, 0.6, 0.3, 0.1, 0.05])  # energy fractions: 0.7, 0.95, 0.99, 0.999, 1
    for k in planted:
        m, n = base[k].shape[0], base[k][0].numel()
        q1 = torch.linalg.qr(torch.randn(m, 5, generator=g, dtype=torch.float64))[0]
        q2 = torch.linalg.qr(torch.randn(n, 5, generator=g, dtype=torch.float64))[0]
        delta = (q1 * spectrum.double()) @ q2.T * 0.01
        student[k] = (base[k].double() + delta.reshape(base[k].shape)).float()
    assert any(base[k].ndim == 4 for k in planted)

    class Reader(dict):
        pass

    for energy in (0.9, 0.985):
        tensors, report = extract_lora(Reader(base), student, LoraRank(energy=energy))
        for row in report["layers"]:
            k = row["layer"] + ".weight"
            s = np.linalg.svd((student[k].double() - base[k].double()).reshape(len(base[k]), -1).numpy())[1]
            frac = np.cumsum(s**2) / np.sum(s**2)
            assert row["rank"] == int(np.argmax(frac >= energy - 1e-9)) + 1, (energy, row)
        file = tmp_path / f"planted-{energy}.safetensors"
        save_file(tensors, str(file))
        fused = _fused_unet(pipe_dir, file)
        for k in planted:
            ref = base[k].double() + _numpy_low_rank(
                student[k].double() - base[k].double(), tensors_rank(report, k)
            )
            torch.testing.assert_close(fused[k], ref, rtol=0, atol=2e-6)
    # energy 1: the change itself (float32 rounding of the student adds tiny singular values)
    tensors, report = extract_lora(Reader(base), student, LoraRank(energy=1.0))
    assert report["total_rel_error"] < 1e-5 and all(r["rank"] >= 5 for r in report["layers"])
    save_file(tensors, str(tmp_path / "full.safetensors"))
    fused = _fused_unet(pipe_dir, tmp_path / "full.safetensors")
    for k in planted:
        torch.testing.assert_close(fused[k], student[k].double(), rtol=0, atol=2e-6)


def tensors_rank(report, key):
    return next(r["rank"] for r in report["layers"] if r["layer"] + ".weight" == key)


def test_lora_bad_input(run_dir, tmp_path):
    from typer.testing import CliRunner

    from wadi_cli.cli.main import app

    run, _ = run_dir
    out = tmp_path / "l.safetensors"
    for flags, words in (
        (["--lora-rank", "100000"], "exceeds the rank"),
        (["--lora-energy", "0"], "(0, 1]"),
        (["--lora-energy", "1.5"], "(0, 1]"),
        ([], "exactly one of"),
        (["--lora-rank", "2", "--lora-energy", "0.5"], "exactly one of"),
        (["--lora-rank", "2", "--lora-keys", "peft"], "--lora-keys"),
    ):
        r = CliRunner().invoke(app, ["export", str(run), "-f", "lora", "-o", str(out), *flags])
        assert r.exit_code == 2 and words in r.stderr, (flags, r.output)
        assert len(r.stderr.strip().splitlines()) == 1 and not out.exists()
    r = CliRunner().invoke(app, ["export", str(run), "-f", "merged", "-o", str(out), "--lora-rank", "2"])
    assert r.exit_code == 2 and "--format lora" in r.stderr and not out.exists()
    r = CliRunner().invoke(app, ["export", str(run), "-f", "lora", "-o", str(out), "--lora-energy", "0.9"])
    assert r.exit_code == 0 and "total relative error" in r.stdout and out.is_file(), r.output


def test_analyze_takes_a_run_folder_or_an_adapter_as_student(run_dir, tmp_path):
    """``wadi analyze BASE RUN`` and ``wadi analyze BASE ADAPTER`` analyze the merged student:
    the same numbers as ``wadi analyze BASE MERGED`` of ``export --format merged``."""
    from typer.testing import CliRunner

    from wadi_cli.cli.main import app

    run, pipe = run_dir
    base = pipe / "unet" / "diffusion_pytorch_model.safetensors"
    export_run(run, "merged", tmp_path / "m.safetensors")
    export_run(run, "adapter", tmp_path / "a.safetensors")
    overall = {}
    for name, student in (
        ("merged", tmp_path / "m.safetensors"),
        ("run", run),
        ("adapter", tmp_path / "a.safetensors"),
    ):
        r = CliRunner().invoke(app, ["analyze", str(base), str(student), "--json"])
        assert r.exit_code == 0, (name, r.output)
        overall[name] = json.loads(r.stdout[r.stdout.index("{") :])["overall"]
    assert overall["merged"]["layers"] > 0 and overall["merged"]["direction_change_mean"] > 0
    assert overall["run"] == overall["merged"] and overall["adapter"] == overall["merged"]
    # a run folder alone: its latest student against the base it was trained from
    r = CliRunner().invoke(app, ["analyze", str(run), "--json"])
    assert r.exit_code == 0, r.output
    alone = json.loads(r.stdout[r.stdout.index("{") :])
    assert alone["overall"] == overall["merged"] and alone["teacher"].startswith(str(pipe / "unet"))
