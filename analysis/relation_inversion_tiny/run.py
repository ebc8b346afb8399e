"""Relation inversion on the tiny model: can ``wadi invert`` learn a position ("at the top left")
as a token <R> from exemplars whose captions omit it, and does the one-step student place
shapes there when the prompt says <R>?

Exemplars: 8 renders (wadi_cli/tiny/data.py) at the top left, of 3 colours × 2 shapes (yellow
and triangles never shown), captioned "a {colour} {shape} <R>". Per inversion seed: ``wadi
invert -b tiny`` (the tiny recipe, ``--steps`` steps), then the shipped one-step student samples
every colour × shape (12 prompts, ``--per-prompt`` images each) with three endings: " <R>", " at
the top left" (the written words) and none; the shipped classifier scores the position. Also
the time per image of the 25-step teacher and the one-step student on the <R> prompts.

    PYTHONPATH=. python3 analysis/relation_inversion_tiny/run.py

Writes results/results.json, results/results.md and results/positions.png.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from wadi_cli.diffusion.tokens import read_embedding_files, use_embeddings
from wadi_cli.invert import invert, resolve_invert_config
from wadi_cli.pipeline import SampleConfig, generate, load_pipeline
from wadi_cli.tiny.classifier import load_classifier, predict
from wadi_cli.tiny.data import ATTRIBUTES, render_batch

HERE = Path(__file__).resolve().parent
TARGET = "top left"
EXEMPLARS = [
    ("red", "circle"), ("blue", "square"), ("green", "circle"), ("red", "square"),
    ("blue", "circle"), ("green", "square"), ("red", "circle"), ("blue", "square"),
]  # fmt: skip
ENDINGS = {"<R>": " <R>", "words": f" at the {TARGET}", "none": ""}


def write_exemplars(folder: Path) -> None:
    """The exemplar PNGs and captions.json (the relation is in the image, not the caption)."""
    attrs = [{"color": c, "shape": s, "position": TARGET} for c, s in EXEMPLARS]
    images = render_batch(attrs, seed=7)
    captions = {}
    for i, (a, im) in enumerate(zip(attrs, images, strict=True)):
        Image.fromarray(im).save(folder / f"{i}.png")
        captions[f"{i}.png"] = f"a {a['color']} {a['shape']} <R>"
    (folder / "captions.json").write_text(json.dumps(captions, indent=1), encoding="utf-8")


def position_accuracy(images: np.ndarray, classifier) -> float:
    return float(np.mean([p["position"] == TARGET for p in predict(images, classifier)]))


def sample(pipe, prompts: list[str], per_prompt: int, teacher: bool) -> tuple[np.ndarray, float]:
    cfg = SampleConfig(teacher=teacher, seed=1000, batch_size=24)
    gen = generate(pipe, prompts, cfg, per_prompt)
    return gen.images, gen.seconds / len(gen.images)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--per-prompt", type=int, default=8)
    ap.add_argument("--timing-images", type=int, default=24)
    ap.add_argument("--out", type=Path, default=HERE / "results")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    prompts = [f"a {c} {s}" for c in ATTRIBUTES["color"] for s in ATTRIBUTES["shape"]]
    classifier = load_classifier()
    work = Path(tempfile.mkdtemp(prefix="relinv-"))
    rows, grids = [], {}
    try:
        (work / "ex").mkdir()
        write_exemplars(work / "ex")
        for seed in range(args.seeds):
            cfg = resolve_invert_config(
                overrides={"images": str(work / "ex"), "max_steps": args.steps, "seed": seed,
                           "checkpoint_every": args.steps, "device": "cpu"}
            )  # fmt: skip
            t0 = time.perf_counter()
            invert(cfg, work / f"run{seed}")
            train_s = time.perf_counter() - t0
            pipe = load_pipeline("tiny", device=torch.device("cpu"), dtype=torch.float32)
            use_embeddings(pipe.prompt_encoder, read_embedding_files([work / f"run{seed}"], "tiny"))
            row = {"seed": seed, "steps": args.steps, "train_seconds": round(train_s, 1)}
            for name, end in ENDINGS.items():
                images, _ = sample(pipe, [p + end for p in prompts], args.per_prompt, teacher=False)
                row[f"acc_{name}"] = position_accuracy(images, classifier)
                asked = [
                    {"color": p.split()[1], "shape": p.split()[2]}
                    for p in np.repeat(prompts, args.per_prompt)
                ]
                got = predict(images, classifier)
                for attr in ("color", "shape"):  # the prompt's entity kept (no leakage)?
                    hits = [g[attr] == a[attr] for g, a in zip(got, asked, strict=True)]
                    row[f"{attr}_{name}"] = float(np.mean(hits))
                seen = [i for i, p in enumerate(np.repeat(prompts, args.per_prompt)) if "yellow" not in p
                        and "triangle" not in p]  # fmt: skip
                row[f"acc_{name}_seen"] = position_accuracy(images[seen], classifier)
                row[f"acc_{name}_unseen"] = position_accuracy(np.delete(images, seen, axis=0), classifier)
                if seed == 0:
                    grids[name] = images[:: args.per_prompt][:12]
            rows.append(row)
            print(json.dumps(row), flush=True)
        # time per image on the <R> prompts: teacher (the tiny recipe's 25 steps) vs student (1 step)
        pipe_t = load_pipeline("tiny", device=torch.device("cpu"), dtype=torch.float32, teacher=True)
        use_embeddings(pipe_t.prompt_encoder, read_embedding_files([work / "run0"], "tiny"))
        timing_prompts = [p + " <R>" for p in prompts][: args.timing_images]
        n_t = max(1, args.timing_images // len(timing_prompts))
        images_t, teacher_s = sample(pipe_t, timing_prompts, n_t, teacher=True)
        _, student_s = sample(pipe, timing_prompts, n_t, teacher=False)
        acc_teacher = position_accuracy(images_t, classifier)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    summary = {name: _mean_sd([r[f"acc_{name}"] for r in rows]) for name in ENDINGS}
    for name in ENDINGS:
        for part in ("seen", "unseen"):
            summary[f"{name}_{part}"] = _mean_sd([r[f"acc_{name}_{part}"] for r in rows])
    result = {
        "rows": rows, "summary": summary,
        "timing": {"teacher_s_per_image": teacher_s, "student_s_per_image": student_s,
                   "images": len(images_t), "teacher_position_accuracy_R": acc_teacher},
        "setup": {"exemplars": EXEMPLARS, "target": TARGET, "prompts": prompts, "per_prompt": args.per_prompt,
                  "steps": args.steps, "seeds": args.seeds, "chance": 1 / len(ATTRIBUTES["position"])},
        "machine": {"cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
                    "threads": 1, "date": time.strftime("%Y-%m-%d")},
    }  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    (args.out / "results.md").write_text(_table(result), encoding="utf-8")
    _figure(rows, grids, args.out / "positions.png")
    print(_table(result))
    return 0


def _mean_sd(values: list[float]) -> dict[str, float]:
    a = np.asarray(values, dtype=np.float64)
    return {"mean": float(a.mean()), "sd": float(a.std(ddof=1)) if len(a) > 1 else 0.0,
            "min": float(a.min()), "max": float(a.max())}  # fmt: skip


def _table(result: dict) -> str:
    s = result["summary"]
    lines = [
        f"Position accuracy (share of one-step student images the classifier puts at the {TARGET}; chance "
        f"{result['setup']['chance']:.2f}), mean ± sd over {result['setup']['seeds']} inversion seeds:",
        "",
        "| prompt ending | all 12 prompts | colour & shape seen | yellow or triangle (unseen) |",
        "|---|---|---|---|",
    ]
    for name, label in (
        ("<R>", "`<R>` (learned)"),
        ("words", f"`at the {TARGET}` (written)"),
        ("none", "none"),
    ):
        cells = [s[name], s[f"{name}_seen"], s[f"{name}_unseen"]]
        lines.append(f"| {label} | " + " | ".join(f"{c['mean']:.3f} ± {c['sd']:.3f}" for c in cells) + " |")
    lines += ["", "Colour / shape accuracy (the prompt's entity kept; mean ± sd over seeds):", ""]
    lines += ["| prompt ending | colour | shape |", "|---|---|---|"]
    for name in ENDINGS:
        cells = [_mean_sd([r[f"{attr}_{name}"] for r in result["rows"]]) for attr in ("color", "shape")]
        lines.append(f"| {name} | " + " | ".join(f"{c['mean']:.3f} ± {c['sd']:.3f}" for c in cells) + " |")
    t = result["timing"]
    teacher_ms, student_ms = 1000 * t["teacher_s_per_image"], 1000 * t["student_s_per_image"]
    lines += [
        "",
        f"Time per image with <R> ({t['images']} images, batch 24, 1 CPU thread): teacher (25 steps) "
        f"{teacher_ms:.1f} ms, student (1 step) {student_ms:.1f} ms ({teacher_ms / student_ms:.1f}×); "
        f"the teacher's position accuracy with <R>: {t['teacher_position_accuracy_R']:.3f}.",
        "",
    ]
    return "\n".join(lines)


def _figure(rows: list[dict], grids: dict[str, np.ndarray], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax_img) = plt.subplots(1, 2, figsize=(11, 3.6), gridspec_kw={"width_ratios": [1, 1.6]})
    names = list(ENDINGS)
    for k, name in enumerate(names):
        vals = [r[f"acc_{name}"] for r in rows]
        ax.bar(k, np.mean(vals), color=("#1b9e77", "#7570b3", "#999999")[k], alpha=0.8)
        ax.errorbar(k, np.mean(vals), yerr=np.std(vals, ddof=1) if len(vals) > 1 else 0, color="k", capsize=4)
        ax.scatter(
            np.full(len(vals), k) + np.linspace(-0.15, 0.15, len(vals)), vals, color="k", s=10, zorder=3
        )
    ax.axhline(0.25, ls=":", color="grey")
    ax.set_xticks(range(len(names)), ["<R>", "'at the top left'", "no relation"])
    ax.set_ylabel("position = top left (classifier)")
    ax.set_ylim(0, 1.05)
    ax.set_title("one-step student, 12 colour × shape prompts")
    rows_img = [np.concatenate(list(grids[n]), axis=1) for n in names if n in grids]
    if rows_img:
        ax_img.imshow(np.concatenate(rows_img, axis=0), interpolation="nearest")
        ax_img.set_yticks([16 + 32 * i for i in range(len(rows_img))], ["<R>", "words", "none"])
        ax_img.set_xticks([])
        ax_img.set_title("seed 0: one image per prompt (columns: colour × shape)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    raise SystemExit(main())
