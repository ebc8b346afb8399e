"""analysis/gpu_acceptance.py runs end to end at toy sizes on the CPU (its ``--tiny`` mode:
the same steps and code paths as on a GPU), writes its JSON + markdown, stops at once
without a GPU, and its resume rule tells a faithful resume from a broken one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _helpers_scripts import load_analysis_script

ga = load_analysis_script("gpu_acceptance.py")


def _check_report(results: Path, skipped: set[str]) -> dict:
    doc = json.loads((results / "gpu_acceptance_cpu_tiny.json").read_text())
    assert doc["tiny"] and doc["device"] == "cpu"
    env = doc["environment"]
    assert {"torch", "diffusers", "transformers", "date_utc", "cpu"} <= set(env)
    for name, step in doc["steps"].items():
        assert step["status"] == ("skipped" if name in skipped else "ok"), (name, step)
    steps = doc["steps"]
    for precision in ("fp16", "bf16"):
        cmp = steps["distill"]["details"][precision]["resume_vs_straight"]
        assert cmp["adapters_bit_identical"] and cmp["losses_bit_identical"]
    sample = steps["sample_compile"]["details"]
    assert sample["eager"]["resolution"] == 512 and sample["compiled"]["ms_per_image_median"] > 0
    assert steps["analyze"]["details"]["layers"] > 0
    assert set(steps["bench_train_step"]["details"]["variants"]) == {"ours", "hook", "lora"}
    assert steps["bench_layer"]["details"]["bf16"]["exact"]["train_ms"] > 0
    md = (results / "gpu_acceptance_cpu_tiny.md").read_text()
    assert "not a GPU measurement" in md and "| distill | ok |" in md
    return doc


def test_cpu_tiny_mode_runs_every_step_and_writes_json_and_markdown(tmp_path):
    # accelerate launch starts two fresh Python processes (~20 CPU-seconds here): the
    # slow test below runs it
    assert ga.main(["--device", "cpu", "--tiny", "--skip", "accelerate", "--results", str(tmp_path)]) == 0
    doc = _check_report(tmp_path, {"accelerate"})
    assert any("torch.compile disabled" in n for n in doc["notes"])


@pytest.mark.slow
def test_cpu_tiny_mode_with_accelerate_launch(tmp_path):
    assert ga.main(["--device", "cpu", "--tiny", "--results", str(tmp_path)]) == 0
    doc = _check_report(tmp_path, set())
    for precision in ("fp16", "bf16"):
        assert doc["steps"]["accelerate"]["details"][precision]["vs_straight"]["adapters_bit_identical"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")
def test_without_cuda_it_stops_at_once_with_one_clear_line(tmp_path, capsys):
    assert ga.main(["--results", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "no CUDA device" in err and "--device cpu --tiny" in err and len(err.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []
    assert ga.main(["--device", "cpu", "--results", str(tmp_path)]) == 2  # full sizes need a GPU


def test_dry_run_prints_the_plan(tmp_path, capsys):
    assert ga.main(["--dry-run", "--workdir", str(tmp_path / "w")]) == 0
    out = capsys.readouterr().out
    assert "--mixed-precision fp16" in out and "--mixed-precision bf16" in out
    assert "accelerate launch --num_processes 1" in out and "--compile" in out
    assert "bench_train_step.py --device cuda --dtype bf16 --resolution 512 --batch 16" in out
    assert "bench_layer.py --device cuda --dtype fp16" in out


# ---- the resume rule on planted runs --------------------------------------------------
def _planted_run(folder: Path, losses: dict[int, tuple[float, float]], theta_scale: float) -> None:
    """A run folder: metrics.csv rows (step -> losses) and a final checkpoint whose
    adapters have Θ = A B = theta_scale · Θ₀."""
    from wadi_cli.lorad import LoRaDConfig, save_adapter

    ckpt = folder / "checkpoints" / f"step-{max(losses):08d}"
    ckpt.mkdir(parents=True)
    rows = ["step,loss_g,loss_fake,grad_norm_g,grad_norm_fake,lr,fake_lr,seconds"]
    rows += [f"{step},{g},{f},1,1,0.01,0.001,0.1" for step, (g, f) in sorted(losses.items())]
    (folder / "metrics.csv").write_text("\n".join(rows) + "\n")
    for role in ("student", "fake"):
        tensors = {
            "blk.lin.lorad_A": torch.ones(6, 2) * theta_scale,
            "blk.lin.lorad_B": torch.linspace(-1, 1, 8).reshape(2, 4),
        }
        save_adapter(ckpt / f"{role}.safetensors", tensors, LoRaDConfig(rank=2, role=role))


def test_resume_rule_tells_a_faithful_resume_from_a_broken_one(tmp_path):
    _planted_run(tmp_path / "S", {1: (1.0, 0.30), 2: (0.9, 0.20)}, 1.0)
    _planted_run(tmp_path / "same", {2: (0.9, 0.20)}, 1.0)
    _planted_run(tmp_path / "drift", {2: (0.9, 0.20)}, 1.02)  # Θ 2 % off, same first loss
    _planted_run(tmp_path / "far", {2: (0.9, 0.20)}, 1.2)  # Θ 20 % off
    _planted_run(tmp_path / "other_data", {2: (0.9, 0.26)}, 1.0)  # first fake loss 30 % off
    _planted_run(tmp_path / "nan", {2: (float("nan"), 0.2)}, 1.0)
    S = tmp_path / "S"
    same = ga.compare_runs(S, tmp_path / "same", 2, cuda=False)
    assert same["adapters_bit_identical"] and same["losses_bit_identical"]
    with pytest.raises(ga.StepFailed, match="bit-identical"):
        ga.compare_runs(S, tmp_path / "drift", 2, cuda=False)
    ok = ga.compare_runs(S, tmp_path / "drift", 2, cuda=True)
    assert not ok["adapters_bit_identical"]
    assert ok["theta_rel_diff"]["student"] == pytest.approx(0.02, rel=1e-4)
    with pytest.raises(ga.StepFailed, match="learned angles differ"):
        ga.compare_runs(S, tmp_path / "far", 2, cuda=True)
    with pytest.raises(ga.StepFailed, match="first-step losses differ"):
        ga.compare_runs(S, tmp_path / "other_data", 2, cuda=True)
    with pytest.raises(ga.StepFailed, match="non-finite"):
        ga.compare_runs(S, tmp_path / "nan", 2, cuda=True)
