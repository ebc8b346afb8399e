"""``wadi eval --watch RUN``: evaluate each new checkpoint of a ``wadi distill`` run.

A checkpoint folder ``RUN/checkpoints/step-NNNNNNNN`` only appears once complete (it is
written as a hidden temporary folder and renamed), so every listed one can be read; its
student adapter (the EMA copy when the run keeps one) is copied first, because the run
may delete old checkpoints (``keep_last``) while we score. Results go to
``RUN/eval/step-NNNNNNNN/`` (a resumable evaluation folder), one row per checkpoint in
``RUN/eval.csv`` and TensorBoard scalars ``eval/<metric>`` in ``RUN/tensorboard``.

The run has finished when its newest checkpoint reached the config's ``max_steps``, or when
it stopped (Ctrl-C): ``wadi distill`` writes ``ranks.json`` after its last checkpoint, and
``config.json`` again when it (re)starts.
"""

from __future__ import annotations

import contextlib
import csv
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

from wadi_cli.distill.checkpoint import CHECKPOINTS, list_checkpoints
from wadi_cli.distill.export import run_weights
from wadi_cli.distill.validate import append_csv_row
from wadi_cli.errors import BadInputError, CheckpointError
from wadi_cli.evaluation.parallel import Processes

EVAL_CSV = "eval.csv"
EVAL_DIR = "eval"


def check_run(run: str | Path) -> Path:
    """``run`` must be a ``wadi distill`` run folder (its marker or config, or checkpoints)."""

    path = Path(run).expanduser()
    if not path.is_dir():
        raise BadInputError(f"--watch {path}: no such folder")
    marker = path / ".wadi"
    kind = ""
    with contextlib.suppress(OSError, json.JSONDecodeError, AttributeError):
        kind = json.loads(marker.read_text()).get("kind", "")
    if kind != "distill-run" and not (path / "config.json").is_file() and not (path / CHECKPOINTS).is_dir():
        raise BadInputError(f"--watch {path}: not a wadi distill run (no config.json, no checkpoints/)")
    return path


def _state(ckpt: Path) -> dict[str, Any]:
    try:
        return json.loads((ckpt / "state.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{ckpt}: unreadable checkpoint state ({exc})") from None


def run_finished(run: Path) -> bool:
    """True when the newest checkpoint reached ``max_steps`` or the run stopped after it."""

    found = list_checkpoints(run)
    if not found:
        return False
    with contextlib.suppress(CheckpointError, KeyError, TypeError, ValueError):
        state = _state(found[-1])
        if int(state["step"]) >= int(state["config"]["max_steps"]):
            return True
    ranks, config = run / "ranks.json", run / "config.json"
    with contextlib.suppress(OSError):
        stopped = ranks.stat().st_mtime_ns
        return stopped >= found[-1].stat().st_mtime_ns and stopped >= config.stat().st_mtime_ns
    return False


def evaluated_steps(run: Path) -> set[int]:
    """Steps already in ``RUN/eval.csv``."""
    path = run / EVAL_CSV
    if not path.is_file():
        return set()
    with path.open(newline="") as fh:
        return {int(r["step"]) for r in csv.DictReader(fh) if r.get("step", "").isdigit()}


@contextlib.contextmanager
def student_weights(run: Path, ckpt: Path) -> Iterator[tuple[str, str]]:
    """``(file, label)``: a private copy of the checkpoint's student, as ``--weights`` takes
    it (the LoRaD adapter file, or for LoRA / DoRA / full baselines the merged state
    dict), and the checkpoint file it came from."""

    with run_weights(run, str(ckpt), private=True) as (file, student, _):
        yield str(file), str(student)


def append_row(run: Path, row: dict[str, Any]) -> None:
    """One row in ``RUN/eval.csv`` and the scalars in ``RUN/tensorboard`` (when installed)."""

    append_csv_row(run / EVAL_CSV, row)
    try:
        from torch.utils.tensorboard import SummaryWriter  # optional dependency (tensorboard)
    except ImportError:
        return
    writer = SummaryWriter(str(run / "tensorboard"))
    try:
        for key, value in row.items():
            if key != "step" and isinstance(value, int | float):
                writer.add_scalar(f"eval/{key}", value, row["step"])
    finally:
        writer.close()


def watch(
    run: str | Path,
    evaluate: Callable[[tuple[str, str], Path, dict[str, Any]], dict[str, Any] | None],
    procs: Processes,
    *,
    poll_s: float = 30.0,
    on_row: Callable[[dict[str, Any]], None] | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> list[dict[str, Any]]:
    """Evaluate every checkpoint of ``run`` not yet in ``eval.csv``, oldest first, until the
    run has finished. ``evaluate((weights, label), out, run_config)`` scores one student
    into the evaluation folder ``out``. Returns the rows written by this call."""

    path = check_run(run)
    rows: list[dict[str, Any]] = []
    while True:
        finished = run_finished(path)  # read before listing: a checkpoint after it is seen next time
        done = evaluated_steps(path)
        pending = [c for c in list_checkpoints(path) if int(c.name.split("-")[1]) not in done]
        finished, pending = procs.gather([(finished, pending)])[0]  # every process follows the main one
        for ckpt in pending:
            step = int(ckpt.name.split("-")[1])
            try:
                config = _state(ckpt)["config"]
                with student_weights(path, ckpt) as weights:
                    result = evaluate(weights, path / EVAL_DIR / ckpt.name, config)
            except (CheckpointError, FileNotFoundError):
                if ckpt.exists():
                    raise
                continue  # the run deleted it (keep_last) before we could copy it
            procs.barrier()
            if procs.is_main and result is not None:
                row = {"step": step, **result["metrics"]}
                append_row(path, row)
                rows.append(row)
                if on_row is not None:
                    on_row(row)
            procs.barrier()
        if finished:
            return rows
        sleep(poll_s)


def watch_request(template: Any, weights: tuple[str, str], out: Path, config: dict[str, Any]) -> Any:
    """The :class:`~wadi_cli.evaluation.evaluate.ModelRequest` of one checkpoint: the run's
    backbone and base model, the template's captions and settings (ᾱ_T: ``--alpha-bar-t``,
    else the value the checkpoint's student records, as for any weights)."""
    return replace(
        template,
        backbone=str(config.get("backbone", template.backbone)),
        model=config.get("model"),
        weights=weights[0],
        weights_label=weights[1],
        out=out,
        teacher=False,
    )
