"""analysis/ablations_tiny: the grid files parse and every cell resolves with today's recipes,
and the README's power numbers follow from the committed adapter-study rows."""

from __future__ import annotations

import csv
import re
import statistics

import pytest
from _helpers_scripts import ANALYSIS

from wadi_cli.sweep import check_cells, load_grid, seeds_needed

STUDY = ANALYSIS / "ablations_tiny"


@pytest.mark.parametrize(("name", "cells", "seeds"), [("kinds", 8, 8), ("ranks", 12, 16)])
def test_grid_files_resolve(name, cells, seeds):
    grid = load_grid(STUDY / f"{name}.toml")
    assert (len(grid.cells), len(grid.seeds)) == (cells, seeds)
    assert grid.eval == ["-n", "2000", "--seed", "0"] and grid.config == "tiny_paper"
    check_cells(grid)


def test_power_numbers_come_from_the_adapter_study():
    rows = list(csv.DictReader((ANALYSIS / "adapter_study/results/runs.csv").open()))
    fd = {}
    for r in rows:
        fd.setdefault(r["name"], {})[int(r["seed"])] = float(r["fd"])
    base = fd["paper-lorad"]
    sds = [
        statistics.stdev(fd[k][s] - base[s] for s in base) for k in ("paper-lora", "paper-dora", "paper-full")
    ]
    assert [round(s, 2) for s in sds] == [2.54, 2.29, 2.15]
    text = (STUDY / "README.md").read_text()
    assert "2.54 (LoRA), 2.29 (DoRA) and\n2.15 fd (full), mean 2.33 fd" in text
    assert f"A 1-fd difference needs {seeds_needed(sds[2], 1.0)}–{seeds_needed(sds[0], 1.0)} seeds" in text
    sd = round(statistics.mean(sds), 2)
    table = re.findall(r"^\| (\d+)[^|]* \| (\d+\.\d+) fd \|$", text, re.M)
    assert len(table) == 6
    for n, mde in table:
        assert seeds_needed(sd, float(mde) + 0.01) <= int(n) < seeds_needed(sd, float(mde) - 0.02), (n, mde)
