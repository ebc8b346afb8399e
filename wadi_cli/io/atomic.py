"""Atomic, durable writes of one file and of folder replacements.

Nothing half-written ever appears at a destination: a file is written to a temporary name
in a private hidden folder next to it and renamed; an existing folder is swapped with its
replacement in one step where the OS can (Linux ``renameat2(RENAME_EXCHANGE)``), so a kill
never leaves the destination missing. Data is flushed to disk (fsync) before the rename
and the folder after it, so a file that has its final name is complete, also after a
power cut. An ``OSError`` while writing (disk full, read-only file system) becomes one
:class:`~wadi_cli.errors.WriteError` line naming the file; the destination keeps its
previous content. Before writing, every writer clears what killed writers left in the
same folder (:mod:`wadi_cli.io.stale_temps`).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from safetensors import SafetensorError

from wadi_cli.errors import WriteError
from wadi_cli.io.crash_hook import pause_before_rename
from wadi_cli.io.stale_temps import clear_stale_temps, temp_prefix

#: errno values that mean "the output cannot be written" (as opposed to a bad input)
WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.EFBIG, errno.EIO})


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


def fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable; silently skipped where folders cannot be synced."""
    with contextlib.suppress(OSError):
        _fsync(folder)


def fsync_tree(folder: Path) -> None:
    for root, _, files in os.walk(folder):
        for f in files:
            path = Path(root) / f
            if not path.is_symlink():
                _fsync(path)
        fsync_dir(Path(root))


def umasked(mode: int) -> int:
    """``mode`` with the process umask applied (as ``open``/``mkdir`` would)."""
    mask = os.umask(0)
    os.umask(mask)
    return mode & ~mask


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
        clear_stale_temps(dest.parent, dest.name)
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
            os.chmod(tmp, umasked(0o666))  # temporary files are 0600; give the file normal permissions
            _fsync(tmp)
            pause_before_rename()
            os.replace(tmp, dest)
            fsync_dir(dest.parent)
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


def replace_dir(src: Path, dest: Path) -> None:
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
