"""Downstream uses of the tiny one-step student, measured: image-to-image (SDEdit) at strengths
0.2…1.0 with the student (one step at t = round(s·999)) and the teacher (25-step DDIM,
the last int(25·s) steps) side by side, and high resolution (64 px, twice the native 32 px):
direct large sampling vs upscale-and-refine vs bicubic upscaling of the native image.

Image-to-image: prompt i asks for attributes A_i; its init image is a freshly rendered real
image of *other* random attributes B_i, so ``accuracy`` (the shipped classifier: colour, shape
and position all those of the prompt) measures how far the prompt wins, ``init_kept`` (all
three attributes those of the init image) how far the init image wins, and ``dist_init`` is
the mean absolute pixel difference to the init image (0–255). High resolution: the
classifier works at 32 px, so 64-px images are scored after a PIL box downsample to 32 px
(say so when quoting them); ``sharpness`` is the mean absolute 4-neighbour Laplacian at
64 px, ``dist_bicubic`` the mean absolute difference to the bicubic upscale of the native
image.

    PYTHONPATH=. python3 analysis/downstream_tiny/run.py            # n = 256, ~6 min on 2 cores
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from wadi_cli.pipeline import SampleConfig, generate, load_pipeline
from wadi_cli.pipeline.generation import refined
from wadi_cli.pipeline.img2img import upscale_images
from wadi_cli.tiny.classifier import attribute_matches, load_classifier, predict
from wadi_cli.tiny.data import prompt_for, render_batch, sample_attributes
from wadi_cli.tiny.metrics import evaluate_images

HERE = Path(__file__).resolve().parent
STRENGTHS = (0.2, 0.4, 0.6, 0.8, 1.0)
REFINE = (0.2, 0.3, 0.5)
#: the teacher's refining runs (25·s steps at 64 px each; its direct 64-px run only with --teacher-direct)
TEACHER_REFINE = (0.3,)
FIELDS = ("part", "sampler", "method", "strength", "accuracy", "init_kept", "fd", "dist_init", "sharpness",
          "dist_bicubic", "seconds")  # fmt: skip


def all_match(images: np.ndarray, attrs: list, classifier) -> float:
    match = attribute_matches(predict(images, classifier), attrs)
    return float(np.logical_and.reduce(list(match.values())).mean())


def down(images: np.ndarray, side: int = 32) -> np.ndarray:
    """PIL box filter to ``side`` px (the classifier's input size)."""
    return np.stack(
        [np.asarray(Image.fromarray(im).resize((side, side), Image.Resampling.BOX)) for im in images]
    )


def laplacian(images: np.ndarray) -> float:
    x = images.astype(np.float64).mean(axis=-1)
    lap = 4 * x[:, 1:-1, 1:-1] - x[:, :-2, 1:-1] - x[:, 2:, 1:-1] - x[:, 1:-1, :-2] - x[:, 1:-1, 2:]
    return float(np.abs(lap).mean())


def scored(images, attrs, classifier, real_seed, **extra) -> dict:
    m = evaluate_images(images, attrs, real_seed, classifier)
    return {"accuracy": m["accuracy"], "fd": m["fd"], **extra}


def img2img_rows(pipes, prompts, attrs, init, init_attrs, classifier, seed, batch) -> tuple[list, dict]:
    rows, shown = [], {}
    for name, pipe in pipes.items():
        for s in (None, *STRENGTHS):
            t0 = time.perf_counter()
            cfg = SampleConfig(teacher=name == "teacher", seed=seed, batch_size=batch, strength=s)
            images = generate(pipe, prompts, cfg, init_images=None if s is None else init).images
            sec = time.perf_counter() - t0
            rows.append(
                {
                    "part": "img2img",
                    "sampler": name,
                    "method": "text-to-image" if s is None else "init image",
                    "strength": "" if s is None else s,
                    **scored(images, attrs, classifier, seed + 1),
                    "init_kept": all_match(images, init_attrs, classifier),
                    "dist_init": float(np.abs(images.astype(int) - init.astype(int)).mean()),
                    "seconds": round(sec, 2),
                }
            )
            shown[(name, s)] = images[:6]
            print(rows[-1], flush=True)
    return rows, shown


def highres_rows(pipes, prompts, attrs, classifier, seed, batch, teacher_direct) -> tuple[list, dict]:
    rows, shown = [], {}
    for name, pipe in pipes.items():
        teacher = name == "teacher"
        base = SampleConfig(teacher=teacher, seed=seed, batch_size=batch)
        native = generate(pipe, prompts, base).images
        bicubic = upscale_images(native, 2)
        runs = {"native 32 px": (native, 0.0), "bicubic ×2": (bicubic, 0.0)}
        if not teacher or teacher_direct:
            t0 = time.perf_counter()
            direct = generate(pipe, prompts, dataclasses.replace(base, height=64, width=64)).images
            runs["direct 64 px"] = (direct, time.perf_counter() - t0)
        for r in REFINE if not teacher else TEACHER_REFINE:
            t0 = time.perf_counter()
            cfg = dataclasses.replace(base, upscale=2, refine_strength=r).resolved(
                pipe.backbone, pipe.alpha_bar_T
            )
            seeds = [seed + i for i in range(len(prompts))]
            out = np.concatenate(
                [
                    refined(
                        pipe, prompts[lo : lo + batch], cfg, seeds[lo : lo + batch], native[lo : lo + batch]
                    )
                    for lo in range(0, len(prompts), batch)
                ]
            )  # the second stage of --upscale 2 on the native images above (the first stage is theirs)
            runs[f"upscale ×2 + refine {r}"] = (out, time.perf_counter() - t0)
        for method, (images, sec) in runs.items():
            small = images if images.shape[1] == 32 else down(images)
            big = images if images.shape[1] == 64 else None
            rows.append(
                {
                    "part": "highres",
                    "sampler": name,
                    "method": method,
                    "strength": "",
                    **scored(small, attrs, classifier, seed + 1),
                    "sharpness": "" if big is None else laplacian(big),
                    "dist_bicubic": ""
                    if big is None
                    else float(np.abs(big.astype(int) - bicubic.astype(int)).mean()),
                    "seconds": round(sec, 2) if sec else "",
                }
            )
            shown[(name, method)] = images[:6]
            print(rows[-1], flush=True)
    return rows, shown


def tile(rows_of_images: list[tuple[str, np.ndarray]], side: int, path: Path) -> None:
    """One row per entry (label, (k, H, W, 3)), every image nearest-resized to ``side``."""
    from PIL import ImageDraw

    label_w, pad = 150, 2
    k = max(len(ims) for _, ims in rows_of_images)
    canvas = Image.new("RGB", (label_w + k * (side + pad), len(rows_of_images) * (side + pad)), "white")
    draw = ImageDraw.Draw(canvas)
    for r, (label, ims) in enumerate(rows_of_images):
        y = r * (side + pad)
        draw.text((4, y + side // 2 - 6), label, fill="black")
        for c, im in enumerate(ims):
            canvas.paste(
                Image.fromarray(im).resize((side, side), Image.Resampling.NEAREST),
                (label_w + c * (side + pad), y),
            )
    canvas.save(path)


def table(rows: list[dict]) -> str:
    def f(v, digits=3):
        return f"{v:.{digits}f}" if isinstance(v, float) else str(v)

    head = "| part | sampler | method | s | accuracy | init kept | fd | dist init | sharpness | dist bicubic "
    head += "| s/run |"
    out = [head, "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(
            "| " + " | ".join(f(r.get(k, "")) if k not in ("fd", "dist_init", "sharpness", "dist_bicubic")
                              else f(r.get(k, ""), 2) for k in FIELDS[:-1] + ("seconds",)) + " |"
        )  # fmt: skip
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", type=int, default=256, help="prompts (= images per row)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ap.add_argument(
        "--teacher-direct", action="store_true", help="also the teacher's direct 64-px run (~15 min)"
    )
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    attrs = sample_attributes(args.n, args.seed + 100)
    init_attrs = sample_attributes(args.n, args.seed + 200)
    init = render_batch(init_attrs, args.seed + 200)
    prompts = [prompt_for(a) for a in attrs]
    classifier = load_classifier()
    pipes = {"student": load_pipeline("tiny"), "teacher": load_pipeline("tiny", teacher=True)}
    start = time.perf_counter()
    rows_a, shown_a = img2img_rows(
        pipes, prompts, attrs, init, init_attrs, classifier, args.seed, args.batch_size
    )
    rows_b, shown_b = highres_rows(
        pipes, prompts, attrs, classifier, args.seed, args.batch_size, args.teacher_direct
    )
    rows = rows_a + rows_b
    with (args.out / "results.csv").open("w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=FIELDS)
        w.writeheader()
        w.writerows([{k: r.get(k, "") for k in FIELDS} for r in rows])
    (args.out / "results.md").write_text(table(rows), encoding="utf-8")
    figure_a = [("init image", init[:6])] + [
        (f"{name} s={s}", ims) for (name, s), ims in shown_a.items() if s is not None
    ]
    tile(figure_a, 64, args.out / "img2img.png")
    tile([(f"{name} {m}", ims) for (name, m), ims in shown_b.items()], 64, args.out / "highres.png")
    meta = {
        "n": args.n,
        "seed": args.seed,
        "minutes": round((time.perf_counter() - start) / 60, 1),
        "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}, 1 thread",
    }
    (args.out / "run.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
