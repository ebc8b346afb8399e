"""``wadi sweep``: a grid of distillation runs (any config field × seeds), each a normal run
folder scored by ``wadi eval``, summarised with 95 % intervals over seeds and paired
differences to a baseline cell, with plots. Resumable: a finished cell is never run again."""

from wadi_cli.sweep.grid import Cell, Grid, check_cells, load_grid
from wadi_cli.sweep.report import every_pair, summarise, write_report
from wadi_cli.sweep.runner import run_sweep, subprocess_wadi
from wadi_cli.sweep.stats import (
    Interval,
    detectable_difference,
    paired_detectable,
    paired_difference,
    seeds_needed,
    t_interval,
)

__all__ = [
    "Cell",
    "Grid",
    "Interval",
    "check_cells",
    "detectable_difference",
    "every_pair",
    "load_grid",
    "paired_detectable",
    "paired_difference",
    "run_sweep",
    "seeds_needed",
    "subprocess_wadi",
    "summarise",
    "t_interval",
    "write_report",
]
