"""Minimal IO core (single .safetensors files). Extended by the IO work item."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from wadi_cli import __version__
from wadi_cli.errors import CheckpointError


class TensorSource:
    """Lazy, read-only view of a checkpoint: names -> tensors, one tensor read at a time.

    Names are diffusers-style (``down_blocks.0.attentions.0...weight``) whatever the
    on-disk format. Use as a context manager or call :meth:`close`.
    """

    def __init__(self, path: Path, files: dict[str, Path], description: str) -> None:
        self.path = path
        self.description = description
        self._files = files  # tensor name -> file holding it
        self._handles: dict[Path, object] = {}

    def keys(self) -> list[str]:
        return list(self._files)

    def __contains__(self, name: object) -> bool:
        return name in self._files

    def __len__(self) -> int:
        return len(self._files)

    def __iter__(self) -> Iterator[str]:
        return iter(self._files)

    def _handle(self, file: Path):
        if file not in self._handles:
            self._handles[file] = safe_open(str(file), framework="pt", device="cpu")
        return self._handles[file]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle(self._files[name]).get_slice(name).get_shape())

    def get(self, name: str) -> torch.Tensor:
        return self._handle(self._files[name]).get_tensor(name)

    def metadata(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for f in dict.fromkeys(self._files.values()):
            out.update(self._handle(f).metadata() or {})
        return out

    def close(self) -> None:
        self._handles.clear()

    def __enter__(self) -> TensorSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_checkpoint(path: str | os.PathLike[str]) -> TensorSource:
    """Open a checkpoint for lazy reading. Raises :class:`CheckpointError` on bad input."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p}: no such file or directory")
    try:
        with safe_open(str(p), framework="pt", device="cpu") as f:
            names = list(f.keys())
    except Exception as exc:
        raise CheckpointError(f"{p}: not a readable safetensors file ({exc})") from None
    return TensorSource(p, dict.fromkeys(names, p), "safetensors file")


def load_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Eagerly read a whole checkpoint (convenience for small models)."""
    with open_checkpoint(path) as src:
        return {k: src.get(k) for k in src.keys()}


def provenance_metadata(config: Mapping[str, object] | None = None, sources: list[str] | None = None) -> dict[str, str]:
    """Metadata written into every file wadi produces: tool version, sources, config."""
    meta = {"format": "pt", "wadi_version": __version__}
    if sources:
        meta["wadi_sources"] = json.dumps([str(s) for s in sources])
    if config:
        meta["wadi_config"] = json.dumps(config, default=str, sort_keys=True)
    return meta


def save_safetensors(
    tensors: Mapping[str, torch.Tensor], path: str | os.PathLike[str], metadata: Mapping[str, str] | None = None
) -> Path:
    """Write ``tensors`` to ``path`` atomically (temp file in the same folder, then rename)."""
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    os.close(fd)
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=dict(metadata or {}))
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return dest


@contextlib.contextmanager
def atomic_output_dir(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary folder next to ``path``; on success it replaces ``path`` (which
    must not exist or be an empty folder, or a folder we may overwrite); on error it is
    removed and ``path`` is untouched."""
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    try:
        yield tmp
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
