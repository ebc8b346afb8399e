"""How fast the ``wadi`` CLI answers: ``wadi --help``, ``wadi CMD --help`` and ``wadi info``.

Each measurement is the wall time of a fresh Python process running the CLI's entry point
(``wadi_cli.cli.main:main``, what the ``wadi`` console script calls) with the given
arguments, output discarded. Targets: ``--help`` and ``CMD --help`` <= 0.5 s, ``info -b
NAME`` <= 1.5 s (medians).

Each round also times the framework's own floor: a bare two-command Typer app in the same
markup mode answering ``cmd --help`` (Python start-up plus typer, its pydantic coercion and
rich), which no CLI built on them can beat.

With ``--before PATH`` (a checkout of earlier code, e.g. ``git worktree add /tmp/before
main``) every command is also run from that checkout, the two alternating run by run (the
order flips every round), so that a busy machine slows both sides alike; the table gives
both medians and their ratio. Both sides use this interpreter and its installed packages
(the checkout comes first on ``PYTHONPATH``; the script checks which copy it imported).
Results, with machine, load average and date, go to ``analysis/results/bench_startup.json``
and ``.md``.

    python analysis/bench_startup.py --before /tmp/before --repeats 7
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "analysis" / "results" / "bench_startup.json"
COMMANDS = ("analyze", "swap", "merge", "info", "sample", "eval", "distill", "export", "demo")
BACKBONES = ("sd15", "sd21", "pixart", "tiny")
LAUNCH = "import sys; sys.argv[0] = 'wadi'; from wadi_cli.cli.main import main; main()"
TARGETS = {"help": 0.5, "info": 1.5}
# `python -c` puts the working directory first on sys.path: run from a neutral folder so
# that PYTHONPATH alone decides which copy of wadi_cli is imported.
NEUTRAL_CWD = tempfile.gettempdir()
FLOOR = (
    "import typer\n"
    "app = typer.Typer(rich_markup_mode='markdown', add_completion=False, pretty_exceptions_enable=False)\n"
    "@app.command()\n"
    "def cmd(x: int = typer.Option(1, help='An option.'), y: str = typer.Option('a', help='Another.')):\n"
    "    'One command.'\n"
    "@app.command()\n"
    "def other():\n"
    "    'Another command.'\n"
    "app()\n"
)


def cases() -> list[tuple[str, list[str]]]:
    """(kind, argv) of every measured invocation."""
    out = [("help", ["--help"])]
    out += [("help", [cmd, "--help"]) for cmd in COMMANDS]
    out += [("info", ["info"])]
    out += [("info", ["info", "-b", name]) for name in BACKBONES]
    return out


def _env(root: Path) -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(root))
    env.pop("WADI_DEBUG", None)
    return env


def imported_from(root: Path) -> Path:
    """Where ``wadi_cli`` is imported from with ``root`` first on the path."""
    code = "import wadi_cli, pathlib; print(pathlib.Path(wadi_cli.__file__).resolve().parent.parent)"
    out = subprocess.run(
        [sys.executable, "-c", code], env=_env(root), capture_output=True, text=True, cwd=NEUTRAL_CWD
    )
    return Path(out.stdout.strip())


def time_once(root: Path, argv: list[str], code: str = LAUNCH) -> float:
    """Wall time of one CLI process (exit status checked: a failing command is no answer)."""
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", code, *argv], env=_env(root), capture_output=True, text=True, cwd=NEUTRAL_CWD
    )
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"wadi {' '.join(argv)} failed in {root}: {proc.stderr.strip()[-300:]}")
    return seconds


def git_commit(root: Path) -> str:
    out = subprocess.run(
        ["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    )
    dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain"], capture_output=True, text=True)
    return out.stdout.strip() + ("+changes" if dirty.stdout.strip() else "")


def run(sides: dict[str, Path], repeats: int) -> tuple[dict[str, dict[str, list[float]]], list[float]]:
    """{argv string: {side: [seconds, …]}}, sides alternating run by run; and the floor's times."""
    times: dict[str, dict[str, list[float]]] = {" ".join(a): {s: [] for s in sides} for _, a in cases()}
    floor: list[float] = []
    names = list(sides)
    for r in range(repeats):
        order = names if r % 2 == 0 else names[::-1]
        for _, argv in cases():
            for side in order:
                times[" ".join(argv)][side].append(time_once(sides[side], argv))
        floor.append(time_once(REPO, ["cmd", "--help"], FLOOR))
        print(f"round {r + 1}/{repeats} done", file=sys.stderr)
    return times, floor


def table(results: dict[str, object]) -> str:
    rows = results["rows"]
    before = results["before"] is not None
    head = "| command | kind | target (s) | after: median (s) | min–max |"
    head += " before: median (s) | before / after |" if before else ""
    sep = "|---" * (7 if before else 5) + "|"
    lines = [head, sep]
    for row in rows:
        a = row["after"]
        line = f"| `wadi {row['argv']}` | {row['kind']} | {row['target_s']} | **{a['median_s']:.3f}** |"
        line += f" {a['min_s']:.3f}–{a['max_s']:.3f} |"
        if before:
            b = row["before"]
            line += f" {b['median_s']:.3f} | {b['median_s'] / a['median_s']:.1f}× |"
        lines.append(line)
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", type=Path, help="A checkout of the earlier code to compare with.")
    ap.add_argument("--repeats", type=int, default=7, help="Runs per command and side (median kept).")
    ap.add_argument("--out", type=Path, default=RESULTS, help="Results JSON (a .md is written beside it).")
    args = ap.parse_args()

    sides = {"after": REPO}
    if args.before is not None:
        sides["before"] = args.before.resolve()
    for side, root in sides.items():
        if imported_from(root) != root:
            raise SystemExit(f"{side}: wadi_cli is not imported from {root} (got {imported_from(root)})")
    load_start = os.getloadavg()[0]
    started = dt.datetime.now(dt.timezone.utc)
    times, floor = run(sides, args.repeats)
    rows = []
    for kind, argv in cases():
        key = " ".join(argv)
        row: dict[str, object] = {"argv": key, "kind": kind, "target_s": TARGETS[kind]}
        for side, ts in times[key].items():
            row[side] = {
                "median_s": statistics.median(ts),
                "min_s": min(ts),
                "max_s": max(ts),
                "runs": [round(t, 4) for t in ts],
            }
        row["meets_target"] = row["after"]["median_s"] <= TARGETS[kind]  # type: ignore[index]
        rows.append(row)

    from wadi_cli.machine import machine_info

    results = {
        "benchmark": "CLI start-up: fresh process per command, wall time",
        "command": "python analysis/bench_startup.py"
        + (" --before BEFORE" if args.before else "")  # BEFORE: the earlier checkout (no machine paths)
        + f" --repeats {args.repeats}",
        "after": {"root": ".", "commit": git_commit(REPO)},
        "before": None if args.before is None else {"root": "BEFORE", "commit": git_commit(sides["before"])},
        "repeats": args.repeats,
        "machine": machine_info(),
        "load_average_1min": {"start": round(load_start, 2), "end": round(os.getloadavg()[0], 2)},
        "date": started.isoformat(timespec="seconds"),
        "seconds": round((dt.datetime.now(dt.timezone.utc) - started).total_seconds(), 1),
        "rows": rows,
        "floor_bare_typer_help": {
            "median_s": statistics.median(floor),
            "min_s": min(floor),
            "max_s": max(floor),
            "runs": [round(t, 4) for t in floor],
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    m = results["machine"]
    md = [
        "# CLI start-up time",
        "",
        "Wall time of a fresh process running `wadi …` (the console script's entry point), output "
        f"discarded; median of {args.repeats} runs per command"
        + (", before and after run alternately (the order flips every round)." if args.before else "."),
        "",
        table(results),
        "",
        "Floor of the framework, same rounds: a bare two-command Typer app answers `cmd --help` in "
        f"{results['floor_bare_typer_help']['median_s']:.3f} s (median; "
        f"{results['floor_bare_typer_help']['min_s']:.3f}–{results['floor_bare_typer_help']['max_s']:.3f}).",
        "",
        f"after = {results['after']['commit']}"
        + (f", before = {results['before']['commit']}" if args.before else "")
        + f". Machine: {m['cpu']}, {m['cores']} cores, Python {m['python']}, torch {m['torch']}. "
        f"Date: {results['date']}. Command: `{results['command']}`.",
        "",
        f"Load average (1 min) at start / end: {results['load_average_1min']['start']} / "
        f"{results['load_average_1min']['end']} on {m['cores']} CPUs. The machine is shared with other "
        "jobs: absolute times are indicative; before and after ran interleaved, so their ratio is "
        "the result.",
        "",
    ]
    args.out.with_suffix(".md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
