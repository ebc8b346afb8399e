"""Benchmark check (slow, off by default; CI runs it): peak RSS while streaming two
full-size SD1.5 U-Net checkpoints tensor by tensor, as ``wadi analyze`` does, against
safetensors' mmap, with ``analysis/bench_streaming.py`` (whose committed results the README
quotes).

Run:  python -m pytest tests/studies/test_io_bench.py -m slow -s
Size: WADI_BENCH_DTYPE=F32 (default; 3.44 GB per file) or F16 (1.72 GB).
"""

from __future__ import annotations

import os
import shutil

import pytest
from _helpers_scripts import load_analysis_script


@pytest.mark.slow
def test_streaming_two_sd15_unets_stays_under_1gb(tmp_path):
    tag = os.environ.get("WADI_BENCH_DTYPE", "F32")
    need = 2 * (3.44e9 if tag == "F32" else 1.72e9) * 1.1  # the two files, with 10 % to spare
    free = shutil.disk_usage(tmp_path).free
    if free < need:  # say so rather than fail on a machine with a small scratch disk
        pytest.skip(f"needs {need / 1e9:.1f} GB of scratch disk, {free / 1e9:.1f} GB free")
    bench = load_analysis_script("bench_streaming.py")
    result = bench.measure(tmp_path, tag)
    modes = result["modes"]
    print(
        "\n"
        + "\n".join(
            f"{k:9s}: peak RSS {v['peak_rss_gib']:.2f} GiB, {v['seconds']} s" for k, v in modes.items()
        )
    )
    for mode in ("wadi", "wadi+out"):
        assert modes[mode]["checksum"] == pytest.approx(modes["mmap"]["checksum"])  # same numbers either way
        assert modes[mode]["peak_rss_gib"] < 1.0
