"""Does a tiny LoRaD run trained with a bf16 base reach the quality of the same run in fp32?

Each arm of ``ARMS`` is ``wadi distill -b tiny`` with the tiny defaults (1000 steps) plus
the arm's flags, one fresh subprocess per run (wall time and peak RSS belong to it), scored
by ``wadi eval -b tiny -w RUN -n 500 --seed 0`` (in fp32: the adapter as a user gets it).
The training and scoring go through ``analysis/sweep.py``'s ``one_run``, the runner of every
other tiny study. Each row also records the package's git commit (the
bf16 arm was run before and after the layer changed) and the |Θ| quantiles of the final
student and fake-score adapters.

    python analysis/lorad_precision/run.py --arms fp32 bf16 --seeds 0 1 --keep-runs lp
    python analysis/lorad_precision/run.py --arms fp32-paper-lr1e-3 bf16-paper-lr1e-3 --keep-runs lp
    python analysis/lorad_precision/run.py --table      # rebuild results/runs.md

Appends one JSON line per run to ``results/runs.jsonl`` and rewrites ``results/runs.md``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
RESULTS = HERE / "results"
ROWS = RESULTS / "runs.jsonl"

PAPER = "tiny_paper"  # the shipped recipe: the paper's objective on tiny
EXACT = "--lorad-exact-low-precision"
#: The compared arms: the tiny defaults as they are (fp32 on CPU), and with a bf16 base;
#: then a small-angle regime: the paper's objective (400 steps) at a 10× lower student lr.
ARMS: dict[str, list[str]] = {
    "fp32": ["--adapter", "lorad"],
    "bf16": ["--adapter", "lorad", "--mixed-precision", "bf16"],
    "fp32-paper-lr1e-3": ["--adapter", "lorad", "--config", PAPER, "--lr", "1e-3"],
    "bf16-paper-lr1e-3": ["--adapter", "lorad", "--config", PAPER, "--lr", "1e-3", "--mixed-precision",
                          "bf16"],
    "bf16-exact": ["--adapter", "lorad", "--mixed-precision", "bf16", EXACT],
    "bf16-paper-lr1e-3-exact": ["--adapter", "lorad", "--config", PAPER, "--lr", "1e-3", "--mixed-precision",
                                "bf16", EXACT],
}  # fmt: skip
QUANTILES = (0.5, 0.9, 0.99, 1.0)


def _runner():
    """``analysis/sweep.py`` as a module (it is a script, not a package)."""
    spec = importlib.util.spec_from_file_location("sweep", ROOT / "analysis/sweep.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["sweep"] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def one_arm(runner, arm: str, seed: int, workdir: Path, env: dict[str, str]) -> dict:
    """Train and score one arm with one seed (the sweep runner's ``one_run``), as a results row."""
    flags, evals = ["--validate-every", "0", "--no-tensorboard"], ["-n", "500", "--seed", "0"]
    sweep = runner.Sweep(path=HERE / "run.py", title="", backbone="tiny", flags=flags, eval=evals,
                         results=ROWS, checkpoint_results=ROWS, columns=[])  # fmt: skip
    run = runner.Run(arm, "", ARMS[arm], [seed])
    row, _ = runner.one_run(sweep, run, seed, workdir, env)
    return {
        "arm": arm,
        "seed": seed,
        "flags": ARMS[arm],
        "command": shlex.join(["wadi", *runner.distill_args(sweep, run, seed, "RUN")]),
        **{
            k: row[k]
            for k in ("accuracy", "fd", "trainable_params", "train_seconds", "peak_rss_mb", "commit")
        },
        "per_attribute_accuracy": {k: row[f"accuracy_{k}"] for k in ("color", "shape", "position")},
        "machine": {"machine": row["machine"], "date": row["date"], "loadavg_at_start": row["load"]},
    }


def theta_quantiles(adapter: Path) -> dict[str, float]:
    """Quantiles of |Θ| = |A B| over every entry of every adapted layer of ``adapter``."""
    from wadi_cli.lorad import load_adapter
    from wadi_cli.lorad.layer import lorad_theta

    tensors = load_adapter(adapter)[0]
    paths = sorted({k.rsplit(".", 1)[0] for k in tensors})
    theta = torch.cat(
        [lorad_theta(tensors[f"{p}.lorad_A"], tensors[f"{p}.lorad_B"]).abs().flatten() for p in paths]
    )
    sample = theta.double()[:: max(1, theta.numel() // 2_000_000)]  # torch.quantile's size limit
    qs = torch.quantile(sample, torch.tensor(QUANTILES).double())
    return {f"q{int(q * 100)}": float(v) for q, v in zip(QUANTILES, qs, strict=True)} | {
        "mean": float(theta.mean())
    }


def markdown(rows: list[dict]) -> str:
    lines = [
        "# Tiny LoRaD distillation: bf16 base vs fp32",
        "",
        "`wadi distill -b tiny` defaults (1000 steps) + the arm's flags (`paper`: "
        "`--config tiny_paper`, 400 steps); `wadi eval -b tiny -w RUN "
        "-n 500 --seed 0` (fp32). One thread per run on a 2-core machine shared with other jobs "
        "(wall times are noisy). |Θ| columns: median / 99th percentile of the final adapters.",
        "",
        "| arm | seed | commit | accuracy | fd | train s | peak RSS MB | student \\|Θ\\| q50 / q99 "
        "| fake \\|Θ\\| q50 / q99 | date |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        s, f = r["theta_student"], r["theta_fake"]
        lines.append(
            f"| {r['arm']} | {r['seed']} | {r['commit']} | {r['accuracy']:.3f} | {r['fd']:.2f} | "
            f"{r['train_seconds']:.0f} | {r['peak_rss_mb']:.0f} | {s['q50']:.2e} / {s['q99']:.2e} | "
            f"{f['q50']:.2e} / {f['q99']:.2e} | {r['machine']['date']} |"
        )
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["arm"], r["commit"]), []).append(r)
    lines += ["", "| arm | commit | seeds | mean accuracy | mean fd | fd range |"]
    lines += ["|---|---|---|---|---|---|"]
    for (arm, commit), runs in groups.items():
        k, fds = len(runs), [r["fd"] for r in runs]
        lines.append(
            f"| {arm} | {commit} | {k} | {sum(r['accuracy'] for r in runs) / k:.3f} | "
            f"{sum(fds) / k:.2f} | {min(fds):.2f}–{max(fds):.2f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arms", nargs="*", default=list(ARMS), choices=list(ARMS))
    ap.add_argument("--seeds", nargs="*", type=int, default=[0])
    ap.add_argument("--keep-runs", type=Path, default=None, help="keep the run folders here")
    ap.add_argument("--table", action="store_true", help="only rebuild results/runs.md")
    args = ap.parse_args()
    RESULTS.mkdir(exist_ok=True)
    if not args.table:
        runner = _runner()
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        with tempfile.TemporaryDirectory(prefix="wadi-lp-") as tmp:
            workdir = args.keep_runs or Path(tmp)
            workdir.mkdir(parents=True, exist_ok=True)
            for seed in args.seeds:
                for arm in args.arms:
                    row = one_arm(runner, arm, seed, workdir, env)
                    ckpt = sorted((workdir / f"{arm}-seed{seed}" / "checkpoints").iterdir())[-1]
                    row["theta_student"] = theta_quantiles(ckpt / "student.safetensors")
                    row["theta_fake"] = theta_quantiles(ckpt / "fake.safetensors")
                    with ROWS.open("a") as fh:
                        fh.write(json.dumps(row) + "\n")
                    print(f"{arm} seed {seed}: accuracy {row['accuracy']:.3f} fd {row['fd']:.2f} "
                          f"{row['train_seconds']:.0f} s", flush=True)  # fmt: skip
    rows = [json.loads(line) for line in ROWS.read_text().splitlines() if line.strip()]
    (RESULTS / "runs.md").write_text(markdown(rows))
    print(markdown(rows))


if __name__ == "__main__":
    sys.exit(main())
