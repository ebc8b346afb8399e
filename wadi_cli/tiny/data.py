"""Procedural training data for the tiny model: one coloured shape on a plain background.

Every image shows one shape with three attributes (:data:`ATTRIBUTES`): colour, shape
and position (image quadrant); the prompt is ``"a {color} {shape} at the {position}"``.
Exact position, size, colour shade and background (tone and a soft gradient) are
jittered so that the Fréchet distance between generated and rendered images is
meaningful. Everything is deterministic given a seed (numpy ``default_rng``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

IMAGE_SIZE = 32
_SUPERSAMPLE = 2  # render at 2x and average-pool: anti-aliased edges

#: The vocabulary of each attribute, in a fixed order (class indices of the classifier).
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "color": ("red", "green", "blue", "yellow"),
    "shape": ("circle", "square", "triangle"),
    "position": ("top left", "top right", "bottom left", "bottom right"),
}

Attrs = dict[str, str]

#: Shapes the renderer draws that are NOT in :data:`ATTRIBUTES` (nor in the tiny model's
#: vocabulary, its training data or its classifier's classes): out-of-vocabulary concepts
#: for fine-tuning studies (``analysis/dreambooth_tiny``). Adding one here changes nothing
#: that the shipped model, student or classifier were trained on.
NOVEL_SHAPES: tuple[str, ...] = ("star",)
#: The star's inner (concave) vertices lie at this fraction of its outer radius.
STAR_INNER_RATIO = 0.45
#: Outer radius of the star relative to the jittered half-extent ``r``: its area is then
#: close to the circle's (a five-pointed star with inner ratio 0.45 covers about 42 % of
#: its circumscribed circle's area, so it is drawn larger).
STAR_OUTER_SCALE = 1.45

# Nominal RGB of each colour in [0, 1]; the renderer jitters shade and hue slightly.
_BASE_RGB: dict[str, tuple[float, float, float]] = {
    "red": (0.88, 0.12, 0.10),
    "green": (0.12, 0.75, 0.18),
    "blue": (0.15, 0.25, 0.92),
    "yellow": (0.92, 0.85, 0.10),
}

# Quadrant centres (row, col) in pixels of the 32x32 image.
_CENTRES: dict[str, tuple[float, float]] = {
    "top left": (8.0, 8.0),
    "top right": (8.0, 24.0),
    "bottom left": (24.0, 8.0),
    "bottom right": (24.0, 24.0),
}

_PROMPT_RE = re.compile(
    r"^a (?P<color>{}) (?P<shape>{}) at the (?P<position>{})$".format(
        *("|".join(v) for v in ATTRIBUTES.values())
    )
)


def prompt_for(attrs: Attrs) -> str:
    """The prompt of an attribute dict: ``"a {color} {shape} at the {position}"``."""
    return f"a {attrs['color']} {attrs['shape']} at the {attrs['position']}"


def parse_prompt(prompt: str) -> Attrs | None:
    """Inverse of :func:`prompt_for` (whitespace and case are normalised); ``None`` when
    the prompt does not follow the template."""
    m = _PROMPT_RE.match(" ".join(prompt.lower().split()))
    return None if m is None else {k: m.group(k) for k in ATTRIBUTES}


def sample_attributes(n: int, seed: int) -> list[Attrs]:
    """``n`` attribute dicts, each attribute drawn uniformly and independently."""
    rng = np.random.default_rng([seed, 0])
    idx = {k: rng.integers(0, len(v), size=n) for k, v in ATTRIBUTES.items()}
    return [{k: ATTRIBUTES[k][int(idx[k][i])] for k in ATTRIBUTES} for i in range(n)]


def attrs_to_indices(attrs: Sequence[Attrs]) -> np.ndarray:
    """``(N, 3)`` int64 class indices (colour, shape, position) of a list of attribute dicts."""
    keys = list(ATTRIBUTES)
    return np.array([[ATTRIBUTES[k].index(a[k]) for k in keys] for a in attrs], dtype=np.int64).reshape(-1, 3)


def star_vertices(outer: float) -> np.ndarray:
    """``(10, 2)`` (dy, dx) vertices of a five-pointed star of outer radius ``outer`` around
    the origin, one point straight up (dy < 0 is up), outer and inner vertices alternating."""
    k = np.arange(10)
    angle = -np.pi / 2 + k * np.pi / 5
    rad = np.where(k % 2 == 0, outer, STAR_INNER_RATIO * outer)
    return np.stack([rad * np.sin(angle), rad * np.cos(angle)], axis=1)


def _star_mask(dy: np.ndarray, dx: np.ndarray, outer: float) -> np.ndarray:
    """Inside the star polygon (even-odd crossing rule over its 10 edges)."""
    v = star_vertices(outer)
    inside = np.zeros(dy.shape, dtype=bool)
    for (y0, x0), (y1, x1) in zip(v, np.roll(v, -1, axis=0), strict=True):
        crosses = (y0 > dy) != (y1 > dy)
        with np.errstate(divide="ignore", invalid="ignore"):
            x_at = x0 + (dy - y0) * (x1 - x0) / (y1 - y0)
        inside ^= crosses & (dx < x_at)
    return inside


def _shape_mask(shape: str, yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, r: float) -> np.ndarray:
    """Boolean mask of a shape of half-extent ``r`` centred at (cy, cx)."""
    dy, dx = yy - cy, xx - cx
    if shape == "circle":
        return dy * dy + dx * dx <= r * r
    if shape == "square":
        h = 0.85 * r  # similar area to the circle
        return (np.abs(dy) <= h) & (np.abs(dx) <= h)
    if shape == "triangle":  # apex up, base down
        top, bottom = -r, 0.8 * r
        frac = (dy - top) / (bottom - top)  # 0 at the apex, 1 at the base
        return (frac >= 0) & (frac <= 1) & (np.abs(dx) <= frac * 1.05 * r)
    if shape == "star":  # out of vocabulary (NOVEL_SHAPES): five points, one pointing up
        return _star_mask(dy, dx, STAR_OUTER_SCALE * r)
    raise ValueError(f"unknown shape {shape!r}")


def render(attrs: Attrs, rng: np.random.Generator, background: Sequence[float] | None = None) -> np.ndarray:
    """Render one ``(32, 32, 3)`` uint8 image of ``attrs``; jitter is drawn from ``rng``.
    ``attrs["shape"]`` may also be one of :data:`NOVEL_SHAPES` (same jitter draws).
    ``background`` (an RGB factor) tints the background, for a shifted distribution (the
    random draws, hence everything else, are those of the plain image)."""
    return _render(attrs, rng, background)[0]


def _render(
    attrs: Attrs, rng: np.random.Generator, background: Sequence[float] | None
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`render`'s image and the shape's silhouette: ``(32, 32)`` bool, the pixels at
    least half covered by the shape (of the 2×2 supersamples)."""
    s = IMAGE_SIZE * _SUPERSAMPLE
    coords = (np.arange(s, dtype=np.float64) + 0.5) / _SUPERSAMPLE
    yy, xx = np.meshgrid(coords, coords, indexing="ij")
    # background: muted grey-ish tone with a small tint and a soft linear gradient
    tone = rng.uniform(0.25, 0.6)
    tint = rng.uniform(-0.04, 0.04, size=3)
    grad = rng.uniform(-0.08, 0.08, size=2)
    img = (
        tone
        + tint[None, None, :]
        + (grad[0] * (yy / IMAGE_SIZE - 0.5) + grad[1] * (xx / IMAGE_SIZE - 0.5))[..., None]
    )
    if background is not None:
        img = img * np.asarray(background, dtype=np.float64)[None, None, :]
    # shape: jittered centre, size and colour shade
    cy, cx = _CENTRES[attrs["position"]]
    cy += rng.uniform(-2.0, 2.0)
    cx += rng.uniform(-2.0, 2.0)
    r = rng.uniform(4.5, 6.5)
    colour = np.array(_BASE_RGB[attrs["color"]]) * rng.uniform(0.8, 1.05) + rng.uniform(-0.05, 0.05, size=3)
    mask = _shape_mask(attrs["shape"], yy, xx, cy, cx, r)
    img = np.where(mask[..., None], colour[None, None, :], img)
    img = img.reshape(IMAGE_SIZE, _SUPERSAMPLE, IMAGE_SIZE, _SUPERSAMPLE, 3).mean(axis=(1, 3))
    cover = mask.reshape(IMAGE_SIZE, _SUPERSAMPLE, IMAGE_SIZE, _SUPERSAMPLE).mean(axis=(1, 3))
    return np.clip(np.round(img * 255.0), 0, 255).astype(np.uint8), cover >= 0.5


def render_batch(attrs: Sequence[Attrs], seed: int, background: Sequence[float] | None = None) -> np.ndarray:
    """Render ``(N, 32, 32, 3)`` uint8 images of ``attrs`` with jitter from ``seed``
    (``background``: see :func:`render`)."""
    rng = np.random.default_rng([seed, 1])
    out = np.empty((len(attrs), IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    for i, a in enumerate(attrs):
        out[i] = render(a, rng, background)
    return out


def real_images(n: int, seed: int) -> tuple[np.ndarray, list[Attrs]]:
    """``n`` freshly rendered images with uniformly drawn attributes: ``(images, attrs)``."""
    attrs = sample_attributes(n, seed)
    return render_batch(attrs, seed), attrs


def render_with_masks(attrs: Sequence[Attrs], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The images of ``render_batch(attrs, seed)`` (the same pixels) and the silhouette of
    each one's shape: ``((N, 32, 32, 3) uint8, (N, 32, 32) bool)``, a mask at least half of
    whose 2×2 supersamples the shape covers (the tiny ControlNet's control, and the ground
    truth of its adherence metric)."""
    rng = np.random.default_rng([seed, 1])
    images = np.empty((len(attrs), IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    masks = np.empty((len(attrs), IMAGE_SIZE, IMAGE_SIZE), dtype=bool)
    for i, a in enumerate(attrs):
        images[i], masks[i] = _render(a, rng, None)
    return images, masks


def mask_images(masks: np.ndarray) -> np.ndarray:
    """``(N, H, W)`` bool silhouettes → ``(N, H, W, 3)`` uint8 control images: white shape
    (255) on black (0)."""
    return np.repeat(np.asarray(masks, dtype=bool)[..., None], 3, axis=-1).astype(np.uint8) * 255
