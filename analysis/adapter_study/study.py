"""Issue #4 item 8: LoRaD vs LoRA vs DoRA vs full fine-tuning on the embedded tiny model.

Each variant is one ``wadi distill --backbone tiny`` run (same training seed, same
settings apart from the student kind) in a fresh subprocess, so wall time and peak RSS
(``os.wait4``) belong to that run alone; then ``wadi eval`` scores the final student on the
same 500 prompts / seed as every other number in this repository.

The runs use the paper's objective (``--config tiny_paper``: no regression term, fake rank 8,
400 steps) unless ``--objective default`` asks for the tiny defaults as they are.

    python analysis/adapter_study/study.py                 # the committed study
    python analysis/adapter_study/study.py --seeds 0 1 --variants lorad lora
    python analysis/adapter_study/study.py --variant "full-3e-4=--adapter full --lr 3e-4"

Writes ``results/study.json`` (every run, with the exact command), ``results/study.csv``
and ``results/study.md`` (the table, with machine and date).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"

#: The compared students, each at its tiny default lr (`[per_adapter.KIND]` in
#: wadi_cli/configs/distill/tiny.toml, chosen from the sweeps in results/explore*.md): LoRaD 1e-2,
#: LoRA / DoRA 1e-3 (1e-2 breaks them), full fine-tune 1e-4 (1e-2 and 1e-3 break it).
#: LoRA / DoRA rank 12 has about LoRaD rank 16's trainable parameter count on the tiny
#: U-Net (163,200 / 170,304 vs 165,632).
VARIANTS: dict[str, list[str]] = {
    "lorad": ["--adapter", "lorad"],
    "lora": ["--adapter", "lora", "--rank", "12"],
    "dora": ["--adapter", "dora", "--rank", "12"],
    "full": ["--adapter", "full"],
}


def _wadi(*args: str) -> list[str]:
    return [sys.executable, "-m", "wadi_cli", *args]


def run_child(cmd: list[str], env: dict[str, str]) -> tuple[int, float, float, str]:
    """Run ``cmd``; return (exit code, wall seconds, peak RSS in MB of that child, stdout)."""
    t0 = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.DEVNULL, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        out.seek(0)
        text = out.read()
    code = os.waitstatus_to_exitcode(status)
    return code, wall, usage.ru_maxrss / 1024, text  # Linux: ru_maxrss in KiB


def trainable_params(flags: list[str]) -> int:
    plan = subprocess.run(
        _wadi("distill", "-b", "tiny", "--dry-run", "--json", *flags),
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return int(json.loads(plan.stdout)["plan"]["student"]["trainable_params"])


def one_run(name: str, flags: list[str], seed: int, workdir: Path, eval_n: int, env: dict[str, str],
            objective: list[str]) -> dict:  # fmt: skip
    run = workdir / f"{name}-seed{seed}"
    cmd = _wadi("distill", "-b", "tiny", "--out", str(run), "--seed", str(seed), *objective,
                "--validate-every", "0", "--no-tensorboard", *flags)  # fmt: skip
    code, wall, rss, _ = run_child(cmd, env)
    if code != 0:
        raise SystemExit(f"{name}: distill failed with exit code {code}: {shlex.join(cmd)}")
    ev_cmd = _wadi("eval", "-b", "tiny", "--weights", str(run), "-n", str(eval_n), "--seed", "0", "--json")
    code, _, _, text = run_child(ev_cmd, env)
    if code != 0:
        raise SystemExit(f"{name}: eval failed with exit code {code}")
    ev = json.loads(text[text.index("{") :])
    return {
        "variant": name,
        "seed": seed,
        "flags": flags,
        "command": shlex.join(["wadi", *cmd[3:]]),
        "accuracy": ev["accuracy"],
        "fd": ev["fd"],
        "per_attribute_accuracy": ev["per_attribute_accuracy"],
        "trainable_params": trainable_params(flags),
        "train_seconds": round(wall, 1),
        "peak_rss_mb": round(rss, 1),
    }


def machine() -> dict:
    from wadi_cli.machine import machine_info

    return {
        **machine_info(),
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "loadavg_at_start": os.getloadavg()[0],
    }


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [
        "# Tiny-model ablation: LoRaD vs LoRA vs DoRA vs full fine-tuning",
        "",
        f"{meta['date']} · {meta['cpu']} · {meta['cores']} cores · torch {meta['torch']} · "
        f"load {meta['loadavg_at_start']:.2f} at start. `wadi eval` n = {meta['eval_n']}, seed 0.",
        "",
        "| variant | seed | trainable params | accuracy | fd | train s | peak RSS MB | command |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['variant']} | {r['seed']} | {r['trainable_params']:,} | {r['accuracy']:.3f} | "
            f"{r['fd']:.2f} | {r['train_seconds']:.0f} | {r['peak_rss_mb']:.0f} | `{r['command']}` |"
        )
    by_variant: dict[str, list[dict]] = {}
    for r in rows:
        by_variant.setdefault(r["variant"], []).append(r)
    if any(len(v) > 1 for v in by_variant.values()):
        lines += [
            "",
            "Mean over seeds:",
            "",
            "| variant | seeds | trainable params | accuracy | fd | train s |",
            "|---|---|---|---|---|---|",
        ]
        for name, runs in by_variant.items():
            k = len(runs)
            lines.append(
                f"| {name} | {k} | {runs[0]['trainable_params']:,} | "
                f"{sum(r['accuracy'] for r in runs) / k:.3f} | {sum(r['fd'] for r in runs) / k:.2f} | "
                f"{sum(r['train_seconds'] for r in runs) / k:.0f} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS), help="names from VARIANTS")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=FLAGS", help="an extra variant")
    ap.add_argument("--seeds", nargs="*", type=int, default=[0])
    ap.add_argument("--eval-n", type=int, default=500)
    ap.add_argument(
        "--threads", type=int, default=1, help="OMP threads per run (1: steadier on 2 shared cores)"
    )
    ap.add_argument("--tag", default="study", help="results file stem")
    ap.add_argument("--keep-runs", type=Path, default=None, help="keep the run folders here")
    ap.add_argument(
        "--combine", nargs="*", default=None, metavar="TAG", help="merge earlier results into --tag"
    )
    ap.add_argument(
        "--objective",
        choices=("paper", "default"),
        default="paper",
        help="paper: the WaDi objective (--config tiny_paper, as in the committed study); "
        "default: the tiny defaults (with their regression term)",
    )
    args = ap.parse_args()
    if args.combine:
        docs = [json.loads((RESULTS / f"{t}.json").read_text()) for t in args.combine]
        rows = sorted((r for d in docs for r in d["runs"]), key=lambda r: (list(VARIANTS).index(r["variant"])
                      if r["variant"] in VARIANTS else 99, r["seed"]))  # fmt: skip
        meta = {**docs[0]["machine"], "combined_from": args.combine}
        write_results(args.tag, rows, meta)
        return
    variants = {n: VARIANTS[n] for n in args.variants}
    for spec in args.variant:
        name, _, flags = spec.partition("=")
        variants[name] = shlex.split(flags)
    objective = ["--config", "tiny_paper"] if args.objective == "paper" else []
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    meta = {**machine(), "eval_n": args.eval_n, "threads": args.threads}
    rows = []
    with tempfile.TemporaryDirectory(prefix="wadi-study-") as tmp:
        workdir = args.keep_runs or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        for seed in args.seeds:
            for name, flags in variants.items():
                row = one_run(name, flags, seed, workdir, args.eval_n, env, objective)
                rows.append(row)
                print(f"{name} seed {seed}: accuracy {row['accuracy']:.3f} fd {row['fd']:.2f} "
                      f"params {row['trainable_params']:,} {row['train_seconds']:.0f} s "
                      f"{row['peak_rss_mb']:.0f} MB", flush=True)  # fmt: skip
    write_results(args.tag, rows, meta)


def write_results(tag: str, rows: list[dict], meta: dict) -> None:
    """``results/<tag>.json`` / ``.csv`` / ``.md``."""
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{tag}.json").write_text(json.dumps({"machine": meta, "runs": rows}, indent=2) + "\n")
    cols = [
        "variant",
        "seed",
        "trainable_params",
        "accuracy",
        "fd",
        "train_seconds",
        "peak_rss_mb",
        "command",
    ]
    csv_lines = [",".join(cols)] + [
        ",".join(json.dumps(r[c]) if c == "command" else str(r[c]) for c in cols) for r in rows
    ]
    (RESULTS / f"{tag}.csv").write_text("\n".join(csv_lines) + "\n")
    (RESULTS / f"{tag}.md").write_text(markdown(rows, meta))
    print(markdown(rows, meta))


if __name__ == "__main__":
    main()
