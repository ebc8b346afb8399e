"""Checkpoint IO: the only code in wadi that reads or writes weights.

Public API (everything else in the package receives tensors):

- :func:`open_checkpoint` -> :class:`TensorSource`, a lazy read-only mapping from
  diffusers-style tensor names to tensors, read one tensor at a time (positioned reads,
  no mmap). Accepts safetensors files, sharded indexes, diffusers model and pipeline
  folders, original SD single files (names mapped to diffusers'), and pickle-format
  files only through ``torch.load(weights_only=True)``.
- :func:`save_safetensors` writes a state dict atomically with provenance metadata
  (:func:`provenance_metadata`).
- :func:`atomic_file` / :func:`write_text_atomic` do the same for any file (PNG, JSON,
  CSV); :func:`discard_dir` deletes a folder without leaving half of it under its name;
  :func:`clear_stale_temps` (which every writer calls) clears what killed writers left
  behind in the folder it writes to. Modules: ``atomic`` (files, folder swaps),
  ``safetensors_writer`` (byte-identical safetensors), ``output_dirs`` (``.wadi`` marker,
  early checks), ``stale_temps`` (temporaries and pid liveness), ``metadata`` (provenance
  and the keys wadi reads back), ``crash_hook`` (the crash tests' pause).
- :func:`atomic_output_dir` makes a ``--out DIR`` appear all at once or not at all,
  and never replaces a folder wadi did not write; :func:`check_writable` fails early.
- :func:`resolve_model` / :func:`fetch_file`: local path or hub snapshot, with
  one-line :class:`~wadi_cli.errors.HubError` failures.
"""

from wadi_cli.io.atomic import atomic_file, discard_dir, write_error, write_text_atomic
from wadi_cli.io.checkpoints import load_state_dict, open_checkpoint
from wadi_cli.io.hub import fetch_file, resolve_model
from wadi_cli.io.metadata import ALPHA_BAR_T_METADATA, provenance_metadata
from wadi_cli.io.output_dirs import MARKER, atomic_output_dir, check_writable, create_output_dir, unused_path
from wadi_cli.io.safetensors_reader import SafetensorsFile
from wadi_cli.io.safetensors_writer import save_safetensors
from wadi_cli.io.sd_single_file import ldm_unet_table
from wadi_cli.io.sources import TensorSource, require_finite
from wadi_cli.io.stale_temps import clear_stale_temps, remove_stale_temps

__all__ = [
    "ALPHA_BAR_T_METADATA",
    "MARKER",
    "SafetensorsFile",
    "TensorSource",
    "atomic_file",
    "atomic_output_dir",
    "check_writable",
    "clear_stale_temps",
    "create_output_dir",
    "discard_dir",
    "fetch_file",
    "ldm_unet_table",
    "load_state_dict",
    "open_checkpoint",
    "provenance_metadata",
    "remove_stale_temps",
    "require_finite",
    "resolve_model",
    "save_safetensors",
    "unused_path",
    "write_error",
    "write_text_atomic",
]
