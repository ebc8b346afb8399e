"""Input images of a sampling run (``--init-image``): one file for every prompt, or a
folder whose images pair with the prompts by sorted file name; each is brought to the
run's size the way the evaluation protocol brings prompt images to its size (RGB, the
largest centred crop of the target's aspect ratio, PIL LANCZOS resize).

:func:`image_files` only lists and opens the files (cheap: run before any model loads);
:func:`paired_images` fits them to the size once the pipeline knows it."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from wadi_cli.errors import BadInputError
from wadi_cli.io.paths import input_path_problem

#: What a folder of input images is read for (other files in it are ignored).
IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def image_files(path: str | os.PathLike[str], count: int, flag: str) -> list[Path]:
    """The image file of each of ``count`` prompts: ``path`` itself for all of them, or the
    images of the folder ``path`` in sorted order (exactly ``count`` of them). Every file is
    opened once to check it is an image. Raises :class:`BadInputError` naming ``flag``."""
    p = Path(path).expanduser()
    problem = input_path_problem(p)
    if problem:
        raise BadInputError(f"{flag} {p}: {problem}")
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
        if len(files) != count:
            raise BadInputError(
                f"{flag} {p}: holds {len(files)} images ({', '.join(IMAGE_SUFFIXES)}) for {count} "
                "prompts; a folder pairs one image with each prompt, in sorted order"
            )
    else:
        files = [p] * count
    for f in dict.fromkeys(files):
        _open(f, flag).close()
    return files


def _open(path: Path, flag: str) -> Image.Image:
    try:
        img = Image.open(path)
        img.load()
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise BadInputError(f"{flag} {path}: cannot read it as an image ({exc})") from None
    return img


def fit_image(image: Image.Image, height: int, width: int) -> np.ndarray:
    """``image`` as an (height, width, 3) uint8 array: RGB, the largest centred crop with the
    target's aspect ratio (offsets rounded down), then PIL LANCZOS to the target size."""
    rgb = image.convert("RGB")
    w, h = rgb.size
    # crop side lengths: keep the whole of the side that limits the aspect ratio
    if w * height > h * width:
        cw, ch = max(1, round(h * width / height)), h
    else:
        cw, ch = w, max(1, round(w * height / width))
    left, top = (w - cw) // 2, (h - ch) // 2
    crop = rgb.crop((left, top, left + cw, top + ch))
    return np.asarray(crop.resize((width, height), Image.Resampling.LANCZOS), dtype=np.uint8)


def paired_images(files: list[Path], height: int, width: int, flag: str) -> np.ndarray:
    """(len(files), height, width, 3) uint8: each file fitted by :func:`fit_image`."""
    cache: dict[Path, np.ndarray] = {}
    for f in files:
        if f not in cache:
            with _open(f, flag) as img:
                cache[f] = fit_image(img, height, width)
    return np.stack([cache[f] for f in files])
