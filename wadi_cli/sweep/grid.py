"""A sweep grid: a TOML file whose axes (any ``wadi distill`` config field, plus the seeds)
are crossed into cells, each trained once per seed.

Grid file::

    [sweep]
    backbone = "tiny"               # wadi distill -b / wadi eval -b
    config = "tiny_paper"           # optional: --config of every run (a path or a shipped name)
    eval = "-n 500 --seed 0"        # wadi eval flags (the same fixed images and noise for every cell)
    metric = "fd"                   # the metric of the tables and plots (a column of RUN/eval.csv)
    baseline = {adapter = "lorad"}  # paired differences: each cell against the cell with these values
    out = "runs"                    # run folders, results and plots (relative to this file; --out)
    analyze = true                  # also `wadi analyze RUN`: NM / DM columns (norm / direction change)

    [fixed]                         # one value for every cell (any config field)
    max_steps = 400

    [grid]                          # the axes: a list of values each; cells = their product
    adapter = ["lorad", "lora"]
    rank = [4, 8]
    seed = [0, 1, 2]                # the replicates of every cell (paired across cells)

A linked axis sets several fields together (e.g. kinds at matched trainable parameters)::

    "adapter+rank" = [["lorad", 4], ["lora", 3], ["full", 0]]

A cell is named by its axis values (``adapter=lora,rank=4``) and each of its seeds trains in
the run folder ``OUT/runs/adapter-lora_rank-4/seed-0``. Every value is checked against the
config's field types when the grid is read, and every cell resolves as ``wadi distill`` would
resolve it (:func:`check_cells`), so a bad grid fails before anything trains.
"""

from __future__ import annotations

import itertools
import os
import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomllib

from wadi_cli.errors import BadInputError

#: Joins the fields of a linked axis (``"adapter+rank" = [["lorad", 4], ["lora", 3]]``).
LINK = "+"
SWEEP_KEYS = ("backbone", "config", "eval", "metric", "baseline", "out", "analyze")
#: What ``[sweep]`` means when it does not say (``out`` defaults to a folder next to the file).
DEFAULT_EVAL = "-n 500 --seed 0"
DEFAULT_METRIC = "fd"


@dataclass(frozen=True)
class Cell:
    """One combination of axis values (``values``: axis → value, in the grid's axis order)."""

    values: tuple[tuple[str, Any], ...]

    @property
    def name(self) -> str:
        """``adapter=lora,rank=4`` (``all`` for a grid without axes besides the seeds)."""
        return ",".join(f"{k}={_show(v)}" for k, v in self.values) or "all"

    @property
    def folder(self) -> str:
        """The cell's folder name (``adapter-lora_rank-4``): the name with path-safe characters."""
        text = "_".join(f"{k}-{_show(v)}" for k, v in self.values) or "all"
        return re.sub(r"[^A-Za-z0-9._-]", "-", text)

    def as_dict(self) -> dict[str, Any]:
        """The axis values as a dict."""
        return dict(self.values)


@dataclass
class Grid:
    """A parsed grid file (see the module docstring)."""

    path: Path
    backbone: str
    config: str | None
    eval: list[str]
    metric: str
    baseline: dict[str, Any]
    out: Path
    fixed: dict[str, Any]
    axes: dict[str, list[Any]]
    seeds: list[int]
    cells: list[Cell] = field(default_factory=list)
    analyze: bool = False

    def run_dir(self, cell: Cell, seed: int) -> Path:
        """The run folder of ``cell`` with ``seed``."""
        return self.out / "runs" / cell.folder / f"seed-{seed}"

    @property
    def fields(self) -> list[str]:
        """The config fields the axes set, in order (a linked axis ``a+b`` sets ``a`` and ``b``)."""
        return [f for axis in self.axes for f in axis.split(LINK)]

    def baseline_of(self, cell: Cell) -> Cell | None:
        """The cell ``cell`` is compared with: its values with the baseline's replaced
        (``None`` without a baseline); on a linked axis the whole value that has the
        baseline's fields (``adapter = "lorad"`` picks ``["lorad", 4]``) replaces the cell's."""
        if not self.baseline:
            return None
        wanted = dict(self.baseline)
        for axis, values in self.axes.items():
            names = axis.split(LINK)
            if len(names) > 1 and wanted.keys() & set(names):
                match = next(
                    v for v in values if all(wanted.get(n, x) == x for n, x in zip(names, v, strict=True))
                )
                wanted.update(zip(names, match, strict=True))
        return Cell(tuple((k, wanted.get(k, v)) for k, v in cell.values))


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return f"{value:g}" if isinstance(value, float) else str(value)


def load_grid(path: str | os.PathLike[str], out: str | os.PathLike[str] | None = None) -> Grid:
    """Read and check a grid file: unknown fields, values of the wrong type, empty axes and a
    baseline that names no cell are :class:`BadInputError` (one line each)."""
    from wadi_cli.distill.config import check_config_values

    p = Path(path).expanduser()
    try:
        doc = tomllib.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise BadInputError(f"cannot read grid file {p}: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise BadInputError(f"{p}: not valid TOML ({exc})") from None
    unknown = sorted(set(doc) - {"sweep", "fixed", "grid"})
    if unknown:
        raise BadInputError(f"{p}: unknown table(s) {', '.join(unknown)}; expected [sweep], [fixed], [grid]")
    head, fixed, grid = (_table(p, doc, name) for name in ("sweep", "fixed", "grid"))
    bad = sorted(set(head) - set(SWEEP_KEYS))
    if bad:
        raise BadInputError(f"{p}: unknown [sweep] key(s) {', '.join(bad)}; expected {', '.join(SWEEP_KEYS)}")
    seeds = grid.pop("seed", [0])
    axes: dict[str, list[Any]] = {}
    for name, values in [("seed", seeds), *grid.items()]:
        if not isinstance(values, list):
            raise BadInputError(f"{p}: [grid] {name} must be a list of values, got {values!r}")
        if not values:
            raise BadInputError(f"{p}: [grid] {name} is an empty axis")
        if len(set(map(repr, values))) != len(values):
            raise BadInputError(f"{p}: [grid] {name} repeats a value")
        if name != "seed":
            axes[name.replace("-", "_")] = values
    if any(isinstance(s, bool) or not isinstance(s, int) for s in seeds):
        raise BadInputError(f"{p}: [grid] seed must be a list of integers, got {seeds!r}")
    linked = {f for axis in axes for f in axis.split(LINK)}
    for name in ("seed", "backbone"):
        if name in fixed or name in linked:
            raise BadInputError(
                f"{p}: {name} is set by [grid] seed / [sweep] backbone, not as a config field"
            )
    fixed = check_config_values(f"{p} [fixed]", fixed)
    fields: list[str] = []
    for name, values in axes.items():
        names = name.split(LINK)
        for value in values:
            if len(names) > 1 and (not isinstance(value, list) or len(value) != len(names)):
                raise BadInputError(
                    f"{p}: [grid] {name}: each value must be a list of {len(names)} ({', '.join(names)}), "
                    f"got {value!r}"
                )
            parts = value if len(names) > 1 else [value]
            check_config_values(f"{p} [grid] {name}", dict(zip(names, parts, strict=True)))
        fields += names
    repeated = sorted({f for f in fields if fields.count(f) > 1})
    if repeated:
        raise BadInputError(f"{p}: [grid] sets {', '.join(repeated)} on more than one axis")
    overlap = sorted(set(fixed) & set(fields))
    if overlap:
        raise BadInputError(f"{p}: {', '.join(overlap)} is both [fixed] and a [grid] axis")
    baseline = head.get("baseline", {})
    if not isinstance(baseline, Mapping):
        raise BadInputError(
            f'{p}: [sweep] baseline must be a table of axis values, e.g. {{adapter = "lorad"}}'
        )
    cells = [_cell(axes, combo) for combo in itertools.product(*axes.values())]
    for name, value in baseline.items():
        if not any(dict(c.values).get(name, object()) == value for c in cells):
            raise BadInputError(f"{p}: baseline {name} = {value!r} is not a value of a [grid] axis")
    analyze = head.get("analyze", False)
    if not isinstance(analyze, bool):
        raise BadInputError(f"{p}: [sweep] analyze must be true or false, got {analyze!r}")
    return Grid(
        path=p,
        backbone=str(head.get("backbone", "tiny")),
        config=head.get("config"),
        eval=shlex.split(str(head.get("eval", DEFAULT_EVAL))),
        metric=str(head.get("metric", DEFAULT_METRIC)),
        baseline=dict(baseline),
        out=Path(out).expanduser() if out is not None else p.parent / str(head.get("out", p.stem)),
        fixed=fixed,
        axes=axes,
        seeds=list(seeds),
        cells=cells,
        analyze=analyze,
    )


def _cell(axes: Mapping[str, list[Any]], combo: tuple[Any, ...]) -> Cell:
    """The cell of one value per axis: a linked axis contributes each of its fields."""
    values: list[tuple[str, Any]] = []
    for axis, value in zip(axes, combo, strict=True):
        names = axis.split(LINK)
        values += zip(names, value, strict=True) if len(names) > 1 else [(axis, value)]
    return Cell(tuple(values))


def _table(p: Path, doc: Mapping[str, Any], name: str) -> dict[str, Any]:
    value = doc.get(name, {})
    if not isinstance(value, Mapping):
        raise BadInputError(f"{p}: [{name}] must be a table")
    return dict(value)


def overrides(grid: Grid, cell: Cell, seed: int) -> dict[str, Any]:
    """The config values of ``cell`` with ``seed`` on top of the recipe (and ``config``)."""
    return {"backbone": grid.backbone, **grid.fixed, **cell.as_dict(), "seed": seed}


def check_cells(grid: Grid) -> None:
    """Resolve every cell as ``wadi distill`` would (ranges, kinds, the recipe's own checks):
    the first cell that does not resolve is a :class:`BadInputError` naming it."""
    from wadi_cli.distill.config import resolve_config

    for cell in grid.cells:
        try:
            resolve_config(grid.config, overrides(grid, cell, grid.seeds[0]))
        except BadInputError as exc:
            raise BadInputError(f"{grid.path}: cell {cell.name}: {exc}") from None


def distill_args(grid: Grid, cell: Cell, seed: int, run: Path, resume: bool = False) -> list[str]:
    """``wadi`` arguments that train ``cell`` with ``seed`` into ``run`` (continuing its latest
    checkpoint with ``resume``)."""
    from wadi_cli.distill.config import field_kind, flag_name

    args = ["distill", "-b", grid.backbone, "--out", str(run), "--seed", str(seed)]
    if grid.config is not None:
        args += ["--config", str(grid.config)]
    for name, value in {**grid.fixed, **cell.as_dict()}.items():
        flag = flag_name(name)
        if field_kind(name) is bool:
            args.append(flag if value else "--no-" + flag[2:])
        else:
            args += [flag, repr(value) if isinstance(value, float) else str(value)]
    return [*args, "--resume", "latest"] if resume else args


def eval_args(grid: Grid, run: Path) -> list[str]:
    """``wadi`` arguments that score every checkpoint of ``run`` into ``RUN/eval.csv``."""
    return ["eval", "-b", grid.backbone, "--watch", str(run), *grid.eval]


#: Where ``[sweep] analyze = true`` has ``wadi analyze RUN`` write its report (in the run folder).
ANALYSIS_DIR = "analysis"


def analyze_args(run: Path) -> list[str]:
    """``wadi`` arguments that compare the run's latest student with its base (``RUN/analysis/``)."""
    return ["analyze", str(run), "--out", str(run / ANALYSIS_DIR), "--no-plots"]
