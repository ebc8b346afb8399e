"""Input images of a run: the crop to the target's aspect ratio and the resize against PIL
calls written out by hand, and a folder's pairing with the prompts."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from wadi_cli.errors import BadInputError
from wadi_cli.pipeline.images import fit_image, image_files, paired_images


@pytest.mark.parametrize(
    ("size", "target", "box"),
    [
        ((40, 20), (16, 16), (10, 0, 30, 20)),  # wide → centre square of the short side
        ((21, 50), (10, 10), (0, 14, 21, 35)),  # tall, odd offset rounded down
        ((40, 40), (12, 24), (10, 0, 30, 40)),  # square → 1:2 (height 24, width 12): a 20×40 strip
    ],
)
def test_fit_image_crops_the_target_aspect_then_lanczos(size, target, box):
    rng = np.random.default_rng(1)
    img = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    height, width = target[1], target[0]
    ref = np.asarray(img.crop(box).resize((width, height), Image.Resampling.LANCZOS))
    out = fit_image(img, height, width)
    assert out.shape == (height, width, 3) and np.array_equal(out, ref)


def test_grey_and_rgba_become_rgb():
    grey = Image.fromarray(np.full((8, 8), 200, np.uint8))
    assert fit_image(grey, 4, 4).shape == (4, 4, 3)
    rgba = Image.fromarray(np.zeros((8, 8, 4), np.uint8))
    assert fit_image(rgba, 4, 4).shape == (4, 4, 3)


def test_folder_pairs_in_sorted_order(tmp_path):
    for name, value in (("b.png", 20), ("a.jpg", 10), ("c.webp", 30)):
        Image.fromarray(np.full((6, 6, 3), value, np.uint8)).save(tmp_path / name)
    (tmp_path / "readme.md").write_text("x")
    files = image_files(tmp_path, 3, "--init-image")
    assert [f.name for f in files] == ["a.jpg", "b.png", "c.webp"]
    arr = paired_images(files, 4, 4, "--init-image")
    assert arr.shape == (3, 4, 4, 3) and [int(a.mean().round()) for a in arr] == [10, 20, 30]
    with pytest.raises(BadInputError, match="holds 3 images .* for 2 prompts"):
        image_files(tmp_path, 2, "--init-image")
    one = image_files(tmp_path / "b.png", 2, "--init-image")
    assert one == [tmp_path / "b.png"] * 2
