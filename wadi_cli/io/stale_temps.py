"""Temporaries of killed writers: their names, whether their writer still runs, and
clearing them.

Every temporary wadi creates is a hidden sibling of its destination named
``.NAME.wadi-HOST-PID.XXXXXXXX.{tmp,old,del}`` (:func:`temp_prefix`). A ``kill -9`` (or a
power cut) leaves it behind; the next wadi writer in the same folder, whatever it writes,
removes it (:func:`clear_stale_temps`) and says so in one ``note:`` line. A temporary is
stale when its writer is gone: on this host, its pid no longer runs; from another host
(a shared file system), it is older than :data:`FOREIGN_STALE_AGE_S`, because the pid
cannot be checked from here. A live writer's temporaries are never touched.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import time
from pathlib import Path

from wadi_cli.errors import WadiNote, warn

#: A temporary written from another host is removed once it is this old (seconds): no
#: wadi write of one file or folder takes a day, so its writer is surely gone.
FOREIGN_STALE_AGE_S = 24 * 3600.0
_TEMP_RE = re.compile(
    r"^\.(?P<name>.+)\.wadi-(?P<host>[A-Za-z0-9_-]+)-(?P<pid>\d+)\.[A-Za-z0-9_]+\.(?P<kind>tmp|old|del)$"
)
_swept: set[tuple[int, str]] = set()  # (pid, folder) already cleared by this process


def host_name() -> str:
    """This host's name as it appears in temporary names (letters, digits, ``_`` and ``-``)."""
    name = socket.gethostname().split(".")[0]
    return re.sub(r"[^A-Za-z0-9_-]", "_", name) or "host"


def temp_prefix(name: str) -> str:
    """Prefix of this process's temporary siblings of ``name`` (host and pid in the name,
    so :func:`remove_stale_temps` can tell a killed writer's leftovers from a live one's)."""
    return f".{name}.wadi-{host_name()}-{os.getpid()}."


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` (on this host) still runs."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: alive, another user's
        return True
    return True


def _is_stale(entry: os.DirEntry, host: str, pid: int, now: float) -> bool:
    if host == host_name():
        return not pid_alive(pid)
    try:
        return now - entry.stat(follow_symlinks=False).st_mtime > FOREIGN_STALE_AGE_S
    except OSError:
        return False


def remove_stale_temps(folder: str | os.PathLike[str], name: str | None = None) -> list[Path]:
    """Remove the temporary files and folders that killed wadi writers left in ``folder``
    (see the module docstring for which are stale; ``name`` limits it to the temporaries
    of one destination). A previous output set aside by a replacement that was killed
    between its two renames (``.old``) is put back if its place is empty.
    Returns what was removed."""
    removed: list[Path] = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    now = time.time()
    for entry in entries:
        m = _TEMP_RE.match(entry.name)
        if not m or (name is not None and m["name"] != name):
            continue
        if not _is_stale(entry, m["host"], int(m["pid"]), now):
            continue
        path = Path(entry.path)
        dest = path.parent / m["name"]
        with contextlib.suppress(OSError):
            if m["kind"] == "old" and not os.path.lexists(dest):
                os.replace(path, dest)
                continue
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(path)
            else:
                path.unlink()
            removed.append(path)
    return removed


def clear_stale_temps(folder: str | os.PathLike[str], name: str | None = None) -> list[Path]:
    """What every writer calls before it writes in ``folder``: remove the stale temporaries
    of every destination there (once per process and folder; those of ``name`` every time)
    and emit one :class:`~wadi_cli.errors.WadiNote` naming what was removed."""
    key = (os.getpid(), os.path.abspath(folder))
    removed = remove_stale_temps(folder, name) if key in _swept else remove_stale_temps(folder)
    _swept.add(key)
    if removed:
        names = ", ".join(p.name for p in removed)
        what = "temporary" if len(removed) == 1 else f"{len(removed)} temporaries"
        warn(f"removed {what} left in {folder} by a killed wadi process: {names}", WadiNote)
    return removed
