"""Multi-process runs through accelerate (the distributed engine; wadi adds no launcher of
its own): ``wadi distill --num-processes N`` re-runs itself under ``accelerate launch``."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Sequence

from wadi_cli.errors import BadInputError


def launched_world_size() -> int:
    """How many processes ``accelerate launch`` / ``torchrun`` started (``WORLD_SIZE``; 1
    when alone), known before any process group exists."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def strip_option(argv: Sequence[str], name: str) -> list[str]:
    """``argv`` without ``name VALUE`` / ``name=VALUE``."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg == name:
            skip = True
            continue
        if arg.startswith(name + "="):
            continue
        out.append(arg)
    return out


def accelerate_command(
    num_processes: int, distill_args: Sequence[str], command: str = "distill"
) -> list[str]:
    """``accelerate launch`` command running ``wadi COMMAND distill_args`` on
    ``num_processes`` processes of this machine (gloo on CPU, NCCL on GPUs). wadi handles
    precision itself (fp16/bf16 frozen base, fp32 adapters), so accelerate's is ``no``.
    Launcher and workers run on this Python (``sys.executable``)."""
    if num_processes < 2:
        raise BadInputError("--num-processes must be at least 2 (run without it for one process)")
    # this interpreter's accelerate, never whichever `accelerate` comes first on PATH (it may
    # belong to another environment, which lacks wadi's extras); the launcher then starts
    # its workers with the same interpreter. It runs through this module (see `_main`).
    return [
        sys.executable,
        "-m",
        "wadi_cli.distill.launch",
        "launch",
        "--multi_gpu",
        "--num_processes",
        str(num_processes),
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "-m",
        "wadi_cli",
        command,
        *distill_args,
    ]


def run_launched(num_processes: int, args: Sequence[str], command: str = "distill") -> int:
    """Run ``wadi COMMAND args`` on ``num_processes`` processes under ``accelerate launch``
    and wait for it; its exit code. While it runs, a SIGTERM to this process (``kill PID``)
    is passed on to the launcher, which passes it on to every worker (a run saves a
    checkpoint and stops). SIGINT is not passed on: Ctrl-C in a terminal already reaches
    the launcher and every worker (one process group), and a repeat would stop them at once."""
    proc = subprocess.Popen(accelerate_command(num_processes, args, command))
    if threading.current_thread() is not threading.main_thread():
        return proc.wait()
    previous = {
        signal.SIGTERM: signal.signal(signal.SIGTERM, lambda signum, frame: proc.send_signal(signum)),
        signal.SIGINT: signal.signal(signal.SIGINT, signal.SIG_IGN),
    }
    try:
        return proc.wait()
    finally:
        for sig, before in previous.items():
            signal.signal(sig, before)


def _main() -> None:
    """``python -m wadi_cli.distill.launch ARGS`` = ``accelerate ARGS``, except that a stop
    signal to the launcher (which passes it on to the workers and waits for them) ends it
    with the shell's code for the signal (128 + its number) instead of a traceback."""
    from accelerate.commands.accelerate_cli import main as accelerate_main
    from torch.distributed.elastic.multiprocessing.api import SignalException

    sys.argv[0] = "accelerate"
    try:
        accelerate_main()
    except SignalException as exc:
        sys.exit(128 + int(exc.sigval))


if __name__ == "__main__":
    _main()
