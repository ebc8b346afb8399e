"""The demo's students: specs and their training, several at once in worker processes.

The tiny backbone trains fastest on ONE thread (its ops are too small to split), so on a
2-core machine two students train side by side, each in its own spawned process with one
thread, and the wall time is close to that of the slowest queue rather than the sum.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue as queue_mod
import resource
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wadi_cli.distill.config import DistillConfig, resolve_config
from wadi_cli.errors import WadiError


@dataclass(frozen=True)
class StudentSpec:
    """One student of the comparison: a name and the distill config values it changes."""

    name: str
    label: str
    overrides: dict[str, Any] = field(default_factory=dict)


#: LoRaD (the method); LoRA at rank 12 (163,200 trainable parameters, about LoRaD rank
#: 16's 165,632 on the tiny U-Net); a full fine-tune (every weight, as DMD2), whose lr is
#: the tiny backbone's full-fine-tune default (an adapter's lr 1e-2 destroys it).
STUDENTS: dict[str, StudentSpec] = {
    "lorad": StudentSpec("lorad", "LoRaD (rank 16)", {"adapter": "lorad"}),
    "lora": StudentSpec("lora", "LoRA (rank 12)", {"adapter": "lora", "rank": 12}),
    "full": StudentSpec("full", "full fine-tune", {"adapter": "full"}),
}


@dataclass
class TrainResult:
    """What one student's training produced."""

    name: str
    run: Path
    seconds: float
    peak_rss_mb: float
    steps: int


#: The shipped ``--config`` the students train with: the paper's objective only
#: (``wadi_cli/configs/distill/tiny_paper.toml``): the demo measures the WaDi method itself,
#: not the tiny recipe's regression term.
STUDENT_RECIPE = "tiny_paper"


def student_config(spec: StudentSpec, steps: int, seed: int) -> DistillConfig:
    """The resolved distill config of ``spec`` on the tiny backbone (``--config``
    :data:`STUDENT_RECIPE` plus the spec's overrides)."""
    return resolve_config(
        STUDENT_RECIPE,
        overrides={
            "backbone": "tiny",
            "max_steps": steps,
            "seed": seed,
            "checkpoint_every": steps,
            "keep_last": 1,
            "validate_every": 0,
            "tensorboard": False,
            "device": "cpu",
            **spec.overrides,
        },
    )


def _worker(name: str, cfg_dict: dict[str, Any], run: str, events: Any) -> None:
    """Spawned process: train one student on one thread, report steps through ``events``.
    (Imports here: the child sets its environment and threads before torch and diffusers load.)"""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from wadi_cli.quiet import quiet_third_party_logs

    quiet_third_party_logs()
    import torch

    torch.set_num_threads(1)
    from wadi_cli.distill import distill

    try:
        cfg = resolve_config(base=cfg_dict)
        start = time.perf_counter()
        every = max(1, cfg.max_steps // 100)

        def on_step(result: Any, seconds: float) -> None:
            if result.step % every == 0 or result.step == cfg.max_steps:
                events.put(("step", name, result.step, result.loss_g, result.loss_fake))

        summary = distill(cfg, run, on_step=on_step)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
        events.put(("done", name, time.perf_counter() - start, peak, summary.step))
    except BaseException as exc:  # report, never hang the parent
        events.put(("error", name, f"{type(exc).__name__}: {exc}", traceback.format_exc()))


def train_students(
    specs: list[StudentSpec],
    steps: int,
    seed: int,
    workdir: Path,
    *,
    jobs: int = 2,
    on_step: Callable[[str, int, float, float], None] | None = None,
    side_job: Callable[[], None] | None = None,
    on_state: Callable[[str, str], None] | None = None,
) -> dict[str, TrainResult]:
    """Train ``specs`` (``jobs`` at a time, one thread each) into ``workdir/<name>``.

    ``side_job`` (e.g. the teacher's evaluation) runs in a thread of this process once a slot
    frees up for it, i.e. when fewer than ``jobs`` students remain to be trained; meanwhile
    this thread goes on reading the workers' events, so ``on_step`` keeps reporting every
    student's real step while the side job works. ``on_state(name, text)`` says when a
    student is launched (``"loading"``) and when it finished (``"done in N s"``).
    """
    ctx = mp.get_context("spawn")
    events = ctx.Queue()
    pending = list(specs)
    running: dict[str, Any] = {}
    results: dict[str, TrainResult] = {}
    side: _SideJob | None = None

    def launch() -> None:
        spec = pending.pop(0)
        cfg = student_config(spec, steps, seed)
        proc = ctx.Process(
            target=_worker, args=(spec.name, cfg.to_dict(), str(workdir / spec.name), events), daemon=True
        )
        proc.start()
        running[spec.name] = proc
        if on_state is not None:
            on_state(spec.name, "loading")

    try:
        while pending or running or side is None or not side.finished():
            while pending and len(running) < jobs:
                launch()
            if side is None and len(running) + len(pending) < jobs:
                side = _SideJob(side_job)
            if not running:
                side.wait(0.5)  # type: ignore[union-attr]  # nothing left to read: wait for the side job
                continue
            try:
                event = events.get(timeout=0.5)
            except queue_mod.Empty:
                dead = [n for n, p in running.items() if not p.is_alive() and p.exitcode not in (0, None)]
                if dead:
                    raise WadiError(
                        f"training the {dead[0]} student died (exit code {running[dead[0]].exitcode})"
                    ) from None
                continue
            kind, name = event[0], event[1]
            if kind == "step" and on_step is not None:
                on_step(name, event[2], event[3], event[4])
            elif kind == "done":
                running.pop(name).join()
                results[name] = TrainResult(name, workdir / name, event[2], event[3], event[4])
                if on_state is not None:
                    on_state(name, f"done in {event[2]:.0f} s")
            elif kind == "error":
                running.pop(name).join()
                if os.environ.get("WADI_DEBUG"):
                    print(event[3])
                raise WadiError(f"training the {name} student failed: {event[2]}")
        side.result()  # type: ignore[union-attr]  # the side job's own error, if any
    finally:
        for proc in running.values():
            proc.terminate()
            proc.join()
    return results


class _SideJob:
    """``job`` in a daemon thread; :meth:`result` re-raises what it raised."""

    def __init__(self, job: Callable[[], None] | None) -> None:
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(job,), name="wadi-demo-side-job", daemon=True)
        self._thread.start()

    def _run(self, job: Callable[[], None] | None) -> None:
        try:
            if job is not None:
                job()
        except BaseException as exc:  # handed to the main thread by result()
            self._error = exc

    def finished(self) -> bool:
        return not self._thread.is_alive()

    def wait(self, timeout: float | None) -> None:
        self._thread.join(timeout)

    def result(self) -> None:
        self._thread.join()
        if self._error is not None:
            raise self._error
