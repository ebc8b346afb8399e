"""Writing: atomic safetensors files with provenance, atomic output folders, early checks.

Nothing half-written ever appears at a destination: files are written to a temporary
name in the same folder and renamed; folders are built as a hidden temporary sibling
and renamed into place when the ``with`` block succeeds. Every folder wadi creates
holds a ``.wadi`` marker, and only such folders (or empty ones) are ever replaced, so
a typo in ``--out`` cannot delete a user's folder.

Crash safety (``kill -9``, preemption, a full or read-only disk):

- temporary names carry the writer's host and pid (``.NAME.wadi-HOST-PID.XXXXXXXX.tmp``),
  so the next write to the same place removes what a killed writer left behind
  (:func:`remove_stale_temps`), and never what a live one is still writing;
- data is flushed to disk (fsync) before the rename and the folder after it, so a file
  that has its final name is complete, also after a power cut;
- an existing output folder is swapped with the new one in one step where the OS can
  (Linux ``renameat2(RENAME_EXCHANGE)``): a kill never leaves the destination missing;
- an ``OSError`` while writing (disk full, read-only file system) becomes one
  :class:`~wadi_cli.errors.WriteError` line naming the file; the destination keeps its
  previous content.

Test hook, off by default: with ``WADI_TEST_WRITE_PAUSE=SECONDS`` in the environment every
atomic write waits that long with its temporary copy complete, just before the rename, so
a crash test can SIGKILL a process inside a checkpoint write deterministically
(``tests/system/test_crash_kill.py``).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import json
import os
import re
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from wadi_cli import __version__
from wadi_cli.errors import BadInputError, WriteError

MARKER = ".wadi"
#: Metadata key under which every adapter, merged file and exported pipeline wadi writes
#: records the ᾱ_T its student was trained with (sampling reads it back).
ALPHA_BAR_T_METADATA = "alpha_bar_T"
TEST_PAUSE_ENV = "WADI_TEST_WRITE_PAUSE"
#: errno values that mean "the output cannot be written" (as opposed to a bad input)
WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.EFBIG, errno.EIO})
_TEMP_RE = re.compile(
    r"^\.(?P<name>.+)\.wadi-(?P<host>[A-Za-z0-9_-]+)-(?P<pid>\d+)\.[A-Za-z0-9_]+\.(?P<kind>tmp|old|del)$"
)


def _host() -> str:
    name = socket.gethostname().split(".")[0]
    return re.sub(r"[^A-Za-z0-9_-]", "_", name) or "host"


def temp_prefix(name: str) -> str:
    """Prefix of this process's temporary siblings of ``name`` (host and pid in the name,
    so :func:`remove_stale_temps` can tell a killed writer's leftovers from a live one's)."""
    return f".{name}.wadi-{_host()}-{os.getpid()}."


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


def remove_stale_temps(folder: str | os.PathLike[str], name: str | None = None) -> list[Path]:
    """Remove the temporary files and folders that killed wadi writers left in ``folder``
    (only those written on this host by a process that is gone; ``name`` limits it to the
    temporaries of one destination). A previous output set aside by a replacement that
    was killed between its two renames (``.old``) is put back if its place is empty.
    Returns what was removed."""
    removed: list[Path] = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    host = _host()
    for entry in entries:
        m = _TEMP_RE.match(entry.name)
        if not m or (name is not None and m["name"] != name) or m["host"] != host:
            continue
        if pid_alive(int(m["pid"])):
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


def _test_pause() -> None:
    """The crash tests' hook (see the module docstring); does nothing unless the variable is set."""
    value = os.environ.get(TEST_PAUSE_ENV)
    if value:
        time.sleep(float(value))


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    text = str(exc).strip()
    m = re.search(r"I/O error: (.*?)(?: \(os error \d+\))?$", text)  # safetensors' SafetensorError
    if m:
        return m.group(1)
    return text.splitlines()[0] if text else type(exc).__name__


def write_error(dest: str | os.PathLike[str], exc: BaseException) -> WriteError:
    """The one-line :class:`WriteError` for a failed write of ``dest``."""
    return WriteError(f"cannot write {dest}: {_reason(exc)}")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable; silently skipped where folders cannot be synced."""
    with contextlib.suppress(OSError):
        _fsync(folder)


def _fsync_tree(folder: Path) -> None:
    for root, _, files in os.walk(folder):
        for f in files:
            path = Path(root) / f
            if not path.is_symlink():
                _fsync(path)
        _fsync_dir(Path(root))


def provenance_metadata(
    config: Mapping[str, object] | None = None, sources: list[str] | None = None
) -> dict[str, str]:
    """Metadata written into every file wadi produces: tool version, sources, config.

    Values are strings (safetensors requires it): ``sources`` and ``config`` are JSON.
    """
    meta = {"format": "pt", "wadi_version": __version__, "wadi_torch_version": torch.__version__}
    if sources:
        meta["wadi_sources"] = json.dumps([str(s) for s in sources])
    if config:
        meta["wadi_config"] = json.dumps(config, default=str, sort_keys=True)
    return meta


def _umasked(mode: int) -> int:
    """``mode`` with the process umask applied (as ``open``/``mkdir`` would)."""
    mask = os.umask(0)
    os.umask(mask)
    return mode & ~mask


def _prepare(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous, and no two tensors sharing memory (safetensors refuses shared storage)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, int]] = set()
    for name, t in tensors.items():
        if not isinstance(name, str) or not isinstance(t, torch.Tensor):
            raise BadInputError(f"cannot save {name!r}: expected str -> torch.Tensor")
        t = t.detach().to("cpu").contiguous()
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if t.numel() and key in seen:
            t = t.clone()
        seen.add(key)
        out[name] = t
    return out


def save_safetensors(
    tensors: Mapping[str, torch.Tensor],
    path: str | os.PathLike[str],
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write ``tensors`` to ``path`` atomically (temp file in the same folder, then rename).

    ``metadata`` must map strings to strings (see :func:`provenance_metadata`).
    """
    meta = dict(metadata or {})
    bad = [k for k, v in meta.items() if not (isinstance(k, str) and isinstance(v, str))]
    if bad:
        raise BadInputError(f"safetensors metadata must be str -> str; bad entry {bad[0]!r}")
    data = _prepare(tensors)
    with atomic_file(path) as tmp:
        save_file(data, tmp, metadata=meta)
    return Path(path)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path to write the new content of ``path`` to; when the block
    succeeds the file is flushed to disk and renamed to ``path`` in one step.

    The temporary path lies in a private hidden folder next to ``path`` (whatever the
    writer creates beside its target, e.g. safetensors' own temporary file, stays inside
    it). On error that folder is removed and ``path`` keeps its previous content; a full
    or read-only disk raises :class:`WriteError` naming ``path``.
    """
    dest = Path(path)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(dest.parent, dest.name)
        tmp_dir = Path(tempfile.mkdtemp(prefix=temp_prefix(dest.name), suffix=".tmp", dir=dest.parent))
    except OSError as exc:
        raise write_error(dest, exc) from None
    try:
        tmp = tmp_dir / dest.name
        try:
            yield tmp
        except SafetensorError as exc:
            raise write_error(dest, exc) from None
        except OSError as exc:
            if exc.errno in WRITE_ERRNOS:
                raise write_error(dest, exc) from None
            raise
        try:
            os.chmod(tmp, _umasked(0o666))  # temporary files are 0600; give the file normal permissions
            _fsync(tmp)
            _test_pause()
            os.replace(tmp, dest)
            _fsync_dir(dest.parent)
        except OSError as exc:
            raise write_error(dest, exc) from None
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def write_text_atomic(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically and durably (:func:`atomic_file`)."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def discard_dir(path: str | os.PathLike[str]) -> None:
    """Delete a folder so that a kill part-way leaves no half-deleted folder under its
    name: it is first renamed to a hidden temporary name (which
    :func:`remove_stale_temps` clears later if the deletion is cut short)."""
    folder = Path(path)
    trash = Path(tempfile.mkdtemp(prefix=temp_prefix(folder.name), suffix=".del", dir=folder.parent))
    os.rmdir(trash)
    os.replace(folder, trash)
    shutil.rmtree(trash, ignore_errors=True)


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
    """Fail early (BadInputError, one line) if ``path`` cannot be written, before long work.

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
        raise BadInputError(f"{dest}: not writable ({exc.strerror or exc} in {probe_dir})") from None
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
        remove_stale_temps(dest.parent, dest.name)
        tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(dest.name), suffix=".tmp", dir=dest.parent))
        os.chmod(tmp, _umasked(0o777))  # mkdtemp makes 0700; give the folder normal permissions
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
            _fsync_tree(tmp)
            _test_pause()
            _replace_dir(tmp, dest)
            _fsync_dir(dest.parent)
        except OSError as exc:
            raise write_error(dest, exc) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@functools.lru_cache(maxsize=1)
def _renameat2() -> ctypes._CFuncPtr | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


def exchange_paths(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``);
    ``False`` where the OS or file system cannot."""
    fn = _renameat2()
    if fn is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _replace_dir(src: Path, dest: Path) -> None:
    """Move ``src`` to ``dest``; an existing ``dest`` is swapped out in one step (or, where
    the OS cannot, set aside under a name :func:`remove_stale_temps` restores) and removed."""
    if not os.path.lexists(dest):
        os.replace(src, dest)
        return
    if exchange_paths(src, dest):
        shutil.rmtree(src, ignore_errors=True)  # src now holds the previous output
        return
    old = Path(tempfile.mkdtemp(prefix=temp_prefix(dest.name), suffix=".old", dir=dest.parent))
    os.rmdir(old)
    os.replace(dest, old)
    try:
        os.replace(src, dest)
    except BaseException:
        os.replace(old, dest)  # put the previous output back
        raise
    shutil.rmtree(old, ignore_errors=True)
