"""Output folders: the ``.wadi`` ownership marker, early checks, and folders that appear
all at once.

Every folder wadi creates holds a ``.wadi`` marker, and only such folders (or empty ones)
are ever replaced, so a typo in ``--out`` cannot delete a user's folder. A ``--out DIR``
is built as a hidden temporary sibling and renamed into place when its ``with`` block
succeeds (:func:`atomic_output_dir`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from wadi_cli import __version__
from wadi_cli.errors import BadInputError, WriteError
from wadi_cli.io.atomic import (
    WRITE_ERRNOS,
    fsync_dir,
    fsync_tree,
    replace_dir,
    umasked,
    write_error,
    write_text_atomic,
)
from wadi_cli.io.crash_hook import pause_before_rename
from wadi_cli.io.stale_temps import clear_stale_temps, temp_prefix

MARKER = ".wadi"


def unused_path(path: str | os.PathLike[str]) -> Path:
    """``path`` if nothing is there yet, else the first free ``path-2``, ``path-3``, …
    (default output folders that never replace an earlier result). Creates nothing."""
    base = Path(path)
    found, n = base, 1
    while found.exists():
        n += 1
        found = base.with_name(f"{base.name}-{n}")
    return found


def _is_ours_or_empty(folder: Path) -> bool:
    return (folder / MARKER).is_file() or not any(folder.iterdir())


def _check_output_dir(dest: Path) -> None:
    if dest.exists() and not dest.is_dir():
        raise BadInputError(f"{dest}: exists and is not a folder; choose another output path")
    if dest.is_dir() and not _is_ours_or_empty(dest):
        raise BadInputError(
            f"{dest}: folder exists, is not empty and was not written by wadi (no {MARKER} marker); "
            "refusing to replace it: choose another output path or remove it yourself"
        )


def check_writable(path: str | os.PathLike[str], *, directory: bool = False) -> Path:
    """Fail early, in one line, if ``path`` cannot be written, before long work: a path that
    cannot be an output (a folder for a file, a foreign folder) is a :class:`BadInputError`;
    a place the OS will not let us write (read-only, permissions, full) a :class:`WriteError`,
    the same error and exit code as a write that fails later.

    ``directory=True``: ``path`` is an output folder (it must be absent, empty, or one of
    ours). Otherwise ``path`` is an output file (it must not be a folder). Probes by
    creating and removing a temporary file in the nearest existing ancestor.
    """
    dest = Path(path).expanduser()
    if directory:
        _check_output_dir(dest)
    elif dest.is_dir():
        raise BadInputError(f"{dest}: is a folder; expected a file path")
    probe_dir = dest.parent
    while not probe_dir.exists() and probe_dir != probe_dir.parent:
        probe_dir = probe_dir.parent
    if not probe_dir.is_dir():
        raise BadInputError(f"{dest}: cannot be created, {probe_dir} is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".wadi-probe.", dir=probe_dir)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise WriteError(
            f"cannot write {dest}: not writable ({exc.strerror or exc} in {probe_dir})"
        ) from None
    return dest


def _marker_text(kind: str | None = None) -> str:
    info = {"created_by": "wadi", "wadi_version": __version__, **({"kind": kind} if kind else {})}
    return json.dumps(info) + "\n"


def _write_marker(folder: Path) -> None:
    (folder / MARKER).write_text(_marker_text(), encoding="utf-8")


def create_output_dir(path: str | os.PathLike[str], kind: str) -> Path:
    """Create the folder ``path`` that wadi fills over time (a run, an evaluation) with its
    ``.wadi`` marker (``kind`` recorded), after every check passed; an existing marker stays."""
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / MARKER).is_file():
        write_text_atomic(folder / MARKER, _marker_text(kind))
    return folder


@contextlib.contextmanager
def atomic_output_dir(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary folder; when the block succeeds it becomes ``path``, all at once.

    ``path`` must be absent, an empty folder, or a folder wadi wrote (it has a ``.wadi``
    marker, which this function writes); anything else raises :class:`BadInputError`
    before the block runs. On error the temporary folder is removed and ``path`` is
    untouched; a full or read-only disk (inside the block too) is a :class:`WriteError`.
    """
    dest = Path(path).expanduser()
    _check_output_dir(dest)
    tmp: Path | None = None
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        clear_stale_temps(dest.parent, dest.name)
        tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(dest.name), suffix=".tmp", dir=dest.parent))
        os.chmod(tmp, umasked(0o777))  # mkdtemp makes 0700; give the folder normal permissions
        _write_marker(tmp)
    except OSError as exc:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise write_error(dest, exc) from None
    try:
        try:
            yield tmp
        except WriteError as exc:  # name the file by its final path, not the temporary one
            raise WriteError(str(exc).replace(str(tmp), str(dest))) from None
        except OSError as exc:
            if exc.errno in WRITE_ERRNOS:
                raise write_error(str(exc.filename or dest).replace(str(tmp), str(dest)), exc) from None
            raise
        _check_output_dir(dest)  # it may have changed while we worked
        try:
            fsync_tree(tmp)
            pause_before_rename()
            replace_dir(tmp, dest)
            fsync_dir(dest.parent)
        except OSError as exc:
            raise write_error(dest, exc) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
