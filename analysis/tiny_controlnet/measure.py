"""Does the one-step student keep the teacher's ControlNet adherence? The shipped tiny ControlNet
(``--controlnet tiny``, trained by ``train.py`` on the teacher only) with the teacher (25-step
DDIM, guidance 3, the ControlNet at both halves) and, unchanged, with the shipped one-step
student; the student and the teacher without control as references; rendered images as the
ceiling of the metrics.

Prompt i names attributes A_i; its control is the silhouette of a freshly rendered shape with
the same attributes (``render_with_masks``: exact position and size jittered inside the
quadrant, as in training data), so the prompt and the control agree and the control adds the
exact placement and size. Scores:

- ``iou``: the adherence, computed without any model: the shape segmented from the generated
  image (``wadi_cli.tiny.metrics.shape_masks``: pixels whose colour lies far from the
  background colour, the median of the image's border) against the control silhouette, IoU
  per image, mean with a 95 % interval (±1.96 standard errors); ``Δiou`` the paired
  difference to the student without control (same prompts and seeds), with its interval;
- ``accuracy`` (all three attributes right by the shipped classifier; 95 % binomial interval)
  and ``fd`` (classifier features against rendered images of the same attributes, n images).

    PYTHONPATH=. python3 analysis/tiny_controlnet/measure.py        # n = 384, ~5 min on 2 cores
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from wadi_cli.pipeline import SampleConfig, generate, load_pipeline
from wadi_cli.pipeline.control import load_controlnet, with_controlnet
from wadi_cli.tiny.classifier import load_classifier
from wadi_cli.tiny.data import mask_images, prompt_for, render_with_masks, sample_attributes
from wadi_cli.tiny.metrics import evaluate_images, mask_iou, shape_masks

HERE = Path(__file__).resolve().parent
FIELDS = ("sampler", "control", "iou", "iou_ci95", "d_iou", "d_iou_ci95", "accuracy", "accuracy_ci95", "fd",
          "seconds")  # fmt: skip


def half_width(x: np.ndarray) -> float:
    return float(1.96 * x.std(ddof=1) / np.sqrt(len(x)))


def row(name, control, images, masks, attrs, classifier, real_seed, reference, seconds) -> tuple:
    iou = mask_iou(shape_masks(images), masks)
    m = evaluate_images(images, attrs, real_seed, classifier)
    acc = float(m["accuracy"])
    diff = iou - reference if reference is not None else None
    out = {
        "sampler": name,
        "control": control,
        "iou": float(iou.mean()),
        "iou_ci95": half_width(iou),
        "d_iou": "" if diff is None else float(diff.mean()),
        "d_iou_ci95": "" if diff is None else half_width(diff),
        "accuracy": acc,
        "accuracy_ci95": float(1.96 * np.sqrt(acc * (1 - acc) / len(images))),
        "fd": float(m["fd"]),
        "seconds": round(seconds, 2),
    }
    print(out, flush=True)
    return out, iou


def figure(columns: list[tuple[str, np.ndarray]], path: Path, side: int = 64) -> None:
    """One column per entry (label, (k, 32, 32, 3)): control | teacher | student | …"""
    pad, head = 4, 16
    k = len(columns[0][1])
    canvas = Image.new("RGB", (len(columns) * (side + pad), head + k * (side + pad)), "white")
    draw = ImageDraw.Draw(canvas)
    for c, (label, ims) in enumerate(columns):
        draw.text((c * (side + pad) + 2, 2), label, fill="black")
        for r, im in enumerate(ims):
            tile = Image.fromarray(im).resize((side, side), Image.Resampling.NEAREST)
            canvas.paste(tile, (c * (side + pad), head + r * (side + pad)))
    canvas.save(path)


def example_mask(path: Path) -> None:
    """The control image of the README's command: the silhouette of a red circle at the top
    left (render_with_masks, seed 0), 32 × 32, white on black."""
    _, mask = render_with_masks([{"color": "red", "shape": "circle", "position": "top left"}], 0)
    Image.fromarray(mask_images(mask)[0]).save(path)


def table(rows: list[dict]) -> str:
    def f(v, d=3):
        return f"{v:.{d}f}" if isinstance(v, float) else str(v)

    out = ["| sampler | control | IoU (95 % CI) | ΔIoU vs student without control | accuracy (95 % CI) "
           "| fd | s |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        d = "" if r["d_iou"] == "" else f"{r['d_iou']:+.3f} ± {r['d_iou_ci95']:.3f}"
        out.append(
            f"| {r['sampler']} | {r['control']} | {f(r['iou'])} ± {f(r['iou_ci95'])} | {d} | "
            f"{f(r['accuracy'])} ± {f(r['accuracy_ci95'])} | {f(r['fd'], 2)} | {r['seconds']} |"
        )
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", type=int, default=384, help="prompts (= images per row)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--controlnet", default="tiny")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ap.add_argument("--mask", type=Path, default=HERE / "mask.png", help="the README example mask")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    attrs = sample_attributes(args.n, args.seed + 300)
    real, masks = render_with_masks(attrs, args.seed + 300)
    control = mask_images(masks)
    prompts = [prompt_for(a) for a in attrs]
    classifier = load_classifier()
    student, teacher = load_pipeline("tiny"), load_pipeline("tiny", teacher=True)
    net = load_controlnet(args.controlnet, teacher)
    runs = {
        ("student", "none"): (student, None),
        ("student", "ControlNet"): (with_controlnet(student, net, 1.0), control),
        ("teacher", "ControlNet"): (with_controlnet(teacher, net, 1.0), control),
        ("teacher", "none"): (teacher, None),
    }
    rows, shown, reference = [], {"control": control}, None
    rows.append(row("rendered", "(ceiling)", real, masks, attrs, classifier, args.seed + 1, None, 0.0)[0])
    for (name, kind), (pipe, ctrl) in runs.items():
        t0 = time.perf_counter()
        cfg = SampleConfig(teacher=name == "teacher", seed=args.seed, batch_size=args.batch_size)
        images = generate(pipe, prompts, cfg, control_images=ctrl).images
        r, iou = row(name, kind, images, masks, attrs, classifier, args.seed + 1, reference,
                     time.perf_counter() - t0)  # fmt: skip
        if reference is None:
            reference = iou
        rows.append(r)
        shown[f"{name}, {kind}"] = images
    with open(args.out / "results.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=FIELDS)
        w.writeheader()
        w.writerows(rows)
    (args.out / "results.md").write_text(table(rows))
    pick = slice(0, 10)
    figure(
        [("control", shown["control"][pick]), ("teacher+CN", shown["teacher, ControlNet"][pick]),
         ("student+CN", shown["student, ControlNet"][pick]), ("student", shown["student, none"][pick])],
        args.out / "control.png",
    )  # fmt: skip
    run = {"n": args.n, "seed": args.seed, "controlnet": args.controlnet, "prompts_seed": args.seed + 300,
           "real_seed": args.seed + 1, "machine": f"{platform.machine()}, {platform.processor() or '?'}, "
           f"torch {torch.__version__}, 1 thread", "date": time.strftime("%Y-%m-%d")}  # fmt: skip
    (args.out / "run.json").write_text(json.dumps(run, indent=1) + "\n")
    example_mask(args.mask)
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
