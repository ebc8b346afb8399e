"""The README's numbers about the shipped tiny model, measured on the shipped files.

- size on disk of ``wadi_cli/assets/tiny`` (pipeline and classifier, bytes);
- U-Net parameters and LoRaD-adaptable Linears (student targets of the tiny backbone);
- the teacher table: ``wadi eval -b tiny --teacher --steps N -n 500 --seed 0 --json`` for
  N = 1, 4, 25, each as its own process, with the wall time of the whole command
  (start-up included; ``wadi eval`` runs the tiny model on one thread) and its CPU time
  (user + system), which depends less on what else the machine runs.

Results: ``analysis/tiny_model/results/shipped.{json,md}``.

    python analysis/tiny_model/measure_shipped.py
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
OUT = Path(__file__).resolve().parent / "results" / "shipped.json"
STEPS = (1, 4, 25)


def sizes(assets: Path) -> dict[str, int]:
    """Bytes of every file under the pipeline folder and of the classifier."""
    pipeline = sum(p.stat().st_size for p in (assets / "pipeline").rglob("*") if p.is_file())
    classifier = (assets / "classifier.safetensors").stat().st_size
    return {"pipeline_bytes": pipeline, "classifier_bytes": classifier, "total_bytes": pipeline + classifier}


def unet_counts() -> dict[str, int]:
    from wadi_cli.backbones import get_backbone
    from wadi_cli.pipeline import load_pipeline

    net = load_pipeline("tiny", teacher=True, device="cpu").denoiser.model
    return {
        "unet_parameters": sum(p.numel() for p in net.parameters()),
        "student_target_linears": len(get_backbone("tiny").target_modules(net, "student")),
    }


def teacher_eval(steps: int, n: int, seed: int) -> dict:
    cmd = ["wadi", "eval", "-b", "tiny", "--teacher", "--steps", str(steps)]
    cmd += ["-n", str(n), "--seed", str(seed)]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "wadi_cli", *cmd[1:], "--json"], capture_output=True, text=True, check=True
    )
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    result = json.loads(proc.stdout)
    for key in ("model", "weights"):  # the repository's files relative to it: no machine paths
        if isinstance(result.get(key), str):
            result[key] = result[key].removeprefix(str(REPO) + os.sep)
    return {"command": " ".join(cmd) + " --json", "wall_s": round(wall, 1), "cpu_s": round(cpu, 1), **result}


def markdown(res: dict) -> str:
    info, s, c = res["machine"], res["sizes"], res["counts"]
    lines = [
        "# The shipped tiny model: size, counts, teacher quality",
        "",
        f"{res['date']} · {info['cpu']} · {info['cores']} cores · torch {info['torch']} · "
        f"load {res['load_at_start']:.1f} at start (the machine is shared with other jobs: wall "
        "times are upper bounds). `python analysis/tiny_model/measure_shipped.py`",
        "",
        f"- `wadi_cli/assets/tiny`: {s['total_bytes']:,} bytes = {s['total_bytes'] / 1e6:.2f} MB "
        f"(pipeline {s['pipeline_bytes'] / 1e6:.2f} MB, classifier {s['classifier_bytes'] / 1e6:.2f} MB)",
        f"- U-Net: {c['unet_parameters']:,} parameters, "
        f"{c['student_target_linears']} LoRaD-adaptable Linears",
        "",
        "| teacher steps | accuracy | fd | wall s (whole command) | CPU s (user + sys) | command |",
        "|---|---|---|---|---|---|",
    ]
    for t in res["teacher"]:
        row = f"| {t['steps']} | {t['accuracy']:.3f} | {t['fd']:.2f} | {t['wall_s']:.1f} | {t['cpu_s']:.1f} "
        row += f"| `{t['command']}` |"
        lines.append(row)
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=fmt)
    parser.add_argument("-n", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=OUT, help="results JSON (a .md is written next to it)")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(REPO))
    from wadi_cli.machine import machine_info

    load = os.getloadavg()[0]
    res = {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine_info(),
        "load_at_start": load,
        "sizes": sizes(REPO / "wadi_cli" / "assets" / "tiny"),
        "counts": unet_counts(),
        "teacher": [teacher_eval(s, args.n, args.seed) for s in STEPS],
    }
    args.out.write_text(json.dumps(res, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(res))
    print(markdown(res))
    return res


if __name__ == "__main__":
    main()
