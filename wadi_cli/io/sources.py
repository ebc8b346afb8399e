"""TensorSource: one lazy, read-only view over any supported checkpoint layout.

Layouts (see :func:`wadi_cli.io.checkpoints.open_checkpoint`): a safetensors file, a
sharded ``*.safetensors.index.json``, a diffusers model or pipeline folder, an original
SD single file (names mapped to diffusers'), or a pickle-format file readable by
``torch.load(weights_only=True)``. Whatever the layout, a TensorSource maps
diffusers-style names to tensors and reads one tensor per :meth:`TensorSource.get`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Protocol

import torch

from wadi_cli.errors import CheckpointError
from wadi_cli.io.safetensors_reader import SafetensorsFile


class Store(Protocol):
    """A file's worth of tensors under their on-disk names."""

    path: Path
    metadata: dict[str, str]

    def names(self) -> list[str]: ...

    def dtype_shape(self, raw: str) -> tuple[torch.dtype, tuple[int, ...]]: ...

    def get(self, raw: str, out: torch.Tensor | None = None) -> torch.Tensor: ...

    def close(self) -> None: ...


class SafetensorsStore:
    """Store over :class:`SafetensorsFile` (lazy, positioned reads, no mmap).

    ``only`` restricts the names exposed (a shard exposes what its index lists); naming a
    tensor the file lacks is a :class:`CheckpointError`.
    """

    def __init__(self, path: Path, only: list[str] | None = None) -> None:
        self.path = path
        self._file = SafetensorsFile(path)
        self.metadata = dict(self._file.metadata)
        self._names = self._file.keys() if only is None else list(only)
        absent = [n for n in self._names if n not in self._file.tensors]
        if absent:
            self._file.close()
            raise CheckpointError(f"{path}: lacks {len(absent)} tensors its index lists, e.g. {absent[0]!r}")

    def names(self) -> list[str]:
        return list(self._names)

    def dtype_shape(self, raw: str) -> tuple[torch.dtype, tuple[int, ...]]:
        info = self._file.info(raw)
        return info.dtype, info.shape

    def get(self, raw: str, out: torch.Tensor | None = None) -> torch.Tensor:
        return self._file.get(raw, out=out)

    def close(self) -> None:
        self._file.close()


class DictStore:
    """Store over tensors already loaded (by the safe pickle loader, possibly mmap-backed).

    :meth:`get` returns a copy so that, as with safetensors, every read is a fresh tensor.
    """

    def __init__(self, path: Path, tensors: dict[str, torch.Tensor]) -> None:
        self.path = path
        self._tensors = tensors
        self.metadata: dict[str, str] = {}

    def names(self) -> list[str]:
        return list(self._tensors)

    def dtype_shape(self, raw: str) -> tuple[torch.dtype, tuple[int, ...]]:
        t = self._tensors[raw]
        return t.dtype, tuple(t.shape)

    def get(self, raw: str, out: torch.Tensor | None = None) -> torch.Tensor:
        t = self._tensors[raw]
        if out is None:
            return t.clone()
        if out.dtype != t.dtype or out.numel() != t.numel() or not out.is_contiguous():
            raise ValueError(f"out= must be a contiguous {t.dtype} tensor of {t.numel()} elements")
        return out.reshape(t.shape).copy_(t)

    def close(self) -> None:
        self._tensors = {}


class TensorSource:
    """Lazy, read-only view of a checkpoint: names -> tensors, one tensor read at a time.

    Names are diffusers-style (``down_blocks.0.attentions.0...weight``) whatever the
    on-disk format. Shapes and dtypes come from headers, without reading data. Use as a
    context manager or call :meth:`close`.

    ``entries`` maps each name to ``(store, name in that store)``; for backward
    compatibility a value may also be the path of a safetensors file holding the
    tensor under the same name.
    """

    def __init__(
        self,
        path: Path,
        entries: Mapping[str, tuple[Store, str] | str | os.PathLike[str]],
        description: str,
        stores: Sequence[Store] = (),
    ) -> None:
        self.path = Path(path)
        self.description = description
        # stores that hold no entry (a file with metadata but no tensors) still own a file
        # handle and metadata: keep them, so metadata() reads them and close() closes them
        self._own_stores = list(stores)
        opened: dict[Path, Store] = {}
        self._entries: dict[str, tuple[Store, str]] = {}
        for name, where in entries.items():
            if isinstance(where, (str, os.PathLike)):
                fp = Path(where)
                if fp not in opened:
                    opened[fp] = SafetensorsStore(fp)
                where = (opened[fp], name)
            self._entries[name] = where

    # -- mapping-like access ------------------------------------------------------
    def keys(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.get(name)

    def _entry(self, name: str) -> tuple[Store, str]:
        try:
            return self._entries[name]
        except KeyError:
            raise KeyError(f"{name!r} is not in {self.path}") from None

    # -- header facts (no data read) ------------------------------------------------
    def shape(self, name: str) -> tuple[int, ...]:
        store, raw = self._entry(name)
        return store.dtype_shape(raw)[1]

    def dtype(self, name: str) -> torch.dtype:
        store, raw = self._entry(name)
        return store.dtype_shape(raw)[0]

    def numel(self, name: str | None = None) -> int:
        """Element count of tensor ``name``, or of the whole checkpoint when ``name`` is None."""
        names = self._entries if name is None else [name]
        total = 0
        for n in names:
            shape = self.shape(n)
            count = 1
            for d in shape:
                count *= d
            total += count
        return total

    def nbytes(self, name: str | None = None) -> int:
        """Bytes of tensor ``name`` (or of all tensors) in their stored dtype."""
        names = self._entries if name is None else [name]
        return sum(self.numel(n) * self.dtype(n).itemsize for n in names)

    def original_name(self, name: str) -> str:
        """The tensor's name inside its file (differs for original SD single files)."""
        return self._entry(name)[1]

    def files(self) -> list[Path]:
        """The files this source reads from (one, or the shards), in first-use order."""
        return list(dict.fromkeys(store.path for store, _ in self._entries.values()))

    # -- data ----------------------------------------------------------------------
    def get(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """Read tensor ``name`` into a new CPU tensor in its stored dtype.

        ``out``: optional contiguous CPU tensor (same dtype and element count) to read
        into instead, e.g. a slice of a reused scratch buffer; a view of it is returned.
        """
        store, raw = self._entry(name)
        return store.get(raw, out=out)

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield ``(name, tensor)`` pairs, reading one tensor at a time."""
        for name in self._entries:
            yield name, self.get(name)

    def metadata(self) -> dict[str, str]:
        """``__metadata__`` of the underlying file(s), merged in file order."""
        out: dict[str, str] = {}
        for store in self._stores():
            out.update(store.metadata)
        return out

    def _stores(self) -> list[Store]:
        found = [*self._own_stores, *(s for s, _ in self._entries.values())]
        return list({id(s): s for s in found}.values())

    def close(self) -> None:
        for store in self._stores():
            store.close()

    def __enter__(self) -> TensorSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"TensorSource({str(self.path)!r}: {self.description})"


def require_tensors(path: Path, obj: object) -> dict[str, torch.Tensor]:
    """Unwrap a loaded pickle payload into a flat name -> tensor dict (or refuse)."""
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]  # Lightning / original SD .ckpt
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a dict of tensors")
    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{path}: contains no tensors")
    return tensors


def require_finite(where: object, name: str, tensor: torch.Tensor) -> None:
    """Refuse (one :class:`CheckpointError` line) a floating tensor holding NaN or Inf:
    such weights make every image, merge or export built on them meaningless."""
    if tensor.is_floating_point() and tensor.numel() and not bool(torch.isfinite(tensor).all()):
        raise CheckpointError(f"{where}: tensor {name!r} holds NaN or Inf values")
