"""A fake ``wadi`` for sweep tests: ``distill`` writes checkpoint folders a real run would
leave (state.json + the files :func:`read_state` checks), ``eval --watch`` writes
``RUN/eval.csv`` from a planted metric, so the runner's file logic runs without training."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from wadi_cli.distill.checkpoint import required_files


def _flag(args: list[str], name: str, default: str | None = None) -> str | None:
    return args[args.index(name) + 1] if name in args else default


class FakeWadi:
    """``planted(cell_args, seed, step) -> fd``; records every call; ``fail`` (a substring of
    the distill arguments) makes those runs exit 2 with a one-line error; ``die_after`` raises
    KeyboardInterrupt once that many distill calls have been made (a killed sweep)."""

    def __init__(self, planted: Callable[[list[str], int, int], float], max_steps: int = 4, every: int = 2):
        self.planted, self.max_steps, self.every = planted, max_steps, every
        self.calls: list[list[str]] = []
        self.fail: str | None = None
        self.die_after: int | None = None
        self.stop_at: int | None = None  # distill stops (exit 0) after this step: an interrupted run

    def __call__(self, args: list[str], log: Path) -> tuple[int, str]:
        self.calls.append(list(args))
        log.parent.mkdir(parents=True, exist_ok=True)
        if args[0] == "distill":
            if self.die_after is not None and sum(c[0] == "distill" for c in self.calls) > self.die_after:
                raise KeyboardInterrupt
            if self.fail and self.fail in " ".join(args):
                log.write_text("error: --rank must be at least 1\n")
                return 2, "error: --rank must be at least 1"
            run, seed = Path(_flag(args, "--out")), int(_flag(args, "--seed"))
            start = 0
            if "--resume" in args:
                start = max(int(p.name.split("-")[1]) for p in (run / "checkpoints").iterdir())
            end = self.max_steps if self.stop_at is None else min(self.stop_at, self.max_steps)
            for step in range(start + self.every, end + 1, self.every):
                ckpt = run / "checkpoints" / f"step-{step:08d}"
                ckpt.mkdir(parents=True)
                state = {"step": step, "data_position": step, "targets": {"student": [], "fake": []},
                         "config": {"max_steps": self.max_steps, "ema_decay": 0.0, "seed": seed,
                                    "args": args}}  # fmt: skip
                (ckpt / "state.json").write_text(json.dumps(state))
                for name in required_files(["student", "fake"], False)[1:]:
                    (ckpt / name).write_bytes(b"")
            return 0, ""
        if args[0] == "analyze":  # wadi analyze RUN --out RUN/analysis: planted changes per seed
            run = Path(args[1])
            seed = json.loads((sorted((run / "checkpoints").iterdir())[-1] / "state.json").read_text())
            seed = seed["config"]["seed"]
            out = Path(_flag(args, "--out"))
            out.mkdir(parents=True)
            overall = {"norm_rel_change_mean": 0.01 * (seed + 1), "direction_change_mean": 0.3 + seed}
            (out / "summary.json").write_text(json.dumps({"overall": overall}))
            return 0, ""
        run = Path(_flag(args, "--watch"))
        steps = sorted(int(p.name.split("-")[1]) for p in (run / "checkpoints").iterdir())
        lines = ["step,accuracy,fd"]
        for step in steps:
            state = json.loads((run / "checkpoints" / f"step-{step:08d}" / "state.json").read_text())
            fd = self.planted(state["config"]["args"], state["config"]["seed"], step)
            lines.append(f"{step},0.5,{float(fd)!r}")
        (run / "eval.csv").write_text("\n".join(lines) + "\n")
        return 0, ""
