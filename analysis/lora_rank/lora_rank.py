"""How small can a one-step LoRA be? The LoRA-rank study on the tiny model.

The shipped tiny LoRaD student (``wadi_cli/assets/tiny/student.safetensors``) is merged into
the tiny base U-Net; its weight change ΔW = merged − base is cut to a LoRA by exactly the
function ``wadi export --format lora`` calls (:func:`wadi_cli.distill.export_lora.extract_lora`,
kohya keys; its report is the ``lora`` field of ``wadi export --json``) for each rank rule
(``--lora-rank R`` or ``--lora-energy E``). Each LoRA file is then applied the way a diffusers
user applies it (``StableDiffusionPipeline.load_lora_weights`` + ``fuse_lora`` on the base
pipeline), the fused U-Net is written as a merged file (base + ΔW_r, checked against an
independent float64 SVD), and scored with ``wadi eval -b tiny --weights FILE -n N --seed S
--json`` in a fresh process. References: the merged student and the undistilled base in
one step (``wadi eval -b tiny --base``).

    python analysis/lora_rank/lora_rank.py                        # the committed results
    python analysis/lora_rank/lora_rank.py --dry-run              # the plan, nothing run
    python analysis/lora_rank/lora_rank.py --ranks 2 --energies --seeds 0 -n 16 --out /tmp/x
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RANKS = [1, 2, 4, 8, 16, 32]  # 64 is not a rank rule on tiny: see README (it equals energy 1)
ENERGIES = [0.9, 0.99, 1.0]
FIELDS = ["rule", "rank_min", "rank_max", "parameters", "total_rel_error", "max_fuse_error"]
FIELDS += ["seed", "accuracy", "fd"]


def wadi_eval(weights: Path | None, num: int, seed: int, base: bool = False) -> dict[str, Any]:
    """``wadi eval -b tiny [--weights FILE | --base] -n NUM --seed SEED --json`` on one thread."""
    args = ["eval", "-b", "tiny", "-n", str(num), "--seed", str(seed), "--json"]
    args += ["--base"] if base else ["--weights", str(weights)]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-m", "wadi_cli", *args], env=env, text=True, capture_output=True)
    if proc.returncode != 0:
        raise SystemExit(f"wadi {' '.join(args)} failed ({proc.returncode}): {proc.stderr[-500:]}")
    return json.loads(proc.stdout[proc.stdout.index("{") :])


def student_change() -> tuple[dict, dict, float]:
    """(base U-Net state, merged student state, the student's ᾱ_T), float32."""
    from wadi_cli.io import open_checkpoint
    from wadi_cli.io.metadata import ALPHA_BAR_T_METADATA
    from wadi_cli.lorad import load_adapter, merge_adapter_into_state_dict
    from wadi_cli.tiny import TINY_PIPELINE_DIR, TINY_STUDENT_PATH

    adapter, _ = load_adapter(TINY_STUDENT_PATH)
    with open_checkpoint(TINY_STUDENT_PATH) as src:
        meta = src.metadata()
    alpha = meta.get(ALPHA_BAR_T_METADATA) or json.loads(meta["distill_config"])["alpha_bar_T"]
    with open_checkpoint(TINY_PIPELINE_DIR, "unet") as src:
        base = {k: src.get(k) for k in src}
        merged = merge_adapter_into_state_dict(src, adapter)
    return base, merged, float(alpha)


def fused_unet(lora_file: Path) -> dict:
    """The tiny base pipeline's U-Net after diffusers' ``load_lora_weights`` + ``fuse_lora``."""
    from diffusers import StableDiffusionPipeline

    from wadi_cli.tiny import TINY_PIPELINE_DIR

    pipe = StableDiffusionPipeline.from_pretrained(
        str(TINY_PIPELINE_DIR), safety_checker=None, local_files_only=True
    )
    pipe.load_lora_weights(str(lora_file.parent), weight_name=lora_file.name)
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    return {k: v.detach().clone() for k, v in pipe.unet.state_dict().items()}


def svd_reference(delta, rank: int):
    """Independent rank-r truncation of ``delta`` (numpy float64)."""
    import numpy as np
    import torch

    mat = delta.double().reshape(delta.shape[0], -1).numpy()
    u, s, vh = np.linalg.svd(mat, full_matrices=False)
    return torch.from_numpy((u[:, :rank] * s[:rank]) @ vh[:rank]).reshape(delta.shape)


def make_lora(rule: str, base: dict, merged: dict, alpha: float, tmp: Path) -> tuple[dict[str, Any], Path]:
    """Export the LoRA of ``rule`` (``rank=R`` or ``energy=E``), fuse it with diffusers and
    write the fused U-Net: (its row fields, the fused file). ``max_fuse_error`` is the largest
    |fused − (base + ΔW_r)| over all weights, ΔW_r from numpy's SVD at the reported ranks."""
    from wadi_cli.distill.export_lora import LoraRank, extract_lora
    from wadi_cli.io import save_safetensors
    from wadi_cli.io.metadata import ALPHA_BAR_T_METADATA

    kind, value = rule.split("=")
    rank_rule = LoraRank(rank=int(value)) if kind == "rank" else LoraRank(energy=float(value))
    tensors, report = extract_lora(base, merged, rank_rule)
    lora_file = tmp / f"lora-{kind}-{value}.safetensors"
    save_safetensors(tensors, lora_file)
    fused = fused_unet(lora_file)
    ranks = {row["layer"] + ".weight": row["rank"] for row in report["layers"]}
    fuse_error = 0.0
    for k, w in base.items():
        delta = merged[k].double() - w.double()
        ref = w.double() + (svd_reference(delta, ranks[k]) if k in ranks else 0.0)
        fuse_error = max(fuse_error, float((fused[k].double() - ref).abs().max()))
    weights = tmp / f"fused-{kind}-{value}.safetensors"
    save_safetensors(fused, weights, {ALPHA_BAR_T_METADATA: str(alpha)})
    fields = {
        "rule": f"{kind} {value}",
        "rank_min": min(ranks.values()),
        "rank_max": max(ranks.values()),
        "parameters": report["parameters"],
        "total_rel_error": report["total_rel_error"],
        "max_fuse_error": fuse_error,
    }
    return fields, weights


def lora_rows(rule: str, base: dict, merged: dict, alpha: float, tmp: Path, args) -> list[dict[str, Any]]:
    """One LoRA rule, evaluated once per seed."""
    fields, weights = make_lora(rule, base, merged, alpha, tmp)
    rows = []
    for seed in args.seeds:
        result = wadi_eval(weights, args.num, seed)
        rows.append({**fields, "seed": seed, "accuracy": result["accuracy"], "fd": result["fd"]})
        print(
            f"{rule} seed {seed}: err {fields['total_rel_error']:.4f} acc {result['accuracy']:.3f} "
            f"fd {result['fd']:.2f}",
            flush=True,
        )
    return rows


def reference_rows(merged: dict, alpha: float, tmp: Path, args) -> list[dict[str, Any]]:
    """The merged student and the undistilled base, one step, per seed."""
    from wadi_cli.io import save_safetensors
    from wadi_cli.io.metadata import ALPHA_BAR_T_METADATA

    weights = tmp / "merged-student.safetensors"
    save_safetensors(merged, weights, {ALPHA_BAR_T_METADATA: str(alpha)})
    rows = []
    for seed in args.seeds:
        for rule, result in (
            ("merged student", wadi_eval(weights, args.num, seed)),
            ("undistilled base (one step)", wadi_eval(None, args.num, seed, base=True)),
        ):
            rows.append({"rule": rule, "seed": seed, "accuracy": result["accuracy"], "fd": result["fd"]})
    return rows


def write_results(rows: list[dict[str, Any]], out: Path, args) -> None:
    """``lora_rank.csv`` (one row per rule and seed), ``lora_rank.md`` (seed means), the plot."""
    out.mkdir(parents=True, exist_ok=True)
    with (out / "lora_rank.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    table = summary(rows)
    lines = [
        f"One-step accuracy and fd of `wadi eval -b tiny -n {args.num}`, mean over seeds "
        f"{', '.join(map(str, args.seeds))} (per seed: `lora_rank.csv`).",
        "",
        "| rule | ranks | LoRA parameters | total relative error | accuracy | fd |",
        "|---|---|---|---|---|---|",
    ]
    for r in table:
        ranks = "" if r["rank_min"] == r["rank_max"] == "" else f"{r['rank_min']}–{r['rank_max']}"
        ranks = str(r["rank_min"]) if r["rank_min"] == r["rank_max"] else ranks
        params = "" if r["parameters"] == "" else f"{int(r['parameters']):,}"
        err = "" if r["total_rel_error"] == "" else f"{float(r['total_rel_error']):.3f}"
        lines.append(f"| {r['rule']} | {ranks} | {params} | {err} | {r['accuracy']:.3f} | {r['fd']:.2f} |")
    (out / "lora_rank.md").write_text("\n".join(lines) + "\n")
    plot(table, out / "lora_rank.png")


def summary(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per rule: its fields and the seed means of accuracy and fd."""
    order: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        order.setdefault(row["rule"], []).append(row)
    out = []
    for group in order.values():
        first = {k: group[0].get(k, "") for k in FIELDS}
        first["accuracy"] = sum(float(g["accuracy"]) for g in group) / len(group)
        first["fd"] = sum(float(g["fd"]) for g in group) / len(group)
        out.append(first)
    return out


def plot(table: list[dict[str, Any]], path: Path) -> None:
    """Accuracy and fd against the LoRA rank (log x; the energy rules at their largest
    rank, marked), the merged student and the one-step base as horizontal lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    fixed = [r for r in table if r["rule"].startswith("rank ")]
    energy = [r for r in table if r["rule"].startswith("energy ")]
    refs = {r["rule"]: r for r in table if r["rank_min"] == ""}
    for ax, key in zip(axes, ("accuracy", "fd"), strict=True):
        ax.plot([r["rank_max"] for r in fixed], [r[key] for r in fixed], "o-", label="--lora-rank R")
        ax.plot(
            [r["rank_max"] for r in energy], [r[key] for r in energy], "s", label="--lora-energy E (max rank)"
        )
        for r in energy:
            ax.annotate(
                r["rule"].split()[1], (r["rank_max"], r[key]), textcoords="offset points", xytext=(4, 4)
            )
        for name, style in (("merged student", "g--"), ("undistilled base (one step)", "r:")):
            if name in refs:
                ax.axhline(refs[name][key], color=style[0], linestyle=style[1:], label=name)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("LoRA rank (largest over layers)")
        ax.set_ylabel(key + (" ↑" if key == "accuracy" else " ↓"))
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("tiny: one-step LoRA of the shipped LoRaD student vs rank")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ranks", type=int, nargs="*", default=RANKS)
    p.add_argument("--energies", type=float, nargs="*", default=ENERGIES)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("-n", "--num", type=int, default=500)
    p.add_argument("--no-references", action="store_true", help="skip the merged student and base rows")
    p.add_argument("--out", type=Path, default=HERE / "results")
    p.add_argument("--dry-run", action="store_true", help="print the plan, run nothing")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    rules = [f"rank={r}" for r in args.ranks] + [f"energy={e:g}" for e in args.energies]
    if args.dry_run:
        for rule in rules:
            print(f"lora {rule} -> load_lora_weights + fuse_lora -> FUSED")
            for seed in args.seeds:
                print(f"wadi eval -b tiny --weights FUSED -n {args.num} --seed {seed} --json")
        if not args.no_references:
            for seed in args.seeds:
                print(f"wadi eval -b tiny --weights MERGED -n {args.num} --seed {seed} --json")
                print(f"wadi eval -b tiny --base -n {args.num} --seed {seed} --json")
        return 0
    base, merged, alpha = student_change()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="wadi-lora-rank-") as tmp:
        for rule in rules:
            rows += lora_rows(rule, base, merged, alpha, Path(tmp), args)
        if not args.no_references:
            rows += reference_rows(merged, alpha, Path(tmp), args)
    write_results(rows, args.out, args)
    print((args.out / "lora_rank.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
