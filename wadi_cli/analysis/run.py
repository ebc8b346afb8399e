"""``analyze``: pair two checkpoints by tensor name and measure how the student's rows
moved away from the teacher's, in norm and in direction (the WaDi paper's Fig. 1).

Tensors are streamed: a reader thread loads the next teacher/student pair while the
current one is decomposed, so at most two pairs, one residual and one Gram matrix are
in memory at any time.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from wadi_cli import __version__
from wadi_cli.analysis.decompose import RowDecomposition, decompose_rows, layer_kind
from wadi_cli.analysis.report import (
    DEFINITIONS,
    LayerResult,
    aggregate,
    group_by_block,
    jsonable,
    layer_result,
)
from wadi_cli.analysis.spectrum import (
    METHODS,
    eigvals_desc,
    exact_squared_singular_values,
    gram_of_smaller_side,
    spectrum_stats,
)
from wadi_cli.errors import BadInputError, MismatchError, warn
from wadi_cli.io import open_checkpoint
from wadi_cli.io.tensor_map import KeyDiff, TensorMap
from wadi_cli.machine import resolve_device


@dataclass
class AnalyzeOptions:
    """Knobs of the analysis (CLI flags map one to one)."""

    rank_k: int = 64  # energy_at_k cut-off
    top: int = 8  # leading singular values reported per layer
    filter: str | None = None  # regex (re.search) on tensor names
    method: str = "gram"  # "gram" (fast, all singular values) or "exact" (float64 SVD)
    device: str = "cpu"

    def validate(self) -> None:
        if self.rank_k < 1:
            raise BadInputError(f"--rank-k must be >= 1, got {self.rank_k}")
        if self.top < 0:
            raise BadInputError(f"--top must be >= 0, got {self.top}")
        if self.method not in METHODS:
            raise BadInputError(f"unknown spectrum method {self.method!r}; expected one of {METHODS}")
        if self.filter is not None:
            try:
                re.compile(self.filter)
            except re.error as exc:
                raise BadInputError(
                    f"--filter {self.filter!r} is not a valid regular expression: {exc}"
                ) from None
        resolve_device(self.device)


@dataclass
class Pairing:
    """How the tensor names of the two checkpoints matched up."""

    paired: list[str] = field(default_factory=list)  # >= 2-D, same shape, selected
    only_in_teacher: list[str] = field(default_factory=list)
    only_in_student: list[str] = field(default_factory=list)
    shape_mismatch: list[dict[str, Any]] = field(default_factory=list)
    not_matrix: list[str] = field(default_factory=list)  # common tensors with < 2 dims
    filtered_out: int = 0


def pair_tensors(teacher: TensorMap, student: TensorMap, pattern: str | None = None) -> Pairing:
    """Match names; list tensors present on one side only or with different shapes.

    Raises :class:`MismatchError` if no weight matrix pairs, and :class:`BadInputError`
    if ``pattern`` deselects every pairable matrix.
    """
    diff = KeyDiff.between(teacher, student)
    out = Pairing(
        only_in_teacher=diff.only_a,
        only_in_student=diff.only_b,
        shape_mismatch=[{"name": k, "teacher": list(ts), "student": list(ss)} for k, ts, ss in diff.shapes],
    )
    regex = re.compile(pattern) if pattern else None
    mismatched = {k for k, _, _ in diff.shapes}
    candidates = 0
    for name in (k for k in diff.common if k not in mismatched):
        if len(student.shape(name)) < 2:
            out.not_matrix.append(name)
        else:
            candidates += 1
            if regex is None or regex.search(name):
                out.paired.append(name)
            else:
                out.filtered_out += 1
    if candidates == 0:
        n_t, n_s = len(diff.common) + len(diff.only_a), len(diff.common) + len(diff.only_b)
        raise MismatchError(
            f"no weight matrix pairs between the two checkpoints ({n_t} teacher tensors, "
            f"{n_s} student tensors, {len(diff.common)} common names, "
            f"{len(out.shape_mismatch)} with different shapes)"
        )
    if not out.paired:
        raise BadInputError(f"--filter {pattern!r} matches none of the {candidates} paired weight matrices")
    return out


@dataclass
class AnalysisResult:
    """Everything ``wadi analyze`` reports; :meth:`summary` is the JSON document."""

    layers: list[LayerResult]
    pairing: Pairing
    options: AnalyzeOptions
    spectra: dict[str, np.ndarray]  # layer -> squared singular values, descending
    teacher: str = ""
    student: str = ""
    seconds: float = 0.0

    def summary(self, include_layers: bool = True) -> dict[str, Any]:
        """Strict-JSON-ready summary: options, definitions, overall/per-block/per-kind stats."""
        kinds: dict[str, list[LayerResult]] = {}
        for layer in self.layers:
            kinds.setdefault(layer.kind, []).append(layer)
        doc: dict[str, Any] = {
            "tool": "wadi analyze",
            "wadi_version": __version__,
            "teacher": self.teacher,
            "student": self.student,
            "options": asdict(self.options),
            "definitions": DEFINITIONS,
            "overall": aggregate(self.layers),
            "blocks": group_by_block(self.layers),
            "kinds": {k: aggregate(v) for k, v in kinds.items()},
            "skipped": {
                "only_in_teacher": self.pairing.only_in_teacher,
                "only_in_student": self.pairing.only_in_student,
                "shape_mismatch": self.pairing.shape_mismatch,
                "not_matrix_count": len(self.pairing.not_matrix),
                "filtered_out_count": self.pairing.filtered_out,
            },
            "seconds": round(self.seconds, 3),
        }
        if include_layers:
            doc["layers"] = [asdict(x) for x in self.layers]
        return jsonable(doc)


ProgressFn = Callable[[str, int, int], None]


def _one_thread() -> None:
    # Thread-local in torch's OpenMP backend: the eigen worker runs its LAPACK calls on
    # one core while the caller's thread keeps all intra-op threads for the products.
    # (Measured: a 1280 x 1280 eigvalsh is several times slower with 2 threads on a
    # loaded 2-core machine than with 1, because its many small parallel steps stall.)
    torch.set_num_threads(1)


def _spectrum_job(residual: torch.Tensor, method: str, defer_gram: bool = False) -> Callable[[], np.ndarray]:
    """The expensive part of a layer's spectrum, as a closure for the eigen worker.

    ``"gram"``: the Gram product is formed now (caller's thread) and only the small
    eigenproblem is deferred, unless ``defer_gram`` (then the worker does both);
    ``"exact"``: the whole SVD is deferred.
    """
    if method == "exact":
        return lambda: exact_squared_singular_values(residual)
    if defer_gram:
        return lambda: eigvals_desc(gram_of_smaller_side(residual))
    g = gram_of_smaller_side(residual)
    return lambda: eigvals_desc(g)


#: storage dtypes that hold quantised integers (or 8-bit floats), not the weights' values
QUANTISED_DTYPES = frozenset(
    {torch.int8, torch.uint8}
    | {getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
       if hasattr(torch, n)}
)  # fmt: skip


def _warn_quantised(teacher: TensorMap, student: TensorMap, names: list[str]) -> None:
    """One warning when paired weights are stored quantised: their norms and angles are those
    of the stored codes (a scale kept elsewhere turns them into weights), so a norm change of
    100x between an int8 and a float file says nothing about the model."""
    for side, src in (("teacher", teacher), ("student", student)):
        found = sorted({str(src.dtype(n)).replace("torch.", "") for n in names} & _names(QUANTISED_DTYPES))
        if found:
            hit = sum(str(src.dtype(n)).replace("torch.", "") in found for n in names)
            kinds = ", ".join(found)
            warn(
                f"{hit} of the {len(names)} paired {side} matrices are stored quantised ({kinds}): "
                "the numbers describe the stored integer codes, not the weights (their scales are kept "
                "elsewhere); dequantise both checkpoints to float for a meaningful comparison"
            )


def _names(dtypes: frozenset[torch.dtype]) -> set[str]:
    return {str(d).replace("torch.", "") for d in dtypes}


def analyze_sources(
    teacher: TensorMap,
    student: TensorMap,
    options: AnalyzeOptions | None = None,
    progress: ProgressFn | None = None,
) -> AnalysisResult:
    """Analyze two open checkpoints (or :class:`~wadi_cli.io.tensor_map.DictSource` state dicts).

    Args:
        teacher, student: sources with ``keys()``, ``shape(name)`` and ``get(name)``.
        options: see :class:`AnalyzeOptions`.
        progress: called as ``progress(name, done, total)`` after each layer.
    """
    opts = options or AnalyzeOptions()
    opts.validate()
    start = time.perf_counter()
    pairing = pair_tensors(teacher, student, opts.filter)
    names = pairing.paired
    _warn_quantised(teacher, student, names)
    layers: list[LayerResult] = []
    spectra: dict[str, np.ndarray] = {}

    def load(name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return teacher.get(name), student.get(name)

    # One reader thread reads the next pair while this one is decomposed; one eigen
    # thread solves the small symmetric eigenproblems while the next Gram is formed.
    pending: list[tuple[str, str, RowDecomposition, Future[np.ndarray]]] = []

    def finish(limit: int) -> None:
        while len(pending) > limit:
            name, kind, dec, fut = pending.pop(0)
            sq = fut.result()
            layers.append(layer_result(name, kind, dec, spectrum_stats(sq, k=opts.rank_k, top=opts.top)))
            spectra[name] = sq.astype(np.float32)
            if progress is not None:
                progress(name, len(layers), len(names))

    res_dtype = torch.float64 if opts.method == "exact" else torch.float32
    # On CPU the eigenproblems cost about twice the Gram products: give half the cores
    # to single-threaded eigen workers and the rest to this thread (no oversubscription;
    # measured on 2 cores, SD2.1 pair: 30.6 s for 1 + 1 vs 36.9 s for 2 intra-op + 1 eigen).
    cores = os.cpu_count() or 1
    eig_workers = 1 if str(opts.device).startswith("cuda") else max(1, cores // 2)
    prev_threads = torch.get_num_threads()
    if not str(opts.device).startswith("cuda"):
        torch.set_num_threads(max(1, min(prev_threads, cores - eig_workers)))
    try:
        with (
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="wadi-read") as reader,
            ThreadPoolExecutor(
                max_workers=eig_workers, thread_name_prefix="wadi-eig", initializer=_one_thread
            ) as eig,
        ):
            future = reader.submit(load, names[0])
            for i, name in enumerate(names):
                t, s = future.result()
                if i + 1 < len(names):
                    future = reader.submit(load, names[i + 1])
                dec = decompose_rows(t, s, residual_dtype=res_dtype, device=opts.device)
                kind = layer_kind(name, tuple(t.shape))
                del t, s
                # Load balancing: when the eigen workers are idle, hand them the whole job
                # (Gram product + eigenproblem) so this thread can read and decompose the next
                # pair; when they are busy, form the Gram here. (Single-threaded cost on the
                # SD2.1 pair: read 2.2 s, decompose 2.5 s, Gram 12.8 s, eigen 14.8 s.)
                idle = all(f.done() for *_, f in pending)
                job = _spectrum_job(dec.residual, opts.method, defer_gram=idle)
                dec.residual = dec.residual[:0]  # keep the shape's columns, free the memory
                pending.append((name, kind, dec, eig.submit(job)))
                finish(limit=2 * eig_workers)
            finish(limit=0)
    finally:
        torch.set_num_threads(prev_threads)  # a library call must not leave it changed
    return AnalysisResult(
        layers=layers,
        pairing=pairing,
        options=opts,
        spectra=spectra,
        teacher=str(getattr(teacher, "description", "")),
        student=str(getattr(student, "description", "")),
        seconds=time.perf_counter() - start,
    )


def analyze_checkpoints(
    teacher_path: str | Path,
    student_path: str | Path,
    options: AnalyzeOptions | None = None,
    progress: ProgressFn | None = None,
) -> AnalysisResult:
    """Open two checkpoints with :func:`wadi_cli.io.open_checkpoint` and analyze them; a
    LoRaD adapter file as STUDENT is merged into the teacher first (as ``wadi swap`` does)."""
    from wadi_cli.io.tensor_map import DictSource
    from wadi_cli.swap.core import open_student

    (options or AnalyzeOptions()).validate()  # fail on bad flags before touching files
    with open_checkpoint(teacher_path) as t_src:
        s_src, desc = open_student(student_path, t_src)
        try:
            student = s_src if hasattr(s_src, "shape") else DictSource(s_src, desc)
            result = analyze_sources(t_src, student, options, progress)
        finally:
            if hasattr(s_src, "close"):
                s_src.close()
    result.teacher = f"{teacher_path} ({result.teacher})" if result.teacher else str(teacher_path)
    result.student = f"{student_path} ({result.student})" if result.student else str(student_path)
    return result
