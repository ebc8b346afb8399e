"""Benchmark (slow, off by default): peak RSS while streaming two full-size SD1.5 U-Net
checkpoints tensor by tensor, as ``wadi analyze`` does; compared with safetensors' mmap.

Run:  python -m pytest tests/test_io_bench.py -m slow -s
Size: WADI_BENCH_DTYPE=F32 (default; 3.44 GB per file) or F16 (1.72 GB).
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import time

import pytest
from _helpers_io import meta_unet_shapes

from wadi_cli.io.sd_single_file import shipped_unet_config

STREAM = """
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


def _write_streaming(path, shapes: dict[str, tuple[int, ...]], tag: str, itemsize: int, fill: int) -> int:
    """Write a safetensors file without holding it in memory (header first, then each tensor)."""
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


@pytest.mark.slow
def test_streaming_two_sd15_unets_stays_under_1gb(tmp_path):
    tag = os.environ.get("WADI_BENCH_DTYPE", "F32")
    itemsize = {"F32": 4, "F16": 2}[tag]
    shapes = meta_unet_shapes(shipped_unet_config("sd15"))
    a, b = tmp_path / "teacher.safetensors", tmp_path / "student.safetensors"
    t0 = time.time()
    size = _write_streaming(a, shapes, tag, itemsize, 0x11)
    _write_streaming(b, shapes, tag, itemsize, 0x22)
    print(f"\nwrote 2 x {size / 1e9:.2f} GB ({tag}) in {time.time() - t0:.0f}s")
    results = {}
    for mode in ("wadi", "wadi+out", "mmap"):
        out = subprocess.run(
            [sys.executable, "-c", STREAM, mode, str(a), str(b)], capture_output=True, text=True, check=True
        )
        rss_mb, secs, total = out.stdout.split()
        results[mode] = (int(rss_mb), float(secs), float(total))
        print(f"{mode:5s}: peak RSS {rss_mb} MB, {secs} s")
    for mode in ("wadi", "wadi+out"):
        assert results[mode][2] == pytest.approx(results["mmap"][2])  # same numbers either way
        assert results[mode][0] < 1024
