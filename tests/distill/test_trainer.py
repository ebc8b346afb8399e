"""The WaDi training step and run loop on a random tiny pipeline (CPU, fast)."""

from __future__ import annotations

import copy
import csv

import pytest
import torch

from wadi_cli.diffusion import TextCondition
from wadi_cli.distill import distill, list_checkpoints, load_checkpoint, resolve_config
from wadi_cli.distill.recipe import TrainingDiverged
from wadi_cli.distill.run import config_for_run
from wadi_cli.distill.trainer import Distiller
from wadi_cli.errors import BadInputError, MismatchError
from wadi_cli.lorad import merge_adapter_into_state_dict
from wadi_cli.lorad.multi_adapter import adapter_state_dict

pytestmark = pytest.mark.usefixtures("one_thread")


def _cfg(pipe_dir, **kw):
    base = dict(
        model=str(pipe_dir),
        batch_size=2,
        max_steps=6,
        device="cpu",
        seed=1,
        checkpoint_every=100,
        ema_decay=0.9,
        regression_weight=0.0,
    )  # EMA on explicitly (the tiny default turns it off); the regression term off (the tiny
    # default's 1024 teacher pairs cost more than these tests); tests that need it set it
    return resolve_config(overrides={**base, **kw})


def _distiller(pipe_dir, **kw) -> tuple[Distiller, torch.nn.Module]:
    from wadi_cli.pipeline import load_pipeline

    sampler = load_pipeline("tiny", model=pipe_dir, teacher=True)
    plain = copy.deepcopy(sampler.denoiser.model)
    return Distiller(
        _cfg(pipe_dir, **kw), sampler, ["a red circle at the top left", "a blue square at the top right"]
    ), plain


def _adapters(run):
    ckpt = load_checkpoint(list_checkpoints(run)[-1])
    return ckpt


def test_resume_is_bit_identical_to_a_straight_run(pipe_dir, tmp_path):
    straight = tmp_path / "straight"
    distill(_cfg(pipe_dir), straight)
    split = tmp_path / "split"
    # validation (EMA swap + images + tiny metrics) on the split run must not change training
    distill(_cfg(pipe_dir, max_steps=3, checkpoint_every=1, keep_last=2, validate_every=2), split)
    assert (split / "validation" / "step-00000002.png").is_file()
    rows = (split / "validation.csv").read_text().splitlines()
    assert rows[0] == "step,accuracy,fd,student" and rows[1].startswith("2,") and rows[1].endswith(",ema")
    assert [p.name for p in list_checkpoints(split)] == ["step-00000002", "step-00000003"]  # --keep-last
    cfg = config_for_run(split, "latest", None, {"max_steps": 6})
    summary = distill(cfg, split, resume="latest")
    assert (summary.start_step, summary.step) == (3, 6)
    a, b = _adapters(straight), _adapters(split)
    assert a.step == b.step == 6 and a.data_position == b.data_position == 12
    for name in ("student", "fake", "ema"):
        for k, v in a.adapters[name].items():
            assert torch.equal(v, b.adapters[name][k]), (name, k)
    for name in ("student", "fake"):
        for idx, st in a.optimizers[name]["state"].items():
            for k, v in st.items():
                assert torch.equal(torch.as_tensor(v), torch.as_tensor(b.optimizers[name]["state"][idx][k]))
    assert torch.equal(a.rng["trainer"], b.rng["trainer"])
    rows = [list(csv.DictReader((d / "metrics.csv").open())) for d in (straight, split)]
    assert [r["step"] for r in rows[1]] == [str(i) for i in range(1, 7)]
    assert [r["loss_g"] for r in rows[0]] == [r["loss_g"] for r in rows[1]]
    # training moved the student away from the identity
    assert any(v.abs().max() > 0 for k, v in a.adapters["student"].items() if k.endswith("lorad_A"))


def test_resume_refuses_a_different_rank_or_backbone(pipe_dir, tmp_path):
    run = tmp_path / "run"
    distill(_cfg(pipe_dir, max_steps=1), run)
    with pytest.raises(MismatchError, match="rank"):
        distill(config_for_run(run, "latest", None, {"rank": 4, "max_steps": 2}), run, resume="latest")
    with pytest.raises(MismatchError, match="backbone"):
        distill(config_for_run(run, "latest", None, {"backbone": "sd15", "rank": 16}), run, resume="latest")
    with pytest.raises(BadInputError, match="--resume latest"):
        distill(_cfg(pipe_dir, max_steps=2), run)


def test_nan_loss_stops_and_keeps_the_last_checkpoint(pipe_dir, tmp_path, monkeypatch):
    run = tmp_path / "run"
    distill(_cfg(pipe_dir, max_steps=1), run)
    before = (list_checkpoints(run)[-1] / "student.safetensors").read_bytes()
    import wadi_cli.distill.trainer as trainer

    monkeypatch.setattr(trainer, "fake_score_loss", lambda *a: torch.tensor(float("nan"), requires_grad=True))
    with pytest.raises(TrainingDiverged, match="fake-score loss is nan"):
        distill(config_for_run(run, "latest", None, {"max_steps": 3}), run, resume="latest")
    assert [p.name for p in list_checkpoints(run)] == ["step-00000001"]
    assert (list_checkpoints(run)[-1] / "student.safetensors").read_bytes() == before


def test_guided_predictions_match_separate_forwards_of_independent_models(pipe_dir):
    """Teacher = the untouched base; fake = the base with its adapter merged (computed from
    the exported tensors); both CFG in ONE batched forward == two separate forwards."""
    d, plain = _distiller(pipe_dir)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in d.params["fake"]:  # move the fake adapter away from the identity
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    enc = d.pipe.prompt_encoder
    cond = enc(["a red circle at the top left", "a green triangle at the bottom right"])
    uncond = enc.empty(2)
    x = torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([100, 700])
    fake_net = copy.deepcopy(plain)
    fake_sd = merge_adapter_into_state_dict(plain.state_dict(), {k: v.detach() for k, v in _fake(d).items()})
    fake_net.load_state_dict(fake_sd)
    for adapter, ref_net in ((None, plain), ("fake", fake_net)):
        with torch.no_grad():
            got = d._guided_eps(adapter, x, t, cond, 1.5)
            e_u = ref_net(x, t, encoder_hidden_states=uncond.embeds).sample
            e_c = ref_net(x, t, encoder_hidden_states=cond.embeds).sample
        torch.testing.assert_close(got, e_u + 1.5 * (e_c - e_u), rtol=1e-4, atol=1e-5)


def _fake(d):
    return adapter_state_dict(d.net, "fake")


def _forward_sizes(d) -> tuple[list[int], object]:
    sizes: list[int] = []
    handle = d.net.register_forward_pre_hook(lambda m, args: sizes.append(args[0].shape[0]))
    try:
        result = d.train_step()
    finally:
        handle.remove()
    return sizes, result


@pytest.mark.parametrize(
    ("fake_guidance", "expected"),
    [
        (1.5, [2, 4, 4, 2]),  # student, teacher cond+uncond, fake cond+uncond, fake update
        (1.0, [2, 4, 2, 2]),  # CFG 1 = the conditional prediction: no unconditional half
    ],
)
def test_a_step_runs_four_network_forwards_with_batched_cfg(pipe_dir, fake_guidance, expected):
    d, _ = _distiller(pipe_dir, fake_guidance=fake_guidance)
    sizes, result = _forward_sizes(d)
    assert sizes == expected
    assert result.step == 1 and torch.isfinite(torch.tensor(result.loss_fake))


def test_fake_updates_train_the_fake_score_on_fresh_student_samples(pipe_dir):
    d2, _ = _distiller(pipe_dir, fake_updates=2, fake_guidance=1.5)
    sizes, _ = _forward_sizes(d2)
    # ... then one no-grad student sample and one more fake update
    assert sizes == [2, 4, 4, 2, 2, 2]
    d1, _ = _distiller(pipe_dir, fake_guidance=1.5)
    d1.train_step()
    a, b = adapter_state_dict(d1.net, "fake"), adapter_state_dict(d2.net, "fake")
    assert any(not torch.equal(a[k], b[k]) for k in a)
    # the generator update (before any extra fake update) is the same
    for k, v in adapter_state_dict(d1.net, "student").items():
        torch.testing.assert_close(v, adapter_state_dict(d2.net, "student")[k], rtol=0, atol=0)


def test_gradient_accumulation_equals_one_big_batch(pipe_dir):
    """2 micro-batches of 2 draw the same noise/prompts as one batch of 4 and average the
    same gradient, so two steps give the same adapters (float rounding aside). A large
    Adam eps makes the update proportional to the gradient: Adam's g/|g| would otherwise
    turn rounding noise in near-zero gradients into lr-sized differences."""
    big, _ = _distiller(pipe_dir, batch_size=4, adam_eps=1.0)
    acc, _ = _distiller(pipe_dir, batch_size=2, grad_accum=2, adam_eps=1.0)
    for d in (big, acc):
        for _ in range(2):
            result = d.train_step()
    assert result.step == 2
    for name in ("student", "fake"):
        a, b = adapter_state_dict(big.net, name), adapter_state_dict(acc.net, name)
        assert any(v.abs().max() > 0 for k, v in a.items() if k.endswith("lorad_A"))
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)
    # and it is not vacuous: a single micro-batch of 2 differs
    small, _ = _distiller(pipe_dir, batch_size=2, adam_eps=1.0)
    for _ in range(2):
        small.train_step()
    s, b = adapter_state_dict(small.net, "student"), adapter_state_dict(acc.net, "student")
    assert any(not torch.allclose(s[k], b[k], rtol=1e-4, atol=1e-6) for k in s)


def test_text_cache_encodes_each_prompt_alone_and_evicts_the_oldest(pipe_dir):
    d, _ = _distiller(pipe_dir, text_cache=2)
    enc = d.pipe.prompt_encoder
    prompts = [
        "a red circle at the top left",
        "a blue square at the top right",
        "a red circle at the top left",
    ]
    got = d.encode(prompts)
    for i, p in enumerate(prompts):
        torch.testing.assert_close(got.embeds[i], enc([p]).embeds[0], rtol=0, atol=0)
    assert list(d._text_cache) == ["a blue square at the top right", "a red circle at the top left"]
    d.encode(["a green triangle at the bottom right"])
    assert list(d._text_cache) == ["a red circle at the top left", "a green triangle at the bottom right"]
    off, _ = _distiller(pipe_dir, text_cache=0)
    torch.testing.assert_close(off.encode(prompts).embeds, got.embeds, rtol=1e-5, atol=1e-6)
    assert off._text_cache == {}


def test_prompt_dropout_replaces_rows_with_the_empty_prompt():
    from wadi_cli.distill.trainer import _drop_prompts

    cond = TextCondition(torch.ones(3, 2, 4), torch.ones(3, 2, dtype=torch.long))
    empty = TextCondition(torch.zeros(3, 2, 4), torch.zeros(3, 2, dtype=torch.long))
    out = _drop_prompts(cond, empty, torch.tensor([False, True, False]))
    assert out.embeds[:, 0, 0].tolist() == [1.0, 0.0, 1.0] and out.mask[:, 0].tolist() == [1, 0, 1]
    # SDXL: the pooled embedding of a dropped row is ∅'s too
    pooled = TextCondition(torch.ones(3, 2, 4), None, torch.full((3, 5), 2.0))
    blank = TextCondition(torch.zeros(3, 2, 4), None, torch.full((3, 5), -1.0))
    out = _drop_prompts(pooled, blank, torch.tensor([True, False, True]))
    assert out.pooled[:, 0].tolist() == [-1.0, 2.0, -1.0] and out.embeds[:, 0, 0].tolist() == [0.0, 1.0, 0.0]


def test_gradient_checkpointing_gives_the_same_updates(pipe_dir):
    """Checkpointing recomputes the forward during backward, which must run with the same
    adapter selected; two steps (the first has g = 0) with and without must agree."""
    plain, _ = _distiller(pipe_dir)
    ckpt, _ = _distiller(pipe_dir, gradient_checkpointing=True)
    for d in (plain, ckpt):
        d.train_step()
        d.train_step()
    for name in ("student", "fake"):
        a, b = adapter_state_dict(plain.net, name), adapter_state_dict(ckpt.net, name)
        assert any(v.abs().max() > 0 for k, v in a.items() if k.endswith("lorad_A"))
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_two_processes_on_cpu_hold_identical_adapters(pipe_dir, tmp_path):
    """``wadi distill --num-processes 2`` (accelerate launch, gloo on CPU)."""
    import json
    import os
    import subprocess
    import sys

    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "wadi_cli", "distill", "--model", str(pipe_dir), "--out", str(run)]
    cmd += ["--max-steps", "2", "--batch-size", "1", "--device", "cpu", "--num-processes", "2"]
    cmd += ["--regression-weight", "0"]  # the tiny default's 1024 teacher pairs: not needed here
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    ranks = json.loads((run / "ranks.json").read_text())
    assert ranks["world_size"] == 2 and len(set(ranks["checksums"])) == 1
    assert [p.name for p in list_checkpoints(run)] == ["step-00000002"]


@pytest.mark.slow
@pytest.mark.parametrize("how", ["SIGTERM-to-wadi", "SIGTERM-to-every-process"])
def test_two_processes_stop_on_a_signal_with_a_checkpoint(pipe_dir, tmp_path, how):
    """``kill PID`` of ``wadi distill --num-processes 2`` (wadi passes SIGTERM to the
    launcher, which passes it to both workers), and a scheduler signalling every process
    of the job (SLURM's preemption, ``scancel``): then every worker gets the signal twice,
    once more from the launcher. Both ranks stop at the same step with a checkpoint, and
    the command exits 143 without a traceback. (A terminal's Ctrl-C reaches wadi and the
    launcher only: the launcher starts its workers in their own session.)"""
    import os
    import re
    import signal
    import subprocess
    import sys
    import time

    import psutil

    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "wadi_cli", "distill", "--model", str(pipe_dir), "--out", str(run)]
    cmd += ["--max-steps", "500", "--batch-size", "1", "--device", "cpu", "--num-processes", "2"]
    cmd += ["--regression-weight", "0", "--checkpoint-every", "1000", "--validate-every", "0"]
    log = tmp_path / "log.txt"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    metrics, deadline = run / "metrics.csv", time.monotonic() + 300
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 3):
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.05)
    name, _, whom = how.partition("-to-")
    sig = signal.Signals[name]
    pids = [proc.pid]
    if whom == "every-process":
        pids += [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
        assert len(pids) >= 4  # wadi, the launcher, two workers
    for pid in pids:
        os.kill(pid, sig)
    code = proc.wait(timeout=120)
    text = " ".join(log.read_text().split())
    assert code == 128 + sig, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    said = {"SIGINT": "Ctrl-C"}.get(name, name)
    step = int(re.search(rf"stopped \({said}\) at step (\d+)", text)[1])
    assert [p.name for p in list_checkpoints(run)] == [f"step-{step:08d}"]
    assert step < 500 and load_checkpoint(list_checkpoints(run)[-1]).step == step


def test_launcher_runs_on_this_python_not_the_accelerate_first_on_path(tmp_path, monkeypatch):
    """CI runs the eval tests from a second venv that is not on PATH, while another
    environment's ``accelerate`` is: launching that one started workers without wadi's
    extras. The launcher must be this interpreter's accelerate, whatever PATH holds."""
    import os
    import subprocess
    import sys

    from wadi_cli.distill.launch import accelerate_command

    foreign = tmp_path / "bin" / "accelerate"
    foreign.parent.mkdir()
    foreign.write_text("#!/bin/sh\nexit 3\n")
    foreign.chmod(0o755)
    monkeypatch.setenv("PATH", f"{foreign.parent}{os.pathsep}{os.environ['PATH']}")
    cmd = accelerate_command(2, ["--max-steps", "1"])
    assert cmd[0] == sys.executable
    assert cmd[cmd.index("-m", 3) + 1 :][:2] == ["wadi_cli", "distill"]
    # the launcher module runs the installed accelerate
    proc = subprocess.run([*cmd[:3], "launch", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-1000:]


def test_validation_rows_follow_the_header_already_in_the_file(tmp_path):
    from wadi_cli.distill.validate import append_csv_row

    fresh = tmp_path / "fresh.csv"
    append_csv_row(fresh, {"step": 1, "fd": 2.0, "student": "raw"})
    append_csv_row(fresh, {"step": 2, "fd": 3.0, "student": "ema"})
    assert fresh.read_text().splitlines() == ["step,fd,student", "1,2.0,raw", "2,3.0,ema"]
    old = tmp_path / "old.csv"  # a run from before the "student" column, resumed
    old.write_text("step,fd\r\n1,2.0\r\n")
    append_csv_row(old, {"step": 2, "fd": 3.0, "student": "raw"})
    assert old.read_text().splitlines() == ["step,fd", "1,2.0", "2,3.0"]


def test_validation_uses_the_ema_and_restores_the_raw_student(pipe_dir):
    from wadi_cli.distill.validate import student_images

    d, _ = _distiller(pipe_dir, ema_decay=0.5, lr=1e-2)
    for _ in range(2):
        d.train_step()
    raw = {k: v.clone() for k, v in adapter_state_dict(d.net, "student").items()}
    prompts, seeds = ["a red circle at the top left"] * 2, [1, 2]
    ema_imgs = student_images(d, prompts, seeds, use_ema=True)
    for k, v in adapter_state_dict(d.net, "student").items():
        assert torch.equal(v, raw[k])
    raw_imgs = student_images(d, prompts, seeds, use_ema=False)
    assert (ema_imgs == student_images(d, prompts, seeds, use_ema=True)).all()  # deterministic
    assert not (ema_imgs == raw_imgs).all()


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_half_precision_base_keeps_fp32_adapters_and_learns(pipe_dir, tmp_path, precision):
    """fp16/bf16 frozen base, fp32 adapters; fp16 scales the loss (VSD gradients are
    ~g/numel and would underflow) and checkpoints the scaler state."""
    run = tmp_path / "run"
    distill(_cfg(pipe_dir, max_steps=2, mixed_precision=precision, lr=1e-2), run)
    ckpt = _adapters(run)
    student = ckpt.adapters["student"]
    assert all(v.dtype == torch.float32 for v in student.values())
    assert max(v.abs().max() for k, v in student.items() if k.endswith("lorad_A")) > 0
    assert ("student" in ckpt.extra["grad_scalers"]) == (precision == "fp16")
    summary = distill(config_for_run(run, "latest", None, {"max_steps": 3}), run, resume="latest")
    assert summary.step == 3


def test_tensorboard_logs_the_metrics_csv_scalars(pipe_dir, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    summary = distill(_cfg(pipe_dir, max_steps=3, tensorboard=True), run)
    assert summary.tensorboard == run / "tensorboard"
    events = EventAccumulator(str(summary.tensorboard))
    events.Reload()
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    for key in ("loss_g", "loss_fake", "grad_norm_g"):
        logged = [(e.step, e.value) for e in events.Scalars(f"train/{key}")]
        assert [s for s, _ in logged] == [1, 2, 3]
        expected = [float(r[key]) for r in rows]
        assert [v for _, v in logged] == pytest.approx(expected, rel=1e-6)
    off = distill(_cfg(pipe_dir, max_steps=1, tensorboard=False), tmp_path / "off")
    assert off.tensorboard is None and not (tmp_path / "off" / "tensorboard").exists()


def test_8bit_adamw_quantises_its_state_and_resumes_exactly(pipe_dir, tmp_path):
    pytest.importorskip("bitsandbytes")
    from safetensors import safe_open

    straight, split = tmp_path / "straight", tmp_path / "split"
    distill(_cfg(pipe_dir, optimizer="adamw8bit", max_steps=4), straight)
    distill(_cfg(pipe_dir, optimizer="adamw8bit", max_steps=2, checkpoint_every=2), split)
    distill(config_for_run(split, "latest", None, {"max_steps": 4}), split, resume="latest")
    a, b = _adapters(straight), _adapters(split)
    for name in ("student", "fake"):
        for k, v in a.adapters[name].items():
            assert torch.equal(v, b.adapters[name][k]), (name, k)
    with safe_open(str(list_checkpoints(split)[-1] / "optim_student.safetensors"), "pt") as f:
        dtypes = {f.get_tensor(k).dtype for k in f.keys()}  # noqa: SIM118
    assert torch.uint8 in dtypes  # the large adapter tensors keep 8-bit moments


def test_lr_schedules_against_their_formulas(pipe_dir):
    import math

    const, _ = _distiller(pipe_dir, warmup_steps=2)
    assert [const.lr_scale(s) for s in range(4)] == [0.5, 1.0, 1.0, 1.0]
    cos, _ = _distiller(pipe_dir, warmup_steps=2, lr_schedule="cosine", max_steps=10)
    got = [cos.lr_scale(s) for s in range(11)]
    expected = [0.5, 1.0] + [0.5 * (1 + math.cos(math.pi * (s - 2) / 8)) for s in range(2, 11)]
    assert got == pytest.approx(expected) and got[-1] == pytest.approx(0.0, abs=1e-12)
    cos.train_step()  # the optimizers follow the schedule
    assert cos.optimizers["student"].param_groups[0]["lr"] == pytest.approx(cos.cfg.lr * 0.5)
    with pytest.raises(BadInputError):
        resolve_config(overrides={"lr_schedule": "linear"})


def test_regression_pairs_are_teacher_samples_and_the_loss_is_its_formula(pipe_dir):
    from wadi_cli.pipeline.teacher import teacher_latents

    kw = dict(regression_weight=0.5, regression_pairs=6, regression_steps=2, guidance=2.0)
    d, _ = _distiller(pipe_dir, **kw)
    again, _ = _distiller(pipe_dir, **kw)
    assert torch.equal(d.pairs["x0"], again.pairs["x0"]) and d.pairs["prompts"] == again.pairs["prompts"]
    cond = d.pipe.prompt_encoder(d.pairs["prompts"][:1])
    ref = teacher_latents(d.pipe, cond, d.pairs["z"][:1], 2, 2.0)
    torch.testing.assert_close(d.pairs["x0"][:1], ref, rtol=1e-4, atol=1e-4)  # batch 6 vs 1: float order
    # ONE student forward over the VSD batch + the pair batch == two separate forwards
    z = torch.randn(3, *d.pipe.latent_shape, generator=torch.Generator().manual_seed(5))
    cond = d.encode(["a red circle at the top left"] * 3)
    state = d.generator.get_state()
    x0_got, got = d._student_forward(z, cond)
    d.generator.set_state(state)
    idx = torch.randint(0, 6, (d.cfg.batch_size,), generator=d.generator)
    from wadi_cli.diffusion import one_step_x0

    with d.student() as student:
        x0_ref = one_step_x0(z, student(z, d.t_last, cond), d.cfg.alpha_bar_T, d.denoiser.prediction_type)
        zp = d.pairs["z"][idx]
        cond_p = d.pipe.prompt_encoder([d.pairs["prompts"][i] for i in idx.tolist()])
        x0 = one_step_x0(zp, student(zp, d.t_last, cond_p), d.cfg.alpha_bar_T, d.denoiser.prediction_type)
    expected = 0.5 * ((x0 - d.pairs["x0"][idx]) ** 2).mean()
    # batch 3+2 vs 3 and 2: float order, amplified 1/sqrt(ᾱ_T) ≈ 15× by the one-step x0
    torch.testing.assert_close(x0_got, x0_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)
    assert got.requires_grad and x0_got.requires_grad  # both feed the student's update
    off, _ = _distiller(pipe_dir)
    assert off.pairs is None


def test_resume_with_the_regression_term_is_bit_identical(pipe_dir, tmp_path):
    kw = dict(regression_weight=0.5, regression_pairs=6, regression_steps=2)
    straight, split = tmp_path / "straight", tmp_path / "split"
    distill(_cfg(pipe_dir, max_steps=3, **kw), straight)
    distill(_cfg(pipe_dir, max_steps=2, checkpoint_every=2, **kw), split)
    distill(config_for_run(split, "latest", None, {"max_steps": 3}), split, resume="latest")
    a, b = _adapters(straight), _adapters(split)
    for k, v in a.adapters["student"].items():
        assert torch.equal(v, b.adapters["student"][k]), k


@pytest.mark.parametrize(
    ("kind", "extra"),
    [("dora-frozen-norm", {}), ("orthogonal", {"orthogonal_map": "householder"})],
)
def test_new_student_kinds_resume_bit_identically(pipe_dir, tmp_path, kind, extra):
    """--adapter dora-frozen-norm / orthogonal: a run split at step 2 ends where a straight
    3-step run ends (adapters, optimizer state), and the student moved."""
    kw = dict(adapter=kind, rank=2, lr=1e-2, ema_decay=0.0, **extra)
    straight = tmp_path / "straight"
    distill(_cfg(pipe_dir, max_steps=3, **kw), straight)
    split = tmp_path / "split"
    distill(_cfg(pipe_dir, max_steps=2, checkpoint_every=1, **kw), split)
    distill(config_for_run(split, "latest", None, {"max_steps": 3}), split, resume="latest")
    a, b = _adapters(straight), _adapters(split)
    assert a.step == b.step == 3 and a.config["adapter"] == kind
    for name in ("student", "fake"):
        assert sorted(a.adapters[name]) == sorted(b.adapters[name])
        for k, v in a.adapters[name].items():
            assert torch.equal(v, b.adapters[name][k]), (name, k)
        for idx, st in a.optimizers[name]["state"].items():
            for k, v in st.items():
                assert torch.equal(torch.as_tensor(v), torch.as_tensor(b.optimizers[name]["state"][idx][k]))
    if kind == "orthogonal":  # torch's trained matrix starts at −I
        moved = [(v + torch.eye(v.shape[0])).abs().max() for v in a.adapters["student"].values()]
    else:  # lora_B starts at 0; the magnitude is not in the file
        assert not any("magnitude" in k for k in a.adapters["student"])
        moved = [v.abs().max() for k, v in a.adapters["student"].items() if "lora_B" in k]
    assert max(moved) > 0
