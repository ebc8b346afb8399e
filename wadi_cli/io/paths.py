"""What is at an input path, in one line: a regular file or folder wadi can read, or why not
(missing, a symbolic link loop or to nowhere, a FIFO or other special file, unreadable).

Checked before anything opens the path: opening a FIFO blocks until a writer comes, and
``Path.exists()`` calls a symlink loop "missing".
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

_SPECIAL = (
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
)


def input_path_problem(path: str | os.PathLike[str]) -> str | None:
    """``None`` if ``path`` is a regular file or a folder (after symlinks), else the reason
    it cannot be an input, as the end of a one-line message (``"PATH: REASON"``)."""
    p = Path(path)
    try:
        mode = os.stat(p).st_mode
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "is a symbolic link loop (the links point at each other), not a file"
        if exc.errno == errno.ENOENT and os.path.islink(p):
            return f"is a symbolic link to a missing target ({os.readlink(p)})"
        if exc.errno in (errno.ENOENT, errno.ENOTDIR):
            return "no such file or directory"
        return f"cannot open ({exc.strerror or exc})"
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return None
    kind = next((name for test, name in _SPECIAL if test(mode)), "a special file")
    return f"is {kind}, not a regular file or folder; give the path of a file"
