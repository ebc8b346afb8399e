"""Benchmark ``wadi analyze`` on an SD2.1-base-sized teacher/student pair.

The pair is built from the shipped architecture config (random weights, nothing is
downloaded): the teacher is a randomly initialised SD2.1-base U-Net (865.9M params,
282 weight matrices); the student rotates every row of every weight matrix by a
planted low-rank direction change (rank 32, plus a small full-rank tail) and rescales
its norm by ~0.5 %, so the direction change is ~20x the norm change, as in the paper.
Both are written as fp32 safetensors (~3.5 GB each) under ``--workdir`` (default
/tmp/wadi_bench_analyze) and reused by later runs.

Then ``wadi analyze TEACHER STUDENT`` with default settings runs ``--repeats`` times
as a subprocess; wall time and peak RSS (``ru_maxrss`` of the child) are recorded, and
the default spectra are validated against ``--exact`` (float64 SVD) on one layer of
every distinct shape. Results (with machine, torch version and date) go to
``analysis/results/bench_analyze.json``.

    python analysis/bench_analyze.py                 # build pair if needed, 3 timed runs
    python analysis/bench_analyze.py --repeats 1 --no-validate
    python analysis/bench_analyze.py --cleanup       # delete the 7 GB pair afterwards
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "wadi_cli" / "configs" / "sd21" / "unet" / "config.json"
RESULTS = REPO / "analysis" / "results" / "bench_analyze.json"
ISSUE_BASELINE = {
    "what": "full singular values of every residual, slow obvious way "
    "(quoted from the target, not re-measured)",
    "wall_s": 839.0,
    "peak_rss_gb": 7.07,
}


def _plant_student(w: torch.Tensor, gen: torch.Generator, rank: int = 32) -> torch.Tensor:
    """Student row = (1 + delta_i) * ||T_i|| * normalize(d_T,i + low-rank + small tail)."""
    m = w.shape[0]
    mat = w.reshape(m, -1).to(torch.float64)
    n = mat.shape[1]
    norms = torch.linalg.vector_norm(mat, dim=1, keepdim=True).clamp_min(1e-30)
    d = mat / norms
    r = min(rank, m, n)
    u = torch.randn(m, r, generator=gen, dtype=torch.float64)
    v = torch.randn(r, n, generator=gen, dtype=torch.float64)
    low = (u @ v) / (r * n) ** 0.5  # rows of norm ~1
    tail = torch.randn(m, n, generator=gen, dtype=torch.float64) / n**0.5
    d_new = d + 0.1 * low + 0.02 * tail
    d_new = d_new / torch.linalg.vector_norm(d_new, dim=1, keepdim=True)
    scale = 1.0 + 0.005 * torch.randn(m, 1, generator=gen, dtype=torch.float64)
    return (d_new * norms * scale).reshape(w.shape).to(w.dtype)


def build_pair(workdir: Path) -> tuple[Path, Path]:
    """Write teacher/student fp32 safetensors (skipped when both already exist)."""
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file

    teacher, student = workdir / "teacher.safetensors", workdir / "student.safetensors"
    if teacher.exists() and student.exists():
        return teacher, student
    workdir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model = UNet2DConditionModel.from_config(json.loads(CONFIG.read_text()))
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    del model
    # Random init leaves some layers exactly zero (zero_module convs); give them weights.
    gen = torch.Generator().manual_seed(1)
    for k, v in sd.items():
        if v.ndim >= 2 and not bool(v.abs().sum()):
            sd[k] = torch.randn(v.shape, generator=gen) * 0.02
    save_file(sd, str(teacher))
    print(
        f"teacher: {sum(v.numel() for v in sd.values()) / 1e6:.1f}M params ({time.perf_counter() - t0:.0f} s)"
    )
    for k in list(sd):
        if sd[k].ndim >= 2:
            sd[k] = _plant_student(sd[k], gen)
    save_file(sd, str(student))
    print(f"student written ({time.perf_counter() - t0:.0f} s)")
    return teacher, student


def time_cli(teacher: Path, student: Path, out_json: Path) -> dict:
    """One ``wadi analyze`` subprocess run; wall time and the child's peak RSS."""
    code = (
        "import resource, subprocess, sys, time\n"
        "t = time.perf_counter()\n"
        "rc = subprocess.run(sys.argv[2:], stdout=open(sys.argv[1], 'w')).returncode\n"
        "wall = time.perf_counter() - t\n"
        "print(rc, wall, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
    )
    cmd = [sys.executable, "-m", "wadi_cli", "analyze", str(teacher), str(student), "--json"]
    res = subprocess.run(
        [sys.executable, "-c", code, str(out_json), *cmd], capture_output=True, text=True, check=True
    )
    rc, wall, rss_kb = res.stdout.split()
    if int(rc) != 0:
        raise RuntimeError(f"wadi analyze failed (rc={rc}): {res.stderr[-2000:]}")
    return {"wall_s": round(float(wall), 2), "peak_rss_gb": round(int(rss_kb) / 1024**2, 3)}


def validate(teacher: Path, student: Path, k: int = 64, max_elements: int = 1280 * 2560) -> list[dict]:
    """Default (Gram) vs exact (float64 SVD) on one layer per distinct matrix shape with at
    most ``max_elements`` entries (the float64 SVD of the largest convs takes minutes)."""
    from wadi_cli.analysis.decompose import decompose_rows
    from wadi_cli.analysis.spectrum import spectrum_stats, squared_singular_values
    from wadi_cli.io import open_checkpoint

    rows = []
    with open_checkpoint(teacher) as ts, open_checkpoint(student) as ss:
        seen: set[tuple[int, ...]] = set()
        for name in list(ts.keys()):
            shape = tuple(ts.shape(name))
            if len(shape) < 2 or shape in seen or np.prod(shape) > max_elements:
                continue
            seen.add(shape)
            t, s = ts.get(name), ss.get(name)
            fast = squared_singular_values(decompose_rows(t, s).residual, "gram")
            exact = squared_singular_values(
                decompose_rows(t, s, residual_dtype=torch.float64).residual, "exact"
            )
            kk = min(k, len(exact))
            top_f, top_e = np.sqrt(fast[:kk]), np.sqrt(exact[:kk])
            sf, se = spectrum_stats(fast, k), spectrum_stats(exact, k)
            rows.append(
                {
                    "layer": name,
                    "shape": list(shape),
                    "topk_max_rel_err": float(np.max(np.abs(top_f - top_e) / top_e)),
                    "energy_at_k_abs_err": abs(sf.energy_at_k - se.energy_at_k),
                    "ranks_equal": (sf.rank90, sf.rank93, sf.rank99) == (se.rank90, se.rank93, se.rank99),
                }
            )
            print(f"validate {name} {shape}: top-{kk} max rel err {rows[-1]['topk_max_rel_err']:.2e}")
    return rows


def machine() -> dict:
    from wadi_cli.machine import cpu_model

    cpu = cpu_model()
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_avg_before": os.getloadavg(),
    }


def breakdown(teacher: Path, student: Path) -> dict[str, float]:
    """Single-threaded seconds per phase of the default method, run one after another (no
    overlap): where the time goes, and the floor for a perfect split over the cores."""
    import torch

    from wadi_cli.analysis.decompose import decompose_rows
    from wadi_cli.analysis.spectrum import eigvals_desc, gram_of_smaller_side
    from wadi_cli.io import open_checkpoint

    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    secs = dict.fromkeys(("read", "decompose", "gram", "eigen"), 0.0)
    try:
        with open_checkpoint(teacher) as t_src, open_checkpoint(student) as s_src:
            for name in t_src:
                if len(t_src.shape(name)) < 2:
                    continue
                t0 = time.perf_counter()
                t, s = t_src.get(name), s_src.get(name)
                t1 = time.perf_counter()
                dec = decompose_rows(t, s)
                t2 = time.perf_counter()
                g = gram_of_smaller_side(dec.residual)
                t3 = time.perf_counter()
                eigvals_desc(g)
                t4 = time.perf_counter()
                for key, dt_ in zip(secs, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
                    secs[key] += dt_
    finally:
        torch.set_num_threads(prev)
    total = sum(secs.values())
    return {**{k: round(v, 2) for k, v in secs.items()}, "total_core_s": round(total, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/wadi_bench_analyze"))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-validate", action="store_true")
    ap.add_argument("--cleanup", action="store_true", help="delete the generated pair at the end")
    ap.add_argument("--results", type=Path, default=RESULTS)
    args = ap.parse_args()
    info = machine()
    teacher, student = build_pair(args.workdir)
    runs = []
    for i in range(args.repeats):
        runs.append(time_cli(teacher, student, args.workdir / f"summary_{i}.json"))
        print(f"run {i + 1}: {runs[-1]}")
    summary = json.loads((args.workdir / "summary_0.json").read_text())
    result = {
        "benchmark": "wadi analyze, defaults, SD2.1-base-shaped fp32 pair (random weights, planted changes)",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": info,
        "conditions": (
            f"{os.cpu_count()}-core VM, load average before the timed runs "
            f"{os.getloadavg()[0]:.2f} (1 min); page cache warm after the first run"
        ),
        "pair": {"params_each": 865_910_724, "weight_matrices": summary["overall"]["layers"]},
        "runs": runs,
        "median_wall_s": statistics.median(r["wall_s"] for r in runs),
        "median_peak_rss_gb": statistics.median(r["peak_rss_gb"] for r in runs),
        "target": {"wall_s": 30.0, "peak_rss_gb": 1.0},
        "issue_baseline": ISSUE_BASELINE,
        "overall": {
            k: summary["overall"][k]
            for k in (
                "direction_to_norm_ratio_mean",
                "direction_to_norm_ratio_std",
                "rank_frac93",
                "energy_at_k",
            )
        },
    }
    result["breakdown_single_thread_s"] = breakdown(teacher, student)
    print("single-threaded breakdown:", result["breakdown_single_thread_s"])
    if not args.no_validate:
        val = validate(teacher, student)
        result["validation_vs_exact"] = {
            "layers": val,
            "worst_topk_rel_err": max(v["topk_max_rel_err"] for v in val),
            "all_ranks_equal": all(v["ranks_equal"] for v in val),
        }
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("median_wall_s", "median_peak_rss_gb")}))
    if args.cleanup:
        shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
