"""``wadi demo``: the whole WaDi story on the embedded tiny model, offline, in minutes.

1. distil the tiny teacher into one-step students: LoRaD (the method) and, unless
   ``quick``, LoRA at a similar parameter count; always a full fine-tune (the swap needs
   one: the paper ran its swap on DMD2, a full fine-tune). Two at a time on 2 cores;
2. evaluate the teacher (multi-step) and every student with ``wadi eval``'s metrics;
3. analyse teacher vs each student (row norms vs directions, residual spectrum);
4. swap on the full fine-tune: teacher norms into it, and teacher directions into it;
5. write ``report.md``, ``metrics.json``, the Fig. 1-style panels and every artefact
   (merged students, hybrids, per-student analysis folders, run folders).

The output folder appears atomically when everything succeeded.
"""

from __future__ import annotations

import functools
import json
import os
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from wadi_cli.analysis import analyze_checkpoints
from wadi_cli.analysis.outputs import write_report_files
from wadi_cli.analysis.report import jsonable
from wadi_cli.demo import figures
from wadi_cli.demo.report import report_markdown, swap_grid_caption
from wadi_cli.demo.students import STUDENT_RECIPE, STUDENTS, student_config, train_students
from wadi_cli.distill.export import export_run
from wadi_cli.distill.plan import parameter_plan
from wadi_cli.errors import BadInputError
from wadi_cli.evaluation.tiny import evaluate_tiny
from wadi_cli.io import atomic_output_dir, check_writable
from wadi_cli.machine import machine_info
from wadi_cli.swap import write_swap
from wadi_cli.tiny.arch import TINY_PIPELINE_DIR
from wadi_cli.tiny.classifier import load_classifier
from wadi_cli.words import plural


@dataclass
class DemoOptions:
    """Knobs of :func:`run_demo` (``None`` = the mode's default)."""

    quick: bool = False
    steps: int | None = None  # distillation steps per student (400; quick: 200)
    num_images: int | None = None  # images per evaluation (500; quick: 256)
    teacher_steps: int = 25
    seed: int = 0
    jobs: int | None = None  # students trained at once (default: min(2, cores))
    grid_rows: int = 6

    def resolved(self) -> DemoOptions:
        steps = self.steps if self.steps is not None else (200 if self.quick else 400)
        n = self.num_images if self.num_images is not None else (256 if self.quick else 500)
        jobs = self.jobs if self.jobs is not None else max(1, min(2, os.cpu_count() or 1))
        out = DemoOptions(self.quick, steps, n, self.teacher_steps, self.seed, jobs, self.grid_rows)
        if steps < 1:
            raise BadInputError("--steps must be at least 1")
        if n < 2:
            raise BadInputError("--num-images must be at least 2 (fd needs two images)")
        if jobs < 1:
            raise BadInputError("--jobs must be at least 1")
        if self.teacher_steps < 1:
            raise BadInputError("--teacher-steps must be at least 1")
        if not 1 <= self.grid_rows <= n:
            raise BadInputError("--grid-rows must lie between 1 and --num-images")
        return out


class DemoProgress:
    """Callbacks of :func:`run_demo` (override for a UI; these do nothing)."""

    def stage(self, text: str) -> None:
        """A new stage starts."""

    def training(self, names: list[str], steps: int) -> None:
        """Students ``names`` will each train ``steps`` steps."""

    def train_step(self, name: str, step: int, loss_g: float, loss_fake: float) -> None:
        """Student ``name`` reached ``step`` (called while the teacher is evaluated, too)."""

    def train_state(self, name: str, text: str) -> None:
        """Student ``name`` was launched (``"loading"``) or finished (``"done in N s"``)."""

    def side_job(self, text: str, seconds: float | None = None) -> None:
        """Work done in this process while the students train (the teacher's evaluation)
        started (``seconds`` is None) or finished after ``seconds``."""

    def result(self, text: str) -> None:
        """A headline number is known."""


@functools.lru_cache(maxsize=1)
def _classifier() -> Any:
    """The shipped tiny classifier, loaded once for all of the demo's evaluations."""
    return load_classifier()


def _evaluate(n: int, seed: int, **kw: Any) -> tuple[dict[str, Any], Any]:
    result, generation = evaluate_tiny(num_images=n, seed=seed, classifier=_classifier(), **kw)
    keep = ("accuracy", "fd", "per_attribute_accuracy", "steps", "cfg", "seconds")
    return {k: result[k] for k in keep if k in result}, generation


def run_demo(out: str | os.PathLike[str], options: DemoOptions | None = None,
             progress: DemoProgress | None = None) -> dict[str, Any]:  # fmt: skip
    """Run the demo into the folder ``out`` and return the ``metrics.json`` document."""
    opts = (options or DemoOptions()).resolved()
    progress = progress or DemoProgress()
    dest = check_writable(out, directory=True)
    started = time.perf_counter()
    with atomic_output_dir(dest) as tmp:
        metrics = _run(tmp, opts, progress)
        metrics["timings"]["total_s"] = round(time.perf_counter() - started, 1)
        _write_outputs(tmp, metrics)
    return metrics


def _run(tmp: Path, opts: DemoOptions, progress: DemoProgress) -> dict[str, Any]:
    names = ["lorad", "full"] if opts.quick else ["lorad", "lora", "full"]
    specs = [STUDENTS[n] for n in names]
    teacher_unet = TINY_PIPELINE_DIR / "unet"
    timings: dict[str, float] = {}
    teacher: dict[str, Any] = {}
    images: dict[str, np.ndarray] = {}
    rows: list[int] = []

    what = (
        f"evaluating the teacher ({plural(opts.teacher_steps, 'step')}, {plural(opts.num_images, 'image')})"  # type: ignore[arg-type]
    )

    def teacher_eval() -> None:
        progress.side_job(what)
        t0 = time.perf_counter()
        res, gen = _evaluate(opts.num_images, opts.seed, teacher=True, steps=opts.teacher_steps)  # type: ignore[arg-type]
        teacher.update(res)
        # the grid's rows: the first distinct prompts (every model's images at these indices)
        rows.extend(figures.distinct_rows(gen.prompts, opts.grid_rows))
        images["teacher"], images["prompts"] = gen.images[rows], np.array(gen.prompts)[rows]
        timings["teacher_eval_s"] = round(time.perf_counter() - t0, 1)
        progress.side_job(what, timings["teacher_eval_s"])
        progress.result(
            f"teacher ({opts.teacher_steps} steps): accuracy {res['accuracy']:.3f}, fd {res['fd']:.2f}"
        )

    each = f"{plural(opts.steps, 'step')} each, {opts.jobs} at a time"  # type: ignore[arg-type]
    progress.stage(f"distilling {plural(len(specs), 'student')} ({each})")
    progress.training(names, opts.steps)  # type: ignore[arg-type]
    t0 = time.perf_counter()
    # the full fine-tune is the slowest (every weight has gradients and Adam state): start
    # it first so the others fill the second core while it runs
    launch_order = sorted(specs, key=lambda sp: sp.name != "full")
    trained = train_students(
        launch_order, opts.steps, opts.seed, tmp / "runs", jobs=opts.jobs,  # type: ignore[arg-type]
        on_step=progress.train_step, side_job=teacher_eval, on_state=progress.train_state,
    )  # fmt: skip
    timings["training_wall_s"] = round(time.perf_counter() - t0, 1)
    students = _students(tmp, specs, trained, opts, progress, images, rows)
    progress.stage("analysing teacher vs each student (norms, directions, residual spectra)")
    t0 = time.perf_counter()
    analysis, analyses = _analyse(tmp, teacher_unet, names)
    timings["analysis_s"] = round(time.perf_counter() - t0, 1)
    progress.stage("swapping norms and directions on the full fine-tune")
    t0 = time.perf_counter()
    swap = _swap(tmp, teacher_unet, opts, progress, images, rows)
    timings["swap_s"] = round(time.perf_counter() - t0, 1)
    swap["student_metrics"] = {k: students["full"][k] for k in ("accuracy", "fd")}
    progress.stage("plots and report")
    _figures(tmp, analyses, teacher, students, swap, images)
    return {
        "tool": "wadi demo",
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine_info(),
        "options": asdict(opts),
        "teacher": {"accuracy": teacher["accuracy"], "fd": teacher["fd"], "steps": opts.teacher_steps,
                    "cfg": teacher.get("cfg"), "per_attribute_accuracy": teacher["per_attribute_accuracy"]},
        "students": students,
        "analysis": analysis,
        "swap": swap,
        "timings": timings,
    }  # fmt: skip


def _students(tmp: Path, specs: list[Any], trained: dict[str, Any], opts: DemoOptions, progress: DemoProgress,
              images: dict[str, np.ndarray], rows: list[int]) -> dict[str, Any]:  # fmt: skip
    """Export every student merged and evaluate it."""
    out: dict[str, Any] = {}
    (tmp / "students").mkdir()
    for spec in specs:
        progress.stage(f"evaluating the {spec.label} student")
        merged = tmp / "students" / f"{spec.name}.safetensors"
        export_run(trained[spec.name].run, "merged", merged, ema=False)
        res, gen = _evaluate(opts.num_images, opts.seed, weights=merged)  # type: ignore[arg-type]
        images[spec.name] = gen.images[rows]
        cfg = student_config(spec, opts.steps, opts.seed)  # type: ignore[arg-type]
        # the objective as the run recorded it (what the report says it trained with)
        recorded = json.loads((trained[spec.name].run / "config.json").read_text(encoding="utf-8"))
        out[spec.name] = {
            "label": spec.label,
            "adapter": cfg.adapter,
            "rank": None if cfg.adapter == "full" else cfg.rank,
            "lr": cfg.lr,
            "recipe": STUDENT_RECIPE,
            "regression_weight": recorded["regression_weight"],
            "fake_rank": recorded["fake_rank"],
            "accuracy": res["accuracy"],
            "fd": res["fd"],
            "per_attribute_accuracy": res["per_attribute_accuracy"],
            "trainable_params": parameter_plan(cfg)["student"]["trainable_params"],
            "steps": trained[spec.name].steps,
            "train_seconds": round(trained[spec.name].seconds, 1),
            "peak_rss_mb": round(trained[spec.name].peak_rss_mb, 1),
            "weights": f"students/{spec.name}.safetensors",
        }
        progress.result(f"{spec.label}: accuracy {res['accuracy']:.3f}, fd {res['fd']:.2f}")
    return out


_ANALYSIS_KEYS = ("norm_rel_change_mean", "direction_change_mean", "angle_deg_mean", "rank_frac90",
                  "rank_frac99", "effective_rank", "direction_to_norm_ratio_mean")  # fmt: skip


def _analyse(tmp: Path, teacher_unet: Path, names: list[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    per, results = {}, {}
    for name in names:
        result = analyze_checkpoints(teacher_unet, tmp / "students" / f"{name}.safetensors")
        folder = tmp / "analysis" / name
        folder.mkdir(parents=True)
        write_report_files(result, folder)
        overall = result.summary(include_layers=False)["overall"]
        per[name] = {k.removesuffix("_mean") if k.startswith("direction_to") else k: overall.get(k)
                     for k in _ANALYSIS_KEYS}  # fmt: skip
        per[name]["layers"] = overall["layers"]
        # layers the student did not touch (an adapter's non-targets) have rank 0: leave them out
        changed = [x.rank_frac90 for x in result.layers if x.direction_residual_fro > 0]
        per[name]["layers_changed"] = len(changed)
        per[name]["rank_frac90_changed"] = float(np.mean(changed)) if changed else None
        # the paper's form of the claim: ~93 % of the residual energy in the top 30 % of its
        # singular values (mean over changed layers)
        top = [energy_in_top(sq, 0.3) for sq in result.spectra.values() if float(np.sum(sq)) > 0]
        per[name]["energy_top30_changed"] = float(np.mean(top)) if top else None
        results[name] = result
    headline = per["full"]
    doc = {
        "student": "full",
        "direction_to_norm_ratio": headline["direction_to_norm_ratio"],
        "norm_rel_change_mean": headline["norm_rel_change_mean"],
        "direction_change_mean": headline["direction_change_mean"],
        "lorad_norm_rel_change_max": max(x.norm_rel_change_mean for x in results["lorad"].layers),
        "per_student": per,
    }
    return jsonable(doc), results


def energy_in_top(sq: np.ndarray, share: float) -> float:
    """Share of ``sum(sq)`` held by the largest ``ceil(share · len(sq))`` entries of the
    squared singular values ``sq`` (descending)."""
    sq = np.sort(np.asarray(sq, dtype=np.float64))[::-1]
    k = max(1, int(np.ceil(share * len(sq))))
    return float(sq[:k].sum() / sq.sum())


def _swap(tmp: Path, teacher_unet: Path, opts: DemoOptions, progress: DemoProgress,
          images: dict[str, np.ndarray], rows: list[int]) -> dict[str, Any]:  # fmt: skip
    """The two hybrids of the full fine-tune, written as `wadi swap` writes them, and scored."""
    (tmp / "swaps").mkdir()
    doc: dict[str, Any] = {"student": "full"}
    labels = {"teacher_norms": "full + teacher norms", "teacher_directions": "full + teacher directions"}
    for variant, label in labels.items():
        path = tmp / "swaps" / f"full_{variant}.safetensors"
        stats = write_swap(teacher_unet, tmp / "students" / "full.safetensors", variant, path)
        res, gen = _evaluate(opts.num_images, opts.seed, weights=path)  # type: ignore[arg-type]
        images[label] = gen.images[rows]
        doc[variant] = {"accuracy": res["accuracy"], "fd": res["fd"], "keep": stats.keep,
                        "per_attribute_accuracy": res["per_attribute_accuracy"],
                        "weights": f"swaps/{path.name}", "stats": stats.to_dict()}  # fmt: skip
        progress.result(f"{label}: accuracy {res['accuracy']:.3f}, fd {res['fd']:.2f}")
    return doc


def _figures(tmp: Path, analyses: dict[str, Any], teacher: dict[str, Any], students: dict[str, Any],
             swap: dict[str, Any], images: dict[str, np.ndarray]) -> None:  # fmt: skip
    fig = tmp / "figures"
    fig.mkdir()
    figures.plot_norm_vs_direction(
        {n: r.layers for n, r in analyses.items()}, fig / "fig1a_norm_vs_direction.png"
    )
    figures.plot_residual_spectrum(
        {n: r.spectra for n, r in analyses.items()}, fig / "fig1b_residual_spectrum.png"
    )
    variants = {
        f"teacher\n({teacher.get('steps')} steps)": teacher,
        "full fine-tune\n(1 step)": students["full"],
        "full FT +\nteacher norms": swap["teacher_norms"],
        "full FT +\nteacher directions": swap["teacher_directions"],
    }
    kinds = ["teacher", "full", "teacher_norms", "teacher_directions"]
    figures.plot_swap_metrics(variants, kinds, fig / "fig1c_swap_metrics.png")
    cols = {"teacher": images["teacher"]}
    cols.update({f"{n} (1 step)": images[n] for n in students})
    cols.update({k: images[k] for k in ("full + teacher norms", "full + teacher directions")})
    caption = swap_grid_caption({"students": students, "swap": swap})
    figures.plot_image_grid(cols, [str(p) for p in images["prompts"]], fig / "fig1d_swap_grid.png", caption)


def _write_outputs(tmp: Path, metrics: dict[str, Any]) -> None:
    (tmp / "metrics.json").write_text(json.dumps(jsonable(metrics), indent=2, allow_nan=False) + "\n")
    (tmp / "report.md").write_text(report_markdown(metrics), encoding="utf-8")
