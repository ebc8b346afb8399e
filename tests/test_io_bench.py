"""Benchmark check (slow, off by default; CI runs it): peak RSS while streaming two
full-size SD1.5 U-Net checkpoints tensor by tensor, as ``wadi analyze`` does, against
safetensors' mmap, with ``analysis/bench_streaming.py`` (whose committed results the README
quotes).

Run:  python -m pytest tests/test_io_bench.py -m slow -s
Size: WADI_BENCH_DTYPE=F32 (default; 3.44 GB per file) or F16 (1.72 GB).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "analysis" / "bench_streaming.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("bench_streaming", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_streaming"] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_streaming_two_sd15_unets_stays_under_1gb(tmp_path):
    bench = _load_script()
    result = bench.measure(tmp_path, os.environ.get("WADI_BENCH_DTYPE", "F32"))
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
