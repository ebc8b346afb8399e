"""What does a LoRaD Linear cost in bf16 / fp16: the default (rounded) path vs the exact
path vs an fp32 matmul, on SD- and PixArt-sized shapes.

Variants, all with a low-precision base weight ``W`` and input ``x`` and fp32 ``A``, ``B``:

- ``rounded``: :class:`wadi_cli.lorad.LoRaDLinear` as by default: one low-precision matmul
  with ``R(AB) W`` rounded to the base dtype (every change below half a step is lost);
- ``exact``: the same layer with ``exact_low_precision=True``: one matmul over the
  interleaved halves ``hi + lo`` of ``R(AB) W``, twice the inner size;
- ``fp32``: ``F.linear(x.float(), R(AB) W).to(x.dtype)``: one fp32 matmul, nothing lost.

Per shape and variant: median milliseconds of forward + backward (gradients of ``x``,
``A``, ``B``) and of a no-grad forward over ``--rounds`` rounds, the variants interleaved
within each round (a shared machine's load then hits all alike); the bytes autograd saves
for backward; and the peak bytes in use above the start during forward + backward (the C
heap's in-use bytes, glibc ``mallinfo2``, read after every aten op: an op's internal
scratch freed before it returns is not seen). One thread.

    python analysis/lorad_precision/bench_layer.py              # CPU, bf16
    python analysis/lorad_precision/bench_layer.py --device cuda --dtype bf16

Writes ``results/bench_layer.json`` and ``.md`` (``bench_layer_<device>_<dtype>`` for
other settings).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import subprocess
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

from wadi_cli.lorad import LoRaDLinear
from wadi_cli.lorad.layer import rotate_weight
from wadi_cli.machine import machine_info

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
#: (label, tokens, in n, out m): SD U-Net Linears at 512 px, batch 1 (64² / 32² / 16² latent
#: tokens, 77 text tokens for cross-attention keys), PixArt-α 256 px (256 tokens, width 1152).
SHAPES: list[tuple[str, int, int, int]] = [
    ("sd attn1.to_q 64²", 4096, 320, 320),
    ("sd ff.net.0.proj 64²", 4096, 320, 2560),
    ("sd ff.net.2 64²", 4096, 1280, 320),
    ("sd attn1.to_q 32²", 1024, 640, 640),
    ("sd attn1.to_q 16²", 256, 1280, 1280),
    ("sd21 attn2.to_k text", 77, 1024, 320),
    ("pixart attn1.to_q", 256, 1152, 1152),
    ("pixart ff.fc1", 256, 1152, 4608),
]
VARIANTS = ("rounded", "exact", "fp32")


class _MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
        "keepcost")]  # fmt: skip


def _heap_reader() -> Callable[[], int] | None:
    """Bytes in use on the C heap (glibc), or None where mallinfo2 is missing."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        fn = libc.mallinfo2
    except (OSError, AttributeError):
        return None
    fn.restype = _MallInfo2

    def in_use() -> int:
        info = fn()
        return int(info.uordblks + info.hblkhd)

    return in_use


class PeakHeap(TorchDispatchMode):
    """Peak of the C heap's in-use bytes, read after every aten op."""

    def __init__(self, read: Callable[[], int]) -> None:
        super().__init__()
        self.read = read
        self.start = read()
        self.peak = self.start

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.peak = max(self.peak, self.read())
        return out


def build(m: int, n: int, rank: int, dtype: torch.dtype, device: str, angle: float) -> LoRaDLinear:
    """A LoRaD layer on a random ``W ~ N(0, 1/n)`` (no bias) with ``|Θ| ≈ angle``."""
    g = torch.Generator().manual_seed(0)
    base = nn.Linear(n, m, bias=False)
    with torch.no_grad():
        base.weight.copy_(torch.randn(m, n, generator=g) / n**0.5)
    layer = LoRaDLinear(base.to(device=device, dtype=dtype), rank, generator=g)
    with torch.no_grad():
        layer.lorad_A.copy_(torch.randn(m, rank, generator=g) * angle / (rank * layer.lorad_B.var()) ** 0.5)
    return layer


def forward_fn(variant: str, layer: LoRaDLinear) -> Callable[[Tensor], Tensor]:
    w = layer.base_layer.weight
    if variant in ("rounded", "exact"):
        exact = variant == "exact"

        def run(x: Tensor) -> Tensor:
            layer.exact_low_precision = exact
            return layer(x)

        return run
    return lambda x: F.linear(x.float(), rotate_weight(w, layer.theta(), dtype=torch.float32)).to(x.dtype)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def saved_bytes(fn: Callable[[Tensor], Tensor], x: Tensor) -> int:
    """Bytes of the tensors autograd keeps for backward (distinct storages)."""
    seen: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = fn(x)
    del y
    return sum(seen.values())


def measure(
    fn: Callable[[Tensor], Tensor], layer: LoRaDLinear, x: Tensor, grad: Tensor, device: str
) -> dict[str, float]:
    """One forward + backward of ``grad`` and one no-grad forward: seconds, and peak bytes
    (C heap / CUDA) of the forward + backward."""
    read = _heap_reader() if device == "cpu" else None
    peak = 0  # no reader (not glibc): not measured
    layer.zero_grad(set_to_none=True)
    x.grad = None
    _sync(device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    if read is not None:
        with PeakHeap(read) as heap:
            fn(x).backward(grad)
        peak = heap.peak - heap.start
    else:
        fn(x).backward(grad)
    _sync(device)
    t1 = time.perf_counter()
    if device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated() - base
    with torch.no_grad():
        t2 = time.perf_counter()
        fn(x)
        _sync(device)
        t3 = time.perf_counter()
    return {"train_s": t1 - t0, "forward_s": t3 - t2, "peak_bytes": peak}


def bench(args: argparse.Namespace) -> list[dict]:
    dtype = DTYPES[args.dtype]
    rows = []
    for label, tokens, n, m in SHAPES:
        if args.only and args.only not in label:
            continue
        layer = build(m, n, args.rank, dtype, args.device, args.angle)
        g = torch.Generator().manual_seed(1)
        x = torch.randn(tokens, n, generator=g).to(args.device, dtype).requires_grad_(True)
        grad = torch.randn(tokens, m, generator=g).to(args.device, dtype)
        fns = {v: forward_fn(v, layer) for v in VARIANTS}
        runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
        for v in VARIANTS:  # warm-up
            measure(fns[v], layer, x, grad, args.device)
        for _ in range(args.rounds):
            for v in VARIANTS:
                runs[v].append(measure(fns[v], layer, x, grad, args.device))
        row = {"shape": label, "tokens": tokens, "in": n, "out": m}
        for v in VARIANTS:
            row[v] = {
                "train_ms": 1000 * statistics.median(r["train_s"] for r in runs[v]),
                "forward_ms": 1000 * statistics.median(r["forward_s"] for r in runs[v]),
                "peak_mb": max(r["peak_bytes"] for r in runs[v]) / 2**20,
                "saved_mb": saved_bytes(fns[v], x) / 2**20,
            }
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def markdown(doc: dict) -> str:
    m, a = doc["machine"], doc["args"]
    lines = [
        f"# LoRaD Linear in {a['dtype']} on {a['device']}: default (rounded) vs exact_low_precision vs fp32",
        "",
        f"{m['date']} · {m.get('gpu', m['cpu'])} · torch {m['torch']} · commit {m['commit']} · one thread · "
        f"{a['rounds']} interleaved rounds (medians) · rank {a['rank']} · |Θ| ≈ {a['angle']:g} · load "
        f"{m['loadavg_at_start']:.1f} at start on a machine shared with other jobs · "
        f"`{doc['command']}`",
        "",
        "ms = forward+backward (train) / no-grad forward; peak MB above the start during "
        "forward+backward; saved MB = kept by autograd for backward.",
        "",
        "| shape (tokens × in → out) | rounded train / fwd ms | exact train / fwd ms "
        "| fp32 train / fwd ms | exact / rounded (train, fwd) | fp32 / rounded (train, fwd) "
        "| peak MB r / e / f | saved MB r / e / f |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in doc["rows"]:
        o, n, f = r["rounded"], r["exact"], r["fp32"]
        lines.append(
            f"| {r['shape']} ({r['tokens']}×{r['in']}→{r['out']}) "
            f"| {o['train_ms']:.1f} / {o['forward_ms']:.1f} "
            f"| {n['train_ms']:.1f} / {n['forward_ms']:.1f} | {f['train_ms']:.1f} / {f['forward_ms']:.1f} "
            f"| {n['train_ms'] / o['train_ms']:.2f}, {n['forward_ms'] / o['forward_ms']:.2f} "
            f"| {f['train_ms'] / o['train_ms']:.2f}, {f['forward_ms'] / o['forward_ms']:.2f} "
            f"| {o['peak_mb']:.1f} / {n['peak_mb']:.1f} / {f['peak_mb']:.1f} "
            f"| {o['saved_mb']:.1f} / {n['saved_mb']:.1f} / {f['saved_mb']:.1f} |"
        )
    tot = {v: sum(r[v]["train_ms"] for r in doc["rows"]) for v in VARIANTS}
    fwd = {v: sum(r[v]["forward_ms"] for r in doc["rows"]) for v in VARIANTS}
    lines += [
        "",
        f"Sum over the shapes: train exact / rounded {tot['exact'] / tot['rounded']:.2f}, fp32 / rounded "
        f"{tot['fp32'] / tot['rounded']:.2f}; no-grad forward exact / rounded "
        f"{fwd['exact'] / fwd['rounded']:.2f}, fp32 / rounded {fwd['fp32'] / fwd['rounded']:.2f}.",
    ]
    return "\n".join(lines) + "\n"


def _rel(path: Path, root: Path) -> str:
    """``path`` relative to the repository ``root`` when inside it."""
    path = path.resolve()
    return str(path.relative_to(root)) if path.is_relative_to(root) else str(path)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--angle", type=float, default=1e-3)
    ap.add_argument("--only", default=None, help="only the shapes whose label contains this")
    ap.add_argument("--results", type=Path, default=RESULTS, help="folder of the JSON + markdown")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    root = HERE.parents[1]
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True)
    dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "wadi_cli"], cwd=root).returncode
    machine = {
        **machine_info(),
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": head.stdout.strip() + ("+dirty" if dirty else ""),
        "loadavg_at_start": os.getloadavg()[0],
    }
    if args.device.startswith("cuda"):
        machine["gpu"] = torch.cuda.get_device_name(0)
    doc = {
        "machine": machine,
        # paths relative to the repository: no machine paths in the results
        "args": {k: _rel(v, root) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "command": "python analysis/lorad_precision/bench_layer.py "
        + " ".join(f"--{k} {v}" for k, v in vars(args).items() if v is not None and k != "results"),
        "rows": bench(args),
    }
    default = (args.device, args.dtype) == ("cpu", "bf16")
    stem = "bench_layer" if default else f"bench_layer_{args.device}_{args.dtype}"
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / f"{stem}.json").write_text(json.dumps(doc, indent=2) + "\n")
    (args.results / f"{stem}.md").write_text(markdown(doc))
    print(markdown(doc))
    return doc


if __name__ == "__main__":
    main()
