"""The images of a fine-tune: instance (and class) folders read once, every image brought to
the backbone's resolution (RGB, centre crop on the long edge, LANCZOS resize: the same
transform as :func:`wadi_cli.evaluation.protocol.protocol_image`), and the class images a
base model generates, cached in the run folder.

Any PIL-readable image of any mode or size is taken (converted, cropped, resized); a folder
with no readable image, or one unreadable file, is one :class:`BadInputError` line naming it.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

#: The run folder's cache of generated class images.
CLASS_IMAGES = "class_images"


def read_image_folder(folder: str | os.PathLike[str], flag: str) -> list[Image.Image]:
    """Every image under ``folder`` (sorted by relative path), decoded: a folder without
    images, or a file that does not decode, is one line naming it. ``flag`` names the folder."""
    from wadi_cli.evaluation.folders import list_images, read_image

    return [read_image(f) for f in list_images(Path(folder).expanduser(), flag)]


def to_resolution(images: list[Image.Image], resolution: int) -> np.ndarray:
    """(N, R, R, 3) uint8: each image as RGB, centre-cropped and resized to ``resolution`` R."""
    from wadi_cli.evaluation.protocol import protocol_image

    return np.stack([protocol_image(im, resolution) for im in images])


def cached_class_images(run: Path, count: int) -> Path | None:
    """``run/class_images`` when it holds ``count`` complete PNGs (a run resumed, or restarted
    after its first checkpoint, reuses them), else ``None``."""
    from wadi_cli.evaluation.folders import png_is_complete

    folder = run / CLASS_IMAGES
    if not folder.is_dir():
        return None
    pngs = sorted(folder.glob("*.png"))
    if len(pngs) != count or not all(png_is_complete(p) for p in pngs):
        return None
    return folder


def write_class_images(run: Path, images: np.ndarray) -> Path:
    """Write generated class images as ``run/class_images/NNNNN.png``, all at once (atomic
    folder), replacing an incomplete cache."""
    from wadi_cli.io import atomic_output_dir

    folder = run / CLASS_IMAGES
    with atomic_output_dir(folder) as tmp:
        for i, image in enumerate(images):
            Image.fromarray(image).save(tmp / f"{i:05d}.png", format="PNG")
    return folder
