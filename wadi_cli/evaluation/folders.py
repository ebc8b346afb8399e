"""Image folders of an evaluation: listing and reading images, the resumable ``--out EVAL``
folder and its manifest.

Layout of ``--out EVAL``::

    EVAL/.wadi              marker (only wadi folders are ever written into)
    EVAL/manifest.json      settings + one entry per image: file, caption, seed
    EVAL/images/000000.png  generated images, each written atomically (temp + rename)
    EVAL/reference/         tiny backbone only: the rendered real images of the captions
    EVAL/metrics.json       the scores and how each was computed

A resumed evaluation keeps every image that is complete (PNG chunks and CRCs intact; the
manifest's settings, checked first, fix the size) and regenerates the others; metrics
always read exactly the manifest's files, so an image is never counted twice.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from wadi_cli.errors import BadInputError
from wadi_cli.io import atomic_file, check_writable, create_output_dir, write_text_atomic

#: Image suffixes read from ``--images`` / ``--ref`` folders (clean-fid's list, less .npy).
IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
MANIFEST = "manifest.json"
METRICS = "metrics.json"
IMAGES = "images"
REFERENCE = "reference"


def natural_key(text: str) -> list[Any]:
    """Sort key that orders digit runs by value and letters case-blind (``2.png`` before
    ``10.png``), GigaGAN's order of its generated images."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", text)]


def list_images(folder: str | os.PathLike[str], flag: str, order: str = "path") -> list[Path]:
    """Image files under ``folder`` (recursively, hidden names skipped), sorted by their
    relative path (``order="natural"``: by :func:`natural_key` of it). A missing folder or
    one without images is refused."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise BadInputError(f"{flag} {root}: no such folder")
    files = sorted(
        (
            p
            for p in root.rglob("*")
            if p.suffix.lower() in IMAGE_SUFFIXES
            and p.is_file()
            and not any(part.startswith(".") for part in p.relative_to(root).parts)
        ),
        key=lambda p: p.relative_to(root).as_posix(),
    )
    if order == "natural":
        files.sort(key=lambda p: natural_key(p.relative_to(root).as_posix()))
    if not files:
        raise BadInputError(f"{flag} {root}: holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return files


def read_image(path: str | os.PathLike[str]) -> Image.Image:
    """Decode an image fully; a corrupt or truncated file is refused naming the file."""
    try:
        with Image.open(path) as im:
            im.load()
            return im.copy()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise BadInputError(f"{path}: not a readable image ({msg})") from None


def png_is_complete(path: Path) -> bool:
    """True when ``path`` is a PNG whose chunks and CRCs are intact up to IEND (a file cut
    short by a kill is not)."""
    try:
        with Image.open(path) as im:
            if im.format != "PNG":
                return False
            im.verify()
        return True
    except Exception:  # noqa: BLE001 - any failure to parse means "regenerate it"
        return False


def save_png(image: np.ndarray, path: Path) -> None:
    """Write one uint8 image as PNG atomically."""
    with atomic_file(path) as tmp:
        Image.fromarray(image).save(tmp, format="PNG")


def image_name(index: int, total: int) -> str:
    """``000042.png``: zero-padded to at least 6 digits so names sort like indices."""
    return f"{index:0{max(6, len(str(max(total - 1, 0))))}d}.png"


@dataclass
class Manifest:
    """What an evaluation folder holds: the settings that determine its images, and one
    entry (file, caption, seed) per image."""

    settings: dict[str, Any]
    entries: list[dict[str, Any]] = field(default_factory=list)

    @property
    def files(self) -> list[str]:
        return [e["file"] for e in self.entries]

    @property
    def captions(self) -> list[str]:
        return [e["caption"] for e in self.entries]

    def to_json(self) -> str:
        return json.dumps({"settings": self.settings, "images": self.entries}, indent=1) + "\n"

    @classmethod
    def read(cls, path: Path) -> Manifest:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            return cls(dict(data["settings"]), list(data["images"]))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
            raise BadInputError(f"{path}: unreadable evaluation manifest ({exc})") from None


def build_manifest(
    settings: dict[str, Any], captions: Sequence[str], seed: int, seed_batch: int | None = None
) -> Manifest:
    """Image ``i`` shows ``captions[i]`` and starts from noise seed ``seed + i``; with
    ``seed_batch`` B (DMD2's seeding) from row ``i mod B`` of the noise of batch
    ``i // B``, drawn at once from a generator seeded ``seed + i // B``."""
    n = len(captions)
    entries: list[dict[str, Any]] = []
    for i, c in enumerate(captions):
        entry: dict[str, Any] = {"file": f"{IMAGES}/{image_name(i, n)}", "caption": c}
        if seed_batch:
            entry.update(seed=seed + i // seed_batch, row=i % seed_batch)
        else:
            entry["seed"] = seed + i
        entries.append(entry)
    return Manifest(dict(settings), entries)


def check_resumable(out: Path, manifest: Manifest) -> Manifest | None:
    """The manifest already in ``out`` (``None`` for a new folder) after checking that it
    describes the same evaluation: same settings, and the same caption for every image
    index both hold (``-n`` may grow or shrink). Anything else is refused, naming the
    first differences."""
    check_writable(out, directory=True)
    path = out / MANIFEST
    if not path.is_file():
        if out.is_dir() and (out / IMAGES).exists():
            raise BadInputError(f"--out {out}: has images/ but no {MANIFEST}; choose another --out")
        return None
    old = Manifest.read(path)
    keys = sorted(set(old.settings) | set(manifest.settings))
    diffs = [
        f"{k}: {old.settings.get(k)!r} there vs {manifest.settings.get(k)!r} now"
        for k in keys
        if old.settings.get(k) != manifest.settings.get(k)
    ]
    for i, (a, b) in enumerate(zip(old.captions, manifest.captions, strict=False)):
        if a != b:
            diffs.append(f"caption {i}: {a!r} there vs {b!r} now")
            break
    if diffs:
        raise BadInputError(
            f"--out {out} holds an evaluation with other settings ({'; '.join(diffs[:3])}); "
            "choose another --out to start a new one"
        )
    return old


def ensure_eval_dir(out: Path) -> Path:
    """Create ``out`` with its ``.wadi`` marker (after every check passed)."""
    return create_output_dir(out, "eval")


def write_manifest(out: Path, manifest: Manifest) -> None:
    """Create ``out`` (with its marker) and write the manifest atomically."""
    ensure_eval_dir(out)
    (out / IMAGES).mkdir(exist_ok=True)
    write_text_atomic(out / MANIFEST, manifest.to_json())


def missing_chunks(out: Path, manifest: Manifest, chunk: int) -> list[tuple[int, int]]:
    """``[(start, stop), …]`` of the image chunks (aligned on multiples of ``chunk``) with at
    least one image that is absent or incomplete. A chunk is always generated whole, so
    every image is made in the same batch whether the run was resumed or split."""
    return [
        (start, stop)
        for start, stop in chunks(len(manifest.entries), chunk)
        if not all(png_is_complete(out / manifest.entries[i]["file"]) for i in range(start, stop))
    ]


def shard(items: Sequence[Any], rank: int, world: int) -> list[Any]:
    """Items ``rank, rank + world, …``: a deterministic split over processes."""
    return list(items[rank::world])


def chunks(n: int, size: int) -> Iterable[tuple[int, int]]:
    """``(start, stop)`` ranges of ``size`` covering ``range(n)``."""
    return ((s, min(s + size, n)) for s in range(0, n, size))
