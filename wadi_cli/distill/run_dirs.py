"""Where ``wadi distill`` puts a run when no ``--out`` is given, and how ``--resume latest``
finds it again: ``./runs/NAME-YYYYmmdd-HHMMSS`` (NAME = the backbone), the newest first."""

from __future__ import annotations

import datetime as dt
import os
import re
from pathlib import Path

from wadi_cli.distill.checkpoint import list_checkpoints
from wadi_cli.errors import BadInputError
from wadi_cli.io import unused_path

#: Parent folder of the default run folders (relative to the working directory).
RUNS_ROOT = Path("runs")
_STAMP = "%Y%m%d-%H%M%S"
_NAME_RE = re.compile(r"^(?P<backbone>[a-z0-9]+)-(?P<stamp>\d{8}-\d{6})(?:-(?P<n>\d+))?$")


def is_run_folder(path: str | os.PathLike[str] | None) -> bool:
    """True for a ``wadi distill --out RUN`` folder (it has ``checkpoints/step-*``)."""
    if path is None:
        return False
    p = Path(path).expanduser()
    return p.is_dir() and any((p / "checkpoints").glob("step-*"))


def new_run_dir(
    backbone: str, root: str | os.PathLike[str] = RUNS_ROOT, now: dt.datetime | None = None
) -> Path:
    """A run folder that does not exist yet: ``root/BACKBONE-YYYYmmdd-HHMMSS`` (local time),
    with ``-2``, ``-3``, … appended when that second is already taken. Creates nothing."""

    stamp = (now or dt.datetime.now()).strftime(_STAMP)
    return unused_path(Path(root) / f"{backbone}-{stamp}")


def _sort_key(path: Path) -> tuple[str, int]:
    m = _NAME_RE.match(path.name)
    assert m is not None
    return m["stamp"], int(m["n"] or 1)


def latest_run_dir(
    backbone: str | None = None, root: str | os.PathLike[str] = RUNS_ROOT, command: str = "wadi distill"
) -> Path:
    """The newest default-named run folder under ``root`` that holds a checkpoint, of
    ``backbone`` (any backbone when ``None``). One-line :class:`BadInputError` naming the
    ``command`` that starts a run when there is none."""

    base = Path(root)
    runs = []
    if base.is_dir():
        for p in base.iterdir():
            m = _NAME_RE.match(p.name)
            if m and p.is_dir() and (backbone is None or m["backbone"] == backbone) and list_checkpoints(p):
                runs.append(p)
    if not runs:
        which = f"{backbone} run" if backbone else "run"
        start = f"{command} -b {backbone}" if backbone else f"{command} -b NAME"
        raise BadInputError(
            f"--resume latest: no {which} with a checkpoint under {base}/ (runs are found there when "
            f"started without --out); start one with `{start}`, or name the run folder with --out RUN"
        )
    return max(runs, key=_sort_key)
