"""Compare the four swap variants side by side: the multi-step teacher, the one-step
student, the student with the teacher's norms (``teacher_norms``) and the student with
the teacher's directions (``teacher_directions``).

Variants are produced one at a time (:func:`variant_states`) and loaded into ONE pipeline's
denoiser, so memory holds the base pipeline plus one hybrid, whatever the backbone. For
each variant, images for every prompt are generated from the same noise (seed ``seed + i``
for image ``i``) and, for the tiny backbone, the variant is scored like ``wadi eval``.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from wadi_cli.backbones import Backbone, get_backbone
from wadi_cli.errors import BadInputError
from wadi_cli.evaluation.tiny import evaluate_tiny
from wadi_cli.io import atomic_output_dir, check_writable, open_checkpoint
from wadi_cli.io.checkpoints import recorded_alpha_bar_T
from wadi_cli.io.tensor_map import Tensors
from wadi_cli.machine import resolve_device
from wadi_cli.pipeline import (
    Generation,
    LoadedPipeline,
    SampleConfig,
    generate,
    load_pipeline,
    load_state_strict,
    resolve_dtype,
    resolve_pipeline_source,
    weights_variant,
)
from wadi_cli.pipeline.options import SamplingOptions, command_default
from wadi_cli.sample.output import image_grid
from wadi_cli.swap.core import SWAP_VARIANTS, check_alpha, open_student, plan_swap, swap_state_dict
from wadi_cli.tiny.classifier import TinyClassifier, load_classifier

VARIANTS: tuple[str, ...] = ("teacher", "student", "teacher_norms", "teacher_directions")
VARIANT_LABELS: dict[str, str] = {
    "teacher": "teacher",
    "student": "student (1 step)",
    "teacher_norms": "+ teacher norms",
    "teacher_directions": "+ teacher directions",
}
SAMPLES_JSON = "swap_samples.json"
METRICS_JSON = "swap_metrics.json"

#: ``progress(description, done, total)``, called as work advances.
Progress = Callable[[str, int, int], None]


def variant_states(
    teacher: Tensors,
    student: Tensors,
    *,
    alpha: float = 1.0,
    filter: str | None = None,
) -> Iterator[tuple[str, Tensors]]:
    """Yield ``(variant, state)`` for :data:`VARIANTS`, in order. Hybrids are computed
    lazily, one at a time, so at most one lives in memory while the caller uses it.
    Validate first (:func:`wadi_cli.swap.plan_swap`): errors would surface mid-way."""
    yield "teacher", teacher
    yield "student", student
    for variant in SWAP_VARIANTS:
        yield variant, swap_state_dict(teacher, student, variant, alpha=alpha, filter=filter)[0]


def _check_tiny(backbone: str | Backbone) -> None:
    name = str(getattr(backbone, "name", backbone)).strip().lower()
    if name != "tiny":
        raise BadInputError(f"accuracy / fd can be computed for the tiny backbone only (got {name!r})")


def _run_variants(
    pipe: LoadedPipeline,
    teacher: Tensors,
    student: Tensors,
    alpha: float,
    filter: str | None,
    work: Callable[[str], None],
) -> None:
    """Load each variant into the pipeline's denoiser (strictly) and call ``work(variant)``."""
    net = pipe.denoiser.model
    for name, state in variant_states(teacher, student, alpha=alpha, filter=filter):
        load_state_strict(net, state, f"the {name.replace('_', ' ')} weights")
        del state
        work(name)


def _eval_entry(result: Mapping[str, Any], teacher: bool) -> dict[str, Any]:
    entry = {k: result[k] for k in ("accuracy", "fd", "steps", "num_images", "seconds") if k in result}
    if teacher:
        entry["cfg"] = result["cfg"]
    return entry


def evaluate_swap_variants(
    teacher_state: Tensors,
    student_state: Tensors,
    *,
    backbone: str = "tiny",
    num_images: int = 500,
    seed: int = 0,
    teacher_steps: int | None = None,
    cfg: float | None = None,
    alpha: float = 1.0,
    filter: str | None = None,
    model: str | os.PathLike[str] | None = None,
    device: torch.device | str = "cpu",
    batch_size: int = 32,
    pipe: LoadedPipeline | None = None,
    progress: Progress | None = None,
) -> dict[str, dict[str, Any]]:
    """Accuracy and Fréchet distance (as ``wadi eval``) of the four variants of the tiny model.

    Returns ``{"teacher": {"accuracy", "fd", "steps", "cfg", …}, "student": {…},
    "teacher_norms": {…}, "teacher_directions": {…}}`` (the hybrids at ``alpha``, limited
    to ``filter``). Every variant sees the same ``num_images`` prompts
    and noise (``seed``); the teacher runs ``teacher_steps`` DDIM steps with guidance
    ``cfg`` (defaults: the backbone's sampling recipe, ``wadi_cli/configs/sample/NAME.toml``).
    """
    _check_tiny(backbone)
    check_alpha(alpha)
    plan_swap(teacher_state, student_state, filter)
    results: dict[str, dict[str, Any]] = {}
    classifier = load_classifier(None)
    if pipe is None:
        pipe = load_pipeline("tiny", model=model, teacher=True, device=device)

    def work(name: str) -> None:
        results[name] = _evaluate_one(
            pipe, classifier, name, num_images, seed, teacher_steps, cfg, batch_size, progress
        )

    _run_variants(pipe, teacher_state, student_state, alpha, filter, work)
    return results


def _evaluate_one(
    pipe: LoadedPipeline,
    classifier: TinyClassifier | None,
    name: str,
    num_images: int,
    seed: int,
    steps: int | None,
    cfg: float | None,
    batch_size: int,
    progress: Progress | None,
) -> dict[str, Any]:
    if progress is not None:
        progress(f"evaluating {name.replace('_', ' ')}", 0, 1)
    is_teacher = name == "teacher"
    result, _ = evaluate_tiny(
        teacher=is_teacher,
        steps=steps if is_teacher else None,
        cfg=cfg if is_teacher else None,
        num_images=num_images,
        seed=seed,
        batch_size=batch_size,
        pipe=pipe,
        classifier=classifier,
    )
    if progress is not None:
        progress(f"evaluated {name.replace('_', ' ')}", 1, 1)
    return _eval_entry(result, is_teacher)


# ---- grids ---------------------------------------------------------------------------------
def _font(size: int) -> Any:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):  # Pillow without FreeType
        return ImageFont.load_default()


def labelled_grid(
    columns: Sequence[np.ndarray], labels: Sequence[str], title: str | None = None
) -> np.ndarray:
    """One image: a title line, a header of ``labels``, then ``columns`` side by side.

    ``columns[j]`` is an (R, H, W, 3) uint8 array (row ``r`` of every column shares its
    noise). Small images are upscaled (nearest) so each column is wide enough for its label.
    """
    if len(columns) != len(labels) or not columns:
        raise ValueError("need one label per column and at least one column")
    n_rows, h, w, _ = columns[0].shape
    font = _font(14)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    widest = max(probe.textbbox((0, 0), label, font=font)[2] for label in labels)
    scale = max(1, math.ceil((widest + 8) / w))
    cells = np.stack([columns[j][r] for r in range(n_rows) for j in range(len(columns))])
    if scale > 1:
        cells = cells.repeat(scale, axis=1).repeat(scale, axis=2)
    body = image_grid(cells, ncols=len(columns))
    cell_w = w * scale
    line = 20
    header = line * (2 if title else 1)
    canvas = Image.new("RGB", (body.shape[1], body.shape[0] + header), (255, 255, 255))
    canvas.paste(Image.fromarray(body), (0, header))
    draw = ImageDraw.Draw(canvas)
    if title:
        text = title if len(title) <= 90 else title[:87] + "..."
        draw.text((2, 2), text, fill=(0, 0, 0), font=font)
    for j, label in enumerate(labels):
        x = j * (cell_w + 2) + max(0, (cell_w - probe.textbbox((0, 0), label, font=font)[2]) // 2)
        draw.text((x, header - line + 2), label, fill=(0, 0, 0), font=font)
    return np.asarray(canvas)


def _slug(text: str, limit: int = 40) -> str:
    keep = "".join(c if c.isalnum() else "_" for c in text.lower()).strip("_")
    while "__" in keep:
        keep = keep.replace("__", "_")
    return keep[:limit] or "prompt"


@dataclass(frozen=True)
class SwapSampling:
    """What ``wadi swap --sample`` renders: one grid per prompt (``rows`` seeds each, from
    ``options.seed``) of the four variants into the folder ``out``, on the base pipeline
    that ``options`` names (backbone, model, device), the teacher with ``options.steps`` /
    ``options.cfg`` (default: the backbone's); with ``evaluate`` and the tiny backbone also
    the scores of ``wadi eval`` over ``options.num_images`` images."""

    prompts: list[str]
    out: Path
    options: SamplingOptions
    rows: int = 4
    evaluate: bool = True

    @property
    def backbone(self) -> str:
        """The backbone's name as given."""
        return self.options.backbone.strip().lower()

    @property
    def num_images(self) -> int:
        """Images per variant for the tiny scores (default: ``wadi swap``'s)."""
        if self.options.num_images is None:
            return int(command_default("swap", "num_images"))
        return self.options.num_images

    @property
    def scores(self) -> bool:
        """Whether the variants are scored (accuracy / fd exist for the tiny model only)."""
        return self.evaluate and self.backbone == "tiny"

    def check(self, dtype: torch.dtype | None = None) -> None:
        """Every check that reads no tensor: prompts, rows, image count (the options were
        validated when built), the base pipeline is there (fetching the files that
        sampling in ``dtype`` loads; default: the dtype ``wadi sample`` would choose), the
        folder can be written."""
        if not self.prompts:
            raise BadInputError("--sample needs at least one prompt")
        if self.rows < 1:
            raise BadInputError(f"--rows must be at least 1, got {self.rows}")
        if self.num_images < 2:
            raise BadInputError(f"--num-images must be at least 2 to estimate FD, got {self.num_images}")
        spec = get_backbone(self.backbone)
        if dtype is None:
            dtype = resolve_dtype(None, resolve_device(self.options.device), spec.family)
        # a missing base fails now; the same files as load_pipeline (fp16 variant on CUDA)
        resolve_pipeline_source(spec, self.options.model, variant=weights_variant(dtype))
        check_writable(self.out, directory=True)


def sample_swap(
    teacher_path: str | os.PathLike[str],
    student_path: str | os.PathLike[str],
    sampling: SwapSampling,
    *,
    alpha: float = 1.0,
    filter: str | None = None,
    student_label: str | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """:func:`render_swap_grids` for checkpoint files (anything
    :func:`~wadi_cli.io.open_checkpoint` reads; a LoRaD adapter as STUDENT is merged into
    TEACHER), on the device and in the dtype ``wadi sample`` would choose, with the ᾱ_T the
    student records. ``student_label`` names STUDENT in ``swap_samples.json``."""
    dev = resolve_device(sampling.options.device)
    dtype = resolve_dtype(None, dev, get_backbone(sampling.backbone).family)
    metadata = {"teacher": str(teacher_path), "student": student_label or str(student_path)}
    with open_checkpoint(teacher_path) as teacher:
        student, _ = open_student(student_path, teacher)
        try:
            return render_swap_grids(
                teacher, student, sampling, device=dev, dtype=dtype, alpha=alpha, filter=filter,
                metadata=metadata, progress=progress, alpha_bar_T=recorded_alpha_bar_T(student_path),
            )  # fmt: skip
        finally:
            close = getattr(student, "close", None)
            if callable(close):
                close()


def render_swap_grids(
    teacher_state: Tensors,
    student_state: Tensors,
    sampling: SwapSampling,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    alpha: float = 1.0,
    filter: str | None = None,
    batch_size: int = 8,
    metadata: Mapping[str, Any] | None = None,
    progress: Progress | None = None,
    alpha_bar_T: float | None = None,
) -> dict[str, Any]:
    """Render one labelled grid per prompt (columns: teacher multi-step | student one-step |
    student + teacher norms | student + teacher directions; rows: seeds ``seed``, …,
    ``seed + rows - 1`` per prompt) into ``sampling.out``, written atomically with
    ``swap_samples.json``: the images come from :func:`wadi_cli.pipeline.generate` (what
    ``wadi sample`` runs) with each variant loaded into one pipeline's denoiser. When
    ``sampling.scores`` the variants are also scored by
    :func:`wadi_cli.evaluation.tiny.evaluate_tiny` (what ``wadi eval -b tiny`` runs) into
    ``swap_metrics.json``. The student variants sample with ``alpha_bar_T`` (the
    student's recorded ᾱ_T; ``None``: the backbone's).

    Returns ``{"out", "grids", "metrics"}`` (``metrics`` is ``None`` without scores).
    """
    sampling.check(dtype)
    check_alpha(alpha)
    plan_swap(teacher_state, student_state, filter)
    spec_name, prompts, rows, seed = sampling.backbone, sampling.prompts, sampling.rows, sampling.options.seed
    # the student variants sample with the student's ᾱ_T: the pipeline decides it from that
    pipe = load_pipeline(
        spec_name,
        model=sampling.options.model,
        teacher=True,
        device=device,
        dtype=dtype,
        alpha_bar_T=alpha_bar_T,
    )
    classifier = load_classifier(None) if sampling.scores else None
    images: dict[str, np.ndarray] = {}
    metrics: dict[str, dict[str, Any]] = {}
    config: dict[str, Any] = {}

    def work(name: str) -> None:
        steps, cfg = sampling.options.steps, sampling.options.cfg
        gen = _generate_variant(pipe, name, prompts, rows, seed, steps, cfg, batch_size, progress)
        images[name], config[name] = gen.images, gen.config.to_dict()
        if classifier is not None:
            metrics[name] = _evaluate_one(
                pipe, classifier, name, sampling.num_images, seed, steps, cfg, 32, progress
            )

    _run_variants(pipe, teacher_state, student_state, alpha, filter, work)
    teacher_label = f"teacher ({int(config['teacher']['steps'])} steps)"
    labels = [teacher_label] + [VARIANT_LABELS[v] for v in VARIANTS[1:]]
    width = max(2, len(str(len(prompts) - 1)))
    grids = [f"{i:0{width}d}_{_slug(p)}.png" for i, p in enumerate(prompts)]
    record = {
        **dict(metadata or {}),
        "backbone": spec_name,
        "alpha": alpha,
        "filter": filter,
        "columns": list(VARIANTS),
        "labels": labels,
        "sampling": config,
        "grids": [
            {"file": f, "prompt": p, "seeds": [seed + i * rows + r for r in range(rows)]}
            for i, (f, p) in enumerate(zip(grids, prompts, strict=True))
        ],
    }
    scores = metrics if classifier is not None else None
    _write_outputs(sampling.out, images, prompts, rows, grids, labels, record, scores)
    return {"out": str(sampling.out), "grids": grids, "metrics": scores}


def _generate_variant(
    pipe: LoadedPipeline,
    name: str,
    prompts: Sequence[str],
    rows: int,
    seed: int,
    steps: int | None,
    cfg: float | None,
    batch_size: int,
    progress: Progress | None,
) -> Generation:
    """``rows`` images per prompt from the variant loaded in ``pipe`` (the teacher
    multi-step with guidance, the others in one step), seeds ``seed + i``."""
    is_teacher = name == "teacher"
    config = SampleConfig(
        teacher=is_teacher,
        steps=steps if is_teacher else None,
        cfg=cfg if is_teacher else None,
        seed=seed,
        batch_size=batch_size,
    )
    label = f"sampling {name.replace('_', ' ')}"

    def tick(done: int, total: int) -> None:
        if progress is not None:
            progress(label, done, total)

    return generate(pipe, list(prompts), config, num_images_per_prompt=rows, progress=tick)


def _write_outputs(
    out_dir: str | os.PathLike[str],
    images: Mapping[str, np.ndarray],
    prompts: Sequence[str],
    rows: int,
    grids: Sequence[str],
    labels: Sequence[str],
    record: Mapping[str, Any],
    metrics: Mapping[str, Any] | None,
) -> None:
    try:
        with atomic_output_dir(out_dir) as tmp:
            for i, (file, prompt) in enumerate(zip(grids, prompts, strict=True)):
                cols = [images[v][i * rows : (i + 1) * rows] for v in VARIANTS]
                Image.fromarray(labelled_grid(cols, labels, title=prompt)).save(tmp / file)
            (tmp / SAMPLES_JSON).write_text(json.dumps(record, indent=2, default=str) + "\n", "utf-8")
            if metrics is not None:
                (tmp / METRICS_JSON).write_text(json.dumps(metrics, indent=2) + "\n", "utf-8")
    except OSError as exc:
        raise BadInputError(f"{out_dir}: cannot write ({exc.strerror or exc})") from None


def read_metrics(out_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``swap_metrics.json`` of a samples folder."""
    return json.loads((Path(out_dir) / METRICS_JSON).read_text(encoding="utf-8"))
