"""Writing samples: numbered PNGs, a grid, and a JSON record of prompts, seeds and
settings, all in one folder that appears atomically (complete or not at all)."""

from __future__ import annotations

import json
import math
import os
import re
import unicodedata
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from PIL import Image

from wadi_cli.errors import BadInputError
from wadi_cli.io import atomic_output_dir, check_writable, unused_path

SAMPLES_JSON = "samples.json"
#: how long it took (differs from run to run) goes here, so samples.json and the PNGs of
#: two runs with the same inputs are byte-identical
TIMINGS_JSON = "timings.json"
TIMING_KEYS = ("seconds",)
GRID_PNG = "grid.png"
#: grid.png shows images of a smaller side enlarged to at least this many pixels (nearest
#: neighbour: every pixel a block, nothing invented), so a grid of 32-px tiny images is legible
GRID_MIN_SIDE = 128
#: Parent folder of ``wadi sample``'s default output folders (relative to the working directory).
SAMPLES_ROOT = Path("wadi-samples")


def image_grid(images: np.ndarray, ncols: int | None = None, pad: int = 2) -> np.ndarray:
    """Tile (N, H, W, 3) uint8 images row-major into one image, ``pad`` white pixels apart.
    ``ncols`` defaults to ceil(sqrt(N))."""
    if images.ndim != 4 or images.shape[0] == 0:
        raise ValueError(f"expected a non-empty (N, H, W, C) array, got shape {images.shape}")
    n, h, w, c = images.shape
    ncols = min(n, ncols or math.ceil(math.sqrt(n)))
    nrows = math.ceil(n / ncols)
    grid = np.full((nrows * h + (nrows - 1) * pad, ncols * w + (ncols - 1) * pad, c), 255, np.uint8)
    for i, img in enumerate(images):
        r, q = divmod(i, ncols)
        grid[r * (h + pad) : r * (h + pad) + h, q * (w + pad) : q * (w + pad) + w] = img
    return grid


def enlarged(images: np.ndarray, min_side: int) -> np.ndarray:
    """(N, H, W, C) images repeated ``k`` times along each side (nearest neighbour), with the
    smallest whole ``k`` that makes the shorter side at least ``min_side`` (1: unchanged)."""
    k = max(1, math.ceil(min_side / min(images.shape[1:3])))
    return images if k == 1 else images.repeat(k, axis=1).repeat(k, axis=2)


def prompt_slug(text: str, max_len: int = 60) -> str:
    """A folder name from a prompt: ASCII letters and digits, lower case, joined by ``-``
    ("a shiba inu wearing a beret" -> "a-shiba-inu-wearing-a-beret"); ``samples`` when
    nothing is left."""

    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    slug = re.sub(r"[^a-z0-9]+", "-", ascii_text.lower()).strip("-")
    return slug[:max_len].rstrip("-") or "samples"


def default_output_dir(
    prompts: list[str] | tuple[str, ...] = (),
    prompts_file: str | os.PathLike[str] | None = None,
    root: str | os.PathLike[str] = SAMPLES_ROOT,
) -> Path:
    """Where ``wadi sample`` writes without ``--out``: ``root/SLUG`` (the slug of the first
    prompt, else of the prompt file's name), or ``root/SLUG-2``, ``-3``, … when taken, so
    an earlier result is never replaced. Creates nothing."""

    text = prompts[0] if prompts else (Path(prompts_file).stem if prompts_file is not None else "")
    return unused_path(Path(root) / prompt_slug(text))


def check_output_dir(out: str | os.PathLike[str]) -> Path:
    """Fail early (before any model is loaded) if ``out`` cannot be written: it is a file,
    a non-empty folder wadi did not write, or its nearest existing parent is not a
    writable folder. A folder wadi wrote before (``.wadi`` marker) is replaced."""

    return check_writable(out, directory=True)


def save_samples(
    out: str | os.PathLike[str],
    images: np.ndarray,
    prompts: list[str],
    seeds: list[int],
    metadata: Mapping[str, object] | None = None,
    grid_cols: int | None = None,
    per_image: list[dict[str, object]] | None = None,
) -> Path:
    """Write ``0000.png``, ``0001.png``, … , ``grid.png`` and ``samples.json`` (prompts,
    seeds, files, ``metadata``) into ``out``, atomically; the :data:`TIMING_KEYS` of
    ``metadata`` go to ``timings.json`` instead. ``per_image``: more keys of each image's
    record (e.g. its ``init_image``)."""

    if not (len(images) == len(prompts) == len(seeds)):
        raise ValueError("images, prompts and seeds must have the same length")
    if len(images) == 0:
        raise BadInputError("no images to save")
    extra = per_image if per_image is not None else [{} for _ in prompts]
    if len(extra) != len(prompts):
        raise ValueError("per_image must have one record per image")
    width = max(4, len(str(len(images) - 1)))
    files = [f"{i:0{width}d}.png" for i in range(len(images))]
    timings = {k: v for k, v in (metadata or {}).items() if k in TIMING_KEYS}
    record = {
        **{k: v for k, v in (metadata or {}).items() if k not in TIMING_KEYS},
        "grid": GRID_PNG,
        "images": [
            {"file": f, "prompt": p, "seed": int(s), **e}
            for f, p, s, e in zip(files, prompts, seeds, extra, strict=True)
        ],
    }
    try:
        with atomic_output_dir(out) as tmp:
            for f, img in zip(files, images, strict=True):
                Image.fromarray(img).save(tmp / f)
            Image.fromarray(image_grid(enlarged(images, GRID_MIN_SIDE), grid_cols)).save(tmp / GRID_PNG)
            (tmp / SAMPLES_JSON).write_text(
                json.dumps(record, indent=2, default=str) + "\n", encoding="utf-8"
            )
            if timings:
                (tmp / TIMINGS_JSON).write_text(json.dumps(timings) + "\n", encoding="utf-8")
    except OSError as exc:
        raise BadInputError(f"--out {out}: cannot write ({exc.strerror or exc})") from None
    return Path(out)
