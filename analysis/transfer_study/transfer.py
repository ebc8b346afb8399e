"""Does the one-step ability of a tiny student transfer to a fine-tune of its teacher?

1. Fine-tune the shipped tiny teacher's U-Net to a shifted distribution: the same shapes and
   prompts on a dark slate background (``render(..., background=SHIFT)``), with the tiny
   model's own trainer (``analysis/tiny_model/train.py:train_unet``; text encoder and VAE
   frozen, as in most community fine-tunes), written as a pipeline folder ``WORK/ft``.
2. Score, on the tiny prompts, with the shipped classifier (accuracy, fd against plain renders)
   and fd against renders of the SHIFTED distribution (``fd_shift``):
   (a) the shipped LoRaD student merged into the fine-tune with ``wadi merge``;
   (b) the same student's weight change as a LoRA (``extract_lora``, full rank and rank 16)
       added to the fine-tune with ``wadi merge``;
   (c) students distilled from the fine-tune itself (``wadi distill -b tiny --model WORK/ft
       --config tiny_paper --seed S``);
   (d) the fine-tune in one step, undistilled;
   with the fine-tune's teacher (25 steps) as the reference, and the original teacher and
   student for context.

Usage:  python analysis/transfer_study/transfer.py [--work DIR] [--seeds 0 1] [--dry-run] [--quick]
``--quick`` is the 1-minute version the tests run (2 fine-tune steps, 1 distill step, 16 images).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
RESULTS = HERE / "results" / "transfer.json"
#: RGB factor of the shifted background (classifier accuracy on such renders: 1.000, n = 500)
SHIFT = (0.3, 0.35, 0.45)
HP = {
    "train_images": 4000,
    "train_seed": 2000,
    "finetune": {
        "name": "finetune",
        "seed": 11,
        "steps": 250,
        "batch": 32,
        "lr": 6e-4,
        "wd": 1e-2,
        "warmup": 20,
        "p_uncond": 0.1,
        "ema": 0.99,
        "ckpt_every": 250,
        "quick_eval_every": 10**9,
    },
    "eval": {"num_images": 500, "seed": 0, "real_seed": 456},
    "lora_ranks": [None, 16],  # None: full rank (the exact change)
}
QUICK = {"train_images": 64, "steps": 2, "num_images": 16, "distill_steps": 1}


def _tiny_trainer():
    """``analysis/tiny_model/train.py`` as a module (its ``train_unet`` and ``encode_all``)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("tiny_train", ROOT / "analysis" / "tiny_model" / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def wadi(*args: object) -> str:
    """Run the wadi CLI (this checkout) and return its stdout; a failure stops the study."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "wadi_cli", *map(str, args)]
    print("$ wadi " + " ".join(map(str, args)), flush=True)
    return subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout


def finetune(work: Path, hp: dict) -> Path:
    """The fine-tuned pipeline folder (skipped when it exists)."""
    from wadi_cli.tiny import arch
    from wadi_cli.tiny.data import attrs_to_indices, render_batch, sample_attributes

    out = work / "ft"
    if arch.tiny_pipeline_available(out):
        return out
    train = _tiny_trainer()
    pipe = arch.load_tiny_pipeline()
    comps = {k: getattr(pipe, k) for k in ("unet", "text_encoder", "tokenizer", "scheduler", "vae")}
    comps["text_encoder"].requires_grad_(False)  # U-Net only: AdamW skips parameters without grads
    attrs = sample_attributes(hp["train_images"], hp["train_seed"])
    images = render_batch(attrs, hp["train_seed"], background=SHIFT)
    with torch.no_grad():
        mean, std = train.encode_all(comps["vae"], images)
    unet, te = train.train_unet(comps, mean, std, attrs_to_indices(attrs), work, hp["finetune"])
    comps["unet"], comps["text_encoder"] = unet, te
    arch.save_tiny_pipeline(comps, out)
    return out


def score(name: str, hp: dict, **kwargs) -> dict:
    """``evaluate_tiny`` on the eval prompts, plus fd against renders of the shifted distribution."""
    from wadi_cli.evaluation.tiny import evaluate_tiny
    from wadi_cli.tiny.classifier import load_classifier
    from wadi_cli.tiny.data import render_batch, sample_attributes
    from wadi_cli.tiny.metrics import feature_statistics, features, frechet_distance

    ev = hp["eval"]
    clf = load_classifier()
    result, gen = evaluate_tiny(
        num_images=ev["num_images"], seed=ev["seed"], real_seed=ev["real_seed"], classifier=clf, **kwargs
    )
    attrs = sample_attributes(ev["num_images"], ev["seed"])
    fake = feature_statistics(features(gen.images, clf))
    real = feature_statistics(features(render_batch(attrs, ev["real_seed"], background=SHIFT), clf))
    row = {
        "name": name,
        "accuracy": result["accuracy"],
        "fd": result["fd"],
        "fd_shift": frechet_distance(*fake, *real),
        "per_attribute_accuracy": result["per_attribute_accuracy"],
        "steps": result["steps"],
    }
    print(json.dumps(row), flush=True)
    return row


def lora_files(work: Path, ranks: list[int | None]) -> dict[str, tuple[Path, float, int]]:
    """The shipped student's weight change as LoRA files (kohya keys), one per rank rule:
    ``{label: (file, total relative error, parameters)}``."""
    from wadi_cli.distill.export_lora import LoraRank, extract_lora
    from wadi_cli.io import load_state_dict, save_safetensors
    from wadi_cli.lorad import load_adapter, merge_adapter_into_state_dict
    from wadi_cli.tiny import TINY_PIPELINE_DIR, TINY_STUDENT_PATH

    base = load_state_dict(TINY_PIPELINE_DIR / "unet")
    tensors, _ = load_adapter(TINY_STUDENT_PATH)
    student = merge_adapter_into_state_dict(base, tensors)
    out = {}
    for r in ranks:
        rule = LoraRank(energy=1.0) if r is None else LoraRank(rank=r)
        lora, report = extract_lora(base, student, rule)
        label = "full" if r is None else f"r{r}"
        path = work / f"student-lora-{label}.safetensors"
        save_safetensors(lora, path)
        out[label] = (path, report["total_rel_error"], report["parameters"])
    return out


def plan(hp: dict, seeds: list[int], quick: bool) -> list[str]:
    """The commands the study runs (``--dry-run`` prints them)."""
    steps = ["--max-steps", str(QUICK["distill_steps"])] if quick else []
    lines = [f"fine-tune: train_unet({json.dumps(hp['finetune'])}) on {hp['train_images']} shifted renders"]
    student = "wadi_cli/assets/tiny/student.safetensors"
    lines += [f"wadi merge WORK/ft/unet {student} --out WORK/a-merged.safetensors"]
    lines += [f"wadi merge WORK/ft/unet WORK/student-lora-{r}.safetensors --out WORK/b-{r}.safetensors"
              for r in ("full", "r16")]  # fmt: skip
    lines += [
        " ".join(["wadi distill -b tiny --model WORK/ft --config tiny_paper --seed", str(s), *steps])
        + f" --out WORK/c-seed{s}"
        for s in seeds
    ]
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=HERE / "work")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--results", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    hp = json.loads(json.dumps(HP))
    if args.quick:
        hp["train_images"] = QUICK["train_images"]
        hp["finetune"].update(steps=QUICK["steps"], ckpt_every=QUICK["steps"], batch=4)
        hp["eval"]["num_images"] = QUICK["num_images"]
    if args.dry_run:
        print("\n".join(plan(hp, args.seeds, args.quick)))
        return 0
    torch.set_num_threads(1)
    from wadi_cli.tiny import TINY_STUDENT_PATH

    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    ft = finetune(work, hp)
    rows = [score("fine-tune teacher (25 steps)", hp, model=ft, teacher=True, steps=25)]
    rows.append(score("(d) fine-tune, 1 step undistilled", hp, model=ft, base=True))
    merged = work / "a-merged.safetensors"
    if not merged.exists():
        wadi("merge", ft / "unet", TINY_STUDENT_PATH, "--out", merged)
    rows.append(score("(a) LoRaD student merged into the fine-tune", hp, model=ft, weights=merged))
    for label, (path, err, params) in lora_files(work, hp["lora_ranks"]).items():
        out = work / f"b-{label}.safetensors"
        if not out.exists():
            wadi("merge", ft / "unet", path, "--out", out)
        row = score(f"(b) student change as LoRA ({label}) added to the fine-tune", hp, model=ft, weights=out)
        rows.append({**row, "lora_rel_error": err, "lora_parameters": params})
    for s in args.seeds:
        run = work / f"c-seed{s}"
        if not (run / "checkpoints").is_dir():
            steps = ["--max-steps", str(QUICK["distill_steps"])] if args.quick else []
            wadi("distill", "-b", "tiny", "--model", ft, "--config", "tiny_paper", "--seed", s, *steps,
                 "--out", run, "--validate-every", "0", "--device", "cpu")  # fmt: skip
        from wadi_cli.distill.export import run_weights

        with run_weights(run) as (file, _, _):  # the run's latest student
            rows.append(score(f"(c) distilled from the fine-tune, seed {s}", hp, model=ft, weights=file))
    rows.append(score("original teacher (25 steps)", hp, teacher=True, steps=25))
    rows.append(score("original student on the original teacher", hp))
    result = {
        "question": "does a tiny one-step student's ability transfer to a fine-tune of its teacher?",
        "shift_background_rgb_factor": SHIFT,
        "hp": hp,
        "seeds": args.seeds,
        "quick": args.quick,
        "rows": rows,
        "seconds": round(time.time() - t0, 1),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, 1 thread",
        "date": time.strftime("%Y-%m-%d"),
    }
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
