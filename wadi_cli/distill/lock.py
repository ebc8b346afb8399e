"""One run folder, one writer: the lock a training process holds on its run folder.

``RUN/.lock`` records who trains in the folder (pid, host, start time, command). The
process holds an exclusive ``flock`` on that file for the whole run; the kernel drops it
when the process ends in any way (``kill -9`` included), so a lock left behind by a killed
run is free by construction and the next run takes it over. Where the file system has no
``flock`` (some network file systems), the recorded holder decides instead: a pid on this
host that no longer runs, or a holder on another host that has not refreshed the file for
:data:`STALE_AFTER_S` seconds, is stale. The holder refreshes the file's modification time
every :data:`HEARTBEAT_S` seconds.

Under ``accelerate launch`` only the main process (rank 0) takes the lock; the other
ranks train in the same folder under it.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

from wadi_cli.errors import BadInputError
from wadi_cli.io.atomic import write_error
from wadi_cli.io.stale_temps import pid_alive

LOCK_NAME = ".lock"
HEARTBEAT_S = 60.0
STALE_AFTER_S = 600.0
_NO_FLOCK = (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL)

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: the recorded holder decides
    fcntl = None  # type: ignore[assignment]


class RunLockedError(BadInputError):
    """Another live process trains in this run folder."""


def _holder(fd: int) -> dict[str, Any]:
    try:
        data = json.loads(os.pread(fd, 4096, 0).decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _busy(run: Path, holder: dict[str, Any]) -> RunLockedError:
    who = "another process"
    if holder.get("pid"):
        who = f"{holder.get('command', 'wadi distill')} (pid {holder['pid']} on {holder.get('host', '?')}"
        who += f", started {holder['started']})" if holder.get("started") else ")"
    return RunLockedError(
        f"{run} is in use: {who} is training in it; wait for it to finish or stop it, or choose another --out"
    )


def _alive(holder: dict[str, Any], path: Path) -> bool:
    """For file systems without flock: is the recorded holder still running?"""
    if not holder.get("pid"):
        return False
    if holder.get("host") == socket.gethostname():
        return pid_alive(int(holder["pid"]))
    try:
        return time.time() - path.stat().st_mtime < STALE_AFTER_S
    except OSError:
        return False


def _try_flock(fd: int) -> bool | None:
    """True: locked; None: held by another process; False: no flock on this file system."""
    if fcntl is None:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return None
    except OSError as exc:
        if exc.errno in _NO_FLOCK:
            return False
        raise
    return True


class RunLock:
    """The lock on one run folder (see the module docstring). Use :func:`acquire_run_lock`."""

    def __init__(self, run: Path, fd: int, previous: dict[str, Any]) -> None:
        self.run = run
        self.path = run / LOCK_NAME
        self.fd: int | None = fd
        self.previous = previous  # the stale holder this lock replaced ({} if none)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._heartbeat, name="wadi-run-lock", daemon=True)
        self._thread.start()

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            with contextlib.suppress(OSError):
                os.utime(self.path)

    def release(self) -> None:
        """Remove the lock file and drop the lock (idempotent)."""
        if self.fd is None:
            return
        self._stop.set()
        with contextlib.suppress(OSError):
            if os.fstat(self.fd).st_ino == os.stat(self.path).st_ino:
                os.unlink(self.path)
        os.close(self.fd)
        self.fd = None

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def check_run_lock(run: str | os.PathLike[str]) -> None:
    """Raise :class:`RunLockedError` if a live process holds the lock of ``run``; creates
    nothing (the early check before any model loads)."""
    path = Path(run) / LOCK_NAME
    try:  # read-write: on NFS flock is an fcntl lock, and an exclusive one needs write access
        fd = os.open(path, os.O_RDWR)
    except OSError:
        return  # no lock file (or not writable: acquire_run_lock will say so)
    try:
        got = _try_flock(fd)
        holder = _holder(fd)
        if got is None or (got is False and _alive(holder, path)):
            raise _busy(Path(run), holder)
    finally:
        os.close(fd)  # also drops the probe's flock


def acquire_run_lock(run: str | os.PathLike[str], command: str = "wadi distill") -> RunLock:
    """Take the lock of the run folder ``run`` (which must exist) for this process, taking
    over a stale one; :class:`RunLockedError` (one line naming the holder) if a live
    process holds it."""
    run = Path(run)
    path = run / LOCK_NAME
    for _ in range(5):  # the lock file may be removed and re-created under us by its holder
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise write_error(path, exc) from None
        try:
            got = _try_flock(fd)
            previous = _holder(fd)
            if got is None or (got is False and _alive(previous, path)):
                raise _busy(run, previous)
            if got and os.fstat(fd).st_ino != _inode(path):
                os.close(fd)  # we locked a file its holder had just removed: try again
                continue
            me = {
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
                "command": command,
            }
            data = (json.dumps(me) + "\n").encode()
            os.ftruncate(fd, 0)
            os.pwrite(fd, data, 0)
            os.fsync(fd)
        except OSError as exc:
            os.close(fd)
            raise write_error(path, exc) from None
        except BaseException:
            os.close(fd)
            raise
        return RunLock(run, fd, previous)
    raise _busy(run, {})


def _inode(path: Path) -> int:
    try:
        return os.stat(path).st_ino
    except FileNotFoundError:
        return -1
