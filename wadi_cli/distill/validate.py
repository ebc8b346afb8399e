"""Validation during training: one-step images for fixed prompts and seeds (EMA weights
when the run keeps them), a PNG grid per interval, and for ``--backbone tiny`` the
``wadi eval`` numbers (attribute accuracy, Fréchet distance) appended to
``validation.csv``.

Validation never touches the run's RNG (one CPU generator per seed) and restores the raw
student weights exactly, so it does not change training.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from wadi_cli.distill.data import SMOKE_PROMPTS
from wadi_cli.io import atomic_file, write_error

#: Seed of the fixed validation prompts / noise, and of the tiny metric's real images.
VALIDATION_SEED = 20260
TINY_VALIDATION_IMAGES = 64


def validation_prompts(backbone: str) -> tuple[list[str], list[dict[str, str]] | None]:
    """Fixed prompts (and, for tiny, their attributes for the metrics)."""
    if backbone == "tiny":
        from wadi_cli.tiny.data import prompt_for, sample_attributes

        attrs = sample_attributes(TINY_VALIDATION_IMAGES, VALIDATION_SEED)
        return [prompt_for(a) for a in attrs], attrs
    return list(SMOKE_PROMPTS[:8]), None


@contextlib.contextmanager
def ema_weights(distiller: Any, use_ema: bool) -> Iterator[None]:
    """Within the block the student adapter holds its EMA (when kept and asked for); the
    raw weights are restored bit-exactly afterwards."""
    if not use_ema or distiller.ema is None:
        yield
        return
    raw = {k: v.clone() for k, v in distiller.student_state().items()}
    distiller.ema.copy_to(distiller.student_state())
    try:
        yield
    finally:
        distiller.load_student_state(raw)


@torch.no_grad()
def student_images(distiller: Any, prompts: list[str], seeds: list[int], use_ema: bool = True) -> np.ndarray:
    """One-step images (N, H, W, 3) uint8 of the student for ``prompts`` / ``seeds``."""
    from wadi_cli.pipeline import decode, initial_noise, one_step_latents

    out = []
    with ema_weights(distiller, use_ema), distiller.student() as student:
        pipe = dataclasses.replace(distiller.pipe, denoiser=student)
        for i in range(0, len(prompts), 32):
            chunk = prompts[i : i + 32]
            cond = pipe.prompt_encoder(chunk).to(distiller.device)
            z = initial_noise(seeds[i : i + 32], pipe.latent_shape, distiller.device)
            x0 = one_step_latents(pipe, cond, z, distiller.cfg.alpha_bar_T)
            out.append(decode(pipe.vae, x0))
    return np.concatenate(out)


def validate(distiller: Any, run: Path) -> dict[str, Any]:
    """Write ``run/validation/step-NNNNNNNN.png``; for tiny also evaluate and append to
    ``run/validation.csv``. Returns the metrics (empty for non-tiny backbones)."""
    from PIL import Image

    from wadi_cli.sample.output import image_grid

    prompts, attrs = validation_prompts(distiller.cfg.backbone)
    seeds = [VALIDATION_SEED + i for i in range(len(prompts))]
    images = student_images(distiller, prompts, seeds)
    with atomic_file(run / "validation" / f"step-{distiller.step:08d}.png") as tmp:
        Image.fromarray(image_grid(images[:64])).save(tmp, format="PNG")
    if attrs is None:
        return {}
    from wadi_cli.tiny.metrics import evaluate_images

    result = evaluate_images(images, attrs, real_seed=VALIDATION_SEED)
    weights = "ema" if distiller.ema is not None else "raw"  # what student_images sampled
    row = {"step": distiller.step, "accuracy": result["accuracy"], "fd": result["fd"], "student": weights}
    append_csv_row(run / "validation.csv", row)
    return row


def append_csv_row(path: Path, row: dict[str, Any]) -> None:
    """Append ``row`` to ``path`` under the columns its header already has (a run resumed
    from an older version keeps its file consistent), or start the file with ``row``'s."""
    fields = list(row)
    try:
        if path.is_file():
            with path.open(newline="") as fh:
                fields = next(csv.reader(fh), fields)
        with path.open("a", newline="") as fh:
            writer = csv.DictWriter(fh, fields, extrasaction="ignore")
            if fh.tell() == 0:
                writer.writeheader()
            writer.writerow(row)
    except OSError as exc:
        raise write_error(path, exc) from None
