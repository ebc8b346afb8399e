"""The swap experiment (WaDi §1) as a function of the swap strength alpha, on the embedded
tiny model, for a FULL fine-tune one-step student (the paper swapped DMD2, a full fine-tune).

For every ``keep`` mode and alpha the hybrid is made with
:func:`wadi_cli.swap.swap_state_dict` and scored like ``wadi eval`` (accuracy / Fréchet
distance on the same ``N`` prompts and noise, seed 0):

- ``keep="direction"``: student directions + teacher norms (``g(a) = (1-a) g_S + a g_T``);
- ``keep="norm"``: student norms + teacher directions (great-circle path ``d_S -> d_T``).

Then the same two swaps at alpha = 1 limited to one layer family at a time (``filter``),
plus per-family weight-space numbers (how far the student's rows moved from the
teacher's in norm and in direction).

    python analysis/swap_study/alpha_sweep.py                      # trains the student first
    python analysis/swap_study/alpha_sweep.py --student RUN_OR_FILE

Without ``--student`` the student is trained by ``wadi distill`` (subprocess, temp folder).
One sampler and one classifier are loaded once; each variant's state dict is copied into
the sampler's U-Net. Writes ``results/alpha_sweep.json`` (every number, machine, date,
commands), ``results/alpha_sweep.csv`` and ``results/alpha_sweep.png``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)
KEEPS = ("direction", "norm")
KEEP_LABEL = {"direction": "student dirs + teacher norms", "norm": "student norms + teacher dirs"}
#: Layer families for the alpha = 1 filtered swaps. Together they partition the 119
#: linear/conv weights of the tiny U-Net (checked at run time).
FAMILIES: dict[str, str] = {
    "attn": r"\.attn[12]\.",  # attention projections q, k, v, out (self + cross)
    "ff+proj": r"\.ff\.|proj_in|proj_out",  # transformer feed-forward and in/out projections
    "resnets|conv": r"resnets|conv",  # resnet convs + their time_emb_proj, conv_in/out, up/down-samplers
    "time_embedding": r"^time_embedding\.",
}
#: The README's 25-step teacher (``wadi eval -b tiny --teacher --steps 25 -n 500 --seed 0``).
README_TEACHER = {"accuracy": 0.982, "fd": 7.27}


def _wadi(*args: str) -> list[str]:
    return [sys.executable, "-m", "wadi_cli", *args]


def train_student(workdir: Path, seed: int, env: dict[str, str]) -> tuple[Path, list[str], float]:
    run = workdir / "full"
    # the paper's objective, as in the demo (the tiny default adds a regression term)
    cmd = _wadi("distill", "-b", "tiny", "--adapter", "full", "--out", str(run), "--seed", str(seed),
                "--config", "tiny_paper", "--validate-every", "0", "--no-tensorboard")  # fmt: skip
    print("training the student:", shlex.join(cmd), flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    return run, cmd, time.perf_counter() - t0


def student_state(path: Path, teacher: dict[str, torch.Tensor], workdir: Path) -> tuple[dict, str, Path]:
    """The student as a full U-Net state dict (a run folder is exported merged, no EMA)."""
    from wadi_cli.distill import export_run
    from wadi_cli.swap import open_student

    if path.is_dir() and (path / "checkpoints").is_dir():  # a `wadi distill` run folder
        merged = workdir / "student_merged.safetensors"
        export_run(path, "merged", merged, ema=False, overwrite=True)
        desc = f"run folder {path}, exported merged (no EMA)"
    else:
        merged, desc = path, None
    src, kind = open_student(merged, teacher)
    state = {k: src[k].clone() for k in src}
    close = getattr(src, "close", None)
    if callable(close):
        close()
    return state, desc or kind, merged


def weight_change(teacher: dict, student: dict, names: list[str]) -> dict[str, float]:
    """Row-wise change teacher -> student over ``names`` (rows pooled over tensors).

    ``norm_rel_mean``: mean of |g_S - g_T| / g_T; ``angle_deg_mean``: mean angle between the
    row directions d_S and d_T in degrees; ``delta_energy``: sum ||W_S - W_T||_F^2;
    ``delta_rel``: ||W_S - W_T||_F / ||W_T||_F over the family.
    """
    from wadi_cli.analysis.decompose import as_matrix

    rel, ang, n_rows = 0.0, 0.0, 0
    d2, t2 = 0.0, 0.0
    for k in names:
        t, s = as_matrix(teacher[k]).double(), as_matrix(student[k]).double()
        gt, gs = t.norm(dim=1), s.norm(dim=1)
        ok = (gt > 0) & (gs > 0)
        cos = ((t[ok] * s[ok]).sum(1) / (gt[ok] * gs[ok])).clamp(-1, 1)
        rel += float(((gs[ok] - gt[ok]).abs() / gt[ok]).sum())
        ang += float(torch.rad2deg(torch.acos(cos)).sum())
        n_rows += int(ok.sum())
        d2 += float((s - t).pow(2).sum())
        t2 += float(t.pow(2).sum())
    return {
        "tensors": len(names),
        "rows": n_rows,
        "norm_rel_mean": rel / max(n_rows, 1),
        "angle_deg_mean": ang / max(n_rows, 1),
        "delta_energy": d2,
        "delta_rel": math.sqrt(d2 / t2) if t2 > 0 else float("nan"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--student", type=Path, help="run folder or merged state-dict file (default: train one)")
    ap.add_argument("--num-images", "-n", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0, help="eval seed (prompts and noise)")
    ap.add_argument("--train-seed", type=int, default=0)
    ap.add_argument("--teacher-steps", type=int, default=25)
    ap.add_argument("--noise-seeds", type=int, nargs="*", default=[1, 2, 3], help="extra student eval seeds")
    ap.add_argument("--skip-teacher", action="store_true", help="quote the README teacher, do not measure")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    t_start = time.perf_counter()

    from wadi_cli.evaluation.tiny import evaluate_tiny
    from wadi_cli.io import open_checkpoint
    from wadi_cli.pipeline import load_pipeline, load_state_strict
    from wadi_cli.swap import VARIANT_OF_KEEP, plan_swap, swap_state_dict
    from wadi_cli.tiny.arch import TINY_PIPELINE_DIR
    from wadi_cli.tiny.classifier import load_classifier

    commands: dict[str, Any] = {
        "study": shlex.join(["python", "analysis/swap_study/alpha_sweep.py", *sys.argv[1:]]),
    }
    with tempfile.TemporaryDirectory(prefix="swapstudy-") as tmp:
        workdir = Path(tmp)
        train_seconds = None
        if args.student is None:
            student_path, cmd, train_seconds = train_student(workdir, args.train_seed, env)
            # the temporary folder as TMPDIR: no machine paths in the committed results
            commands["train"] = shlex.join(["wadi", *cmd[3:]]).replace(str(workdir), "TMPDIR")
        else:
            student_path = args.student.expanduser().resolve()
            commands["train"] = "(given with --student; the study's own default is) " + shlex.join(
                [
                    "wadi",
                    "distill",
                    "-b",
                    "tiny",
                    "--adapter",
                    "full",
                    "--out",
                    "RUN",
                    "--seed",
                    str(args.train_seed),
                    "--validate-every",
                    "0",
                    "--no-tensorboard",
                ]  # fmt: skip
            )
        with open_checkpoint(TINY_PIPELINE_DIR / "unet") as src:
            teacher = {k: src[k].clone() for k in src}
        student, student_desc, merged_file = student_state(student_path, teacher, workdir)
        selected_all, swappable = plan_swap(teacher, student, None)
        fam_names = {f: plan_swap(teacher, student, rx)[0] for f, rx in FAMILIES.items()}
        covered = sorted(n for names in fam_names.values() for n in names)
        if covered != sorted(swappable):
            raise SystemExit("the layer families do not partition the swappable weights")
        changes = {"all": weight_change(teacher, student, swappable)}
        changes.update({f: weight_change(teacher, student, n) for f, n in fam_names.items()})
        total_energy = changes["all"]["delta_energy"]
        for c in changes.values():
            c["delta_energy_share"] = c["delta_energy"] / total_energy if total_energy > 0 else float("nan")

        sampler = load_pipeline("tiny", teacher=True)
        classifier = load_classifier(None)
        net = sampler.denoiser.model

        def score(state: dict, label: str, teacher_mode: bool = False) -> dict[str, Any]:
            load_state_strict(net, state, label)
            t0 = time.perf_counter()
            res, _ = evaluate_tiny(
                teacher=teacher_mode,
                steps=args.teacher_steps if teacher_mode else None,
                num_images=args.num_images,
                seed=args.seed,
                pipe=sampler,
                classifier=classifier,
            )
            out = {k: res[k] for k in ("accuracy", "fd", "steps", "cfg", "alpha_bar_T")}
            out["eval_seconds"] = round(time.perf_counter() - t0, 2)
            print(f"{label:55s} accuracy {out['accuracy']:.3f}  fd {out['fd']:8.2f}", flush=True)
            return out

        def score_seed(state: dict, seed: int) -> dict[str, Any]:
            load_state_strict(net, state, "student")
            res, _ = evaluate_tiny(num_images=args.num_images, seed=seed, pipe=sampler, classifier=classifier)
            print(f"student, eval seed {seed:<41d} accuracy {res['accuracy']:.3f}  fd {res['fd']:8.2f}")
            return {"accuracy": res["accuracy"], "fd": res["fd"]}

        rows: list[dict[str, Any]] = []
        if args.skip_teacher:
            teacher_ref = {**README_TEACHER, "steps": args.teacher_steps, "source": "README (quoted)"}
        else:
            measured = score(teacher, f"teacher ({args.teacher_steps} steps)", True)
            teacher_ref = {**measured, "source": "measured"}
        # the undistilled model sampled in one step: where "undo the whole distillation" lands
        base_one_step = score(teacher, "teacher weights, 1 step (no distillation)")
        student_ref = score(student, "student (alpha 0)")
        # scale of eval noise: the student on other prompt/noise seeds
        seed_spread = []
        for s in args.noise_seeds:
            seed_spread.append({"seed": s, **score_seed(student, s)})
        rows.append({"kind": "student", "keep": "", "alpha": 0.0, "filter": "", **student_ref})
        for keep in KEEPS:
            for alpha in ALPHAS[1:]:
                hybrid, stats = swap_state_dict(teacher, student, VARIANT_OF_KEEP[keep], alpha=alpha)
                r = score(hybrid, f"{KEEP_LABEL[keep]}, alpha {alpha}")
                rows.append({"kind": "sweep", "keep": keep, "alpha": alpha, "filter": "", **r,
                             "tensors_swapped": stats.tensors_swapped, "rows_swapped": stats.rows_swapped,
                             "rows_skipped": stats.rows_skipped})  # fmt: skip
        for fam, rx in FAMILIES.items():
            for keep in KEEPS:
                hybrid, stats = swap_state_dict(teacher, student, VARIANT_OF_KEEP[keep], alpha=1.0, filter=rx)
                r = score(hybrid, f"{KEEP_LABEL[keep]}, alpha 1, only {fam}")
                rows.append({"kind": "filter", "keep": keep, "alpha": 1.0, "filter": fam, "regex": rx, **r,
                             "tensors_swapped": stats.tensors_swapped, "rows_swapped": stats.rows_swapped,
                             "rows_skipped": stats.rows_skipped})  # fmt: skip

        # cross-check: the in-process path must give what `wadi eval` gives for the student
        cli = _wadi("eval", "-b", "tiny", "--weights", str(merged_file), "-n", str(args.num_images),
                    "--seed", str(args.seed), "--json")  # fmt: skip
        proc = subprocess.run(cli, check=True, env=env, capture_output=True, text=True)
        cli_res = json.loads(proc.stdout)
        cross = {"command": shlex.join(["wadi", *cli[3:]]).replace(str(merged_file), "STUDENT.safetensors"),
                 "accuracy": cli_res["accuracy"], "fd": cli_res["fd"],
                 "matches_in_process": abs(cli_res["accuracy"] - student_ref["accuracy"]) < 1e-9
                 and abs(cli_res["fd"] - student_ref["fd"]) < 1e-6}  # fmt: skip
        print("cross-check with `wadi eval`:", cross, flush=True)
        if args.student is None:
            commands["export"] = "wadi_cli.distill.export_run(RUN, 'merged', STUDENT.safetensors, ema=False)"

    wall = time.perf_counter() - t_start
    for r in rows:
        r["d_accuracy"] = r["accuracy"] - student_ref["accuracy"]
        r["d_fd"] = r["fd"] - student_ref["fd"]
    record = {
        "study": "swap vs alpha, full fine-tune tiny student",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "python": platform.python_version(),
            "torch": torch.__version__,
        },
        "commands": commands,
        "student": {
            "source": str(args.student) if args.student else "trained by this script",
            "description": student_desc.replace(str(workdir), "TMPDIR"),
            "train_seconds": train_seconds,
        },  # fmt: skip
        "eval": {"num_images": args.num_images, "seed": args.seed},
        "teacher": teacher_ref,
        "student_ref": student_ref,
        "base_one_step": base_one_step,
        "student_other_eval_seeds": seed_spread,
        "cli_cross_check": cross,
        "families": FAMILIES,
        "weight_change": changes,
        "rows": rows,
        "paper": {"teacher_norms_fid_delta": 0.7, "teacher_directions_fid_delta": 241},
        "wall_seconds": round(wall, 1),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "alpha_sweep.json").write_text(json.dumps(record, indent=2) + "\n")
    fields = ["kind", "keep", "alpha", "filter", "accuracy", "fd", "d_accuracy", "d_fd", "tensors_swapped",
              "rows_swapped", "eval_seconds"]  # fmt: skip
    with open(args.out / "alpha_sweep.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    plot(
        rows,
        teacher_ref,
        student_ref,
        base_one_step,
        args.out / "alpha_sweep.png",
        args.num_images,
        args.seed,
    )
    print(f"wrote {args.out}; wall time {wall:.0f} s")


def plot(rows: list[dict], teacher: dict, student: dict, base: dict, path: Path, n: int, seed: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for keep, color in zip(KEEPS, ("tab:blue", "tab:red"), strict=True):
        pts = [(0.0, student)] + [(r["alpha"], r) for r in rows if r["kind"] == "sweep" and r["keep"] == keep]
        xs = [a for a, _ in pts]
        for ax, metric in zip(axes, ("accuracy", "fd"), strict=True):
            ax.plot(xs, [r[metric] for _, r in pts], "o-", color=color, label=KEEP_LABEL[keep])
    for ax, metric in zip(axes, ("accuracy", "fd"), strict=True):
        ax.axhline(teacher[metric], color="k", ls="--", lw=1, label=f"teacher, {teacher['steps']} steps")
        ax.axhline(student[metric], color="gray", ls=":", lw=1, label="student, 1 step")
        ax.axhline(base[metric], color="tab:orange", ls="-.", lw=1, label="teacher weights, 1 step")
        ax.set_xlabel("swap strength alpha")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    axes[0].set_ylim(0, 1.02)
    axes[1].set_yscale("log")
    axes[1].set_ylabel("Fréchet distance (log)")
    axes[0].legend(fontsize=8, loc="lower left")
    fig.suptitle(f"Swap on the tiny full fine-tune one-step student (n={n}, seed {seed})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
