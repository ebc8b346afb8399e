"""Stopping a training run cleanly on Ctrl-C (SIGINT) or SIGTERM: the loop finishes the
current step, saves a checkpoint and exits."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from typing import Any

from wadi_cli.distill.launch import launched_world_size

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def stop_on_signals() -> Iterator[dict[str, Any]]:
    """The first Ctrl-C (SIGINT) or SIGTERM (what a batch scheduler such as SLURM sends
    before it kills a job) sets ``flag["stop"]`` to the signal's name: the loop saves a
    checkpoint and exits after the current step. A second Ctrl-C of a process on its own
    interrupts at once. Repeats are otherwise ignored: under ``accelerate launch`` every
    worker gets each signal twice (from the terminal or scheduler, and passed on by the
    launcher, which also enforces its own deadline), and schedulers may repeat SIGTERM
    before their SIGKILL. A signal that is ignored (SIGINT of a job started with ``nohup``
    or in the background of a script) stays ignored."""
    flag: dict[str, Any] = {"stop": None}
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    launched = launched_world_size() > 1

    def handler(signum: int, frame: Any) -> None:
        if flag["stop"] is None:
            flag["stop"] = signal.Signals(signum).name
        elif signum == signal.SIGINT and not launched:
            raise KeyboardInterrupt

    previous = {}
    for sig in STOP_SIGNALS:
        if signal.getsignal(sig) is not signal.SIG_IGN:
            previous[sig] = signal.signal(sig, handler)
    try:
        yield flag
    finally:
        for sig, before in previous.items():
            signal.signal(sig, before)
