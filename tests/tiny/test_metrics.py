"""Fréchet distance against float64 references; accuracy/FD of the shipped classifier."""

from __future__ import annotations

import numpy as np
import pytest

from wadi_cli.errors import BadInputError
from wadi_cli.tiny.arch import TINY_CLASSIFIER_PATH
from wadi_cli.tiny.metrics import (
    control_adherence,
    feature_statistics,
    frechet_distance,
    mask_iou,
    shape_masks,
)


def _random_rotation(d: int, rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((d, d)))
    return q * np.sign(np.diag(r))


def test_fd_commuting_covariances_closed_form():
    """Same eigenbasis: FD = ‖Δμ‖² + Σ (√a_i − √b_i)²."""
    rng = np.random.default_rng(0)
    d = 12
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    a, b = rng.uniform(0.1, 3.0, d), rng.uniform(0.1, 3.0, d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-9)
    q = _random_rotation(d, rng)
    s1, s2 = q @ np.diag(a) @ q.T, q @ np.diag(b) @ q.T
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-7)


def test_fd_general_covariances_against_eigendecomposition():
    """tr((Σ1Σ2)^½) = Σ √λ_i(Σ1^½ Σ2 Σ1^½), computed with symmetric eigendecompositions."""
    rng = np.random.default_rng(1)
    d = 10
    x, y = rng.standard_normal((d, d)), rng.standard_normal((d, d))
    s1, s2 = x @ x.T + 0.1 * np.eye(d), y @ y.T + 0.1 * np.eye(d)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    w, v = np.linalg.eigh(s1)
    root1 = v @ np.diag(np.sqrt(w)) @ v.T
    lam = np.linalg.eigvalsh(root1 @ s2 @ root1)
    expected = (
        np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.sum(np.sqrt(np.clip(lam, 0, None)))
    )
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-8)


def test_fd_identical_and_singular():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((5, 8))
    s = x.T @ x  # rank 5 of 8: singular
    assert abs(frechet_distance(np.zeros(8), s, np.zeros(8), s)) < 1e-6
    assert frechet_distance(np.ones(8), s, np.zeros(8), s) == pytest.approx(8.0, abs=1e-5)
    assert isinstance(frechet_distance(np.zeros(8), s, np.zeros(8), np.eye(8)), float)


def test_fd_rejects_mismatched_shapes():
    with pytest.raises(BadInputError):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_feature_statistics_from_samples_converge_to_planted_gaussian():
    rng = np.random.default_rng(3)
    mu = np.array([1.0, -2.0, 0.5])
    cov = np.diag([1.0, 4.0, 0.25])
    feats = rng.multivariate_normal(mu, cov, size=200_000)
    m, s = feature_statistics(feats)
    np.testing.assert_allclose(m, mu, atol=0.02)
    np.testing.assert_allclose(s, cov, atol=0.03)
    assert frechet_distance(m, s, mu, cov) < 1e-3


needs_classifier = pytest.mark.skipif(
    not TINY_CLASSIFIER_PATH.is_file(), reason="tiny classifier not shipped"
)


@needs_classifier
def test_shipped_classifier_on_fresh_renders():
    from wadi_cli.tiny.classifier import attribute_matches, load_classifier, predict
    from wadi_cli.tiny.data import real_images

    imgs, attrs = real_images(400, 31337)
    match = attribute_matches(predict(imgs, load_classifier()), attrs)
    assert np.logical_and.reduce(list(match.values())).mean() >= 0.95


@needs_classifier
def test_evaluate_images_real_vs_wrong_prompts():
    """Real renders score ~1 with a small FD; the same images against shuffled prompts
    score low; a constant grey image set has a far larger FD."""
    from wadi_cli.tiny.data import real_images
    from wadi_cli.tiny.metrics import evaluate_images

    imgs, attrs = real_images(300, 77)
    good = evaluate_images(imgs, attrs, real_seed=78)
    assert good["num_images"] == 300
    assert good["accuracy"] >= 0.95
    assert set(good["per_attribute_accuracy"]) == {"color", "shape", "position"}
    wrong = evaluate_images(imgs, attrs[1:] + attrs[:1], real_seed=78)
    assert wrong["accuracy"] < 0.2
    rng = np.random.default_rng(0)
    grey = np.full_like(imgs, 128) + rng.integers(0, 3, imgs.shape, dtype=np.uint8)
    bad = evaluate_images(grey, attrs, real_seed=78)
    assert bad["fd"] > 10 * max(good["fd"], 1e-3)
    with pytest.raises(BadInputError):
        evaluate_images(imgs[:10], attrs[:9], real_seed=0)


def _boxes(n: int, side: int, boxes: list[tuple[int, int, int, int]]) -> np.ndarray:
    out = np.zeros((n, side, side), bool)
    for i, (r0, r1, c0, c1) in enumerate(boxes):
        out[i, r0:r1, c0:c1] = True
    return out


def test_mask_iou_of_planted_boxes():
    """Rows 2–5 × cols 2–7 (24 px) against rows 4–9 × cols 4–7 (24 px): 8 px shared, 40 in
    the union; disjoint boxes 0; both empty 1; a box against itself 1."""
    a = _boxes(4, 12, [(2, 6, 2, 8), (0, 3, 0, 3), (0, 0, 0, 0), (1, 4, 1, 9)])
    b = _boxes(4, 12, [(4, 10, 4, 8), (5, 8, 5, 8), (0, 0, 0, 0), (1, 4, 1, 9)])
    np.testing.assert_allclose(mask_iou(a, b), [8 / 40, 0.0, 1.0, 1.0])
    with pytest.raises(BadInputError, match="masks of shapes"):
        mask_iou(a, b[:3])


def test_shape_masks_recover_planted_shapes():
    """A flat shape drawn on a background with a gradient (±10 across) and pixel noise (σ 3) comes back
    exactly, for a saturated and a dim shape colour, and for one covering 43 % of the border."""
    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[:32, :32]
    truth = _boxes(3, 32, [(20, 29, 3, 10), (5, 11, 18, 27), (0, 12, 0, 32)])
    base = 100 + 0.4 * yy[..., None] - 0.3 * xx[..., None] + rng.normal(0, 3, (3, 32, 32, 3))
    images = base.copy()
    images[0][truth[0]] = [220, 40, 30]
    images[1][truth[1]] = [60, 150, 70]  # about 80 from the background
    images[2][truth[2]] = [40, 60, 200]  # a band on 43 % of the border: the median is still background
    images = np.clip(np.round(images), 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(shape_masks(images), truth)


def test_shape_masks_recover_the_rendered_silhouettes():
    """On 400 rendered images (every colour, shape and position, anti-aliased edges) the
    segmentation is the renderer's own silhouette."""
    from wadi_cli.tiny.data import render_with_masks, sample_attributes

    images, masks = render_with_masks(sample_attributes(400, 8), 8)
    iou = mask_iou(shape_masks(images), masks)
    assert iou.mean() > 0.995 and iou.min() > 0.9


def test_control_adherence_mean_and_interval():
    """Mean IoU and 1.96 standard errors, against a hand computation on planted masks."""
    from wadi_cli.tiny.data import render_with_masks, sample_attributes

    images, masks = render_with_masks(sample_attributes(5, 2), 2)
    shifted = np.roll(masks, (1, 2), axis=(1, 2))
    iou = np.array([(m & s).sum() / (m | s).sum() for m, s in zip(masks, shifted, strict=True)])
    out = control_adherence(images, shifted)
    assert out["iou"] == pytest.approx(iou.mean(), abs=1e-3)
    assert out["iou_ci95"] == pytest.approx(1.96 * iou.std(ddof=1) / np.sqrt(5), rel=0.05)
