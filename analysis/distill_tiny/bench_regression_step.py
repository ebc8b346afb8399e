"""What the tiny default's regression term costs: building the teacher pairs, and a training
step without it, with it (the regression batch in the same student forward as the VSD batch,
as `Distiller` does), and with it in a second student forward (how it was before).

    python analysis/distill_tiny/bench_regression_step.py   # → results/bench_regression_step.*

One thread (as `wadi distill -b tiny` uses), the real tiny pipeline and its default config.
The three step variants are timed in interleaved rounds on one distiller; medians per step.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from datetime import UTC, datetime
from pathlib import Path
from types import MethodType

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def two_forwards(self, z, cond):  # noqa: ANN001, ANN202  (bound onto a Distiller)
    """The pre-merge step: the VSD batch and the pair batch in two student forwards."""
    x0 = self._one_step_x0(z, cond)
    z_r, cond_r, target = self._regression_batch()
    x_r = self._one_step_x0(z_r, cond_r)
    return x0, self.cfg.regression_weight * torch.mean((x_r.float() - target) ** 2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10, help="steps per variant per round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--pairs", type=int, default=None, help="regression pairs (default: the tiny default)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    from wadi_cli.distill import load_prompts, resolve_config
    from wadi_cli.distill.run import build_distiller
    from wadi_cli.machine import machine_info

    over = {"device": "cpu"} | ({"regression_pairs": args.pairs} if args.pairs else {})
    cfg = resolve_config(overrides=over)
    prompts = load_prompts(None)
    # built without the term, then given the default config (they differ only in the
    # regression weight), so the pairs can be timed on their own
    d = build_distiller(resolve_config(overrides=over | {"regression_weight": 0.0}), prompts)
    d.cfg = cfg
    t0 = time.perf_counter()
    pairs = d._teacher_pairs(prompts)
    pairs_seconds = time.perf_counter() - t0
    merged, separate = d._student_forward, MethodType(two_forwards, d)
    variants = {  # name -> (pairs, student forward)
        "no regression": (None, merged),
        "regression, one student forward (current)": (pairs, merged),
        "regression, two student forwards (before)": (pairs, separate),
    }
    times: dict[str, list[float]] = {name: [] for name in variants}
    d.train_step()  # warm-up
    for r in range(args.rounds):
        for name, (d.pairs, d._student_forward) in variants.items():
            for _ in range(args.steps):
                t = time.perf_counter()
                d.train_step()
                times[name].append(time.perf_counter() - t)
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(
            f"{n} {statistics.median(v):.3f} s" for n, v in times.items()), flush=True)  # fmt: skip
    med = {n: statistics.median(v) for n, v in times.items()}
    base = med["no regression"]
    result = {
        "machine": {
            **machine_info(),
            "threads": 1,
            "load_avg_before": os.getloadavg()[0],
            "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        },  # fmt: skip
        "config": {
            "regression_pairs": cfg.regression_pairs,
            "regression_steps": cfg.regression_steps,
            "batch_size": cfg.batch_size,
            "fake_rank": cfg.fake_rank,
        },  # fmt: skip
        "pairs_seconds": round(pairs_seconds, 1),
        "step_median_seconds": {n: round(v, 4) for n, v in med.items()},
        "step_vs_no_regression": {n: round(v / base, 3) for n, v in med.items()},
        "steps_timed_per_variant": args.steps * args.rounds,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "bench_regression_step.json").write_text(json.dumps(result, indent=2) + "\n")
    m = result["machine"]
    lines = [
        "# The tiny default's regression term: what it costs",
        "",
        f"{m['date']} · {m['cpu']} · {m['cores']} cores, 1 thread · torch {m['torch']} · "
        f"load {m['load_avg_before']:.2f} at start. `python analysis/distill_tiny/bench_regression_step.py`",
        "",
        f"Building {cfg.regression_pairs} teacher pairs ({cfg.regression_steps} steps, "
        f"CFG {cfg.guidance:g}): **{result['pairs_seconds']:.1f} s**.",
        "",
        "| training step | median s | × no regression |",
        "|---|---|---|",
    ] + [f"| {n} | {med[n]:.3f} | {med[n] / base:.2f} |" for n in med]
    (RESULTS / "bench_regression_step.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
