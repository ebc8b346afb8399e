"""The CLI answers at once because its layer imports nothing heavy: `wadi --help`,
`wadi CMD --help` and `wadi info` run in a fresh interpreter without importing torch,
diffusers or transformers (those load inside the command bodies that need them). The
timings themselves are measured by ``analysis/bench_startup.py``, not here."""

from __future__ import annotations

import json
import subprocess
import sys

HEAVY = ("torch", "diffusers", "transformers", "safetensors", "numpy")
COMMANDS = ("analyze", "swap", "merge", "info", "sample", "eval", "distill", "export", "demo", "sweep")

PROBE = """
import json, sys
from typer.testing import CliRunner
from wadi_cli.cli.main import app
runs = {}
for argv in json.loads(sys.argv[1]):
    result = CliRunner().invoke(app, argv)
    runs[" ".join(argv)] = [result.exit_code, result.stdout]
print(json.dumps({"runs": runs, "heavy": [m for m in json.loads(sys.argv[2]) if m in sys.modules]}))
"""


def test_help_and_info_import_nothing_heavy():
    argvs = [["--help"], *[[c, "--help"] for c in COMMANDS], ["info"], ["info", "-b", "sd15", "--json"]]
    argvs += [["info", "-b", name, "--json"] for name in ("sd21", "pixart", "tiny")]
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps(argvs), json.dumps(HEAVY)],
        capture_output=True,
        text=True,
        check=True,
    )
    report = json.loads(proc.stdout)
    assert all(code == 0 for code, _ in report["runs"].values()), report["runs"]
    assert report["heavy"] == []
    # the numbers come out exactly the paper's (WaDi §2) without building a network
    plan = json.loads(report["runs"]["info -b sd15 --json"][1])
    assert plan["base_params"] == 859_520_964
    assert plan["student"] == {"rank": 256, "layers": 182, "trainable_params": 83_795_968}
    assert plan["fake"] == {"rank": 32, "layers": 160, "trainable_params": 9_378_816}
    pixart = json.loads(report["runs"]["info -b pixart --json"][1])
    assert (
        pixart["student"]["trainable_params"] == 81_219_584
        and pixart["fake"]["trainable_params"] == 20_127_744
    )
