"""DreamBooth on the tiny model, measured: LoRaD vs LoRA at equal trainable parameters on a
concept the model has never seen (a star, drawn by the same renderer: ``NOVEL_SHAPES``).

Instance set: ``--instances`` renders of a red star at the top left (render jitter only),
captioned ``"a red sks at the top left"`` ("sks": three untrained letter tokens of the tiny
BPE vocabulary, in the shape slot of the training prompts). Each run is ``wadi finetune -b
tiny`` (the library call), checkpointed every ``--every`` steps; every checkpoint (and the
base model, step 0) is sampled with the fine-tuned teacher (25 DDIM steps, CFG 3: the
sampling recipe) from the same noise for every run, and scored with the shipped classifier:

- ``subject``: subject fidelity, the mean over images of the Euclidean distance, in the
  classifier's 128-d feature space, from an image of the instance prompt to the centroid of
  ``REF_RENDERS`` held-out renders of the star (same colour and position, fresh jitter);
- ``subject_novel``: the same for prompts with a colour and/or position the instances never
  show, each against held-out star renders of the *prompted* attributes (subject kept AND
  prompt followed);
- ``color_acc`` / ``position_acc``: prompt fidelity, the classifier's colour (position)
  accuracy over the novel prompts whose colour (position) differs from the instances';
- ``copy_gap``: memorisation, the mean nearest-neighbour feature distance of the
  instance-prompt images to as many held-out renders as there are instances, minus that to the
  instance images themselves (> 0: closer to the training images than to new renders of the
  same concept; ≈ 0 for new renders);
- ``vocab_shape``: language drift, the classifier's shape accuracy for in-vocabulary prompts
  ``"a red {circle|square|triangle} at the top left"`` (the instances' colour and position).

The references (held-out renders, the instance set, circle renders, the base model) are
scored with the same functions and written as rows with ``kind`` = ``reference``.

    PYTHONPATH=. python3 analysis/dreambooth_tiny/run.py --lr-sweep   # the lr sweep (seed 100)
    PYTHONPATH=. python3 analysis/dreambooth_tiny/run.py               # the study (seeds 0-3)
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import math
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from wadi_cli.distill.export import run_weights
from wadi_cli.finetune import finetune, resolve_finetune_config
from wadi_cli.pipeline import SampleConfig, generate, load_pipeline
from wadi_cli.tiny.classifier import features, load_classifier, predict
from wadi_cli.tiny.data import ATTRIBUTES, render_batch

HERE = Path(__file__).resolve().parent
IDENTIFIER = "sks"
INSTANCE = {"color": "red", "shape": "star", "position": "top left"}
CLASS_PROMPT = "a red circle at the top left"
INSTANCE_SEED = 100  # render jitter of the instance images
HELD_OUT_SEED = 200  # render jitter of the held-out references (never trained on)
REF_RENDERS = 64
SAMPLE_SEED = 7  # the teacher's noise: the same for every run and checkpoint (paired)
#: equal trainable parameters: LoRaD r·(m + n/2) vs LoRA r·(m + n) per layer (counts printed)
RANKS = {"lorad": 16, "lora": 12}
#: lr sweep (seed 100, no prior), the same criterion for both kinds: subject_novel at the end
SWEEP_LRS = {"lorad": (3e-3, 1e-2, 3e-2), "lora": (3e-4, 1e-3, 3e-3, 1e-2)}
METRICS = ("subject", "subject_novel", "color_acc", "position_acc", "copy_gap", "vocab_shape")
FIELDS = ("part", "kind", "rank", "params", "lr", "prior", "seed", "step", *METRICS, "train_s")


def prompt(color: str, position: str) -> str:
    """The instance-style prompt: the identifier in the shape slot."""
    return f"a {color} {IDENTIFIER} at the {position}"


def novel_attrs() -> list[dict[str, str]]:
    """Every colour × position except the instances' own (15 prompts)."""
    return [
        {"color": c, "shape": "star", "position": p}
        for c in ATTRIBUTES["color"]
        for p in ATTRIBUTES["position"]
        if (c, p) != (INSTANCE["color"], INSTANCE["position"])
    ]


def instance_images(n: int) -> np.ndarray:
    return render_batch([INSTANCE] * n, INSTANCE_SEED)


# ---- scores ------------------------------------------------------------------------------
def centroid_distance(feats: np.ndarray, centroids: np.ndarray) -> float:
    """Mean over rows of ‖feats_i − centroids_i‖₂."""
    return float(np.linalg.norm(feats - centroids, axis=1).mean())


def nearest_distance(feats: np.ndarray, pool: np.ndarray) -> float:
    """Mean over rows of feats of the distance to the nearest row of ``pool``."""
    d = np.linalg.norm(feats[:, None, :] - pool[None, :, :], axis=2)
    return float(d.min(axis=1).mean())


def vae_roundtrip(images: np.ndarray, pipe=None) -> np.ndarray:
    """``images`` encoded by the tiny VAE (the mode of q(z|x), as ``wadi finetune`` encodes its
    instances) and decoded: the closest the latent model can come to them."""
    from wadi_cli.finetune.trainer import encode_latents
    from wadi_cli.pipeline import decode

    pipe = pipe if pipe is not None else load_pipeline("tiny", teacher=True)
    with torch.no_grad():
        return decode(pipe.vae, encode_latents(pipe, images))


class Scorer:
    """Classifier features of the references, computed once; scores of image sets.

    Every reference goes through the tiny VAE first (:func:`vae_roundtrip`): its decoder never
    learnt a star and draws a rounded blob for one (``README``), so a generated image is compared
    with what the model could draw at best, not with the sharp render."""

    def __init__(self, n_instances: int, classifier=None) -> None:
        self.model = classifier if classifier is not None else load_classifier()
        self.pipe = load_pipeline("tiny", teacher=True)
        self.instances = instance_images(n_instances)
        self.inst_feats = self.feats(self.instances)
        self.held_out_nn = self.feats(render_batch([INSTANCE] * n_instances, HELD_OUT_SEED + 1))
        self._centroids: dict[tuple[str, str], np.ndarray] = {}

    def roundtrip(self, images: np.ndarray) -> np.ndarray:
        return vae_roundtrip(images, self.pipe)

    def feats(self, renders: np.ndarray) -> np.ndarray:
        """Classifier features of renders after the VAE round trip."""
        return features(self.roundtrip(renders), self.model)

    def centroid(self, a: dict[str, str]) -> np.ndarray:
        key = (a["color"], a["position"])
        if key not in self._centroids:
            refs = render_batch([{**a, "shape": "star"}] * REF_RENDERS, HELD_OUT_SEED)
            self._centroids[key] = self.feats(refs).mean(axis=0)
        return self._centroids[key]

    def subject(self, images: np.ndarray, attrs: list[dict[str, str]]) -> float:
        """Centroid distance of ``images`` to held-out star renders of their ``attrs`` (through
        the VAE)."""
        cents = np.stack([self.centroid(a) for a in attrs])
        return centroid_distance(features(images, self.model), cents)

    def copy_gap(self, images: np.ndarray) -> float:
        f = features(images, self.model)
        return nearest_distance(f, self.held_out_nn) - nearest_distance(f, self.inst_feats)

    def score(self, inst=None, novel=None, novel_at=None, vocab=None, vocab_at=None) -> dict[str, float]:
        """The six scores (NaN for a set not given): ``inst`` images of the instance prompt,
        ``novel`` images of the ``novel_at`` attributes, ``vocab`` of the ``vocab_at`` ones."""
        out = dict.fromkeys(METRICS, math.nan)
        if inst is not None:
            out["subject"] = self.subject(inst, [INSTANCE] * len(inst))
            out["copy_gap"] = self.copy_gap(inst)
        if novel is not None:
            pred = predict(novel, self.model)
            new_c = [i for i, a in enumerate(novel_at) if a["color"] != INSTANCE["color"]]
            new_p = [i for i, a in enumerate(novel_at) if a["position"] != INSTANCE["position"]]
            out["subject_novel"] = self.subject(novel, novel_at)
            out["color_acc"] = float(np.mean([pred[i]["color"] == novel_at[i]["color"] for i in new_c]))
            out["position_acc"] = float(
                np.mean([pred[i]["position"] == novel_at[i]["position"] for i in new_p])
            )
        if vocab is not None:
            vpred = predict(vocab, self.model)
            out["vocab_shape"] = float(
                np.mean([p["shape"] == a["shape"] for p, a in zip(vpred, vocab_at, strict=True)])
            )
        return out


# ---- sampling ------------------------------------------------------------------------------
def sample_set(pipe, n_subject: int, n_prompt: int) -> tuple:
    """Teacher images of the instance prompt, the novel prompts and the in-vocabulary prompts,
    from noise seeded ``SAMPLE_SEED + i`` (image i of the concatenated prompt list)."""
    novel_at = [a for a in novel_attrs() for _ in range(n_prompt)]
    vocab_at = [{**INSTANCE, "shape": s} for s in ATTRIBUTES["shape"] for _ in range(n_prompt)]
    prompts = (
        [prompt(INSTANCE["color"], INSTANCE["position"])] * n_subject
        + [prompt(a["color"], a["position"]) for a in novel_at]
        + [f"a {a['color']} {a['shape']} at the {a['position']}" for a in vocab_at]
    )
    images = generate(pipe, prompts, SampleConfig(teacher=True, seed=SAMPLE_SEED, batch_size=64)).images
    a, b = n_subject, n_subject + len(novel_at)
    return images[:a], images[a:b], novel_at, images[b:], vocab_at


def checkpoint_pipe(run: Path, ckpt: Path):
    """The base teacher with a checkpoint's adapter merged in (any kind: a merged export)."""
    with run_weights(run, str(ckpt), merged=True) as (file, _, _):
        return load_pipeline("tiny", weights=file, teacher=True)


# ---- runs ----------------------------------------------------------------------------------
def train(
    kind: str, lr: float | None, prior: bool, seed: int, steps: int, every: int, inst_dir: Path, out: Path
):
    overrides = {
        "backbone": "tiny",
        "instance_images": str(inst_dir),
        "instance_prompt": prompt(INSTANCE["color"], INSTANCE["position"]),
        "adapter": kind,
        "rank": RANKS[kind],
        "lr": lr,
        "seed": seed,
        "init_seed": seed,
        "max_steps": steps,
        "checkpoint_every": every,
        "keep_last": steps // every + 1,
        "tensorboard": False,
        "device": "cpu",
    }
    if prior:
        overrides["class_prompt"] = CLASS_PROMPT
    cfg = resolve_finetune_config(overrides=overrides)  # lr None: the recipe's for this kind
    t0 = time.perf_counter()
    finetune(cfg, out)
    return time.perf_counter() - t0, cfg.lr


def adapter_params(ckpt: Path) -> int:
    """Trainable parameters = the elements of the checkpoint's adapter file."""
    from safetensors import safe_open

    with safe_open(str(ckpt / "student.safetensors"), "pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())  # noqa: SIM118 (safe_open has no __iter__)


def score_run(run: Path, scorer: Scorer, n_subject: int, n_prompt: int) -> list[tuple[int, dict, int]]:
    rows = []
    for ckpt in sorted((run / "checkpoints").iterdir()):
        step = int(ckpt.name.split("-")[1])
        parts = sample_set(checkpoint_pipe(run, ckpt), n_subject, n_prompt)
        rows.append((step, scorer.score(*parts), adapter_params(ckpt)))
    return rows


def reference_rows(scorer: Scorer, n_subject: int, n_prompt: int) -> list[dict]:
    """New star renders (raw and through the VAE: the ceiling), the instance set (through the
    VAE), circle renders through the VAE, and the base model, scored alike."""
    novel_at = [a for a in novel_attrs() for _ in range(n_prompt)]
    vocab_at = [{**INSTANCE, "shape": s} for s in ATTRIBUTES["shape"] for _ in range(n_prompt)]
    circle = {**INSTANCE, "shape": "circle"}
    star_i, star_n = (
        render_batch([INSTANCE] * n_subject, HELD_OUT_SEED + 2),
        render_batch(novel_at, HELD_OUT_SEED + 2),
    )
    circ_i = render_batch([circle] * n_subject, HELD_OUT_SEED + 2)
    circ_n = render_batch([{**a, "shape": "circle"} for a in novel_at], HELD_OUT_SEED + 2)
    vocab = render_batch(vocab_at, HELD_OUT_SEED + 3)
    rt = scorer.roundtrip
    rows = [
        ("star renders", scorer.score(star_i, star_n, novel_at, vocab, vocab_at)),
        ("star renders through the VAE (ceiling)",
         scorer.score(rt(star_i), rt(star_n), novel_at, rt(vocab), vocab_at)),
        ("instance images through the VAE", scorer.score(rt(scorer.instances))),
        ("circle renders through the VAE", scorer.score(rt(circ_i), rt(circ_n), novel_at)),
        ("base model", scorer.score(*sample_set(scorer.pipe, n_subject, n_prompt))),
    ]  # fmt: skip
    return [{"part": "reference", "kind": name, "step": 0, **s} for name, s in rows]


# ---- summary -------------------------------------------------------------------------------
def mean_ci(values: list[float]) -> tuple[float, float]:
    """Mean and half-width of its 95 % Student-t interval (NaN for one value)."""
    from scipy.stats import t

    v = np.asarray(values, np.float64)
    if len(v) < 2:
        return float(v.mean()), math.nan
    return float(v.mean()), float(t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v)))


def fmt(m: float, h: float) -> str:
    return f"{m:.3f}" if math.isnan(h) else f"{m:.3f} ± {h:.3f}"


def summarize(rows: list[dict]) -> str:
    """Markdown: references; per kind, prior and step the mean ± 95 % CI over seeds; the paired
    differences LoRaD − LoRA (same seed, prior and step)."""
    lines = ["| reference | " + " | ".join(METRICS) + " |", "|---" * (len(METRICS) + 1) + "|"]
    for r in (r for r in rows if r["part"] == "reference"):
        lines.append(f"| {r['kind']} | " + " | ".join(f"{r[m]:.3f}" for m in METRICS) + " |")
    study = [r for r in rows if r["part"] == "study"]
    groups = sorted({(r["prior"], r["step"], r["kind"]) for r in study})
    lines += [
        "",
        "| prior | step | kind | seeds | " + " | ".join(METRICS) + " |",
        "|---" * (len(METRICS) + 4) + "|",
    ]
    for prior, step, kind in groups:
        g = [r for r in study if (r["prior"], r["step"], r["kind"]) == (prior, step, kind)]
        cells = [fmt(*mean_ci([r[m] for r in g])) for m in METRICS]
        lines.append(f"| {prior} | {step} | {kind} | {len(g)} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "| prior | step | pairs | " + " | ".join(f"Δ {m}" for m in METRICS) + " |",
        "|---" * (len(METRICS) + 3) + "|",
    ]
    for prior, step in sorted({(p, s) for p, s, _ in groups}):
        by = {(r["kind"], r["seed"]): r for r in study if (r["prior"], r["step"]) == (prior, step)}
        seeds = sorted(s for k, s in by if k == "lorad" and ("lora", s) in by)
        if not seeds:
            continue
        cells = [fmt(*mean_ci([by["lorad", s][m] - by["lora", s][m] for s in seeds])) for m in METRICS]
        lines.append(f"| {prior} | {step} | {len(seeds)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    """Every score against the step: mean over seeds with its 95 % band, per kind and prior;
    dashed: held-out star renders, dotted: circle renders."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    study = [r for r in rows if r["part"] == "study"]
    refs = {r["kind"]: r for r in rows if r["part"] == "reference"}
    fig, axes = plt.subplots(2, 3, figsize=(13, 7))
    for ax, m in zip(axes.flat, METRICS, strict=True):
        for kind, prior in sorted({(r["kind"], r["prior"]) for r in study}):
            steps = sorted({r["step"] for r in study if (r["kind"], r["prior"]) == (kind, prior)})
            stats = [
                mean_ci([r[m] for r in study if (r["kind"], r["prior"], r["step"]) == (kind, prior, s)])
                for s in steps
            ]
            mu = np.array([s[0] for s in stats])
            hw = np.nan_to_num(np.array([s[1] for s in stats]))
            style = "-" if kind == "lorad" else "--"
            line = ax.plot(steps, mu, style, marker="o", ms=3, label=f"{kind}, prior {prior}")[0]
            ax.fill_between(steps, mu - hw, mu + hw, color=line.get_color(), alpha=0.15)
        for name, ls in (
            ("star renders through the VAE (ceiling)", ":"),
            ("circle renders through the VAE", "-."),
        ):
            if name in refs and not math.isnan(refs[name][m]):
                ax.axhline(refs[name][m], color="grey", ls=ls, lw=1, label=name)
        ax.set_title(m)
        ax.set_xlabel("step")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def save_grid(images: dict[str, np.ndarray], path: Path) -> None:
    """One row per label (the first 16 images, 3× nearest upscaling)."""
    rows = [np.concatenate(list(v[:16]), axis=1) for v in images.values()]
    width = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, 2), (0, width - r.shape[1]), (0, 0)), constant_values=255) for r in rows]
    img = Image.fromarray(np.concatenate(rows, axis=0))
    img.resize((img.width * 3, img.height * 3), Image.Resampling.NEAREST).save(path)


def write_csv(rows: list[dict], path: Path) -> None:
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})


def machine() -> str:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())  # fmt: skip
    versions = f"python {platform.python_version()}, torch {torch.__version__}"
    return f"{cpu}, {torch.get_num_threads()} torch thread(s), {versions}"


def git_head() -> str:
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=HERE)
    return out.stdout.strip()


# ---- main ----------------------------------------------------------------------------------
_SCORER: Scorer | None = None


def _init_worker(instances: int, threads: int, scorer: Scorer | None = None) -> None:
    global _SCORER
    torch.set_num_threads(threads)
    _SCORER = scorer if scorer is not None else Scorer(instances)


def one_run(spec: tuple) -> tuple[list[dict], dict[str, np.ndarray]]:
    """Train one run, score each of its checkpoints, delete it: ``(rows, sample grids)``."""
    kind, lr, prior, seed, args, inst_dir, work = spec
    assert _SCORER is not None
    run = work / f"{kind}-{lr}-{prior}-{seed}"
    train_s, cfg_lr = train(kind, lr, prior, seed, args.steps, args.every, inst_dir, run)
    part = "sweep" if args.lr_sweep else "study"
    rows, grids = [], {}
    for step, scores, params in score_run(run, _SCORER, args.n_subject, args.n_prompt):
        rows.append({"part": part, "kind": kind, "rank": RANKS[kind], "params": params, "lr": cfg_lr,
                     "prior": "on" if prior else "off", "seed": seed, "step": step, **scores,
                     "train_s": round(train_s, 1)})  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
    if seed == int(args.seeds.split(",")[0]) and not args.lr_sweep:
        final = sample_set(checkpoint_pipe(run, sorted((run / "checkpoints").iterdir())[-1]), args.grid, 1)
        grids[f"{kind}, prior {'on' if prior else 'off'}: instance prompt"] = final[0]
        grids[f"{kind}, prior {'on' if prior else 'off'}: novel prompts"] = final[1]
    shutil.rmtree(run)
    return rows, grids


def write_outputs(rows: list[dict], grids: dict[str, np.ndarray], args: argparse.Namespace) -> None:
    """The results CSV (and for the study its tables, curves and sample grid)."""
    write_csv(rows, args.out / ("sweep.csv" if args.lr_sweep else "results.csv"))
    if not args.lr_sweep:
        (args.out / "results.md").write_text(summarize(rows))
        plot(rows, args.out / "overfit.png")
        save_grid(grids, args.out / "samples.png")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=HERE / "results")
    p.add_argument(
        "--lr-sweep", action="store_true", help="run the lr sweep (sweep.csv) instead of the study"
    )
    p.add_argument("--seeds", default="0,1,2,3")
    p.add_argument("--kinds", default="lorad,lora")
    p.add_argument("--prior", choices=("off", "on", "both"), default="both")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--every", type=int, default=50)
    p.add_argument("--instances", type=int, default=6)
    p.add_argument("--n-subject", type=int, default=8, help="images of the instance prompt per checkpoint")
    p.add_argument("--n-prompt", type=int, default=1, help="images per novel / in-vocabulary prompt")
    p.add_argument("--grid", type=int, default=8, help="images per row of samples.png")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--jobs", type=int, default=1, help="training runs in parallel (processes)")
    return p.parse_args(argv)


def runs_of(args: argparse.Namespace) -> list[tuple[str, float | None, bool, int]]:
    """(kind, lr or None for the recipe's, prior, seed) of every training run."""
    kinds = args.kinds.split(",")
    if args.lr_sweep:
        return [(k, lr, False, 100) for k in kinds for lr in SWEEP_LRS[k]]
    priors = {"off": (False,), "on": (True,), "both": (False, True)}[args.prior]
    seeds = [int(s) for s in args.seeds.split(",")]
    return [(k, None, p, s) for p in priors for s in seeds for k in kinds]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    t_all, cpu0 = time.perf_counter(), time.process_time()
    args.out.mkdir(parents=True, exist_ok=True)
    part = "sweep" if args.lr_sweep else "study"
    work = args.out / f"_runs-{part}"
    shutil.rmtree(work, ignore_errors=True)
    inst_dir = work / "instances"
    inst_dir.mkdir(parents=True)
    scorer = Scorer(args.instances)
    for i, im in enumerate(scorer.instances):
        Image.fromarray(im).save(inst_dir / f"{i:02d}.png")
    rows = [] if args.lr_sweep else reference_rows(scorer, args.n_subject, args.n_prompt)
    grids: dict[str, np.ndarray] = {"instance images": scorer.instances}
    grids["base model: instance prompt"], grids["base model: novel prompts"] = sample_set(
        scorer.pipe, args.grid, 1
    )[:2]
    specs = [(kind, lr, prior, seed, args, inst_dir, work) for kind, lr, prior, seed in runs_of(args)]
    if args.jobs > 1:
        import multiprocessing

        pool = multiprocessing.get_context("spawn").Pool(
            args.jobs, _init_worker, (args.instances, args.threads)
        )
        results = pool.imap(one_run, specs)
    else:
        _init_worker(args.instances, args.threads, scorer)
        results = map(one_run, specs)
    for run_rows, run_grids in results:
        rows += run_rows
        grids.update(run_grids)
        write_outputs(rows, grids, args)  # after every run: an interrupted study leaves whole files
    if args.jobs > 1:
        pool.close()
        pool.join()
    shutil.rmtree(work)
    name = "sweep" if args.lr_sweep else "results"
    info = {
        "command": " ".join(
            ["PYTHONPATH=. python3 analysis/dreambooth_tiny/run.py", *(argv or sys.argv[1:])]
        ),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "params": {r["kind"]: r["params"] for r in rows if r["part"] != "reference"},
        "lr": sorted({(r["kind"], r["lr"]) for r in rows if r["part"] != "reference"}),
        "wall_s": round(time.perf_counter() - t_all, 1),
        "cpu_s": round(time.process_time() - cpu0, 1),
        "git": git_head(),
    }
    (args.out / f"{name}.json").write_text(json.dumps(info, indent=1) + "\n")
    print(json.dumps(info))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
