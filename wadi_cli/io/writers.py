"""Writing: atomic safetensors files with provenance, atomic output folders, early checks.

Nothing half-written ever appears at a destination: files are written to a temporary
name in the same folder and renamed; folders are built as a hidden temporary sibling
and renamed into place when the ``with`` block succeeds. Every folder wadi creates
holds a ``.wadi`` marker, and only such folders (or empty ones) are ever replaced, so
a typo in ``--out`` cannot delete a user's folder.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file

from wadi_cli import __version__
from wadi_cli.errors import BadInputError

MARKER = ".wadi"
#: Metadata key under which every adapter, merged file and exported pipeline wadi writes
#: records the ᾱ_T its student was trained with (sampling reads it back).
ALPHA_BAR_T_METADATA = "alpha_bar_T"


def provenance_metadata(
    config: Mapping[str, object] | None = None, sources: list[str] | None = None
) -> dict[str, str]:
    """Metadata written into every file wadi produces: tool version, sources, config.

    Values are strings (safetensors requires it): ``sources`` and ``config`` are JSON.
    """
    meta = {"format": "pt", "wadi_version": __version__, "wadi_torch_version": torch.__version__}
    if sources:
        meta["wadi_sources"] = json.dumps([str(s) for s in sources])
    if config:
        meta["wadi_config"] = json.dumps(config, default=str, sort_keys=True)
    return meta


def _umasked(mode: int) -> int:
    """``mode`` with the process umask applied (as ``open``/``mkdir`` would)."""
    mask = os.umask(0)
    os.umask(mask)
    return mode & ~mask


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
    dest = Path(path)
    with atomic_file(dest) as tmp:
        save_file(_prepare(tensors), str(tmp), metadata=meta)
    return dest


def unused_path(path: str | os.PathLike[str]) -> Path:
    """``path`` if nothing is there yet, else the first free ``path-2``, ``path-3``, …
    (default output folders that never replace an earlier result). Creates nothing."""
    base = Path(path)
    found, n = base, 1
    while found.exists():
        n += 1
        found = base.with_name(f"{base.name}-{n}")
    return found


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path in ``path``'s folder; when the block succeeds it is renamed to
    ``path`` (readers see the old file or the new one, never half of one)."""
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, _umasked(0o666))
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_text_atomic(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def _is_ours_or_empty(folder: Path) -> bool:
    return (folder / MARKER).is_file() or not any(folder.iterdir())


def _check_output_dir(dest: Path) -> None:
    if dest.exists() and not dest.is_dir():
        raise BadInputError(f"{dest}: exists and is not a folder; choose another output path")
    if dest.is_dir() and not _is_ours_or_empty(dest):
        raise BadInputError(
            f"{dest}: folder exists, is not empty and was not written by wadi (no {MARKER} marker); "
            "refusing to replace it: choose another output path or remove it yourself"
        )


def check_writable(path: str | os.PathLike[str], *, directory: bool = False) -> Path:
    """Fail early (BadInputError, one line) if ``path`` cannot be written, before long work.

    ``directory=True``: ``path`` is an output folder (it must be absent, empty, or one of
    ours). Otherwise ``path`` is an output file (it must not be a folder). Probes by
    creating and removing a temporary file in the nearest existing ancestor.
    """
    dest = Path(path).expanduser()
    if directory:
        _check_output_dir(dest)
    elif dest.is_dir():
        raise BadInputError(f"{dest}: is a folder; expected a file path")
    probe_dir = dest.parent
    while not probe_dir.exists() and probe_dir != probe_dir.parent:
        probe_dir = probe_dir.parent
    if not probe_dir.is_dir():
        raise BadInputError(f"{dest}: cannot be created, {probe_dir} is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".wadi-probe.", dir=probe_dir)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise BadInputError(f"{dest}: not writable ({exc.strerror or exc} in {probe_dir})") from None
    return dest


def _write_marker(folder: Path) -> None:
    (folder / MARKER).write_text(
        json.dumps({"created_by": "wadi", "wadi_version": __version__}) + "\n", encoding="utf-8"
    )


@contextlib.contextmanager
def atomic_output_dir(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary folder; when the block succeeds it becomes ``path``, all at once.

    ``path`` must be absent, an empty folder, or a folder wadi wrote (it has a ``.wadi``
    marker, which this function writes); anything else raises :class:`BadInputError`
    before the block runs. On error the temporary folder is removed and ``path`` is
    untouched.
    """
    dest = Path(path).expanduser()
    _check_output_dir(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    os.chmod(tmp, _umasked(0o777))  # mkdtemp makes 0700; give the folder normal permissions
    try:
        _write_marker(tmp)
        yield tmp
        _check_output_dir(dest)  # it may have changed while we worked
        _replace_dir(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _replace_dir(src: Path, dest: Path) -> None:
    """Move ``src`` to ``dest``; an existing ``dest`` is set aside first and removed after."""
    if not dest.exists():
        os.replace(src, dest)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".old", dir=dest.parent))
    os.rmdir(old)
    os.replace(dest, old)
    try:
        os.replace(src, dest)
    except BaseException:
        os.replace(old, dest)  # put the previous output back
        raise
    shutil.rmtree(old, ignore_errors=True)
