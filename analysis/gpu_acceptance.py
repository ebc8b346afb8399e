"""GPU acceptance: every CUDA path of wadi in one run, on one GPU, in under 8 minutes.

Steps (each records status, seconds, numbers and notes; a failed step does not stop
the others, and the exit code is non-zero when any step failed):

1. ``distill``: ``wadi distill -b tiny`` with ``--mixed-precision fp16`` and ``bf16``:
   a straight run S (2k steps, a checkpoint at k), a run R resumed from S's step-k
   checkpoint into a fresh folder; every logged loss finite, R against S (rule below).
2. ``accelerate``: the same straight run through ``accelerate launch --num_processes 1
   -m wadi_cli distill …`` (run A), compared with S by the same rule.
3. ``sample_compile``: a random-weight SD2.1-base pipeline built from the shipped U-Net
   config (VAE, OpenCLIP-sized text encoder and scheduler from the configs below, the tiny
   tokenizer; nothing is downloaded) with a random LoRaD adapter: ms per image at 512 px,
   batch 1, VAE decode included, eager vs ``torch.compile``; then ``wadi sample --compile``.
4. ``analyze``: ``wadi analyze --device cuda`` on an SD2.1-base-sized teacher/student pair
   (random weights written to fp16 safetensors; the student's rows are perturbed).
5. ``bench_train_step``: ``analysis/train_step/bench_train_step.py --device cuda --dtype bf16
   --resolution 512 --batch 16`` (ours / hooks / LoRA).
6. ``bench_layer``: ``analysis/lorad_precision/bench_layer.py --device cuda`` in bf16 and
   fp16: what LoRaD's ``exact_low_precision`` path (two weight halves, doubled inner size)
   costs against the default rounded matmul and an fp32 matmul, on SD / PixArt shapes.
7. ``sdxl_memory``: ``wadi distill -b sdxl`` steps at 1024 px (fp16, gradient checkpointing,
   batch 1 and 2) on the real architecture (real weights from the hub cache, else random
   weights of the real config): ``torch.cuda.max_memory_allocated`` and seconds per step
   against the memory model's prediction (``analysis/sdxl_memory/run.py``'s ``gpu_block``;
   writing a random-weight folder and loading it take a minute or two beyond the budget).

Resume and accelerate tolerance. On the CPU every kernel is deterministic and the check
is bit-identity of the final adapters and of every logged loss (what
tests/distill/test_trainer.py asserts). On CUDA the restored state and the step's random
draws are bit-identical too (the checkpoint holds the adapters, AdamW and GradScaler
states; the draws come from the run's CPU generator), and forward kernels are
deterministic for identical inputs on one GPU, so the first step after the checkpoint
(or the first step of run A) must give the same losses to 1e-3 relative: room for a
nondeterministic reduction, whose effect on a mean over a whole batch is far smaller,
while a resume that lost the RNG state or the data position draws other noise and
prompts (the fake-score loss moves by tens of % from one step to the next). Backward
kernels on CUDA (attention, convolution input gradients, index ops) accumulate with
atomics, so the following steps drift; AdamW normalises every update to about the
learning rate, so entries whose gradient is near zero can flip, but in norm that drift
is a small part of what was learned. So the learned angles must agree to 5 %:
``‖Θ_R − Θ_S‖ ≤ 0.05 ‖Θ_S‖`` with ``Θ = A B`` over every adapted layer (zero at
initialisation), for the student and the fake score. A resume without its AdamW state
(a fresh Adam's first steps are ≈ lr · sign(g)) or on other data changes the update of
the resumed steps by a large fraction of itself, far above 5 % at k = half the run.
Whether the adapters came out bit-identical anyway is recorded.

    python analysis/gpu_acceptance.py                          # one CUDA GPU, < 8 minutes
    python analysis/gpu_acceptance.py --device cpu --tiny      # toy sizes on the CPU
    python analysis/gpu_acceptance.py --dry-run                # print the plan, run nothing

Writes ``analysis/results/gpu_acceptance.json`` and ``.md`` (``gpu_acceptance_cpu_tiny``
in ``--tiny`` mode; ``--results DIR`` moves both), with device, versions and date.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime as dt
import importlib.util
import io
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "analysis" / "results"
STEPS: tuple[str, ...] = (
    "distill", "accelerate", "sample_compile", "analyze", "bench_train_step", "bench_layer", "sdxl_memory"
)  # fmt: skip
BUDGET_S = 480.0
RESUME_LOSS_RTOL = 1e-3
THETA_RTOL = 0.05
PROMPT = "a photo of a red fox in the snow"

#: SD2.1-base's VAE (AutoencoderKL, 4 latent channels, factor 8) and OpenCLIP ViT-H/14
#: text tower sizes, as in the hub repo's ``vae/config.json`` / ``text_encoder/config.json``.
SD_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[128, 256, 512, 512],
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=32,
    sample_size=512,
    scaling_factor=0.18215,
)
OPENCLIP_H_TEXT = dict(
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=23,
    num_attention_heads=16,
    max_position_embeddings=77,
    hidden_act="gelu",
    projection_dim=512,
)
SD21_SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    steps_offset=1,
    skip_prk_steps=True,
    set_alpha_to_one=False,
    prediction_type="epsilon",
)


@dataclass
class Context:
    """Where and at which size the steps run."""

    device: str
    tiny: bool
    work: Path
    in_process: bool
    notes: list[str] = field(default_factory=list)

    @property
    def cuda(self) -> bool:
        return self.device.startswith("cuda")


# ---- running wadi ----------------------------------------------------------------------
def wadi(ctx: Context, args: list[str], launcher: list[str] | None = None) -> dict[str, Any]:
    """Run ``wadi ARGS``: a fresh ``python -m wadi_cli`` process (or under ``launcher``), or,
    with ``ctx.in_process``, the same Typer command in this process. Returns the exit code,
    seconds and the tails of stdout / stderr."""
    t0 = time.perf_counter()
    if ctx.in_process and launcher is None:
        rc, out, err = _wadi_here(args)
    else:
        cmd = [*(launcher or [sys.executable, "-m", "wadi_cli"]), *args]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
        rc, out, err = proc.returncode, proc.stdout, proc.stderr
    return {"rc": rc, "seconds": time.perf_counter() - t0, "stdout": out, "stderr": err[-4000:]}


def _wadi_here(args: list[str]) -> tuple[int, str, str]:
    import click
    from typer.main import get_command

    from wadi_cli.cli.main import app

    out, err = io.StringIO(), io.StringIO()
    threads = torch.get_num_threads()
    rc = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            ret = get_command(app).main(args=args, prog_name="wadi", standalone_mode=False)
            rc = ret if isinstance(ret, int) else 0
        except click.exceptions.Exit as exc:
            rc = exc.exit_code
        except click.ClickException as exc:
            rc = exc.exit_code
            err.write(exc.format_message())
        except SystemExit as exc:
            rc = exc.code if isinstance(exc.code, int) else 1
        except Exception:
            rc = 1
            err.write(traceback.format_exc())
        finally:
            torch.set_num_threads(threads)
    return rc, out.getvalue(), err.getvalue()


def _need(result: dict[str, Any], what: str) -> None:
    if result["rc"] != 0:
        tail = (result["stderr"] or result["stdout"]).strip().splitlines()[-3:]
        raise StepFailed(f"{what} exited with {result['rc']}: {' | '.join(tail)}")


class StepFailed(Exception):
    """A check of a step did not hold (the message says which)."""


# ---- 1-2. tiny distillation: fp16 / bf16, resume, accelerate ---------------------------
def distill_sizes(ctx: Context) -> tuple[int, list[str]]:
    """(checkpoint step k, size flags): the run is 2k steps. The regression term's
    teacher pairs are few (and, in ``--tiny`` mode, 2-step: a config file sets that)."""
    if not ctx.tiny:
        return 10, ["--regression-pairs", "128"]
    toml = ctx.work / "tiny-sizes.toml"
    if not toml.is_file():
        ctx.work.mkdir(parents=True, exist_ok=True)
        toml.write_text("regression-steps = 2\n")
    return 1, ["--config", str(toml), "--batch-size", "2", "--regression-pairs", "2"]


def distill_args(ctx: Context, out: Path, precision: str, resume: Path | None = None) -> list[str]:
    k, sizes = distill_sizes(ctx)
    args = ["distill", "-b", "tiny", "--out", str(out), "--device", ctx.device, "--mixed-precision",
            precision, "--max-steps", str(2 * k), "--checkpoint-every", str(k), "--keep-last", "2",
            "--validate-every", "0", "--no-tensorboard", *sizes]  # fmt: skip
    if resume is not None:
        args += ["--resume", str(resume)]
    return args


def _losses(run: Path) -> list[dict[str, float]]:
    with (run / "metrics.csv").open(newline="") as fh:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(fh)]


def _thetas(ckpt: Path, role: str) -> dict[str, torch.Tensor]:
    from wadi_cli.lorad import load_adapter
    from wadi_cli.lorad.layer import lorad_theta

    tensors = load_adapter(ckpt / f"{role}.safetensors")[0]
    paths = sorted({k.rsplit(".", 1)[0] for k in tensors})
    return {p: lorad_theta(tensors[f"{p}.lorad_A"], tensors[f"{p}.lorad_B"]) for p in paths}


def compare_runs(ref: Path, other: Path, first_step: int, cuda: bool) -> dict[str, Any]:
    """``other`` (resumed at ``first_step - 1``, or run A from the start) against ``ref``
    by the rule in the module docstring. Raises :class:`StepFailed` when it does not hold."""
    from wadi_cli.distill.checkpoint import list_checkpoints
    from wadi_cli.io import open_checkpoint

    rows_ref, rows_other = _losses(ref), _losses(other)
    for name, rows in (("reference", rows_ref), ("compared", rows_other)):
        bad = [r["step"] for r in rows if not all(math.isfinite(r[k]) for k in ("loss_g", "loss_fake"))]
        if bad:
            raise StepFailed(f"{name} run has non-finite losses at steps {bad[:5]}")
    by_step = {int(r["step"]): r for r in rows_ref}
    first = next(r for r in rows_other if int(r["step"]) == first_step)
    loss_rel = {
        k: abs(first[k] - by_step[first_step][k]) / max(abs(by_step[first_step][k]), 1e-12)
        for k in ("loss_g", "loss_fake")
    }
    ckpt_ref, ckpt_other = list_checkpoints(ref)[-1], list_checkpoints(other)[-1]
    if ckpt_ref.name != ckpt_other.name:
        raise StepFailed(f"final checkpoints differ: {ckpt_ref.name} vs {ckpt_other.name}")
    theta_rel, identical = {}, True
    for role in ("student", "fake"):
        a, b = _thetas(ckpt_ref, role), _thetas(ckpt_other, role)
        num = sum(float((b[p] - a[p]).double().square().sum()) for p in a)
        den = sum(float(a[p].double().square().sum()) for p in a)
        theta_rel[role] = (num / den) ** 0.5 if den > 0 else (0.0 if num == 0 else float("inf"))
        with (
            open_checkpoint(ckpt_ref / f"{role}.safetensors") as x,
            open_checkpoint(ckpt_other / f"{role}.safetensors") as y,
        ):
            identical &= all(torch.equal(x.get(k), y.get(k)) for k in x)
    same_losses = [r["loss_g"] for r in rows_other] == [by_step[int(r["step"])]["loss_g"] for r in rows_other]
    out = {
        "first_step_loss_rel_diff": loss_rel,
        "theta_rel_diff": theta_rel,
        "adapters_bit_identical": identical,
        "losses_bit_identical": same_losses,
    }
    if not cuda:
        if not (identical and same_losses):
            raise StepFailed(f"CPU runs must be bit-identical: {out}")
        return out
    if max(loss_rel.values()) > RESUME_LOSS_RTOL:
        raise StepFailed(f"first-step losses differ by more than {RESUME_LOSS_RTOL:g} relative: {loss_rel}")
    if max(theta_rel.values()) > THETA_RTOL:
        raise StepFailed(f"learned angles differ by more than {THETA_RTOL:.0%}: {theta_rel}")
    return out


def step_distill(ctx: Context) -> dict[str, Any]:
    k, _ = distill_sizes(ctx)
    details: dict[str, Any] = {}
    for precision in ("fp16", "bf16"):
        straight, resumed = ctx.work / f"distill-{precision}-S", ctx.work / f"distill-{precision}-R"
        r1 = wadi(ctx, distill_args(ctx, straight, precision))
        _need(r1, f"{precision} straight run")
        ckpt = straight / "checkpoints" / f"step-{k:08d}"
        r2 = wadi(ctx, distill_args(ctx, resumed, precision, resume=ckpt))
        _need(r2, f"{precision} resumed run")
        cmp = compare_runs(straight, resumed, k + 1, ctx.cuda)
        details[precision] = {
            "straight_s": round(r1["seconds"], 1),
            "resumed_s": round(r2["seconds"], 1),
            "steps": 2 * k,
            "final_loss_g": _losses(straight)[-1]["loss_g"],
            "resume_vs_straight": cmp,
        }
    return details


def step_accelerate(ctx: Context) -> dict[str, Any]:
    # this interpreter's accelerate, not the first `accelerate` on PATH (another environment's)
    launcher = [sys.executable, "-m", "wadi_cli.distill.launch"]
    launcher += ["launch", "--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no",
                 "--dynamo_backend", "no", "-m", "wadi_cli"]  # fmt: skip
    if not ctx.cuda:
        launcher.insert(launcher.index("launch") + 1, "--cpu")
    details: dict[str, Any] = {}
    for precision in ("fp16", "bf16"):
        straight = ctx.work / f"distill-{precision}-S"
        if not (straight / "metrics.csv").is_file():
            r0 = wadi(ctx, distill_args(ctx, straight, precision))
            _need(r0, f"{precision} straight run")
        launched = ctx.work / f"distill-{precision}-A"
        r = wadi(ctx, distill_args(ctx, launched, precision), launcher=launcher)
        _need(r, f"accelerate launch ({precision})")
        details[precision] = {
            "seconds": round(r["seconds"], 1),
            "vs_straight": compare_runs(straight, launched, 1, ctx.cuda),
        }
    return details


# ---- 3. sampling on the SD2.1 architecture, eager vs compiled ---------------------------
def _bench_train_step():
    """``analysis/train_step/bench_train_step.py`` as a module (it is a script)."""
    if "bench_train_step" in sys.modules:
        return sys.modules["bench_train_step"]
    path = REPO / "analysis" / "train_step" / "bench_train_step.py"
    spec = importlib.util.spec_from_file_location("bench_train_step", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_train_step"] = module
    spec.loader.exec_module(module)
    return module


def unet_config(ctx: Context) -> dict[str, Any]:
    """The shipped SD2.1-base U-Net config (toy-sized in ``--tiny`` mode)."""
    bts = _bench_train_step()
    if not ctx.tiny:
        return bts.sd21_unet_config()
    cfg = bts.sd21_unet_config(blocks=2, width_div=8, layers_per_block=1, cross_attention_dim=32)
    # attention at the lower level only: 4096-token attention at 512 px costs seconds on a CPU
    cfg["down_block_types"] = cfg["down_block_types"][::-1]
    cfg["up_block_types"] = cfg["up_block_types"][::-1]
    return cfg


def build_sd21_pipeline(ctx: Context, folder: Path, dtype: torch.dtype) -> tuple[Path, Path]:
    """A random-weight SD2.1-base pipeline folder and a random LoRaD student adapter for it."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from wadi_cli.backbones import get_backbone
    from wadi_cli.lorad import LoRaDConfig, save_adapter
    from wadi_cli.tiny import TINY_PIPELINE_DIR

    torch.manual_seed(0)
    ucfg = unet_config(ctx)
    unet = UNet2DConditionModel.from_config(ucfg)
    vae_cfg = dict(SD_VAE)
    text_cfg = dict(OPENCLIP_H_TEXT)
    if ctx.tiny:
        vae_cfg.update(block_out_channels=[8, 8, 8, 8], layers_per_block=1, norm_num_groups=4)
        text_cfg.update(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    tok_dir = folder.parent / "tokenizer-src"
    shutil.copytree(Path(TINY_PIPELINE_DIR) / "tokenizer", tok_dir, dirs_exist_ok=True)
    tokenizer = CLIPTokenizer.from_pretrained(str(tok_dir), model_max_length=77)
    text_cfg["projection_dim"] = min(text_cfg["projection_dim"], text_cfg["hidden_size"])
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), **ids, **text_cfg))
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL(**vae_cfg),
        text_encoder=text,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=PNDMScheduler(**SD21_SCHEDULER),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    ).to(dtype=dtype)
    pipe.save_pretrained(str(folder), safe_serialization=True)
    targets = get_backbone("sd21").target_modules(unet, "student")
    g = torch.Generator().manual_seed(1)
    tensors = {}
    linears = dict(unet.named_modules())
    for path in targets:
        m, n = linears[path].weight.shape
        tensors[f"{path}.lorad_A"] = torch.randn(m, 4, generator=g) * 1e-2
        tensors[f"{path}.lorad_B"] = torch.randn(4, n // 2, generator=g) * 1e-1
    config = LoRaDConfig(rank=4, targets=tuple(targets), backbone="sd21")
    adapter = save_adapter(folder.parent / "student.safetensors", tensors, config)
    return folder, adapter


def step_sample_compile(ctx: Context) -> dict[str, Any]:
    from wadi_cli.pipeline import load_pipeline
    from wadi_cli.pipeline.generation import generate
    from wadi_cli.pipeline.settings import SampleConfig

    dtype = torch.float16 if ctx.cuda else torch.float32
    t0 = time.perf_counter()
    folder, adapter = build_sd21_pipeline(ctx, ctx.work / "sd21" / "pipeline", dtype)
    details: dict[str, Any] = {"build_s": round(time.perf_counter() - t0, 1), "dtype": str(dtype)[6:]}
    images, cli_images = (2, 1) if ctx.tiny else (6, 2)
    with _dynamo_disabled(not ctx.cuda):
        if not ctx.cuda:
            ctx.notes.append(
                "sample_compile: torch.compile disabled on the CPU (TORCHDYNAMO_DISABLE): inductor's C++ "
                "build alone takes minutes; the --compile code path still runs, both timings are eager"
            )
        for mode in ("eager", "compiled"):
            sampler = load_pipeline(
                "sd21", model=folder, weights=adapter, device=torch.device(ctx.device), dtype=dtype,
                compile=mode == "compiled",
            )  # fmt: skip
            gen = generate(sampler, [PROMPT] * images, SampleConfig(batch_size=1))
            steady = gen.timings[1:]
            details[mode] = {
                "first_image_s": round(gen.timings[0], 3),
                "ms_per_image_median": round(1000 * statistics.median(steady), 2),
                "images_timed": len(steady),
                "resolution": int(gen.images.shape[1]),
            }
            del sampler
            _free(ctx)
        env = {"TORCHDYNAMO_DISABLE": "1"} if not ctx.cuda else {}
        with _env(env):
            out = ctx.work / "sd21" / "samples"
            r = wadi(ctx, ["sample", PROMPT, "-b", "sd21", "--model", str(folder), "-w", str(adapter),
                           "--device", ctx.device, "--dtype", "fp16" if ctx.cuda else "fp32", "--compile",
                           "-n", str(cli_images), "--batch-size", "1", "--out", str(out)])  # fmt: skip
    _need(r, "wadi sample --compile")
    pngs = sorted(p.name for p in out.glob("0*.png"))
    if len(pngs) != cli_images:
        raise StepFailed(f"wadi sample --compile wrote {pngs}, expected {cli_images} images")
    details["cli_compile_s"] = round(r["seconds"], 1)
    details["speedup_compiled"] = round(
        details["eager"]["ms_per_image_median"] / details["compiled"]["ms_per_image_median"], 3
    )
    return details


@contextlib.contextmanager
def _dynamo_disabled(disable: bool):
    import torch._dynamo

    before = torch._dynamo.config.disable
    torch._dynamo.config.disable = disable or before
    try:
        yield
    finally:
        torch._dynamo.config.disable = before


@contextlib.contextmanager
def _env(values: dict[str, str]):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _free(ctx: Context) -> None:
    import gc

    gc.collect()
    if ctx.cuda:
        torch.cuda.empty_cache()


# ---- 4. analyze on an SD2.1-sized pair --------------------------------------------------
def build_pair(ctx: Context, folder: Path) -> tuple[Path, Path, int]:
    """Teacher = a random SD2.1-base U-Net; student = the same with every weight row nudged
    (direction and a little norm). fp16 on CUDA (half the bytes to write and read)."""
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    dev = torch.device(ctx.device)
    dtype = torch.float16 if ctx.cuda else torch.float32
    with dev:
        unet = UNet2DConditionModel.from_config(unet_config(ctx))
    teacher = {k: v.detach().to(dtype).contiguous() for k, v in unet.state_dict().items()}
    del unet
    g = torch.Generator(device=dev).manual_seed(1)
    student = {}
    for k, v in teacher.items():
        if v.ndim >= 2:
            noise = torch.randn(v.shape, generator=g, device=dev, dtype=torch.float32)
            w = v.float()
            student[k] = (w + 0.02 * noise * w.std().clamp_min(1e-3)).to(dtype)
        else:
            student[k] = v
    params = sum(v.numel() for v in teacher.values())
    t_path, s_path = folder / "teacher.safetensors", folder / "student.safetensors"
    save_file({k: v.cpu() for k, v in teacher.items()}, str(t_path))
    save_file({k: v.cpu() for k, v in student.items()}, str(s_path))
    return t_path, s_path, params


def step_analyze(ctx: Context) -> dict[str, Any]:
    t0 = time.perf_counter()
    teacher, student, params = build_pair(ctx, ctx.work / "pair")
    build_s = time.perf_counter() - t0
    _free(ctx)
    r = wadi(ctx, ["analyze", str(teacher), str(student), "--device", ctx.device, "--json"])
    _need(r, "wadi analyze")
    summary = json.loads(_wadi_json(r["stdout"]))
    overall = summary["overall"]
    if not overall["layers"] or not math.isfinite(overall["direction_change_mean"]):
        raise StepFailed(f"wadi analyze gave no finite result: {overall}")
    return {
        "params_per_model": params,
        "build_s": round(build_s, 1),
        "analyze_s": round(r["seconds"], 1),
        "layers": overall["layers"],
        "direction_change_mean": overall["direction_change_mean"],
    }


def _wadi_json(text: str) -> str:
    return text[text.index("{") : text.rindex("}") + 1]


# ---- 5. training-step benchmark ---------------------------------------------------------
def _run_script(script: Path, argv: list[str]) -> None:
    """Run an analysis script in a fresh process; a non-zero exit is a failed step."""
    proc = subprocess.run([sys.executable, str(script), *argv], capture_output=True, text=True, cwd=REPO)
    if proc.returncode:
        raise StepFailed(f"{script.name} exited with {proc.returncode}: {proc.stderr[-500:]}")


def bench_argv(ctx: Context, out: Path) -> list[str]:
    if ctx.tiny:
        return ["--device", "cpu", "--dtype", "fp32", "--resolution", "32", "--batch", "1", "--blocks", "2",
                "--width-div", "8", "--rank", "8", "--fake-rank", "4", "--repeats", "1", "--warmup", "0",
                "--rounds", "1", "--out", str(out)]  # fmt: skip
    return ["--device", "cuda", "--dtype", "bf16", "--resolution", "512", "--batch", "16", "--out", str(out)]


def step_bench_train_step(ctx: Context, results: Path) -> dict[str, Any]:
    out = ctx.work / "bench_tiny.json" if ctx.tiny else results / "gpu_acceptance_bench_train_step.json"
    argv = bench_argv(ctx, out)
    if ctx.in_process:  # the workers' own function, without fresh processes (toy sizes)
        bts = _bench_train_step()
        args = bts.parse_args(argv)
        threads = torch.get_num_threads()
        try:
            runs = {v: [bts.run_variant(v, args)] for v in bts.VARIANTS}
        finally:
            torch.set_num_threads(threads)
        summary = bts.summarise(runs, ctx.cuda)
        ctx.notes.append(
            "bench_train_step: in-process at toy size (the script's own runs use fresh processes)"
        )
    else:
        _run_script(REPO / "analysis" / "train_step" / "bench_train_step.py", argv)
        summary = json.loads(out.read_text())
    table = {
        v: {"median_step_s": row["median_step_s"], "peak_memory_gb": row["peak_memory_gb"]}
        for v, row in summary["variants"].items()
    }
    return {"variants": table, "ratios": summary["ratios"], "targets_met": summary["targets_met"],
            "command": "python analysis/train_step/bench_train_step.py " + " ".join(argv)}  # fmt: skip


# ---- 6. LoRaD layer precision/cost benchmark ---------------------------------------------
def bench_layer_argv(ctx: Context, dtype: str, out: Path) -> list[str]:
    argv = ["--device", ctx.device, "--dtype", dtype, "--results", str(out)]
    return argv + (["--only", "text", "--rounds", "1"] if ctx.tiny else ["--rounds", "7"])


def step_bench_layer(ctx: Context, results: Path) -> dict[str, Any]:
    script = REPO / "analysis" / "lorad_precision" / "bench_layer.py"
    out = ctx.work / "bench_layer" if ctx.tiny else REPO / "analysis" / "lorad_precision" / "results"
    details: dict[str, Any] = {}
    for dtype in ("bf16", "fp16"):
        argv = bench_layer_argv(ctx, dtype, out)
        if ctx.in_process:
            spec = importlib.util.spec_from_file_location("bench_layer", script)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            threads = torch.get_num_threads()
            try:
                with contextlib.redirect_stdout(io.StringIO()):
                    doc = module.main(argv)
            finally:
                torch.set_num_threads(threads)
        else:
            _run_script(script, argv)
            doc = json.loads((out / f"bench_layer_{ctx.device}_{dtype}.json").read_text())
        rows = doc["rows"]
        details[dtype] = {
            v: {k: round(sum(r[v][k] for r in rows), 2) for k in ("train_ms", "forward_ms")}
            for v in ("rounded", "exact", "fp32")
        }
    return details


# ---- 7. SDXL memory: predicted vs measured --------------------------------------------
def step_sdxl_memory(ctx: Context) -> dict[str, Any]:
    """``analysis/sdxl_memory/run.py``'s ``gpu_block`` (a script: loaded by path)."""
    import importlib.util

    path = REPO / "analysis" / "sdxl_memory" / "run.py"
    spec = importlib.util.spec_from_file_location("sdxl_memory_run", path)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module.gpu_block(ctx.device, ctx.tiny, ctx.work)


# ---- driver -----------------------------------------------------------------------------
def environment(device: str) -> dict[str, Any]:
    """Device, versions and date."""
    import wadi_cli
    from wadi_cli.machine import machine_info

    info: dict[str, Any] = {
        **machine_info(),
        "date_utc": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": device,
        "wadi": wadi_cli.__version__,
        "platform": platform.platform(),
    }
    for name in ("diffusers", "transformers", "accelerate", "peft", "safetensors"):
        with contextlib.suppress(Exception):
            info[name] = __import__(name).__version__
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_gb=round(props.total_memory / 1e9, 1),
                    cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version())  # fmt: skip
    with contextlib.suppress(Exception):
        git = ["git", "rev-parse", "--short", "HEAD"]
        info["commit"] = subprocess.run(git, cwd=REPO, capture_output=True, text=True).stdout.strip()
    return info


def plan(ctx: Context) -> list[str]:
    """The commands the steps run (for ``--dry-run`` and the report)."""
    k, _ = distill_sizes(ctx)
    w = ctx.work
    lines = []
    for p in ("fp16", "bf16"):
        lines.append("wadi " + " ".join(distill_args(ctx, w / f"distill-{p}-S", p)))
        ckpt = w / f"distill-{p}-S" / "checkpoints" / f"step-{k:08d}"
        lines.append("wadi " + " ".join(distill_args(ctx, w / f"distill-{p}-R", p, resume=ckpt)))
        launched = distill_args(ctx, w / f"distill-{p}-A", p)
        lines.append("accelerate launch --num_processes 1 -m wadi_cli " + " ".join(launched))
    lines.append(f"wadi sample '{PROMPT}' -b sd21 --model {w}/sd21/pipeline -w {w}/sd21/student.safetensors "
                 f"--device {ctx.device} --compile -n 2 --batch-size 1 --out {w}/sd21/samples")  # fmt: skip
    lines.append(
        f"wadi analyze {w}/pair/teacher.safetensors {w}/pair/student.safetensors --device {ctx.device} --json"
    )
    lines.append("python analysis/train_step/bench_train_step.py " + " ".join(bench_argv(ctx, RESULTS / "…")))
    for dtype in ("bf16", "fp16"):
        argv = bench_layer_argv(ctx, dtype, REPO / "analysis" / "lorad_precision" / "results")
        lines.append("python analysis/lorad_precision/bench_layer.py " + " ".join(argv))
    lines.append(
        f"sdxl_memory: wadi distill -b sdxl steps, batch 1 and 2, on {ctx.device} (analysis/sdxl_memory)"
    )
    return lines


def markdown(doc: dict[str, Any]) -> str:
    env = doc["environment"]
    dev = env.get("gpu", env["cpu"])
    lines = [
        "# GPU acceptance" + (" (CPU, toy sizes: not a GPU measurement)" if doc["tiny"] else ""),
        "",
        f"{env['date_utc']} · {doc['device']} ({dev}) · torch {env['torch']} · diffusers "
        f"{env.get('diffusers')} · transformers {env.get('transformers')} · accelerate "
        f"{env.get('accelerate')} · wadi {env['wadi']} (commit {env.get('commit')}) · "
        f"total {doc['total_s']:.0f} s (budget {BUDGET_S:.0f} s: "
        f"{'within' if doc['total_s'] <= BUDGET_S else 'OVER'})",
        "",
        "| step | status | wall s | CPU s | result |",
        "|---|---|---|---|---|",
    ]
    for name, step in doc["steps"].items():
        result = step.get("error") or json.dumps(step.get("details", {}), separators=(",", ":"))[:600]
        lines.append(
            f"| {name} | {step['status']} | {step.get('seconds', 0):.1f} | {step.get('cpu_seconds', 0):.1f} "
            f"| `{result}` |"
        )
    if doc["notes"]:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in doc["notes"]]
    lines += ["", "Command: `" + doc["command"] + "`"]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", help="cuda (the acceptance run) or cpu (with --tiny)")
    p.add_argument("--tiny", action="store_true", help="toy sizes (the CPU check of the script itself)")
    p.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    p.add_argument("--skip", nargs="*", default=[], choices=STEPS, help="steps to leave out")
    p.add_argument(
        "--in-process", action="store_true", help="run wadi commands in this process (--tiny: always)"
    )
    p.add_argument("--results", type=Path, default=RESULTS, help="folder of the JSON + markdown")
    p.add_argument("--workdir", type=Path, default=None, help="keep the runs here (default: a temp folder)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.dry_run:
        work = args.workdir or Path(tempfile.gettempdir()) / "wadi-gpu-acc"
        print("\n".join(plan(Context(args.device, args.tiny, work, args.in_process or args.tiny))))
        return 0
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(
            "gpu_acceptance: no CUDA device is visible (torch.cuda.is_available() is False); run it on a "
            "machine with a GPU, or check the script itself with --device cpu --tiny",
            file=sys.stderr,
        )
        return 2
    if not args.device.startswith("cuda") and not args.tiny:
        print("gpu_acceptance: --device cpu needs --tiny (full sizes are for the GPU)", file=sys.stderr)
        return 2
    with contextlib.ExitStack() as stack:
        work = args.workdir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="wadi-gpu-acc-")))
        work.mkdir(parents=True, exist_ok=True)
        ctx = Context(args.device, args.tiny, work, args.in_process or args.tiny)
        return run_all(ctx, args, argv)


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (user + system)."""
    import resource

    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def run_all(ctx: Context, args: argparse.Namespace, argv: list[str] | None) -> int:
    runners: dict[str, Callable[[], dict[str, Any]]] = {
        "distill": lambda: step_distill(ctx),
        "accelerate": lambda: step_accelerate(ctx),
        "sample_compile": lambda: step_sample_compile(ctx),
        "analyze": lambda: step_analyze(ctx),
        "bench_train_step": lambda: step_bench_train_step(ctx, args.results),
        "bench_layer": lambda: step_bench_layer(ctx, args.results),
        "sdxl_memory": lambda: step_sdxl_memory(ctx),
    }
    t_start = time.perf_counter()
    steps: dict[str, Any] = {}
    for name, fn in runners.items():
        if name in args.skip:
            steps[name] = {"status": "skipped", "seconds": 0.0}
            continue
        t0, c0 = time.perf_counter(), _cpu_seconds()
        try:
            steps[name] = {"status": "ok", "details": fn()}
        except StepFailed as exc:
            steps[name] = {"status": "FAILED", "error": str(exc)}
        except Exception as exc:  # a crash is a failed step too; keep going
            steps[name] = {"status": "FAILED", "error": f"{type(exc).__name__}: {exc}",
                           "traceback": traceback.format_exc()[-3000:]}  # fmt: skip
        steps[name]["seconds"] = round(time.perf_counter() - t0, 1)
        steps[name]["cpu_seconds"] = round(_cpu_seconds() - c0, 1)
        print(f"{name}: {steps[name]['status']} ({steps[name]['seconds']:.0f} s)", flush=True)
        _free(ctx)
    stem = "gpu_acceptance_cpu_tiny" if ctx.tiny else "gpu_acceptance"
    cmd = "python analysis/gpu_acceptance.py " + " ".join(argv if argv is not None else sys.argv[1:])
    doc = {
        "device": ctx.device,
        "tiny": ctx.tiny,
        "command": cmd.strip(),
        "environment": environment(ctx.device),
        "total_s": round(time.perf_counter() - t_start, 1),
        "budget_s": BUDGET_S,
        "tolerances": {"resume_first_step_loss_rtol": RESUME_LOSS_RTOL, "theta_rtol": THETA_RTOL},
        "steps": steps,
        "notes": ctx.notes,
        "plan": plan(ctx),
    }
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / f"{stem}.json").write_text(json.dumps(doc, indent=2) + "\n")
    (args.results / f"{stem}.md").write_text(markdown(doc))
    print(markdown(doc))
    failed = [n for n, s in steps.items() if s["status"] == "FAILED"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
