"""Evaluation of the tiny model with its attribute classifier (``wadi eval -b tiny``):
generate one image per prompt drawn from the tiny data distribution, then score them with
the shipped attribute classifier.

- ``accuracy``: share of images whose colour, shape and position all match the prompt;
- ``fd``: Fréchet distance between classifier features of the generated images and of
  freshly rendered real images with the same attributes (jitter from ``real_seed``).

Prompts come from ``sample_attributes(num_images, seed)``; image ``i`` uses noise seed
``seed + i`` (as ``wadi sample``), so a result is reproducible from (weights, N, seed).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from wadi_cli.errors import BadInputError
from wadi_cli.pipeline import Generation, LoadedPipeline, SampleConfig, generate, load_pipeline
from wadi_cli.pipeline.control import add_controlnet
from wadi_cli.pipeline.defaults import CONTROL_SCALE, STRENGTH
from wadi_cli.tiny.classifier import load_classifier
from wadi_cli.tiny.data import prompt_for, sample_attributes
from wadi_cli.tiny.metrics import control_adherence, evaluate_images

if TYPE_CHECKING:
    from wadi_cli.tiny.classifier import TinyClassifier


def evaluate_generation(
    generation: Generation,
    attrs: list[dict[str, str]],
    real_seed: int,
    classifier: TinyClassifier | None = None,
) -> dict[str, Any]:
    """Accuracy / FD of already generated tiny images against their attribute dicts."""

    return dict(evaluate_images(generation.images, attrs, real_seed=real_seed, classifier=classifier))


def evaluate_tiny(
    *,
    weights: str | os.PathLike[str] | None = None,
    teacher: bool = False,
    steps: int | None = None,
    cfg: float | None = None,
    alpha_bar_T: float | None = None,
    num_images: int = 256,
    seed: int = 0,
    real_seed: int | None = None,
    model: str | os.PathLike[str] | None = None,
    device: torch.device | str = "cpu",
    batch_size: int = 32,
    pipe: LoadedPipeline | None = None,
    classifier: TinyClassifier | None = None,
    base: bool = False,
    inputs: DownstreamInputs | None = None,
) -> tuple[dict[str, Any], Generation]:
    """Generate ``num_images`` tiny images (one-step with ``weights``, by default the shipped
    student; ``base=True``: the undistilled base in one step; or the teacher with
    ``steps``/``cfg``) for prompts drawn with ``seed`` and score them.

    ``real_seed`` (default: ``seed``) draws the jitter of the real reference images.
    ``classifier`` is a loaded classifier or a weights path (default: the shipped one);
    it is loaded first, so a missing classifier fails before any generation. A ready
    ``pipe`` may be passed to skip loading. Returns the JSON-ready result and the
    generation (images, prompts, seeds). ``inputs``: init images (image-to-image) and
    ControlNet with control images, one per prompt; with a control the result adds its
    adherence (:func:`control_scores`).
    """

    if num_images < 2:
        raise BadInputError(f"--num-images must be at least 2 to estimate FD, got {num_images}")
    inputs = inputs or DownstreamInputs()
    config = SampleConfig(
        teacher=teacher, steps=steps, cfg=cfg, alpha_bar_T=alpha_bar_T, seed=seed, batch_size=batch_size,
        strength=inputs.strength,
    )  # fmt: skip
    if classifier is None or isinstance(classifier, (str, os.PathLike)):
        classifier = load_classifier(classifier)
    if pipe is None:
        pipe = load_pipeline(
            "tiny",
            model=model,
            weights=weights,
            teacher=teacher,
            device=device,
            base=base,
            alpha_bar_T=alpha_bar_T,
        )
        pipe = add_controlnet(pipe, inputs.controlnet, inputs.control_scale, pipe.dtype)
    attrs = sample_attributes(num_images, seed)
    prompts = [prompt_for(a) for a in attrs]
    start = time.perf_counter()
    generation = generate(
        pipe, prompts, config, init_images=inputs.init_images, control_images=inputs.control_images
    )
    seconds = time.perf_counter() - start
    rs = seed if real_seed is None else real_seed
    metrics = evaluate_generation(generation, attrs, rs, classifier)
    resolved = generation.config
    result: dict[str, Any] = {
        "backbone": "tiny",
        "mode": "teacher" if teacher else "one-step",
        "accuracy": metrics["accuracy"],
        "fd": metrics["fd"],
        **{k: v for k, v in metrics.items() if k not in ("accuracy", "fd")},
        "seed": seed,
        "real_seed": rs,
        "model": pipe.model_source,
        "model_file": pipe.model_file,
        "weights": pipe.weights,
        "weights_kind": pipe.weights_kind,
        "steps": resolved.steps if teacher else 1,
        "cfg": resolved.cfg if teacher else None,
        "alpha_bar_T": None if teacher else resolved.alpha_bar_T,
        "seconds": round(seconds, 3),
        **inputs.record(),
    }
    if inputs.control_images is not None:
        result.update(control_scores(generation.images, inputs.control_images))
    return result, generation


@dataclass(frozen=True)
class DownstreamInputs:
    """What a tiny evaluation adds to text-to-image: ``init_images`` (image-to-image at
    ``strength``) and ``controlnet`` (``--controlnet``: a name, folder or hub id) at
    ``control_scale`` with ``control_images``; the images (N, 32, 32, 3) uint8, one per
    prompt, and the ``files`` they came from (``{flag: path}``, recorded)."""

    init_images: np.ndarray | None = None
    strength: float | None = None
    controlnet: str | None = None
    control_scale: float | None = None
    control_images: np.ndarray | None = None
    files: dict[str, str] = field(default_factory=dict)

    def record(self) -> dict[str, Any]:
        """What the result records of them (nothing for plain text-to-image)."""
        out: dict[str, Any] = dict(self.files)
        if self.init_images is not None:
            out["strength"] = STRENGTH if self.strength is None else self.strength
        if self.controlnet is not None:
            out["controlnet"] = self.controlnet
            out["control_scale"] = CONTROL_SCALE if self.control_scale is None else self.control_scale
        return out


def control_scores(images: np.ndarray, control_images: np.ndarray) -> dict[str, float]:
    """The adherence of generated tiny images to silhouette controls (white shape on black):
    ``control_iou`` (mean IoU of the shape segmented from each image, without any model,
    against its control's white pixels, mean channel > 127) and ``control_iou_ci95`` (the
    half-width of its 95 % interval); :func:`~wadi_cli.tiny.metrics.control_adherence`."""
    masks = np.asarray(control_images, dtype=np.float64).mean(axis=-1) > 127
    scores = control_adherence(images, masks)
    return {"control_iou": scores["iou"], "control_iou_ci95": scores["iou_ci95"]}
