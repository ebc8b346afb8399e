"""Attribute classifier of the tiny model's images (colour, shape, position).

A small CNN with one linear head per attribute, trained on freshly rendered images
(:mod:`wadi_cli.tiny.data`) by ``analysis/tiny_model/train.py``. Its penultimate layer
(:data:`FEATURE_DIM` values) is the feature space of the tiny model's Fréchet distance.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from wadi_cli.errors import BadInputError, CheckpointError
from wadi_cli.tiny.arch import TINY_CLASSIFIER_PATH
from wadi_cli.tiny.data import ATTRIBUTES, IMAGE_SIZE, Attrs

FEATURE_DIM = 128


class TinyClassifier(nn.Module):
    """Conv stack (stride 2) 32->16->8->4 px, a 128-d feature layer, one head per attribute."""

    def __init__(self) -> None:
        super().__init__()

        def block(cin: int, cout: int, stride: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, stride=stride, padding=1), nn.GroupNorm(8, cout), nn.SiLU()]

        self.body = nn.Sequential(
            *block(3, 32, 2),
            *block(32, 64, 2),
            *block(64, 64, 2),
            nn.Flatten(),
            nn.Linear(64 * 4 * 4, FEATURE_DIM),
            nn.SiLU(),
        )
        self.heads = nn.ModuleDict({k: nn.Linear(FEATURE_DIM, len(v)) for k, v in ATTRIBUTES.items()})

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features ``(N, FEATURE_DIM)`` of images in [-1, 1], ``(N, 3, 32, 32)``."""
        return self.body(x)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits per attribute for images in [-1, 1], ``(N, 3, 32, 32)``."""
        f = self.features(x)
        return {k: head(f) for k, head in self.heads.items()}


def to_model_input(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 ``(N, 32, 32, 3)`` images (array or tensor) -> float ``(N, 3, 32, 32)`` in [-1, 1]."""
    x = torch.as_tensor(np.asarray(images) if not isinstance(images, torch.Tensor) else images)
    if x.ndim != 4 or tuple(x.shape[1:]) != (IMAGE_SIZE, IMAGE_SIZE, 3):
        raise BadInputError(f"expected uint8 images of shape (N, 32, 32, 3), got {tuple(x.shape)}")
    if x.dtype != torch.uint8:
        raise BadInputError(f"expected uint8 images, got {x.dtype}")
    return x.permute(0, 3, 1, 2).float().div(127.5).sub(1.0).contiguous()


def load_classifier(path: str | os.PathLike[str] | None = None) -> TinyClassifier:
    """Load the trained classifier (default: the shipped ``classifier.safetensors``), in eval
    mode. The file is read like every weights file (:func:`wadi_cli.io.load_state_dict`:
    strict header checks, no unpickling); keys, shapes and finite values are checked."""
    from wadi_cli.io import load_state_dict, require_finite

    p = Path(path) if path is not None else TINY_CLASSIFIER_PATH
    from wadi_cli.io.paths import input_path_problem

    problem = input_path_problem(p)
    if problem and "no such file" not in problem:
        raise CheckpointError(f"{p}: {problem}")
    if not p.is_file():
        what = "is a folder, not" if p.is_dir() else "not found: no"
        raise CheckpointError(f"{p}: {what} tiny classifier weights file; pass one with --classifier FILE")
    state = load_state_dict(p)
    model = TinyClassifier()
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        first = lambda names: ", ".join(names[:2]) or "-"  # noqa: E731
        raise CheckpointError(
            f"{p}: not the tiny classifier ({len(missing)} of its tensors missing, e.g. {first(missing)}; "
            f"{len(unexpected)} unexpected, e.g. {first(unexpected)})"
        )
    for k, v in state.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            need = tuple(expected[k].shape)
            raise CheckpointError(
                f"{p}: tensor {k!r} has shape {tuple(v.shape)}, the classifier needs {need}"
            )
        require_finite(p, k, v)
    model.load_state_dict(state)
    return model.eval()


@torch.no_grad()
def features(
    images: np.ndarray | torch.Tensor, model: TinyClassifier | None = None, batch_size: int = 256
) -> np.ndarray:
    """Classifier features ``(N, FEATURE_DIM)`` float64 of uint8 ``(N, 32, 32, 3)`` images."""
    model = model if model is not None else load_classifier()
    x = to_model_input(images)
    out = [model.features(x[i : i + batch_size]) for i in range(0, len(x), batch_size)]
    return torch.cat(out).double().numpy() if out else np.zeros((0, FEATURE_DIM))


@torch.no_grad()
def predict(
    images: np.ndarray | torch.Tensor, model: TinyClassifier | None = None, batch_size: int = 256
) -> list[Attrs]:
    """Predicted attribute dict of each uint8 ``(N, 32, 32, 3)`` image."""
    model = model if model is not None else load_classifier()
    x = to_model_input(images)
    idx: dict[str, list[int]] = {k: [] for k in ATTRIBUTES}
    for i in range(0, len(x), batch_size):
        logits = model(x[i : i + batch_size])
        for k in ATTRIBUTES:
            idx[k].extend(logits[k].argmax(dim=1).tolist())
    return [{k: ATTRIBUTES[k][idx[k][i]] for k in ATTRIBUTES} for i in range(len(x))]


def attribute_matches(pred: Sequence[Attrs], target: Sequence[Attrs]) -> dict[str, np.ndarray]:
    """Boolean arrays (one per attribute) of whether each prediction matches its target."""
    if len(pred) != len(target):
        raise BadInputError(f"{len(pred)} predictions for {len(target)} targets")
    return {
        k: np.array([p[k] == t[k] for p, t in zip(pred, target, strict=True)], dtype=bool) for k in ATTRIBUTES
    }
