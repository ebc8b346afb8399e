"""The crash tests' hook, off by default.

With ``WADI_TEST_WRITE_PAUSE=SECONDS`` in the environment every atomic write (file or
folder) waits that long with its temporary copy complete, just before the rename, so a
crash test can SIGKILL a process inside the write window deterministically
(``tests/_helpers_crash.py``). Nothing else in wadi reads this variable.
"""

from __future__ import annotations

import os
import time

TEST_PAUSE_ENV = "WADI_TEST_WRITE_PAUSE"


def pause_before_rename() -> None:
    """Sleep ``$WADI_TEST_WRITE_PAUSE`` seconds; does nothing unless the variable is set."""
    value = os.environ.get(TEST_PAUSE_ENV)
    if value:
        time.sleep(float(value))
