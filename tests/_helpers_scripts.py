"""The scripts under ``analysis/`` (studies and benchmarks, not an importable package),
loaded as modules for their tests."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

ANALYSIS = Path(__file__).resolve().parents[1] / "analysis"


def load_analysis_script(relative: str) -> ModuleType:
    """``analysis/<relative>`` as a module named after its file (loaded once per process)."""
    path = ANALYSIS / relative
    name = path.stem
    if name in sys.modules and getattr(sys.modules[name], "__file__", None) == str(path):
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
