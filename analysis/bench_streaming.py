"""Peak memory of streaming two full-size SD1.5 U-Net checkpoints tensor by tensor.

Two safetensors files with the SD1.5 U-Net's names and shapes (from the shipped
architecture config; a constant byte pattern, never held in memory) are written under
``--workdir``; then a child process computes a per-row norm ratio over every weight
matrix of the pair, one tensor pair in memory at a time, in three ways:

- ``wadi``: ``wadi_cli.io.open_checkpoint`` (positioned reads, what ``wadi analyze`` uses);
- ``wadi+out``: the same, reading into two reused scratch buffers;
- ``mmap``: safetensors' own ``safe_open`` (memory-mapped; touched pages stay resident).

Each child's peak RSS (``ru_maxrss``) and time are recorded; the three must compute the
same number. Results go to ``analysis/results/bench_streaming.{json,md}``.

    python analysis/bench_streaming.py                # F32: two 3.44 GB files
    python analysis/bench_streaming.py --dtype F16    # two 1.72 GB files
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "analysis" / "results" / "bench_streaming.json"
MODES = ("wadi", "wadi+out", "mmap")

CHILD = """
import resource, sys, time, torch
from wadi_cli.io import open_checkpoint
from safetensors import safe_open
torch.set_num_threads(1)
mode, a, b = sys.argv[1:4]
t0 = time.time(); total = 0.0
if mode.startswith("wadi"):
    ta, tb = open_checkpoint(a), open_checkpoint(b)
    names, get_a, get_b = ta.keys(), ta.get, tb.get
    if mode == "wadi+out":  # reuse two scratch buffers: no allocation, no fresh-page faults
        big = max(ta.numel(n) for n in names)
        sa, sb = torch.empty(big), torch.empty(big)
        get_a = lambda n: ta.get(n, out=sa[: ta.numel(n)])
        get_b = lambda n: tb.get(n, out=sb[: tb.numel(n)])
else:
    ta, tb = safe_open(a, "pt"), safe_open(b, "pt")
    names, get_a, get_b = list(ta.keys()), ta.get_tensor, tb.get_tensor
for n in names:  # per-row norm ratio of two checkpoints, one tensor pair in memory at a time
    x = get_a(n)
    if x.dim() < 2:
        continue
    # fp32 maths: the float64 copy of the largest tensor (1280x2560x3x3) alone is 236 MB
    nx, ny = x.flatten(1).norm(dim=1), get_b(n).flatten(1).norm(dim=1)
    total += float((ny / nx.clamp_min(1e-12)).double().mean())
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024, round(time.time() - t0, 1), total)
"""


def sd15_unet_shapes() -> dict[str, tuple[int, ...]]:
    """Name → shape of the SD1.5 U-Net, built on the meta device (no memory, no weights)."""
    import torch
    from diffusers import UNet2DConditionModel

    from wadi_cli.io.sd_single_file import shipped_unet_config

    with torch.device("meta"):
        model = UNet2DConditionModel.from_config(shipped_unet_config("sd15"))
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def write_streaming(path: Path, shapes: dict[str, tuple[int, ...]], tag: str, fill: int) -> int:
    """Write a safetensors file without holding it in memory (header, then each tensor's
    bytes as a repeated nonzero pattern); returns the data size in bytes."""
    itemsize = {"F32": 4, "F16": 2}[tag]
    header, offset = {}, 0
    for name, shape in shapes.items():
        n = itemsize
        for d in shape:
            n *= d
        header[name] = {"dtype": tag, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    chunk = bytes([fill, 0x3C]) * (1 << 19)  # 1 MiB of a nonzero pattern
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)) + raw)
        left = offset
        while left:
            fh.write(chunk[: min(left, len(chunk))])
            left -= min(left, len(chunk))
    return offset


def measure(workdir: Path, tag: str = "F32", keep: bool = False) -> dict:
    """Write the pair, run the three modes, return the results (files removed unless ``keep``)."""
    workdir.mkdir(parents=True, exist_ok=True)
    a, b = workdir / f"teacher-{tag}.safetensors", workdir / f"student-{tag}.safetensors"
    shapes = sd15_unet_shapes()
    t0 = time.perf_counter()
    size = write_streaming(a, shapes, tag, 0x11)
    write_streaming(b, shapes, tag, 0x22)
    written = time.perf_counter() - t0
    modes = {}
    try:
        for mode in MODES:
            out = subprocess.run(
                [sys.executable, "-c", CHILD, mode, str(a), str(b)],
                capture_output=True,
                text=True,
                check=True,
            )
            rss_mb, secs, total = out.stdout.split()
            modes[mode] = {
                "peak_rss_gib": int(rss_mb) / 1024,
                "seconds": float(secs),
                "checksum": float(total),
            }
    finally:
        if not keep:
            a.unlink(missing_ok=True)
            b.unlink(missing_ok=True)
    return {"dtype": tag, "file_gb": size / 1e9, "tensors": len(shapes), "write_s": written, "modes": modes}


def markdown(result: dict) -> str:
    m, info = result["modes"], result["machine"]
    lines = [
        "# Streaming two SD1.5 U-Net checkpoints: peak memory",
        "",
        f"{result['date']} · {info['cpu']} · {info['cores']} cores · torch {info['torch']} · "
        f"load {result['load_at_start']:.1f} at start (shared machine). `{result['command']}`",
        "",
        f"Two {result['dtype']} safetensors files of {result['file_gb']:.2f} GB each "
        f"({result['tensors']} tensors, SD1.5 U-Net names and shapes); a per-row norm ratio over every "
        "weight matrix, one tensor pair at a time, in a child process.",
        "",
        "| reader | peak RSS | seconds |",
        "|---|---|---|",
    ]
    for mode in MODES:
        lines.append(f"| {mode} | {m[mode]['peak_rss_gib']:.2f} GiB | {m[mode]['seconds']:.1f} |")
    lines += ["", "All three readers computed the same checksum."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dtype", choices=("F32", "F16"), default="F32")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/wadi_bench_streaming"))
    parser.add_argument(
        "--out", type=Path, default=RESULTS, help="results JSON (a .md is written next to it)"
    )
    args = parser.parse_args(argv)
    sys.path.insert(0, str(REPO))
    from wadi_cli.machine import machine_info

    load = os.getloadavg()[0]
    result = measure(args.workdir, args.dtype)
    result.update(
        date=dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        machine=machine_info(),
        load_at_start=load,
        command="python analysis/bench_streaming.py"
        + (f" --dtype {args.dtype}" if args.dtype != "F32" else ""),
    )
    checks = [m["checksum"] for m in result["modes"].values()]
    if max(checks) - min(checks) > 1e-9 * abs(max(checks)):
        raise SystemExit(f"the readers disagree: {checks}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
