"""Writing safetensors files: atomically (:mod:`wadi_cli.io.atomic`) and byte-identically
across runs and processes.

safetensors stores ``__metadata__`` from a hash map, so two processes writing the same
tensors and metadata put the keys in different orders and the files' sha256 differ. After
safetensors has written the temporary file, its header is rewritten with the metadata keys
sorted (:func:`canonicalize_header`): the same inputs give the same bytes.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file

from wadi_cli.errors import BadInputError
from wadi_cli.io.atomic import atomic_file


def _prepare(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous, and no two tensors sharing memory (safetensors refuses shared storage)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, int]] = set()
    for name, t in tensors.items():
        if not isinstance(name, str) or not isinstance(t, torch.Tensor):
            raise BadInputError(f"cannot save {name!r}: expected str -> torch.Tensor")
        t = t.detach().to("cpu").contiguous()
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if t.numel() and key in seen:
            t = t.clone()
        seen.add(key)
        out[name] = t
    return out


def save_safetensors(
    tensors: Mapping[str, torch.Tensor],
    path: str | os.PathLike[str],
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write ``tensors`` to ``path`` atomically (temp file in the same folder, then rename).

    ``metadata`` must map strings to strings (see :func:`provenance_metadata`).
    """
    meta = dict(metadata or {})
    bad = [k for k, v in meta.items() if not (isinstance(k, str) and isinstance(v, str))]
    if bad:
        raise BadInputError(f"safetensors metadata must be str -> str; bad entry {bad[0]!r}")
    data = _prepare(tensors)
    with atomic_file(path) as tmp:
        save_file(data, tmp, metadata=meta)
        canonicalize_header(tmp)
    return Path(path)


def canonicalize_header(path: str | os.PathLike[str]) -> None:
    """Rewrite the header of the safetensors file ``path`` with its ``__metadata__`` keys
    sorted (tensor entries keep safetensors' own, deterministic order). The header is
    padded with spaces to its old length (as safetensors pads it) and rewritten in place;
    only if it grew is the whole file copied."""
    with open(path, "r+b") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(n))
        meta = header.pop("__metadata__", None)
        ordered = {"__metadata__": dict(sorted(meta.items()))} if meta is not None else {}
        ordered.update(header)
        new = json.dumps(ordered, separators=(",", ":"), ensure_ascii=False).encode()
        if len(new) <= n:
            fh.seek(8)
            fh.write(new + b" " * (n - len(new)))
            return
    new += b" " * (-(8 + len(new)) % 8)
    tmp = Path(f"{os.fspath(path)}.header")
    with open(path, "rb") as src, open(tmp, "wb") as dst:
        src.seek(8 + n)
        dst.write(struct.pack("<Q", len(new)) + new)
        shutil.copyfileobj(src, dst, 1 << 24)
    os.replace(tmp, path)
