"""Running an evaluation: generate (resumable, split over processes), extract features,
score against a reference, write ``metrics.json``.

Every process runs the same code: checks are made by all of them (so a refusal is the
same everywhere, and nobody waits on a process that gave up), images and features are
split by :func:`~wadi_cli.evaluation.folders.shard` over fixed chunks, and the main
process gathers the features, scores and writes. Chunks are the same whatever the
number of processes, so 1 and N processes make the same images and the same numbers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from wadi_cli.errors import BadInputError
from wadi_cli.evaluation import protocol, scores
from wadi_cli.evaluation.features import (
    ClipFeatures,
    InceptionFeatures,
    extract,
    library_version,
    require_extra,
)
from wadi_cli.evaluation.folders import (
    IMAGES,
    MANIFEST,
    METRICS,
    REFERENCE,
    Manifest,
    chunks,
    image_name,
    list_images,
    missing_chunks,
    read_image,
    save_png,
    shard,
    write_manifest,
)
from wadi_cli.evaluation.parallel import Processes
from wadi_cli.evaluation.reference import Reference, load_reference, save_reference
from wadi_cli.io import write_text_atomic
from wadi_cli.pipeline import LoadedPipeline, generate, images_from_noise
from wadi_cli.tiny.classifier import TinyClassifier
from wadi_cli.tiny.data import render_batch
from wadi_cli.tiny.metrics import evaluate_images

_CLIP_INPUT = {
    "as-generated": "the image as generated",
    "square-256": "the protocol's 256-px square",
    "square-256-tensor": "the protocol's 256-px square through GigaGAN's [-1, 1] tensor and back",
}


class ProgressFactory(Protocol):
    """``progress(description, total)``: a context yielding ``advance(n)``."""

    def __call__(
        self, description: str, total: int
    ) -> contextlib.AbstractContextManager[Callable[[int], None]]: ...


@contextlib.contextmanager
def no_progress(description: str, total: int) -> Iterator[Callable[[int], None]]:
    yield lambda n: None


@dataclass
class EvalOptions:
    """How to score: which metrics, the protocol's settings, the extractors' weights."""

    metrics: tuple[str, ...]
    resolution: int = protocol.RESOLUTION
    inception_weights: str | None = None
    clip_model: str | None = None  # None: the protocol's
    clip_weights: str | None = None
    clip_prefix: str = protocol.CLIP_PREFIX
    feature_batch_size: int = 50
    workers: int = 0
    protocol: str = protocol.DEFAULT_PROTOCOL

    @property
    def rules(self) -> protocol.Protocol:
        """The named protocol's rules (crop, CLIP input and text, captions, seeding)."""
        return protocol.get_protocol(self.protocol)

    @property
    def clip_architecture(self) -> str:
        return self.clip_model or self.rules.clip_model

    @property
    def protocol_metrics(self) -> tuple[str, ...]:
        return tuple(m for m in self.metrics if m in protocol.PROTOCOL_METRICS)

    @property
    def needs_reference(self) -> bool:
        return any(m in protocol.REFERENCE_METRICS for m in self.metrics)


@dataclass
class Timing:
    generated: int = 0
    generation_s: float = 0.0
    featured: int = 0
    features_s: float = 0.0

    def to_dict(self) -> dict[str, float]:
        out: dict[str, float] = {"generated": self.generated, "generation_s": round(self.generation_s, 3)}
        if self.generated:
            out["generation_images_per_s"] = round(self.generated / max(self.generation_s, 1e-9), 3)
        out.update(featured=self.featured, features_s=round(self.features_s, 3))
        if self.featured:
            out["feature_images_per_s"] = round(self.featured / max(self.features_s, 1e-9), 3)
        return out


@dataclass
class Scorer:
    """Loaded feature extractors and reference statistics, shared by every evaluation of a
    session (``--watch`` scores many checkpoints against one reference)."""

    options: EvalOptions
    procs: Processes
    progress: ProgressFactory = no_progress
    inception: Any = None
    clip: Any = None
    reference: Reference | None = None  # on the main process (the others compute, not hold it)
    reference_from: str | None = None  # every process: where the reference was loaded from
    timing: Timing = field(default_factory=Timing)
    warnings: list[str] = field(default_factory=list)  # said once per evaluation, in words
    _texts: tuple[tuple[str, ...], np.ndarray] | None = None  # the last captions' CLIP features

    @classmethod
    def load(cls, options: EvalOptions, procs: Processes, progress: ProgressFactory = no_progress) -> Scorer:
        """Check the extra and load the extractors the metrics need (before any generation)."""

        scorer = cls(options, procs, progress)
        needed = options.protocol_metrics
        if not needed:
            return scorer
        require_extra(needed)
        if any(m in protocol.REFERENCE_METRICS for m in needed):
            scorer.inception = InceptionFeatures(options.inception_weights, procs.device)
        if "clip" in needed:
            scorer.clip = ClipFeatures(
                options.clip_architecture, options.clip_weights, procs.device, options.rules
            )
        return scorer

    def settings(self) -> protocol.FeatureSettings:
        return self.inception.settings(self.options.resolution, self.options.rules.crop)

    # ---- features ------------------------------------------------------------------
    def features(self, files: Sequence[Path], clip: bool, label: str) -> dict[str, np.ndarray] | None:
        """Features of ``files`` split over the processes in fixed batches; the main process
        gets them all in file order, the others ``None``."""

        batch = self.options.feature_batch_size
        spans = list(chunks(len(files), batch))
        mine = shard(spans, self.procs.rank, self.procs.world)
        my_files = [f for s, e in mine for f in files[s:e]]
        start = time.perf_counter()
        with self.progress(label, len(my_files)) as advance:
            feats = extract(
                my_files,
                inception=self.inception,
                clip=self.clip if clip else None,
                batch_size=batch,
                resolution=self.options.resolution,
                workers=self.options.workers,
                progress=advance,
                rounding=self.options.rules.crop,
            )
        self.timing.featured += len(my_files)
        self.timing.features_s += time.perf_counter() - start
        parts = self.procs.gather([(mine, feats)])
        if not self.procs.is_main:
            return None
        out: dict[str, np.ndarray] = {}
        for key in sorted({k for _, arrays in parts for k in arrays}):
            rows: list[tuple[int, np.ndarray]] = []
            for spans_of, arrays in parts:
                if not spans_of:
                    continue
                offset = 0
                for s, e in spans_of:
                    rows.append((s, arrays[key][offset : offset + e - s]))
                    offset += e - s
            out[key] = np.concatenate([a for _, a in sorted(rows, key=lambda r: r[0])])
        return out

    # ---- reference -------------------------------------------------------------------
    def load_reference(self, ref: str | Path, save_to: str | Path | None = None) -> Reference | None:
        """``ref``: a folder of real images (features computed here) or a reference file.
        ``save_to`` writes the statistics of a folder (main process)."""

        path = Path(ref).expanduser()
        self.reference_from = str(path)
        if path.is_file():
            if save_to is not None:
                raise BadInputError("--save-ref needs --ref DIR (a folder of real images), not a file")
            self.reference = load_reference(path, self.settings(), self.inception.dim)
            return self.reference
        files = list_images(path, "--ref", self.options.rules.image_order)
        feats = self.features(files, clip=False, label="reference features")
        if feats is None:
            return None
        provenance = {
            "clean_fid_version": library_version("clean-fid"),
            "inception_file": self.inception.path.name,
        }
        self.reference = Reference.from_features(feats["inception"], self.settings(), str(path), provenance)
        if save_to is not None:
            save_reference(self.reference, save_to)
        return self.reference

    # ---- scores ----------------------------------------------------------------------
    def score(self, files: Sequence[Path], captions: Sequence[str] | None) -> tuple[dict[str, float], dict]:
        """Protocol metrics of ``files`` (main process; others get empty dicts)."""
        wanted = self.options.protocol_metrics
        if not wanted:
            return {}, {}
        if "clip" in wanted and captions is None:
            raise BadInputError("--metrics clip needs the caption of every image: pass --captions FILE")
        self.warnings = []
        feats = self.features(files, clip="clip" in wanted, label="features")
        if feats is None:
            return {}, {}
        out: dict[str, float] = {}
        ref = self.reference
        if "fid" in wanted:
            mu, sigma = scores.statistics(feats["inception"])
            out["fid"] = scores.fid(mu, sigma, ref.mu, ref.sigma)  # type: ignore[union-attr]
            if scores.is_singular(len(files), ref.num_images, len(mu)):  # type: ignore[union-attr]
                self.warnings.append(scores.singular_note(len(files), ref.num_images, len(mu)))  # type: ignore[union-attr]
        if "kid" in wanted:
            out["kid"] = scores.kid(feats["inception"], ref.features)  # type: ignore[union-attr]
        if "pr" in wanted:
            out["precision"], out["recall"] = scores.precision_recall(feats["inception"], ref.features)  # type: ignore[union-attr]
        if "clip" in wanted:
            out["clip"] = scores.clip_score(feats["clip"], self._text_features(captions))  # type: ignore[arg-type]
        return out, self.how(len(files))

    def _text_features(self, captions: Sequence[str]) -> np.ndarray:
        """CLIP text features of ``captions``, encoded once per session (``--watch`` scores
        every checkpoint with the same captions)."""
        key = tuple(captions)
        if self._texts is None or self._texts[0] != key:
            prefix = self.options.clip_prefix
            parts = [self.clip.texts(list(key[i : i + 64]), prefix) for i in range(0, len(key), 64)]
            self._texts = (key, np.concatenate(parts))
        return self._texts[1]

    def how(self, n: int) -> dict[str, dict[str, Any]]:
        """How each metric was computed (library, version, extractor, resize, N)."""

        wanted = self.options.protocol_metrics
        how: dict[str, dict[str, Any]] = {}
        rules = self.options.rules
        resize = (
            f"RGB, {protocol.crop_description(rules.crop)}, PIL LANCZOS to {self.options.resolution}x"
            f"{self.options.resolution}, then clean-fid's clean resize to 299x299"
        )
        if self.inception is not None:
            extractor = (
                f"Inception-v3 pool3, {self.inception.path.name} (sha256 {self.inception.sha256[:12]}…)"
            )
            base = {"feature_extractor": extractor, "resize": resize, "n_generated": n}
            base["n_reference"] = self.reference.num_images if self.reference else None
            cf = f"clean-fid {library_version('clean-fid')}"
            if "fid" in wanted:
                how["fid"] = {"library": cf, "function": "frechet_distance", "mode": "clean", **base}
            if "kid" in wanted:
                kid = (
                    f"kernel_distance, {protocol.KID_SUBSETS} subsets of ≤{protocol.KID_SUBSET_SIZE}, "
                    f"seed {protocol.KID_SEED}"
                )
                how["kid"] = {"library": cf, "function": kid, "mode": "clean", **base}
            if "pr" in wanted:
                tf = f"torch-fidelity {library_version('torch-fidelity')}"
                how["pr"] = {
                    "library": tf,
                    "function": f"prc_features_to_metric, k = {protocol.PR_NEIGHBORHOOD}",
                    **base,
                }
        if "clip" in wanted:
            how["clip"] = {
                "library": f"open_clip {library_version('open_clip_torch')}",
                "feature_extractor": self.clip.description,
                "text": f"{self.options.clip_prefix!r} + caption, tokenized {rules.tokenization}",
                "resize": f"{_CLIP_INPUT[rules.clip_input]}, then OpenCLIP's own preprocessing",
                "scale": "mean cosine similarity (0-1)",
                "n_generated": n,
            }
        return how


# ---- generation ----------------------------------------------------------------------------
def generate_missing(
    pipe: LoadedPipeline,
    out: Path,
    manifest: Manifest,
    config: Any,
    procs: Processes,
    progress: ProgressFactory,
    seed_batch: int | None = None,
    inputs: dict[str, np.ndarray | None] | None = None,
) -> tuple[int, float]:
    """Generate every chunk of ``manifest`` with an incomplete image, split over processes.
    Chunk ``[s, e)`` is one batch of captions ``s..e-1`` with seeds ``seed + s …``; with
    ``seed_batch`` (DMD2's seeding) a chunk is one of its batches, whose noise is drawn at
    once (:func:`batch_noise`). ``inputs``: :func:`~wadi_cli.pipeline.generate`'s
    ``init_images`` / ``control_images``, one per caption (not with ``seed_batch``).
    Returns (images made by this process, seconds)."""

    chunk = seed_batch or config.batch_size
    todo = missing_chunks(out, manifest, chunk)
    procs.barrier()  # every process has looked before anyone writes
    mine = shard(todo, procs.rank, procs.world)
    total = sum(e - s for s, e in mine)
    start = time.perf_counter()
    with progress("generating", total) as advance:
        for s, e in mine:
            if seed_batch:
                noise = batch_noise(manifest.entries, s, e, pipe.latent_shape)
                images = images_from_noise(pipe, manifest.captions[s:e], config, noise)
            else:
                cfg = dataclasses.replace(config, seed=int(manifest.entries[s]["seed"]), batch_size=e - s)
                given = {k: v[s:e] for k, v in (inputs or {}).items() if v is not None}
                images = generate(pipe, manifest.captions[s:e], cfg, **given).images
            for i, image in zip(range(s, e), images, strict=True):
                save_png(image, out / manifest.entries[i]["file"])
            advance(e - s)
    seconds = time.perf_counter() - start
    procs.barrier()
    return total, seconds


def batch_noise(
    entries: Sequence[dict[str, Any]], start: int, stop: int, shape: Sequence[int]
) -> torch.Tensor:
    """The noise of entries ``start..stop-1`` under DMD2's seeding: for each batch seed,
    ``N(0, I)`` of shape (images of that batch in the whole manifest, *shape), float32, from
    one CPU generator seeded with it; each entry takes its ``row``."""
    wanted = {int(e["seed"]) for e in entries[start:stop]}
    sizes = {k: sum(1 for e in entries if int(e["seed"]) == k) for k in wanted}
    drawn = {
        k: torch.randn((m, *shape), generator=torch.Generator("cpu").manual_seed(k), dtype=torch.float32)
        for k, m in sizes.items()
    }
    return torch.stack([drawn[int(e["seed"])][int(e["row"])] for e in entries[start:stop]])


def prepare_out(out: Path, manifest: Manifest, procs: Processes) -> None:
    """Write ``manifest`` into ``out`` (main process) once every process has checked with
    :func:`~wadi_cli.evaluation.folders.check_resumable` that a resumed folder matches."""
    procs.barrier()
    if procs.is_main:
        write_manifest(out, manifest)
    procs.barrier()


def write_tiny_reference(
    out: Path, attrs: Sequence[dict[str, str]], real_seed: int, procs: Processes
) -> Path:
    """The tiny backbone's real images for ``attrs`` (rendered with ``real_seed``) as PNGs in
    ``out/reference`` (main process)."""

    folder = out / REFERENCE
    if procs.is_main:
        images = render_batch(attrs, real_seed)
        for i, image in enumerate(images):
            save_png(image, folder / image_name(i, len(images)))
    procs.barrier()
    return folder


def tiny_scores(
    files: Sequence[Path],
    attrs: Sequence[dict[str, str]] | None,
    real_seed: int,
    classifier: TinyClassifier | None,
) -> dict[str, float]:
    """The tiny classifier's accuracy and Fréchet distance of the images in ``files``."""

    if attrs is None:
        raise BadInputError(
            "accuracy and fd need tiny prompts ('a red circle at the top left'); use --metrics"
        )
    images = np.stack([np.asarray(protocol.to_rgb(read_image(f))) for f in files])
    result = evaluate_images(images, list(attrs), real_seed=real_seed, classifier=classifier)
    return {"accuracy": float(result["accuracy"]), "fd": float(result["fd"])}


def write_metrics(out: Path, result: dict[str, Any]) -> Path:
    """``out/metrics.json``, atomically."""
    return write_text_atomic(out / METRICS, json.dumps(result, indent=2, default=str) + "\n")


def manifest_images(folder: Path) -> tuple[list[Path], list[str]] | None:
    """Files and captions of a wadi evaluation folder (``None`` for any other folder)."""
    if not (folder / MANIFEST).is_file():
        return None
    manifest = Manifest.read(folder / MANIFEST)
    return [folder / f for f in manifest.files], manifest.captions


__all__ = [
    "IMAGES",
    "EvalOptions",
    "ProgressFactory",
    "Scorer",
    "Timing",
    "batch_noise",
    "generate_missing",
    "manifest_images",
    "no_progress",
    "prepare_out",
    "tiny_scores",
    "write_metrics",
    "write_tiny_reference",
]
