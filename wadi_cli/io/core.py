"""Compatibility module: the IO core now lives in focused modules; import from
:mod:`wadi_cli.io` (these names stay importable from here too)."""

from wadi_cli.io.resolve import load_state_dict, open_checkpoint
from wadi_cli.io.sources import TensorSource
from wadi_cli.io.writers import (
    atomic_output_dir,
    check_writable,
    provenance_metadata,
    save_safetensors,
)

__all__ = [
    "TensorSource",
    "atomic_output_dir",
    "check_writable",
    "load_state_dict",
    "open_checkpoint",
    "provenance_metadata",
    "save_safetensors",
]
