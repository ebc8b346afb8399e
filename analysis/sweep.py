"""The one sweep runner of the tiny-model studies: ``wadi distill`` + ``wadi eval`` for every run
listed in a TOML file, one CSV row per run and seed, and the Markdown table made from that CSV.

A sweep file (``analysis/<study>/runs.toml``) lists named runs. Each run, for each of its
seeds, is ``wadi distill -b BACKBONE --out RUN --seed S <sweep flags> <run flags>`` in a fresh
subprocess (its wall time and peak RSS are its own), then ``wadi eval -b BACKBONE --weights RUN
<eval flags> --json``; with ``checkpoints = true`` also the student (and the EMA, when kept) of
every kept checkpoint. Rows go to the sweep's results CSV (the resolved value of every setting
named in ``columns``, accuracy, fd, trainable parameters, seconds, peak RSS, machine, date,
commit) and its checkpoint CSV; the Markdown table next to the CSV is rewritten from it.

    python analysis/sweep.py analysis/distill_tiny/runs.toml --list
    python analysis/sweep.py analysis/distill_tiny/runs.toml --only cos1000 --seeds 2 --dry-run
    python analysis/sweep.py analysis/adapter_study/runs.toml --group "paper objective" --jobs 2
    python analysis/sweep.py analysis/distill_tiny/runs.toml --table      # only rewrite runs.md

Sweep file::

    [sweep]
    title = "What the tiny recipe was tuned with"   # heading of the table
    backbone = "tiny"
    flags = "--validate-every 0 --no-tensorboard"   # given to every run (shell syntax)
    eval = "-n 500 --seed 0"                        # wadi eval flags
    results = "results/runs.csv"                    # relative to this file; the table is .md
    checkpoint_results = "results/checkpoints.csv"  # rows of checkpoints = true runs
    columns = ["lr", "fake_lr", "max_steps"]        # resolved config fields recorded per row

    [[run]]
    name = "cos1000"
    group = "steps and schedule"
    flags = "--lr-schedule cosine --checkpoint-every 250 --keep-last 4"
    seeds = [0, 1, 2, 3]
    checkpoints = true

Threads: every child runs with ``OMP_NUM_THREADS=--threads`` (default 1) and ``--jobs`` runs
side by side (default 1); nothing is pinned to a core.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import tomllib

ROOT = Path(__file__).resolve().parents[1]

#: Config fields that never change what a run learns (logging, checkpoint cadence, where it
#: runs): a sweep need not record them as columns even when its runs set them differently.
NOT_SETTINGS = frozenset(
    {"seed", "checkpoint_every", "keep_last", "log_every", "validate_every", "tensorboard", "text_cache",
     "device", "prompt_column"}
)  # fmt: skip
#: The CSV columns around the sweep's own ``columns``.
HEAD = ["name", "group", "seed"]
TAIL = ["accuracy", "fd", "accuracy_color", "accuracy_shape", "accuracy_position", "trainable_params",
        "train_seconds", "peak_rss_mb", "flags", "eval", "date", "machine", "load", "threads", "commit",
        "note"]  # fmt: skip
CHECKPOINT_COLUMNS = ["name", "seed", "step", "weights", "accuracy", "fd", "eval", "date", "commit"]
SWEEP_KEYS = {"title", "backbone", "flags", "eval", "results", "checkpoint_results", "columns"}
RUN_KEYS = {"name", "group", "flags", "seeds", "checkpoints"}


@dataclass
class Run:
    """One named run of a sweep: its flags (after the sweep's) and the seeds it is run with."""

    name: str
    group: str
    flags: list[str]
    seeds: list[int]
    checkpoints: bool = False


@dataclass
class Sweep:
    """A parsed sweep file."""

    path: Path
    title: str
    backbone: str
    flags: list[str]
    eval: list[str]
    results: Path
    checkpoint_results: Path
    columns: list[str]
    runs: list[Run] = field(default_factory=list)

    @property
    def table(self) -> Path:
        """The Markdown table made from :attr:`results`."""
        return self.results.with_suffix(".md")

    def run(self, name: str) -> Run:
        """The run called ``name``."""
        for run in self.runs:
            if run.name == name:
                return run
        raise KeyError(name)


def _fail(message: str) -> None:
    raise SystemExit(f"error: {message}")


def load_sweep(path: str | os.PathLike[str]) -> Sweep:
    """Parse and check a sweep file (unknown keys and repeated names are errors)."""
    path = Path(path)
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        _fail(f"cannot read sweep file {path}: {exc}")
    head = doc.get("sweep", {})
    if set(doc) - {"sweep", "run"} or set(head) - SWEEP_KEYS:
        _fail(f"{path}: unknown keys {sorted((set(doc) - {'sweep', 'run'}) | (set(head) - SWEEP_KEYS))}")
    for key in ("backbone", "results"):
        if key not in head:
            _fail(f"{path}: [sweep] needs {key!r}")
    results = path.parent / head["results"]
    sweep = Sweep(
        path=path,
        title=head.get("title", path.parent.name),
        backbone=head["backbone"],
        flags=shlex.split(head.get("flags", "")),
        eval=shlex.split(head.get("eval", "-n 500 --seed 0")),
        results=results,
        checkpoint_results=path.parent / head.get("checkpoint_results", results.with_name("checkpoints.csv")),
        columns=list(head.get("columns", [])),
    )
    for entry in doc.get("run", []):
        if set(entry) - RUN_KEYS or "name" not in entry:
            _fail(f"{path}: a [[run]] needs a name and takes only {sorted(RUN_KEYS)}: {entry}")
        if any(r.name == entry["name"] for r in sweep.runs):
            _fail(f"{path}: two runs are called {entry['name']!r}")
        sweep.runs.append(
            Run(
                name=entry["name"],
                group=entry.get("group", ""),
                flags=shlex.split(entry.get("flags", "")),
                seeds=[int(s) for s in entry.get("seeds", [0])],
                checkpoints=bool(entry.get("checkpoints", False)),
            )
        )
    return sweep


def distill_args(sweep: Sweep, run: Run, seed: int, out: str | os.PathLike[str]) -> list[str]:
    """``wadi`` arguments that train ``run`` with ``seed`` into ``out``."""
    return ["distill", "-b", sweep.backbone, "--out", str(out), "--seed", str(seed), *sweep.flags, *run.flags]


def plan_args(sweep: Sweep, run: Run, seed: int) -> list[str]:
    """``wadi`` arguments that print the run's resolved config and adapter plan (``--dry-run --json``)."""
    return [
        "distill",
        "-b",
        sweep.backbone,
        "--seed",
        str(seed),
        *sweep.flags,
        *run.flags,
        "--dry-run",
        "--json",
    ]


def eval_args(sweep: Sweep, weights: str | os.PathLike[str]) -> list[str]:
    """``wadi`` arguments that score ``weights`` (a run folder or a student file)."""
    return ["eval", "-b", sweep.backbone, "--weights", str(weights), *sweep.eval, "--json"]


def select(
    sweep: Sweep, only: list[str] | None, group: str | None, seeds: list[int] | None
) -> list[tuple[Run, int]]:
    """The (run, seed) pairs chosen by ``--only`` / ``--group`` / ``--seeds``, in file order."""
    names = {r.name for r in sweep.runs}
    for name in only or []:
        if name not in names:
            _fail(f"no run called {name!r} in {sweep.path} (--list shows them)")
    if group is not None and not any(r.group == group for r in sweep.runs):
        _fail(f"no run of group {group!r} in {sweep.path} (--list shows them)")
    chosen = [r for r in sweep.runs if (not only or r.name in only) and (group is None or r.group == group)]
    return [(r, s) for r in chosen for s in (seeds if seeds is not None else r.seeds)]


def dry_run(sweep: Sweep, pairs: list[tuple[Run, int]], runs_dir: str) -> str:
    """The commands a real run of ``pairs`` would execute, one block per run and seed."""
    lines = []
    for run, seed in pairs:
        out = f"{runs_dir}/{run.name}-seed{seed}"
        lines.append(f"# {run.name} seed {seed}" + (f" ({run.group})" if run.group else ""))
        lines.append(shlex.join(["wadi", *distill_args(sweep, run, seed, out)]))
        lines.append(shlex.join(["wadi", *eval_args(sweep, out)]))
        if run.checkpoints:
            for name in ("student", "ema"):
                ckpt = f"{out}/checkpoints/STEP/{name}.safetensors"
                lines.append(shlex.join(["wadi", *eval_args(sweep, ckpt)]) + "   # every kept STEP")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------- running


def _wadi(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "wadi_cli", *args]


def run_child(cmd: list[str], env: dict[str, str], log: Path | None = None) -> tuple[int, float, float, str]:
    """Run ``cmd``; return (exit code, wall seconds, peak RSS in MB of that child alone, stdout).
    Its stderr goes to ``log`` (appended) when given."""
    t0 = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, open(log or os.devnull, "a") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        out.seek(0)
        text = out.read()
    return os.waitstatus_to_exitcode(status), wall, usage.ru_maxrss / 1024, text  # Linux: KiB


def _json(text: str) -> dict[str, Any]:
    return json.loads(text[text.index("{") :])


def git_commit() -> str:
    """HEAD of this checkout, ``+dirty`` when the package has uncommitted changes ('' outside git)."""
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    if head.returncode != 0:
        return ""
    dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "wadi_cli"], cwd=ROOT).returncode
    return head.stdout.strip() + ("+dirty" if dirty else "")


def machine() -> dict[str, Any]:
    """Where and when: CPU, cores, torch, the 1-minute load at the start, the UTC date."""
    from wadi_cli.machine import machine_info

    info = machine_info()
    return {
        "machine": f"{info['cpu']}, {info['cores']} cores, torch {info['torch']}",
        "load": round(os.getloadavg()[0], 2),
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


def one_run(
    sweep: Sweep, run: Run, seed: int, workdir: Path, env: dict[str, str]
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Train, score and describe one run with one seed: (results row, checkpoint rows)."""
    out = workdir / f"{run.name}-seed{seed}"
    log = workdir / f"{run.name}-seed{seed}.log"
    meta = machine()
    code, _, _, text = run_child(_wadi(plan_args(sweep, run, seed)), env, log)
    if code != 0:
        raise RuntimeError(f"{run.name} seed {seed}: the flags do not resolve (exit {code}); see {log}")
    plan = _json(text)
    code, wall, rss, _ = run_child(_wadi(distill_args(sweep, run, seed, out)), env, log)
    if code != 0:
        raise RuntimeError(f"{run.name} seed {seed}: wadi distill exited {code}; see {log}")
    code, _, _, text = run_child(_wadi(eval_args(sweep, out)), env, log)
    if code != 0:
        raise RuntimeError(f"{run.name} seed {seed}: wadi eval exited {code}; see {log}")
    scores = _json(text)
    commit, evals = git_commit(), shlex.join(sweep.eval)
    attrs = scores.get("per_attribute_accuracy", {})
    row = {
        "name": run.name,
        "group": run.group,
        "seed": seed,
        **{c: plan["config"][c] for c in sweep.columns},
        "accuracy": scores["accuracy"],
        "fd": round(scores["fd"], 4),
        **{f"accuracy_{k}": attrs.get(k, "") for k in ("color", "shape", "position")},
        "trainable_params": plan["plan"]["student"]["trainable_params"],
        "train_seconds": round(wall, 1),
        "peak_rss_mb": round(rss, 1),
        "flags": shlex.join(run.flags),
        "eval": evals,
        **meta,
        "threads": env.get("OMP_NUM_THREADS", ""),
        "commit": commit,
        "note": "",
    }
    checkpoints = []
    if run.checkpoints:
        for ckpt in sorted((out / "checkpoints").glob("step-*")):
            for weights in ("student", "ema"):
                file = ckpt / f"{weights}.safetensors"
                if not file.is_file():
                    continue
                code, _, _, text = run_child(_wadi(eval_args(sweep, file)), env, log)
                if code != 0:
                    raise RuntimeError(
                        f"{run.name} seed {seed}: wadi eval of {file} exited {code}; see {log}"
                    )
                s = _json(text)
                checkpoints.append(
                    {"name": run.name, "seed": seed, "step": int(ckpt.name.split("-")[1]), "weights": weights,
                     "accuracy": s["accuracy"], "fd": round(s["fd"], 4), "eval": evals, "date": meta["date"],
                     "commit": commit}
                )  # fmt: skip
    return row, checkpoints


# ------------------------------------------------------------------------------ CSV / table


def csv_columns(sweep: Sweep) -> list[str]:
    """The header of the sweep's results CSV."""
    return [*HEAD, *sweep.columns, *TAIL]


def read_rows(path: Path) -> list[dict[str, str]]:
    """The rows of a CSV ([] when it does not exist)."""
    if not path.is_file():
        return []
    with path.open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def append_rows(path: Path, columns: list[str], rows: list[dict[str, Any]]) -> None:
    """Add ``rows`` to the CSV at ``path`` (rewritten atomically, header first)."""
    from wadi_cli.io.atomic import write_text_atomic

    old = read_rows(path)
    if old and list(old[0]) != columns:
        _fail(f"{path} has the columns {list(old[0])}, the sweep file gives {columns}")
    buf = io.StringIO()
    writer = csv.DictWriter(buf, columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows([*old, *rows])
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, buf.getvalue())


def _num(value: str, fmt: str) -> str:
    return format(float(value), fmt) if value not in ("", None) else ""


def markdown(sweep: Sweep) -> str:
    """The table of the sweep's results CSV (and checkpoint CSV), grouped as the file groups its runs."""
    rows, ckpts = read_rows(sweep.results), read_rows(sweep.checkpoint_results)
    path = sweep.path.resolve()
    rel = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
    order = {r.name: i for i, r in enumerate(sweep.runs)}
    rows.sort(key=lambda r: (order.get(r["name"], len(order)), int(r["seed"]), r["date"]))
    run_cmd = shlex.join(["wadi", *distill_args(sweep, Run("NAME", "", ["FLAGS"], [0]), 0, "RUN")])
    run_cmd = run_cmd.replace("--seed 0", "--seed SEED")
    machines = sorted({r["machine"] for r in rows if r["machine"]})
    lines = [
        f"# {sweep.title}",
        "",
        f"Generated by `python analysis/sweep.py {rel} --table` from `{sweep.results.name}` (one row "
        f"per run and seed, with every setting that varied: {', '.join(sweep.columns)})"
        + (f" and `{sweep.checkpoint_results.name}`" if ckpts else "")
        + f". Each run is `{run_cmd}`, then "
        f"`{shlex.join(['wadi', *eval_args(sweep, 'RUN')])}`; FLAGS and seeds are in `{sweep.path.name}`. "
        f"Re-run one: `python analysis/sweep.py {rel} --only NAME --seeds SEED`.",
        "",
        "Machines: " + "; ".join(machines) + ". Dates and load per row in the CSV.",
    ]
    groups: dict[str, list[dict[str, str]]] = {}
    for r in rows:
        groups.setdefault(r["group"], []).append(r)
    for group, members in groups.items():
        lines += ["", f"## {group or 'runs'}", ""]
        lines += ["| run | seed | flags | steps | accuracy | fd | train s | peak RSS MB | date | note |"]
        lines += ["|---|---|---|---|---|---|---|---|---|---|"]
        for r in members:
            lines.append(
                f"| {r['name']} | {r['seed']} | `{r['flags']}` | {r.get('max_steps', '')} | "
                f"{_num(r['accuracy'], '.3f')} | {_num(r['fd'], '.2f')} | "
                f"{_num(r['train_seconds'], '.0f')} | {_num(r['peak_rss_mb'], '.0f')} | {r['date'][:10]} | "
                f"{r['note']} |"
            )
        by_name: dict[str, list[dict[str, str]]] = {}
        for r in members:
            by_name.setdefault(r["name"], []).append(r)
        several = {n: rs for n, rs in by_name.items() if len(rs) > 1}
        if several:
            lines += ["", "| run | seeds | mean accuracy | mean fd | fd range | mean train s |"]
            lines += ["|---|---|---|---|---|---|"]
            for name, rs in several.items():
                fds = [float(r["fd"]) for r in rs]
                acc = sum(float(r["accuracy"]) for r in rs) / len(rs)
                secs = [float(r["train_seconds"]) for r in rs if r["train_seconds"]]
                mean_s = f"{sum(secs) / len(secs):.0f}" if secs else ""
                lines.append(
                    f"| {name} | {', '.join(r['seed'] for r in rs)} | {acc:.3f} | "
                    f"{sum(fds) / len(fds):.2f} | {min(fds):.2f}–{max(fds):.2f} | {mean_s} |"
                )
    if ckpts:
        lines += ["", "## Checkpoint by checkpoint", "", "accuracy / fd of each kept checkpoint's student "
                  "(`student`) or EMA (`ema`), scored like the final weights.", "",
                  "| run | seed | weights | step: accuracy / fd |", "|---|---|---|---|"]  # fmt: skip
        series: dict[tuple[str, str, str], list[dict[str, str]]] = {}
        for c in sorted(
            ckpts, key=lambda c: (order.get(c["name"], len(order)), int(c["seed"]), int(c["step"]))
        ):
            series.setdefault((c["name"], c["seed"], c["weights"]), []).append(c)
        for (name, seed, weights), cs in series.items():
            points = " · ".join(
                f"{c['step']}: {_num(c['accuracy'], '.3f') or '–'} / {_num(c['fd'], '.2f')}" for c in cs
            )
            lines.append(f"| {name} | {seed} | {weights} | {points} |")
    return "\n".join(lines) + "\n"


def write_table(sweep: Sweep) -> None:
    """Rewrite the sweep's Markdown table from its CSVs."""
    from wadi_cli.io.atomic import write_text_atomic

    write_text_atomic(sweep.table, markdown(sweep))


# ---------------------------------------------------------------------------------- command


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sweep", type=Path, help="a sweep file, e.g. analysis/distill_tiny/runs.toml")
    ap.add_argument("--only", nargs="+", metavar="NAME", help="these runs only")
    ap.add_argument("--group", help="the runs of this group only")
    ap.add_argument("--seeds", nargs="+", type=int, help="these seeds instead of each run's own")
    ap.add_argument("--jobs", type=int, default=1, help="runs side by side (default 1)")
    ap.add_argument("--threads", type=int, default=1, help="OMP / MKL threads per child (default 1)")
    ap.add_argument("--keep-runs", type=Path, help="keep the run folders (and logs) here")
    ap.add_argument(
        "--results", type=Path, help="write rows to this CSV instead of the sweep's (its table next to it)"
    )
    ap.add_argument("--list", action="store_true", help="list the runs and exit")
    ap.add_argument("--dry-run", action="store_true", help="print the commands and exit")
    ap.add_argument("--table", action="store_true", help="only rewrite the Markdown table from the CSV")
    args = ap.parse_args(argv)
    sweep = load_sweep(args.sweep)
    if args.results:
        sweep.results = args.results
        sweep.checkpoint_results = args.results.with_name(args.results.stem + "_checkpoints.csv")
    if args.table:
        write_table(sweep)
        print(f"wrote {sweep.table}")
        return 0
    if args.list:
        for run in sweep.runs:
            seeds = ",".join(map(str, run.seeds))
            print(f"{run.name:32s} {run.group:24s} seeds {seeds:8s} {shlex.join(run.flags)}")
        return 0
    pairs = select(sweep, args.only, args.group, args.seeds)
    if args.jobs < 1 or args.threads < 1:
        _fail("--jobs and --threads must be >= 1")
    if args.dry_run:
        print(dry_run(sweep, pairs, str(args.keep_runs or "RUNS")), end="")
        return 0
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    lock, failed = threading.Lock(), []

    def work(pair: tuple[Run, int], workdir: Path) -> None:
        run, seed = pair
        try:
            row, ckpts = one_run(sweep, run, seed, workdir, env)
        except RuntimeError as exc:
            print(f"error: {exc}", file=sys.stderr, flush=True)
            failed.append(pair)
            return
        with lock:
            append_rows(sweep.results, csv_columns(sweep), [row])
            if ckpts:
                append_rows(sweep.checkpoint_results, CHECKPOINT_COLUMNS, ckpts)
            write_table(sweep)
        print(f"{run.name} seed {seed}: accuracy {row['accuracy']:.3f} fd {row['fd']:.2f} "
              f"{row['train_seconds']:.0f} s {row['peak_rss_mb']:.0f} MB", flush=True)  # fmt: skip

    with tempfile.TemporaryDirectory(prefix="wadi-sweep-") as tmp:
        workdir = args.keep_runs or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            list(pool.map(lambda p: work(p, workdir), pairs))
    print(f"{len(pairs) - len(failed)} of {len(pairs)} runs written to {sweep.results}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
