"""``wadi demo``: distil, analyse and swap on the embedded tiny model, with a report.

The names below load on first use: the demo's spawned training workers import
:mod:`wadi_cli.demo.students` and must get there without torch (they set their threads and
environment first)."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from wadi_cli.demo.run import DemoOptions, DemoProgress, run_demo
    from wadi_cli.demo.students import STUDENTS, StudentSpec, train_students

_HOMES = {
    "DemoOptions": "run",
    "DemoProgress": "run",
    "run_demo": "run",
    "STUDENTS": "students",
    "StudentSpec": "students",
    "train_students": "students",
}

__all__ = ["STUDENTS", "DemoOptions", "DemoProgress", "StudentSpec", "run_demo", "train_students"]


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)
