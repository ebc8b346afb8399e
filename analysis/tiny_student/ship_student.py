"""Make the tiny model's shipped one-step student (``wadi_cli/assets/tiny/student.safetensors``).

1. ``wadi distill -b tiny --seed 0 --out RUN`` with the tiny defaults, on one thread
   (skipped with ``--run RUN``: an existing run of that command);
2. ``wadi eval -b tiny --weights RUN -n 500 --seed 0 --json``;
3. the run's student adapter is written to the package assets with its provenance in the
   safetensors metadata (recipe, commands, seed, resolved config, eval numbers, versions);
4. ``wadi eval -b tiny -n 500 --seed 0 --json`` (no --weights: the shipped file) must give
   the same numbers as step 2; both go to ``analysis/tiny_student/results/ship_student.json``.

    python analysis/tiny_student/ship_student.py                 # ~8 min on one thread
    python analysis/tiny_student/ship_student.py --run run0 # reuse a finished run
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SEED = 0
TRAIN = ["distill", "-b", "tiny", "--seed", str(SEED)]
EVAL = ["eval", "-b", "tiny", "-n", "500", "--seed", "0", "--json"]
RECIPE = "tiny defaults (wadi distill -b tiny: wadi_cli/configs/distill/tiny.toml)"


def wadi(*args: str, capture: bool = False) -> str:
    """Run ``wadi ARGS`` on one thread (what the tiny recipe was tuned and measured with)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "wadi_cli", *args]
    proc = subprocess.run(cmd, env=env, text=True, capture_output=capture)
    if proc.returncode != 0:
        raise SystemExit(f"wadi {' '.join(args)} failed ({proc.returncode}): {(proc.stderr or '')[-500:]}")
    return proc.stdout if capture else ""


def _portable(path: str, run: Path) -> str:
    """``path`` with the run folder written RUN and the repository's own files relative to it."""
    path = path.replace(str(run.resolve()), "RUN").replace(str(run), "RUN")
    return path.removeprefix(str(HERE.parents[1]) + os.sep)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, help="A finished run of `wadi distill -b tiny --seed 0`.")
    args = ap.parse_args()

    from wadi_cli import __version__
    from wadi_cli.distill import resolve_config
    from wadi_cli.distill.export import run_student_file
    from wadi_cli.lorad import load_adapter, save_adapter
    from wadi_cli.machine import machine_info
    from wadi_cli.tiny import TINY_STUDENT_PATH

    started = dt.datetime.now(dt.timezone.utc)
    train_seconds = None
    with tempfile.TemporaryDirectory(prefix="wadi-tiny-student-") as tmp:
        run = args.run
        if run is None:
            run = Path(tmp) / "run"
            t0 = time.perf_counter()
            wadi(*TRAIN, "--out", str(run))
            train_seconds = round(time.perf_counter() - t0, 1)
        adapter_file, config = run_student_file(run)
        expected = resolve_config(overrides={"backbone": "tiny", "seed": SEED}).to_dict()
        changed = {k for k in expected if config.get(k) != expected[k] and k not in ("model", "device")}
        if changed:
            raise SystemExit(f"{run} was not trained with the tiny defaults (differs in {sorted(changed)})")
        eval_run = json.loads(wadi(*EVAL, "--weights", str(run), capture=True))
        tensors, lorad = load_adapter(adapter_file)
        summary = {k: eval_run[k] for k in ("accuracy", "fd", "per_attribute_accuracy", "num_images", "seed")}
        versions = {"wadi": __version__, **machine_info()}
        import diffusers

        versions["diffusers"] = diffusers.__version__
        save_adapter(
            TINY_STUDENT_PATH,
            tensors,
            lorad,
            extra_metadata={
                "recipe": RECIPE,
                "train_command": "wadi " + " ".join(TRAIN),
                "seed": str(SEED),
                "train_step": str(json.loads((adapter_file.parent / "state.json").read_text())["step"]),
                "distill_config": json.dumps(config, sort_keys=True),
                "eval_command": "wadi " + " ".join(EVAL[:-1]),
                "eval": json.dumps(summary, sort_keys=True),
                "trained_with": json.dumps(versions, sort_keys=True),
            },
        )
    eval_shipped = json.loads(wadi(*EVAL, capture=True))
    for ev in (eval_run, eval_shipped):  # no machine paths in the committed results
        for key in ("model", "weights"):
            if isinstance(ev.get(key), str):
                ev[key] = _portable(ev[key], run)
    if (eval_shipped["accuracy"], eval_shipped["fd"]) != (eval_run["accuracy"], eval_run["fd"]):
        raise SystemExit(f"the shipped file scores {eval_shipped} but the run {eval_run}")
    results = {
        "question": "the one-step student shipped with the tiny model: how good is it?",
        "train_command": "wadi " + " ".join(TRAIN) + " --out RUN",
        "train_seconds": train_seconds,
        "train_config": config,
        "eval_command": "wadi " + " ".join(EVAL),
        "eval_of_the_run": eval_run,
        "eval_of_the_shipped_file": eval_shipped,
        "shipped_file": str(TINY_STUDENT_PATH.relative_to(HERE.parents[1])),
        "shipped_bytes": TINY_STUDENT_PATH.stat().st_size,
        "machine": versions,
        "date": started.isoformat(timespec="seconds"),
    }
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "ship_student.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(json.dumps({k: results[k] for k in ("shipped_file", "shipped_bytes")} | summary, indent=2))


if __name__ == "__main__":
    main()
