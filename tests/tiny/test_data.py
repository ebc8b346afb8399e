"""Procedural data of the tiny model: determinism, prompt round trip, rendered content."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from wadi_cli.tiny.data import (
    ATTRIBUTES,
    attrs_to_indices,
    mask_images,
    parse_prompt,
    prompt_for,
    real_images,
    render,
    render_batch,
    render_with_masks,
    sample_attributes,
)

ALL_ATTRS = [dict(zip(ATTRIBUTES, combo, strict=True)) for combo in itertools.product(*ATTRIBUTES.values())]


def test_attribute_space_is_48_combinations():
    assert len(ALL_ATTRS) == 48
    assert ATTRIBUTES["color"] == ("red", "green", "blue", "yellow")


def test_prompt_round_trip_all_combinations():
    for a in ALL_ATTRS:
        p = prompt_for(a)
        assert p == f"a {a['color']} {a['shape']} at the {a['position']}"
        assert parse_prompt(p) == a
        assert parse_prompt("  " + p.upper().replace(" ", "  ") + " ") == a


@pytest.mark.parametrize(
    "bad", ["", "a red circle", "a purple circle at the top left", "a red circle at the middle", "red circle"]
)
def test_parse_prompt_rejects_other_text(bad):
    assert parse_prompt(bad) is None


def test_sampling_and_rendering_are_deterministic():
    assert sample_attributes(20, 3) == sample_attributes(20, 3)
    assert sample_attributes(20, 3) != sample_attributes(20, 4)
    a, attrs = real_images(16, 5)
    b, attrs_b = real_images(16, 5)
    assert attrs == attrs_b
    assert a.dtype == np.uint8 and a.shape == (16, 32, 32, 3)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, real_images(16, 6)[0])
    # the same attributes with another seed: other jitter, other pixels
    assert not np.array_equal(render_batch(attrs, 5), render_batch(attrs, 7))


def test_attribute_indices():
    idx = attrs_to_indices(ALL_ATTRS)
    assert idx.shape == (48, 3)
    assert len({tuple(r) for r in idx}) == 48
    assert idx.min() == 0 and list(idx.max(axis=0)) == [3, 2, 3]


def _shape_pixels(img: np.ndarray) -> np.ndarray:
    """Saturated pixels: the background is near-grey, every shape colour is saturated."""
    f = img.astype(np.int32)
    return (f.max(axis=2) - f.min(axis=2)) > 80


@pytest.mark.parametrize("attrs", ALL_ATTRS[::5])
def test_rendered_content_matches_attributes(attrs):
    """Independent check of the renderer: where the saturated pixels are and what colour."""
    rng = np.random.default_rng(0)
    for _ in range(3):
        img = render(attrs, rng)
        mask = _shape_pixels(img)
        assert 20 <= mask.sum() <= 250
        rows, cols = np.nonzero(mask)
        vert, horiz = attrs["position"].split()
        assert (rows.mean() < 16) == (vert == "top")
        assert (cols.mean() < 16) == (horiz == "left")
        r, g, b = img[mask].astype(np.float64).mean(axis=0)
        expected = {
            "red": r > g + 60 and r > b + 60,
            "green": g > r + 60 and g > b + 60,
            "blue": b > r + 60 and b > g + 60,
            "yellow": r > b + 100 and g > b + 100,
        }
        assert expected[attrs["color"]], (attrs, (r, g, b))


def test_shapes_differ_in_fill_ratio():
    """A square fills most of its bounding box, a circle ~π/4 of it, a triangle ~half."""
    ratios = {}
    for shape in ATTRIBUTES["shape"]:
        mask = _shape_pixels(
            render({"color": "red", "shape": shape, "position": "top left"}, np.random.default_rng(1))
        )
        rows, cols = np.nonzero(mask)
        box = (np.ptp(rows) + 1) * (np.ptp(cols) + 1)
        ratios[shape] = mask.sum() / box
    assert ratios["square"] > 0.9
    assert 0.65 < ratios["circle"] < 0.9
    assert 0.35 < ratios["triangle"] < 0.65


def test_background_factor_tints_only_the_background():
    """A shifted background (the transfer study's) multiplies the plain background by the
    factor and leaves the random draws, hence the shape, as they were."""
    from wadi_cli.tiny.data import render_batch

    attrs = [{"color": "red", "shape": "square", "position": "top left"}]
    plain = render_batch(attrs, 5).astype(np.float64)
    shifted = render_batch(attrs, 5, background=(0.3, 0.35, 0.45)).astype(np.float64)
    # the square sits near (8, 8): its centre keeps its colour; the far corner is background
    np.testing.assert_array_equal(shifted[0, 8, 8], plain[0, 8, 8])
    np.testing.assert_allclose(shifted[0, 28, 28], plain[0, 28, 28] * np.array([0.3, 0.35, 0.45]), atol=1.0)


def _erode(mask: np.ndarray) -> np.ndarray:
    """Pixels whose 4 neighbours are also in ``mask`` (the border of the image counts as out)."""
    m = np.pad(mask, 1)
    return m[1:-1, 1:-1] & m[:-2, 1:-1] & m[2:, 1:-1] & m[1:-1, :-2] & m[1:-1, 2:]


def test_silhouettes_are_the_shapes_drawn_in_the_same_images():
    """render_with_masks: the very images of render_batch; inside its mask (eroded: no edge
    pixel) every pixel has the one shape colour, outside it (dilated) none has, and the area is
    that of a shape of half-extent 4.5–6.5 px."""
    attrs = sample_attributes(60, 11)
    images, masks = render_with_masks(attrs, 11)
    np.testing.assert_array_equal(images, render_batch(attrs, 11))
    for img, mask, a in zip(images, masks, attrs, strict=True):
        inner, outer = _erode(mask), _erode(~mask)  # no pixel at the shape's edge
        colours = img[inner].astype(int)
        assert inner.sum() > 10 and np.ptp(colours, axis=0).max() <= 1, a  # one flat colour
        shape_colour = colours.mean(axis=0)
        far = np.abs(img[outer].astype(int) - shape_colour).max(axis=1)
        assert far.min() > 60, a  # no shape-coloured pixel outside
        assert 40 <= mask.sum() <= 140, (a, mask.sum())


def test_mask_images_are_white_on_black():
    masks = np.zeros((2, 4, 5), bool)
    masks[0, 1, 2] = masks[1, 3, 4] = True
    out = mask_images(masks)
    assert out.shape == (2, 4, 5, 3) and out.dtype == np.uint8
    assert out[0, 1, 2].tolist() == [255, 255, 255] and out[1, 3, 4].tolist() == [255, 255, 255]
    assert out.sum() == 2 * 3 * 255


def test_star_is_outside_the_vocabulary_and_drawn_as_a_five_pointed_star():
    """The star (``NOVEL_SHAPES``) is no class, prompt word or parseable prompt of the tiny
    model; its mask is the polygon of its vertices: the pixel area of a large star drawn on a
    fine grid matches the shoelace area of the 10 vertices, and a ray from the centre crosses
    it once in a point's direction and not at all beyond the inner radius between two points."""
    from wadi_cli.tiny.arch import PROMPT_WORDS
    from wadi_cli.tiny.data import (
        NOVEL_SHAPES,
        STAR_INNER_RATIO,
        STAR_OUTER_SCALE,
        _shape_mask,
        star_vertices,
    )

    assert "star" in NOVEL_SHAPES and "star" not in ATTRIBUTES["shape"] and "star" not in PROMPT_WORDS
    assert parse_prompt("a red star at the top left") is None
    v = star_vertices(10.0)
    y, x = v[:, 0], v[:, 1]
    shoelace = 0.5 * abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))
    # closed form: 10 triangles centre-outer-inner, each ½·R·ρR·sin 36°
    assert shoelace == pytest.approx(5 * 10.0 * STAR_INNER_RATIO * 10.0 * np.sin(np.pi / 5))
    c = (np.arange(800) + 0.5) / 20 - 20.0  # 40 x 40 units at 20 px per unit
    yy, xx = np.meshgrid(c, c, indexing="ij")
    mask = _shape_mask("star", yy, xx, 0.0, 0.0, 10.0 / STAR_OUTER_SCALE)  # outer radius 10
    assert mask.sum() / 400 == pytest.approx(shoelace, rel=0.01)
    # up (dy < 0) is a point: inside at 0.9 R; straight down lies between two points
    assert _shape_mask("star", np.array([-9.0]), np.array([0.0]), 0, 0, 10.0 / STAR_OUTER_SCALE)[0]
    assert not _shape_mask("star", np.array([6.0]), np.array([0.0]), 0, 0, 10.0 / STAR_OUTER_SCALE)[0]


def test_star_renders_like_the_other_shapes():
    """Same colour, position and jitter draws as the vocabulary's shapes: a red star at the
    top left has its saturated pixels there, in red, and its pixels differ from every other
    shape's drawn from the same random state."""
    attrs = {"color": "red", "shape": "star", "position": "top left"}
    img = render(attrs, np.random.default_rng(2))
    mask = _shape_pixels(img)
    rows, cols = np.nonzero(mask)
    assert 30 <= mask.sum() <= 250 and rows.mean() < 16 and cols.mean() < 16
    r, g, b = img[mask].astype(np.float64).mean(axis=0)
    assert r > g + 60 and r > b + 60
    box = (np.ptp(rows) + 1) * (np.ptp(cols) + 1)
    assert 0.3 < mask.sum() / box < 0.6  # a star fills less of its box than a circle
    for shape in ATTRIBUTES["shape"]:
        other = render({**attrs, "shape": shape}, np.random.default_rng(2))
        assert not np.array_equal(img, other)
        np.testing.assert_array_equal(img[28:, 28:], other[28:, 28:])  # same background draws
