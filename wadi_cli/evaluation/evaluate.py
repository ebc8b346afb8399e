"""The three jobs of ``wadi eval`` beyond the tiny classifier: evaluate a model (generate one
image per caption into ``--out EVAL``, then score), evaluate a folder of images made
elsewhere (``--images``), and compute reference statistics (``--save-ref``).

Checks come first, in this order, so that nothing long runs before a refusal: the output
folder and its manifest, the extractors' weights, the reference, then the model.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from wadi_cli.errors import BadInputError
from wadi_cli.evaluation import protocol
from wadi_cli.evaluation.folders import build_manifest, check_resumable, ensure_eval_dir, list_images
from wadi_cli.evaluation.parallel import Processes
from wadi_cli.evaluation.run import (
    EvalOptions,
    ProgressFactory,
    Scorer,
    generate_missing,
    manifest_images,
    no_progress,
    prepare_out,
    tiny_scores,
    write_metrics,
    write_tiny_reference,
)
from wadi_cli.io import check_writable
from wadi_cli.io.sd_single_file_read import model_file_record
from wadi_cli.pipeline import (
    SampleConfig,
    decide_alpha_bar_T,
    get_backbone_spec,
    load_pipeline,
    resolve_dtype,
)
from wadi_cli.pipeline.control import add_controlnet
from wadi_cli.pipeline.defaults import CONTROL_SCALE, STRENGTH
from wadi_cli.pipeline.images import paired_images
from wadi_cli.tiny.classifier import load_classifier
from wadi_cli.tiny.data import parse_prompt


@dataclass
class ModelRequest:
    """What to generate: the backbone, its weights, the sampling settings and the captions."""

    backbone: str
    out: Path
    captions: list[str]
    weights: str | None = None
    model: str | None = None
    teacher: bool = False
    steps: int | None = None
    cfg: float | None = None
    alpha_bar_T: float | None = None
    seed: int = 0
    batch_size: int = 8
    dtype: str | None = None
    real_seed: int | None = None
    classifier: str | None = None
    weights_label: str | None = None  # what the manifest records (default: ``weights``)
    base: bool = False  # one step from the undistilled base instead of the default weights
    # the downstream uses (--init-image / --strength, --controlnet, --height / --width): the
    # input image of each caption, checked by wadi_cli.sample.run.input_images
    init_files: list[Path] | None = None
    strength: float | None = None
    controlnet: str | None = None
    control_scale: float | None = None
    control_files: list[Path] | None = None
    height: int | None = None
    width: int | None = None

    def downstream(self) -> dict[str, Any]:
        """What the manifest records of the downstream uses (a resume must match it)."""
        out: dict[str, Any] = {}
        if self.init_files is not None:
            out.update(init_image=_common(self.init_files), strength=self.strength or STRENGTH)
        if self.controlnet is not None:
            scale = CONTROL_SCALE if self.control_scale is None else self.control_scale
            out.update(controlnet=self.controlnet, control_image=_common(self.control_files))
            out["control_scale"] = scale
        if self.height is not None or self.width is not None:
            out.update(height=self.height, width=self.width)
        return out


def _fitted(files: list[Path] | None, size: tuple[int, int], flag: str) -> Any:
    """The input images of ``files`` at ``size`` (None without files)."""
    return paired_images(files, *size, flag) if files else None


def _common(files: list[Path] | None) -> str | None:
    """The one file every caption uses, else the folder the files are in."""
    if not files:
        return None
    return str(files[0]) if len(set(files)) == 1 else str(files[0].parent)


def _tiny_attrs(backbone: str, captions: Sequence[str]) -> list[dict[str, str]] | None:
    """Attributes of tiny prompts (``None`` unless every caption is one)."""
    if backbone != "tiny":
        return None

    attrs = [parse_prompt(c) for c in captions]
    return None if any(a is None for a in attrs) else attrs  # type: ignore[return-value]


def _load_classifier(metrics: Sequence[str], classifier: str | None) -> Any:
    if not any(m in protocol.TINY_METRICS for m in metrics):
        return None

    return load_classifier(classifier)


def check_ref(ref: str | None) -> None:
    """Fail before any long work when ``--ref`` is neither a file nor a folder of images."""
    if ref is None:
        return
    path = Path(ref).expanduser()
    if not path.exists():
        raise BadInputError(f"--ref {path}: no such file or folder")
    if path.is_dir():
        list_images(path, "--ref")


def _reference(
    scorer: Scorer, ref: str | None, tiny_fallback: tuple[Path, list, int] | None, procs: Processes
) -> None:
    """Load the reference once per scorer (on every process: a folder's features are
    computed by all of them): ``ref``, or (tiny) the rendered real images."""
    if not scorer.options.needs_reference or scorer.reference_from is not None:
        return
    if ref is not None:
        scorer.load_reference(ref)
        return
    if tiny_fallback is None:
        raise BadInputError(
            "--metrics fid/kid/pr need --ref REF: a folder of real images or a file made with --save-ref"
        )
    out, attrs, real_seed = tiny_fallback
    scorer.load_reference(write_tiny_reference(out, attrs, real_seed, procs))


def evaluate_model(
    request: ModelRequest,
    options: EvalOptions,
    procs: Processes,
    *,
    ref: str | None = None,
    scorer: Scorer | None = None,
    progress: ProgressFactory = no_progress,
    device: Any = None,
) -> dict[str, Any] | None:
    """Generate (or finish generating) ``request.out`` and score it. Returns the result on
    the main process (also written to ``out/metrics.json``), ``None`` elsewhere."""

    spec = get_backbone_spec(request.backbone)
    # the ᾱ_T the pipeline will decide when loaded, known now for the manifest
    alpha_bar = decide_alpha_bar_T(spec, request.weights, request.alpha_bar_T)
    config = SampleConfig(
        teacher=request.teacher,
        steps=request.steps,
        cfg=request.cfg,
        alpha_bar_T=request.alpha_bar_T,
        seed=request.seed,
        batch_size=request.batch_size,
        strength=request.strength,
        height=request.height,
        width=request.width,
    ).resolved(spec, alpha_bar.value)
    dev = procs.device if device is None else device
    dtype = resolve_dtype(request.dtype, dev, spec.family)
    settings = {
        "backbone": spec.name,
        "model": request.model,
        "weights": request.weights_label or request.weights,
        "base": request.base,
        "mode": "teacher" if request.teacher else "one-step",
        "steps": config.steps if request.teacher else 1,
        "cfg": config.cfg if request.teacher else None,
        "alpha_bar_T": None if request.teacher else config.alpha_bar_T,
        "seed": request.seed,
        "batch_size": request.batch_size,
        "dtype": str(dtype).replace("torch.", ""),
    }
    record = model_file_record(request.model)
    if record is not None:  # a single file: its sha256 (a resume with another file is refused)
        settings["model_file"] = record
    rules = options.rules
    seed_batch = rules.seed_batch if rules.seeding == "per-batch" else None
    if seed_batch:  # only then do the images depend on the protocol (older folders resume)
        settings.update(seeding=f"{rules.name}: per batch of {seed_batch}", batch_size=seed_batch)
    settings.update(request.downstream())
    if seed_batch and request.downstream():
        raise BadInputError(
            f"--protocol {rules.name} draws its noise per batch at the model's size: "
            "--init-image, --controlnet, --height and --width are not supported with it"
        )
    check_ref(ref)
    manifest = build_manifest(settings, request.captions, request.seed, seed_batch)
    check_resumable(request.out, manifest)
    attrs = _tiny_attrs(spec.name, request.captions)
    real_seed = request.seed if request.real_seed is None else request.real_seed
    classifier = _load_classifier(options.metrics, request.classifier)
    scorer = scorer or Scorer.load(options, procs, progress)  # missing weights: before anything is written
    prepare_out(request.out, manifest, procs)
    tiny_ref = (request.out, attrs, real_seed) if attrs is not None else None
    _reference(scorer, ref, tiny_ref, procs)
    pipe = load_pipeline(
        spec,
        model=request.model,
        weights=request.weights,
        teacher=request.teacher,
        device=dev,
        dtype=dtype,
        base=request.base,
        alpha_bar_T=request.alpha_bar_T,
    )
    pipe = add_controlnet(pipe, request.controlnet, request.control_scale, dtype)
    _, lat_h, lat_w = pipe.latent_shape_for(config.height, config.width)
    size = (lat_h * pipe.vae_scale, lat_w * pipe.vae_scale)
    inputs = {
        "init_images": _fitted(request.init_files, size, "--init-image"),
        "control_images": _fitted(request.control_files, size, "--control-image"),
    }
    made, seconds = generate_missing(
        pipe, request.out, manifest, config, procs, progress, seed_batch, inputs=inputs
    )
    scorer.timing.generated += made
    scorer.timing.generation_s += seconds
    files = [request.out / f for f in manifest.files]
    metrics, how = scorer.score(files, manifest.captions)
    if not procs.is_main:
        return None
    if classifier is not None:
        metrics.update(tiny_scores(files, attrs, real_seed, classifier))
        how.update(tiny_classifier={"library": "wadi (tiny classifier)", "real_seed": real_seed})
    result = {
        **settings,
        "model": pipe.model_source,
        "weights_kind": pipe.weights_kind,
        "num_images": len(files),
        "metrics": metrics,
        "how": how,
        "reference": _reference_summary(scorer),
        "protocol": rules.to_dict(),
        "timing": scorer.timing.to_dict(),
        "out": str(request.out),
    }
    result["image_size"], size_warnings = _image_sizes(rules, files, options.resolution)
    warnings = list(pipe.warnings) + _protocol_warnings(scorer) + size_warnings
    if warnings:
        result["warnings"] = warnings
    write_metrics(request.out, result)
    return result


def _protocol_warnings(scorer: Scorer) -> list[str]:
    """The scorer's notes (a singular FID) and, for a protocol with a fixed real set, a
    reference of another size."""
    notes = list(scorer.warnings)
    rules, ref = scorer.options.rules, scorer.reference
    wanted = rules.reference_images
    if ref is not None and wanted is not None and ref.num_images != wanted and scorer.options.needs_reference:
        notes.append(
            f"--protocol {rules.name} compares against {rules.reference} ({wanted:,} images); "
            f"this reference holds {ref.num_images:,}, so FID / KID / precision / recall are not the papers'"
        )
    return notes


def _image_sizes(rules: protocol.Protocol, files: Sequence[Path], resolution: int) -> tuple[str, list[str]]:
    """How the scored images were sized (``"1024x1024 → 256x256"``; sizes from the file
    headers) and, under a protocol that names the generated size, a warning for other sizes."""
    sizes = []
    for f in files:
        with Image.open(f) as image:
            sizes.append(image.size)
    shown = ", ".join(f"{w}x{h}" for w, h in sorted(set(sizes))[:3]) + (", …" if len(set(sizes)) > 3 else "")
    note = protocol.size_note(rules, sizes, resolution)
    return f"{shown} → {resolution}x{resolution}", [note] if note else []


def _reference_summary(scorer: Scorer) -> dict[str, Any] | None:
    ref = scorer.reference
    if ref is None:
        return None
    return {"source": ref.source, "num_images": ref.num_images, **ref.settings}


def evaluate_folder(
    images: str | os.PathLike[str],
    options: EvalOptions,
    procs: Processes,
    *,
    captions: Sequence[str] | None = None,
    num_images: int | None = None,
    ref: str | None = None,
    out: Path | None = None,
    progress: ProgressFactory = no_progress,
) -> dict[str, Any] | None:
    """Score a folder of images made elsewhere (a wadi ``--out EVAL`` folder brings its own
    captions). ``captions[i]`` belongs to the i-th image in sorted order."""
    folder = Path(images).expanduser()
    if any(m in protocol.TINY_METRICS for m in options.metrics):
        raise BadInputError("--images: accuracy and fd score tiny generations; use --metrics fid,kid,clip,pr")
    check_ref(ref)
    found = manifest_images(folder)
    order = options.rules.image_order
    files, own = found if found is not None else (list_images(folder, "--images", order), None)
    texts = list(captions) if captions is not None else own
    if num_images is not None:
        if num_images > len(files):
            raise BadInputError(
                f"--num-images {num_images} but --images {folder} holds only {len(files)} images"
            )
        files = files[:num_images]
    if texts is not None:
        if len(texts) < len(files):
            raise BadInputError(f"--images {folder}: {len(files)} images but only {len(texts)} captions")
        if num_images is None and len(texts) != len(files):
            raise BadInputError(
                f"--images {folder}: {len(files)} images but {len(texts)} captions; "
                "pass -n N to use the first N"
            )
        texts = texts[: len(files)]
    if out is not None:
        check_writable(out, directory=True)
    scorer = Scorer.load(options, procs, progress)
    _reference(scorer, ref, None, procs)
    metrics, how = scorer.score(files, texts)
    if not procs.is_main:
        return None
    result = {
        "images": str(folder),
        "num_images": len(files),
        "metrics": metrics,
        "how": how,
        "reference": _reference_summary(scorer),
        "protocol": options.rules.to_dict(),
        "timing": scorer.timing.to_dict(),
    }
    result["image_size"], size_warnings = _image_sizes(options.rules, files, options.resolution)
    warnings = _protocol_warnings(scorer) + size_warnings
    if warnings:
        result["warnings"] = warnings
    if out is not None:
        ensure_eval_dir(out)
        result["out"] = str(out)
        write_metrics(out, result)
    return result


def make_reference(
    ref: str | os.PathLike[str],
    save_to: str | os.PathLike[str],
    options: EvalOptions,
    procs: Processes,
    progress: ProgressFactory = no_progress,
) -> dict[str, Any] | None:
    """Compute the reference statistics of a folder of real images and save them."""

    if Path(ref).expanduser().is_file():
        raise BadInputError("--save-ref needs --ref DIR (a folder of real images), not a file")
    check_ref(str(ref))
    check_writable(Path(save_to).expanduser())
    opts = EvalOptions(
        metrics=("fid", "kid", "pr"),
        resolution=options.resolution,
        inception_weights=options.inception_weights,
        feature_batch_size=options.feature_batch_size,
        workers=options.workers,
        protocol=options.protocol,
    )
    start = time.perf_counter()
    scorer = Scorer.load(opts, procs, progress)
    reference = scorer.load_reference(ref, save_to=Path(save_to).expanduser() if procs.is_main else None)
    if reference is None:
        return None
    return {
        "saved": str(save_to),
        "source": reference.source,
        "num_images": reference.num_images,
        "settings": reference.settings,
        "seconds": round(time.perf_counter() - start, 3),
    }
