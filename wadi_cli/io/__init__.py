"""Checkpoint IO: the only code in wadi that reads or writes weights.

Public API (everything else in the package receives tensors):

- :func:`open_checkpoint` -> :class:`TensorSource`, a lazy read-only mapping from
  diffusers-style tensor names to tensors, read one tensor at a time.
- :func:`save_safetensors` writes a state dict atomically with provenance metadata.
- :func:`atomic_output_dir` makes a ``--out DIR`` appear all at once or not at all.
"""

from wadi_cli.io.core import (
    TensorSource,
    atomic_output_dir,
    load_state_dict,
    open_checkpoint,
    provenance_metadata,
    save_safetensors,
)

__all__ = [
    "TensorSource",
    "atomic_output_dir",
    "load_state_dict",
    "open_checkpoint",
    "provenance_metadata",
    "save_safetensors",
]
