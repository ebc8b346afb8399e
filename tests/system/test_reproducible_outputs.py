"""Every file wadi writes from the same inputs is byte-identical across runs and processes:
each output format is written twice, by two fresh interpreters (their hash seeds, and so
the order of any hash map, differ), and the sha256 of every file compared.

Formats: ``export`` merged, adapter, diffusers and single-file; ``merge`` (merged and
single-file); ``swap``; ``sample`` (PNGs and ``samples.json``) and ``analyze --out`` (tables,
``spectra.npz``, plots); the time a command took goes to ``timings.json``, the one file
allowed to differ. Slow: two interpreters, ~1 min.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from _helpers_hub import SD15, shared_hub_cache, use_hub_cache
from _helpers_sample import one_torch_thread
from typer.testing import CliRunner

from wadi_cli.cli.main import app

ROOT = Path(__file__).resolve().parents[2]
#: the one file of an output that may differ between two runs (wall-clock time)
MAY_DIFFER = {"timings.json"}

_DRIVER = """
import json, sys
from typer.testing import CliRunner
from wadi_cli.cli.main import app
for args in json.loads(sys.argv[1]):
    r = CliRunner().invoke(app, args)
    if r.exit_code != 0:
        sys.exit(f"{args}: exit {r.exit_code}: {r.output} {r.stderr}")
"""


def sha256s(path: Path) -> dict[str, str]:
    """sha256 of a file, or of every file of a folder by relative path."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {
        str(p.relative_to(path)) if p != path else p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in files
        if p.name not in MAY_DIFFER
    }


def _run_in_fresh_interpreter(commands: list[list[str]], env: dict[str, str]) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", _DRIVER, json.dumps(commands)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


def _wadi(*args: object) -> None:
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, (args, result.output, result.stderr)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, pipe_dir):
    """A tiny run and an sd15 (miniature hub layout) run, 2 steps each, and the tiny base."""
    root = tmp_path_factory.mktemp("repro")
    small = ["--batch-size", "1", "--max-steps", "2", "--validate-every", "0", "--device", "cpu"]
    small += ["--no-tensorboard", "--regression-weight", "0"]
    with one_torch_thread(), pytest.MonkeyPatch.context() as mp:
        cache = shared_hub_cache()
        use_hub_cache(mp, cache)
        _wadi("distill", "-b", "tiny", "--model", pipe_dir, "--out", root / "tiny-run", *small)
        _wadi("distill", "-b", "sd15", "--rank", "4", "--fake-rank", "2", "--prompts", "smoke", "--out",
              root / "sd15-run", *small)  # fmt: skip
        _wadi("export", root / "tiny-run", "-f", "adapter", "--out", root / "adapter.safetensors")
        _wadi("export", root / "tiny-run", "-f", "merged", "--out", root / "merged.safetensors")
        _wadi("export", root / "sd15-run", "-f", "adapter", "--out", root / "sd15-adapter.safetensors")
    return {"root": root, "pipe": pipe_dir, "cache": cache}


def commands(i: dict, out: Path) -> dict[str, tuple[list[str], Path]]:
    """format -> (wadi arguments, what it writes) with every output under ``out``."""
    tiny_run, sd15_run, root = i["root"] / "tiny-run", i["root"] / "sd15-run", i["root"]
    base = i["pipe"] / "unet" / "diffusion_pytorch_model.safetensors"
    o = {k: out / k for k in ("merged", "adapter", "diffusers", "single-file", "swap", "merge", "analyze")}
    o.update({"merge single-file": out / "merge-single", "sample": out / "sample"})
    cases = {
        "merged": ["export", tiny_run, "-f", "merged", "--out", o["merged"]],
        "adapter": ["export", tiny_run, "-f", "adapter", "--out", o["adapter"]],
        "diffusers": ["export", tiny_run, "-f", "diffusers", "--out", o["diffusers"]],
        "single-file": ["export", sd15_run, "-f", "single-file", "--out", o["single-file"]],
        "merge": ["merge", base, root / "adapter.safetensors", "--out", o["merge"]],
        "merge single-file": ["merge", SD15, root / "sd15-adapter.safetensors", "-f", "single-file",
                              "--out", o["merge single-file"]],
        "swap": ["swap", base, root / "merged.safetensors", "--keep", "direction", "--out", o["swap"]],
        "analyze": ["analyze", base, root / "merged.safetensors", "--out", o["analyze"]],
        "sample": ["sample", "a red circle", "-b", "tiny", "--model", i["pipe"], "--weights",
                   root / "adapter.safetensors", "-n", "3", "--device", "cpu", "--out", o["sample"]],
    }  # fmt: skip
    return {k: ([str(a) for a in v], o[k]) for k, v in cases.items()}


@pytest.mark.slow
def test_every_format_is_byte_identical_when_written_by_two_processes(inputs, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.update(HF_HUB_CACHE=str(inputs["cache"]), HF_HUB_OFFLINE="1")
    env.pop("PYTHONHASHSEED", None)  # each interpreter draws its own hash seed
    runs = [commands(inputs, tmp_path / f"process-{n}") for n in (1, 2)]
    for run in runs:
        _run_in_fresh_interpreter([args for args, _ in run.values()], env)
    report = {}
    for fmt in runs[0]:
        first, second = sha256s(runs[0][fmt][1]), sha256s(runs[1][fmt][1])
        assert first, fmt
        report[fmt] = {"files": len(first), "identical": first == second}
        assert first == second, (fmt, {k: (v, second.get(k)) for k, v in first.items() if second.get(k) != v})
    assert any(p.suffix == ".png" for p in runs[0]["sample"][1].iterdir())
    assert (runs[0]["sample"][1] / "timings.json").is_file()  # the time went there, not into samples.json
    print(json.dumps(report))
