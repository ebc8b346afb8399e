"""CPU latency of the tiny model: one-step generation vs the 25-step teacher.

End-to-end ``wadi_cli.pipeline.generate`` (prompt encoding, denoiser call(s), VAE decode),
fp32 on the CPU, for one image and for a batch of 16. The teacher uses DDIM with
classifier-free guidance (conditional and unconditional halves in one forward, so each
of its 25 steps runs the U-Net on twice the batch). Every setting is warmed up
(``--warmup`` runs, excluded) and then timed ``--repeats`` times; the median is kept.

The trained tiny pipeline is used when it is shipped (``wadi_cli/assets/tiny/pipeline``),
else a randomly initialised one with the same architecture (latency does not depend on
the weights' values); the results say which. Results, with machine, torch version,
thread count and date, go to ``analysis/results/bench_sample.json`` and ``.md``.

    python analysis/bench_sample.py                  # 1 warm-up, 5 timed runs each
    python analysis/bench_sample.py --repeats 9 --threads 2
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "analysis" / "results" / "bench_sample.json"
PROMPT = "a red circle at the top left"


def _load(tmp: Path):
    from wadi_cli.pipeline import load_pipeline
    from wadi_cli.tiny import build_tiny_components, save_tiny_pipeline, tiny_pipeline_available

    if tiny_pipeline_available():
        return load_pipeline("tiny", teacher=True), "trained (shipped wadi_cli/assets/tiny/pipeline)"
    path = save_tiny_pipeline(build_tiny_components(seed=0), tmp / "pipeline")
    return load_pipeline(
        "tiny", model=path, teacher=True
    ), "random (same architecture; trained tiny not shipped)"


def _time(fn, warmup: int, repeats: int) -> dict[str, float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "runs": repeats}


def _denoiser_only(sampler, args, cfg) -> dict[str, dict[str, float]]:
    """Latents only (no text encoding, no VAE decode): the part distillation speeds up."""
    from wadi_cli.pipeline import initial_noise, one_step_latents, teacher_latents

    rows = {}
    for batch in (1, args.batch):
        cond = sampler.prompt_encoder([PROMPT] * batch)
        z = initial_noise(range(batch), sampler.latent_shape)
        one = _time(
            lambda c=cond, z=z: one_step_latents(sampler, c, z, cfg.alpha_bar_T), args.warmup, args.repeats
        )
        many = _time(
            lambda c=cond, z=z: teacher_latents(sampler, c, z, args.steps, cfg.cfg), args.warmup, args.repeats
        )
        rows[f"denoiser_only_one_step_batch{batch}"] = one
        rows[f"denoiser_only_teacher_batch{batch}"] = many
        print(f"denoiser only, batch {batch:2d}: {one['median_s']:.4f} s vs {many['median_s']:.4f} s")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = round(os.getloadavg()[0], 2)

    from wadi_cli.pipeline import SampleConfig, generate

    with tempfile.TemporaryDirectory() as tmp:
        sampler, weights = _load(Path(tmp))
        rows = {}
        for batch in (1, args.batch):
            prompts = [PROMPT] * batch
            for mode in ("one_step", "teacher"):
                cfg = SampleConfig(teacher=mode == "teacher", steps=args.steps, batch_size=batch, seed=0)
                res = _time(lambda c=cfg, p=prompts: generate(sampler, p, c), args.warmup, args.repeats)
                res["per_image_s"] = res["median_s"] / batch
                rows[f"{mode}_batch{batch}"] = res
                print(
                    f"{mode:8s} batch {batch:2d}: median {res['median_s']:.4f} s "
                    f"({res['per_image_s']:.4f} s/image)"
                )
        teacher_cfg = SampleConfig(teacher=True).resolved(sampler.backbone)
        rows.update(_denoiser_only(sampler, args, teacher_cfg))
    ratio = {
        f"batch{b}": rows[f"teacher_batch{b}"]["median_s"] / rows[f"one_step_batch{b}"]["median_s"]
        for b in (1, args.batch)
    }
    ratio_denoiser = {
        f"batch{b}": rows[f"denoiser_only_teacher_batch{b}"]["median_s"]
        / rows[f"denoiser_only_one_step_batch{b}"]["median_s"]
        for b in (1, args.batch)
    }
    result = {
        "what": "end-to-end CPU latency of wadi_cli.pipeline.generate on the tiny model (fp32): "
        "prompt encoding + denoiser + VAE decode",
        "weights": weights,
        "teacher": {"scheduler": "DDIM", "steps": args.steps, "cfg": teacher_cfg.cfg},
        "one_step": {"alpha_bar_T": teacher_cfg.alpha_bar_T, "timestep": 999},
        "warmup_runs_excluded": args.warmup,
        "results": rows,
        "speedup_teacher_over_one_step": ratio,
        "speedup_denoiser_only": ratio_denoiser,
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "loadavg_before": load_before,
            "loadavg_after": round(os.getloadavg()[0], 2),
        },
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": "python analysis/bench_sample.py "
        + " ".join(f"--{k} {v}" for k, v in vars(args).items() if k != "out" and v is not None),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    args.out.with_suffix(".md").write_text(_markdown(result, args.batch), encoding="utf-8")
    print(f"speed-up of one step over the {args.steps}-step teacher: {ratio}")
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}")


def _markdown(r: dict, batch: int) -> str:
    res = r["results"]
    lines = [
        "# Tiny model: one-step vs teacher latency (CPU)",
        "",
        f"{r['what']}. Weights: {r['weights']}. Teacher: {r['teacher']['steps']} DDIM steps, "
        f"cfg {r['teacher']['cfg']} (two halves per forward). "
        f"Median of {res['one_step_batch1']['runs']} runs "
        f"after {r['warmup_runs_excluded']} warm-up run(s).",
        "",
        "| batch | one step (s) | teacher (s) | one step per image (s) | teacher per image (s) | ratio |",
        "|---|---|---|---|---|---|",
    ]
    for b in (1, batch):
        o, t = res[f"one_step_batch{b}"], res[f"teacher_batch{b}"]
        lines.append(
            f"| {b} | {o['median_s']:.4f} | {t['median_s']:.4f} | {o['per_image_s']:.4f} | "
            f"{t['per_image_s']:.4f} | {r['speedup_teacher_over_one_step'][f'batch{b}']:.1f}x |"
        )
    lines += ["", "Denoiser only (latents; no prompt encoding, no VAE decode):", ""]
    lines += ["| batch | one step (s) | teacher (s) | ratio |", "|---|---|---|---|"]
    for b in (1, batch):
        o, t = res[f"denoiser_only_one_step_batch{b}"], res[f"denoiser_only_teacher_batch{b}"]
        lines.append(
            f"| {b} | {o['median_s']:.4f} | {t['median_s']:.4f} | "
            f"{r['speedup_denoiser_only'][f'batch{b}']:.1f}x |"
        )
    m = r["machine"]
    lines += [
        "",
        f"Machine: {m['platform']}, {m['processor']}, {m['cpu_count']} CPUs, "
        f"{m['torch_threads']} torch threads, "
        f"torch {m['torch']}. Date: {r['date']}. Command: `{r['command']}`.",
        "",
        f"Load average (1 min) before / after the run: {m.get('loadavg_before', '?')} / "
        f"{m.get('loadavg_after', '?')} on {m['cpu_count']} CPUs: above ~{m['cpu_count']} the CPU was "
        "shared with other jobs; treat absolute times as indicative, the ratio as the result.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
