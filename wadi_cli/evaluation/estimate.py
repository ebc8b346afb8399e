"""``wadi eval --dry-run``: what an evaluation would do and how long its Inception part
takes on this machine, without loading any model or writing anything.

The feature rate is measured here and now: a few batches through a full-size Inception-v3
with random weights (torchvision's, the same compute as clean-fid's network) plus the
protocol's resizes of a 512-px image. Generation and the CLIP model are not timed (their
weights are not loaded in a dry run); the fixed part (start-up, FID's 2048-d matrix square
root) is quoted from ``analysis/eval_throughput`` with the machine it was measured on.
"""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from wadi_cli.evaluation import protocol
from wadi_cli.machine import cpu_model

#: analysis/eval_throughput/results/throughput.json (2026-11-30): fixed part of one
#: evaluation, tiny generation rate, and the machine they were measured on.
STUDY = {
    "fixed_s": 25.6,
    "tiny_generation_images_per_s": 223.0,
    "feature_images_per_s": 9.5,
    "machine": "Intel(R) Xeon(R) Processor, 2 cores, 2 threads",
    "source": "analysis/eval_throughput/results/throughput.json",
}


def machine() -> str:
    """``"<CPU model>, N cores, T torch threads[, GPU name]"`` of this process."""
    import os

    text = f"{cpu_model()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"
    if torch.cuda.is_available():
        text += f", {torch.cuda.get_device_name(0)}"
    return text


def feature_rate(device: torch.device, batches: int = 2, batch_size: int = 4) -> float | None:
    """Images per second of the protocol's Inception path on ``device`` (``None`` without
    torchvision): resizes of a 512-px image, then a random-weight Inception-v3 forward."""
    if importlib.util.find_spec("torchvision") is None:
        return None
    import torchvision
    from PIL import Image

    net = torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=False)
    net = net.eval().to(device)
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (512, 512, 3), dtype=np.uint8))
    x = torch.rand(batch_size, 3, 299, 299, device=device)
    with torch.no_grad():
        net(x)  # warm-up
        start = time.perf_counter()
        for _ in range(batches):
            for _ in range(batch_size):
                square = protocol.protocol_image(image)
                Image.fromarray(square).resize((299, 299), Image.Resampling.BICUBIC)
            net(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
    return batches * batch_size / (time.perf_counter() - start)


def count_reference(ref: str | None) -> tuple[int, str]:
    """(images whose features a ``--ref`` needs, what it is)."""
    from wadi_cli.evaluation.folders import list_images

    if ref is None:
        return 0, "none"
    path = Path(ref).expanduser()
    if path.is_dir():
        n = len(list_images(path, "--ref"))
        return n, f"folder of {n:,} images"
    return 0, "statistics file (no features to compute)"


def estimate(
    *,
    generate: int,
    score: int,
    ref: str | None,
    metrics: tuple[str, ...],
    backbone: str | None,
    device: torch.device,
    protocol_name: str,
) -> dict[str, Any]:
    """The plan and time estimate of an evaluation (see the module docstring)."""
    inception = any(m in protocol.REFERENCE_METRICS for m in metrics)
    n_ref, ref_text = count_reference(ref) if inception else (0, "")
    featured = (score + n_ref) if inception else 0
    rate = feature_rate(device) if featured else None
    out: dict[str, Any] = {
        "protocol": protocol_name,
        "metrics": list(metrics),
        "images_to_generate": generate,
        "images_to_score": score,
        "reference": ref_text,
        "inception_images": featured,
        "machine": machine(),
        "device": str(device),
    }
    total = 0.0
    if featured:
        if rate is None:
            out["inception_s"] = None
            out["note_features"] = "not timed: torchvision (the eval extra) is not installed"
        else:
            out["inception_images_per_s"] = round(rate, 2)
            out["inception_s"] = round(featured / rate, 1)
            total += featured / rate
    if generate and backbone == "tiny":
        gen_s = generate / STUDY["tiny_generation_images_per_s"]
        out["generation_s"] = round(gen_s, 1)
        total += gen_s
    elif generate:
        out["generation_s"] = None
        out["note_generation"] = f"{backbone} generation not timed (no weights are loaded in a dry run)"
    if "clip" in metrics:
        out["note_clip"] = "the CLIP model's time is not included (its weights are not loaded in a dry run)"
    out["fixed_s"] = STUDY["fixed_s"]
    out["fixed_s_measured_on"] = f"{STUDY['machine']} ({STUDY['source']})"
    out["estimate_s"] = round(total + STUDY["fixed_s"], 1)
    return out


def describe(plan: dict[str, Any]) -> str:
    """The plan in a few lines of text."""
    lines = [
        f"dry run, --protocol {plan['protocol']}, metrics {','.join(plan['metrics'])}",
        f"  generate {plan['images_to_generate']:,} images, score {plan['images_to_score']:,}; "
        f"reference: {plan['reference'] or 'not needed'}",
    ]
    if plan.get("inception_s") is not None:
        lines.append(
            f"  Inception features of {plan['inception_images']:,} images at "
            f"{plan['inception_images_per_s']} images/s (measured now): {plan['inception_s']} s"
        )
    if plan.get("generation_s") is not None:
        lines.append(f"  generation: {plan['generation_s']} s (tiny rate of the study)")
    lines += [f"  {plan[k]}" for k in ("note_features", "note_generation", "note_clip") if k in plan]
    lines.append(f"  fixed part: {plan['fixed_s']} s, measured on {plan['fixed_s_measured_on']}")
    lines.append(f"  estimate: ~{plan['estimate_s']} s on this machine: {plan['machine']}")
    return "\n".join(lines)


def to_json(plan: dict[str, Any]) -> str:
    return json.dumps(plan, indent=2)
