"""How much of LoRaD's intended weight change survives a bf16 / fp16 base?

With ``--mixed-precision bf16|fp16`` the frozen base weight ``W`` is stored in the low
precision. The intended change of an adapted Linear is ``ΔW = R(Θ)W − W`` (exact, float64,
from the stored ``W``). Two measures of what a forward really applies:

- weight space, the rotated weight rounded to the storage dtype (what a single low-precision
  matmul multiplies with): ``applied = round(R(Θ)W) − W``;
- output space, :class:`LoRaDLinear`'s forward itself on random inputs, by default and
  with ``exact_low_precision``: ``applied_y = layer(x) − x Wᵀ`` against ``δy = x ΔWᵀ``
  (float64 references).

For each: the *applied share* ``⟨applied, ΔW⟩ / ‖ΔW‖²`` (1 = the whole change on average,
0 = none of it) and the *relative error* ``‖applied − ΔW‖ / ‖ΔW‖`` (the "share
lost"; in output space it includes the output's own rounding, which no layer can avoid).

Part 1: 1152×1152 weights (PixArt's width), ``W ~ N(0, 1/1152)``, ``Θ = angle · N(0, 1)``
at angles 1e-4, 1e-3, 1e-2. Part 2: the trained tiny adapters of the runs given with
``--run NAME=RUN_FOLDER`` (student and fake score of the last checkpoint): |Θ| distribution
and the weight-space measures on the shipped tiny U-Net's weights.

    python analysis/lorad_precision/rounding.py --run fp32-seed0=lp/fp32-seed0 ...

Writes ``results/rounding.json`` and ``results/rounding.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
from datetime import UTC, datetime
from pathlib import Path

import torch
from torch import Tensor

from wadi_cli.io import load_state_dict
from wadi_cli.lorad import LoRaDLinear, load_adapter
from wadi_cli.lorad.layer import lorad_theta, rotate_weight
from wadi_cli.machine import machine_info

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
RESULTS = HERE / "results"
TINY_UNET = ROOT / "wadi_cli/assets/tiny/pipeline/unet/diffusion_pytorch_model.safetensors"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
ANGLES = (1e-4, 1e-3, 1e-2)
HIST_EDGES = [0.0] + [10.0**e for e in range(-7, 1)] + [float("inf")]


def measures(applied: Tensor, intended: Tensor) -> dict[str, float]:
    """Applied share and relative error of ``applied`` against ``intended`` (float64)."""
    energy = float((intended * intended).sum())
    return {
        "share": float((applied * intended).sum()) / energy,
        "rel_err": float((applied - intended).norm()) / energy**0.5,
    }


def weight_space(w_lp: Tensor, theta: Tensor) -> tuple[Tensor, Tensor]:
    """(applied, intended) weight changes, float64: the rotated weight rounded to the
    storage dtype (one low-precision matmul's operand) vs the exact rotation."""
    w64 = w_lp.double()
    intended = rotate_weight(w64, theta.double()) - w64
    applied = rotate_weight(w_lp, theta).double() - w64
    return applied, intended


def output_space(w_lp: Tensor, theta: Tensor, rows: int, generator: torch.Generator) -> dict[str, dict]:
    """Output-space measures of :class:`LoRaDLinear`'s forward, default (the rotated weight
    rounded to the base dtype) and ``exact_low_precision``, on ``rows`` random inputs."""
    m, n = w_lp.shape
    x = torch.randn(rows, n, generator=generator).to(w_lp.dtype)
    x64, w64 = x.double(), w_lp.double()
    base = x64 @ w64.T
    delta = x64 @ (rotate_weight(w64, theta.double()) - w64).T
    layer = LoRaDLinear(torch.nn.Linear(n, m, bias=False, dtype=w_lp.dtype), rank=1)
    with torch.no_grad():
        layer.base_layer.weight.copy_(w_lp)
        # Θ = A B with rank 1 cannot hold an arbitrary Θ: set A = Θ, B = I via rank n/2
        layer.lorad_A = torch.nn.Parameter(theta.float().clone())
        layer.lorad_B = torch.nn.Parameter(torch.eye(n // 2))
        default = layer(x).double()
        layer.exact_low_precision = True
        exact = layer(x).double()
    return {"layer_default": measures(default - base, delta), "layer_exact": measures(exact - base, delta)}


def synthetic(seed: int, rows: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    n = 1152
    w = torch.randn(n, n, generator=g) / n**0.5
    out = []
    for angle in ANGLES:
        theta = angle * torch.randn(n, n // 2, generator=g)
        for name, dt in DTYPES.items():
            w_lp = w.to(dt)
            row = {"angle": angle, "dtype": name, "weight": measures(*weight_space(w_lp, theta))}
            row.update(output_space(w_lp, theta, rows, g))
            out.append(row)
            print(json.dumps(row), flush=True)
    return out


def theta_distribution(thetas: list[Tensor]) -> dict:
    """Quantiles and a log-binned histogram of |Θ| over every entry of every layer."""
    flat = torch.cat([t.abs().flatten() for t in thetas]).double()
    sample = flat[:: max(1, flat.numel() // 2_000_000)]  # torch.quantile's size limit
    qs = (0.1, 0.25, 0.5, 0.75, 0.9, 0.99, 1.0)
    quant = torch.quantile(sample, torch.tensor(qs, dtype=torch.float64))
    bins = zip(HIST_EDGES[:-1], HIST_EDGES[1:], strict=True)
    counts = [int(((flat >= lo) & (flat < hi)).sum()) for lo, hi in bins]
    return {
        "entries": flat.numel(),
        "mean": float(flat.mean()),
        "quantiles": {str(q): float(v) for q, v in zip(qs, quant, strict=True)},
        "histogram": {"edges": [str(e) for e in HIST_EDGES], "counts": counts},
    }


def trained(runs: dict[str, Path]) -> list[dict]:
    base = load_state_dict(TINY_UNET)
    out = []
    for name, run in runs.items():
        ckpt = sorted((run / "checkpoints").iterdir())[-1]
        for role in ("student", "fake"):
            tensors = load_adapter(ckpt / f"{role}.safetensors")[0]
            paths = sorted({k.rsplit(".", 1)[0] for k in tensors})
            thetas = {p: lorad_theta(tensors[f"{p}.lorad_A"], tensors[f"{p}.lorad_B"]) for p in paths}
            row = {"run": name, "checkpoint": str(ckpt), "role": role}
            row["theta"] = theta_distribution(list(thetas.values()))
            for dname, dt in DTYPES.items():
                pairs = [weight_space(base[f"{p}.weight"].to(dt), thetas[p]) for p in paths]
                applied = torch.cat([a.flatten() for a, _ in pairs])
                intended = torch.cat([i.flatten() for _, i in pairs])
                row[dname] = measures(applied, intended)
            out.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "theta"}), flush=True)
    return out


def markdown(doc: dict) -> str:
    m = doc["machine"]
    lines = [
        "# LoRaD under a bf16 / fp16 base: how much of the intended change is applied",
        "",
        f"{m['date']} · {m['cpu']} · torch {m['torch']} · commit {m['commit']} · `{doc['command']}`",
        "",
        "share = ⟨applied, intended⟩ / ‖intended‖² (1: all of it on average); rel err = "
        "‖applied − intended‖ / ‖intended‖. Weight space: the rotated weight rounded to the "
        "storage dtype; output space: on random inputs, the output's own rounding included.",
        "",
        "## 1152×1152, Θ = angle · N(0, 1)",
        "",
        "| angle | dtype | weight share | weight rel err | layer default: share / rel err "
        "| layer exact_low_precision: share / rel err |",
        "|---|---|---|---|---|---|",
    ]
    for r in doc["synthetic"]:
        s, o, f = r["weight"], r["layer_default"], r["layer_exact"]
        lines.append(
            f"| {r['angle']:.0e} | {r['dtype']} | {s['share']:.3f} | {s['rel_err']:.3f} | "
            f"{o['share']:.3f} / {o['rel_err']:.3f} | {f['share']:.3f} / {f['rel_err']:.3f} |"
        )
    if doc["trained"]:
        lines += [
            "",
            "## Trained tiny adapters (last checkpoint), weight space on the tiny U-Net's weights",
            "",
            "| run | role | \\|Θ\\| q10 | q50 | q90 | q99 | max | bf16 share / rel err "
            "| fp16 share / rel err |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in doc["trained"]:
            q = r["theta"]["quantiles"]
            b, h = r["bf16"], r["fp16"]
            lines.append(
                f"| {r['run']} | {r['role']} | {q['0.1']:.1e} | {q['0.5']:.1e} | {q['0.9']:.1e} | "
                f"{q['0.99']:.1e} | {q['1.0']:.1e} | {b['share']:.3f} / {b['rel_err']:.3f} | "
                f"{h['share']:.3f} / {h['rel_err']:.3f} |"
            )
        lines += ["", "\\|Θ\\| histogram (entries per bin):", ""]
        edges = doc["trained"][0]["theta"]["histogram"]["edges"]
        bins = [f"[{lo}, {hi})" for lo, hi in zip(edges[:-1], edges[1:], strict=True)]
        lines += ["| run | role | " + " | ".join(bins) + " |", "|---|---|" + "---|" * len(bins)]
        for r in doc["trained"]:
            counts = r["theta"]["histogram"]["counts"]
            lines.append(f"| {r['run']} | {r['role']} | " + " | ".join(str(c) for c in counts) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", action="append", default=[], metavar="NAME=RUN_FOLDER")
    ap.add_argument("--rows", type=int, default=512, help="random inputs for the output-space measure")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    runs = {}
    for spec in args.run:
        name, _, folder = spec.partition("=")
        runs[name] = Path(folder)
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "wadi_cli"], cwd=ROOT).returncode
    machine = {
        **machine_info(),
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": head.stdout.strip() + ("+dirty" if dirty else ""),
        "loadavg_at_start": os.getloadavg()[0],
    }
    command = "python analysis/lorad_precision/rounding.py " + " ".join(f"--run {s}" for s in args.run)
    doc = {
        "machine": machine,
        "command": command.strip(),
        "synthetic": synthetic(args.seed, args.rows),
        "trained": trained(runs),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "rounding.json").write_text(json.dumps(doc, indent=2) + "\n")
    (RESULTS / "rounding.md").write_text(markdown(doc))
    print(markdown(doc))


if __name__ == "__main__":
    main()
