"""A strict, lazy safetensors reader that does not use mmap.

Why not ``safetensors.safe_open``: it memory-maps the file, and every page a tensor
read touches stays counted in the process's resident set. Streaming two 3.5 GB
checkpoints tensor by tensor would then look like 7 GB of RSS. Here each tensor is
read with positioned reads (``os.preadv``) straight into a freshly allocated tensor,
so only the tensor being read is resident (the kernel's page cache is not ours).

File layout (https://github.com/huggingface/safetensors, "Format"):

    [8 bytes: N, little-endian u64][N bytes: JSON header][data section]

The header maps names to ``{"dtype", "shape", "data_offsets": [begin, end]}``
(offsets relative to the data section) plus an optional ``"__metadata__"``
string→string map. The validation mirrors the reference implementation: header
starts with ``{``, tensors cover the data section contiguously with no gap or overlap,
and ``end - begin == numel * itemsize``.
"""

from __future__ import annotations

import json
import math
import os
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from wadi_cli.errors import CheckpointError

# safetensors dtype tag -> torch dtype (every tag torch 2.x can represent).
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "C64": torch.complex64,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
for _tag, _name in (("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64")):
    if hasattr(torch, _name):  # unsigned >8-bit dtypes exist in torch >= 2.3
        DTYPES[_tag] = getattr(torch, _name)
DTYPE_TAGS: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}

MAX_HEADER_BYTES = 100_000_000  # the reference implementation's limit
_PICKLE_OR_ZIP = (b"PK\x03\x04", b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives in a safetensors file (offsets are absolute)."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def _fail(path: Path, what: str) -> CheckpointError:
    return CheckpointError(f"{path}: {what}")


def _no_duplicate_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    out: dict[str, object] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def _read_header(fd: int, path: Path, size: int) -> tuple[dict[str, object], int]:
    """Return the parsed JSON header and the absolute offset of the data section."""
    if size == 0:
        raise _fail(path, "empty file (0 bytes), not a safetensors checkpoint")
    head = os.pread(fd, 8, 0)
    if any(head.startswith(m) for m in _PICKLE_OR_ZIP):
        raise _fail(
            path,
            "this is a PyTorch pickle/zip checkpoint, not safetensors (renamed?); "
            "give it its real suffix (.ckpt/.bin/.pt) or convert it to safetensors",
        )
    if len(head) < 8:
        raise _fail(path, f"truncated: {size} bytes, too short for a safetensors header")
    (n,) = struct.unpack("<Q", head)
    if n > MAX_HEADER_BYTES or 8 + n > size:
        raise _fail(
            path,
            f"not a safetensors file or truncated: header length {n} does not fit in the {size}-byte file",
        )
    raw = os.pread(fd, n, 8)
    if not raw.startswith(b"{"):
        raise _fail(path, "not a safetensors file: the header is not a JSON object")
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicate_keys)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # RecursionError: [[[[... nested
        raise _fail(path, f"corrupt safetensors header: invalid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise _fail(path, "corrupt safetensors header: not a JSON object")
    return header, 8 + n


def _parse_entry(path: Path, name: str, entry: object, data_start: int) -> TensorInfo:
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise _fail(path, f"corrupt header entry for {name!r}: expected dtype, shape, data_offsets")
    tag, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if tag not in DTYPES:
        raise _fail(path, f"tensor {name!r} has unsupported dtype {tag!r}")
    if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
        raise _fail(path, f"tensor {name!r} has an invalid shape {shape!r}")
    if not (
        isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int and o >= 0 for o in offsets)
    ):
        raise _fail(path, f"tensor {name!r} has invalid data_offsets {offsets!r}")
    begin, end = offsets
    dtype = DTYPES[tag]
    expected = math.prod(shape) * dtype.itemsize
    if end < begin or end - begin != expected:
        raise _fail(
            path,
            f"header lies about tensor {name!r}: {tag}{shape} needs {expected} bytes, "
            f"offsets {offsets} give {end - begin}",
        )
    return TensorInfo(dtype, tuple(shape), data_start + begin, data_start + end)


def parse_header(fd: int, path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Read and strictly validate the header of the safetensors file open as ``fd``.

    Returns ``(tensors, metadata)``; raises :class:`CheckpointError` naming ``path``
    and the first problem found.
    """
    size = os.fstat(fd).st_size
    header, data_start = _read_header(fd, path, size)
    meta = header.pop("__metadata__", None) or {}
    if not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise _fail(path, "corrupt header: __metadata__ must map strings to strings")
    infos = {name: _parse_entry(path, name, e, data_start) for name, e in header.items()}
    cursor = data_start  # tensors must tile the data section: no gap, no overlap
    for name, info in sorted(infos.items(), key=lambda kv: (kv[1].begin, kv[1].end)):
        if info.begin != cursor:
            what = "overlaps another tensor" if info.begin < cursor else "leaves a gap before it"
            raise _fail(path, f"corrupt header: tensor {name!r} {what} (offsets are inconsistent)")
        cursor = info.end
    if cursor != size:
        if cursor > size:
            raise _fail(path, f"truncated: header needs {cursor} bytes, the file has {size}")
        raise _fail(path, f"corrupt: {size - cursor} trailing bytes not described by the header")
    return infos, meta


class SafetensorsFile:
    """Lazy reader of one safetensors file: header parsed at open, tensors read on demand.

    >>> with SafetensorsFile("model.safetensors") as f:       # doctest: +SKIP
    ...     w = f.get("conv_in.weight")
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        if sys.byteorder != "little":  # pragma: no cover - no big-endian CI
            raise CheckpointError("reading safetensors needs a little-endian machine")
        try:
            self._fd: int | None = os.open(self.path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
        except IsADirectoryError:
            raise _fail(self.path, "is a folder, not a safetensors file") from None
        except OSError as exc:
            raise _fail(self.path, f"cannot open ({exc.strerror or exc})") from None
        try:
            self.tensors, self.metadata = parse_header(self._fd, self.path)
        except BaseException:
            self.close()
            raise

    def keys(self) -> list[str]:
        return list(self.tensors)

    def info(self, name: str) -> TensorInfo:
        return self.tensors[name]

    def get(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """Read tensor ``name`` into a new CPU tensor (positioned reads, no mmap).

        With ``out`` (a contiguous CPU tensor of the same dtype and element count, e.g. a
        reused scratch buffer) the data lands there and a view of ``out`` is returned:
        no allocation, no page faults on fresh memory.
        """
        info = self.tensors[name]
        if self._fd is None:
            raise _fail(self.path, "file is closed")
        if out is None:
            buf = torch.empty(info.nbytes, dtype=torch.uint8)
        else:
            if out.dtype != info.dtype or out.numel() != info.numel or not out.is_contiguous():
                raise ValueError(f"out= must be a contiguous {info.dtype} tensor of {info.numel} elements")
            if out.device.type != "cpu":
                raise ValueError("out= must be a CPU tensor")
            buf = out.reshape(-1).view(torch.uint8) if info.nbytes else torch.empty(0, dtype=torch.uint8)
        self._read(name, info, buf)
        return (buf.view(info.dtype) if out is None else out).reshape(info.shape)

    def _read(self, name: str, info: TensorInfo, buf: torch.Tensor) -> None:
        if not info.nbytes:
            return
        view = memoryview(buf.numpy())
        done = 0
        while done < info.nbytes:
            got = os.preadv(self._fd, [view[done:]], info.begin + done)
            if got <= 0:
                raise _fail(self.path, f"truncated while reading {name!r} (file changed on disk?)")
            done += got

    def close(self) -> None:
        fd = getattr(self, "_fd", None)  # absent when the constructor failed to open the file
        if fd is not None:
            self._fd = None
            os.close(fd)

    def __enter__(self) -> SafetensorsFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()
