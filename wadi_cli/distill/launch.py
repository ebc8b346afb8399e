"""Multi-process runs through accelerate (the distributed engine; wadi adds no launcher of
its own): ``wadi distill --num-processes N`` re-runs itself under ``accelerate launch``."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from wadi_cli.errors import BadInputError


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
    # its workers with the same interpreter
    return [
        sys.executable,
        "-m",
        "accelerate.commands.accelerate_cli",
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
