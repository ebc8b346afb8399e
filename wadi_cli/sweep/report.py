"""The tables and plots of a sweep, made from ``OUT/results.csv`` and each run's ``eval.csv``.

- ``summary.csv`` / ``summary.md``: per cell the seeds scored, the mean of the grid's metric
  with its 95 % t interval over seeds, and the paired difference to the baseline cell
  (matched by seed, its own t interval; :mod:`wadi_cli.sweep.stats`) with the smallest
  difference the pairing could detect (power 0.8); failed runs listed with their error line.
- ``pairs.csv`` (and a section of ``summary.md``): the same paired difference for every pair
  of cells, when the grid has more than two.
- ``bars.png``: mean ± interval per cell (the shape of WaDi's Table 2).
- ``convergence.csv`` / ``convergence.png``: the metric against the training step per cell
  (every kept checkpoint, scored by ``wadi eval --watch``): mean over seeds with its interval
  and, in the CSV, the paired difference to the baseline cell at each step.
- ``heatmap.png``: the mean over two axes (the shape of the paper's rank table, settings
  A–F), when the grid has exactly two (unlinked) axes.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

from wadi_cli.sweep.grid import Cell, Grid
from wadi_cli.sweep.runner import CHANGE_COLUMNS, read_eval_csv, read_results
from wadi_cli.sweep.stats import LEVEL, paired_detectable, paired_difference, t_interval

SUMMARY_COLUMNS = (
    "cell", "seeds", "failed", "mean", "low", "high", "baseline", "diff_seeds", "diff_mean", "diff_low",
    "diff_high", "diff_detectable", "nm", "dm",
)  # fmt: skip
CONVERGENCE_COLUMNS = (
    "cell", "step", "seeds", "mean", "low", "high", "baseline", "diff_seeds", "diff_mean", "diff_low",
    "diff_high", "diff_detectable",
)  # fmt: skip
PAIR_COLUMNS = ("cell", "minus", "diff_seeds", "diff_mean", "diff_low", "diff_high", "diff_detectable")
#: The paired columns of a cell that is its own baseline (or has none): empty.
NO_PAIR = dict.fromkeys(("diff_seeds", "diff_mean", "diff_low", "diff_high", "diff_detectable"), "")
#: The power at which ``diff_detectable`` is the smallest detectable difference.
POWER = 0.8


def cell_values(
    grid: Grid, rows: list[dict[str, Any]], metric: str | None = None
) -> dict[str, dict[int, float]]:
    """Cell name → {seed: ``metric`` (default: the grid's)} over the ``ok`` rows."""
    metric = metric or grid.metric
    out: dict[str, dict[int, float]] = {c.name: {} for c in grid.cells}
    for r in rows:
        if r.get("status") == "ok" and r["cell"] in out and r.get(metric, "") not in ("", None):
            out[r["cell"]][int(r["seed"])] = float(r[metric])
    return out


def summarise(grid: Grid, rows: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """One summary row per cell (:data:`SUMMARY_COLUMNS`), in grid order."""
    rows = read_results(grid) if rows is None else rows
    values = cell_values(grid, rows)
    changes = {col: cell_values(grid, rows, col) for col in CHANGE_COLUMNS}
    failed: dict[str, int] = {}
    for r in rows:
        if r.get("status") != "ok":
            failed[r["cell"]] = failed.get(r["cell"], 0) + 1
    out = []
    for cell in grid.cells:
        mine = values[cell.name]
        ci = t_interval([mine[s] for s in sorted(mine)])
        row: dict[str, Any] = {"cell": cell.name, "seeds": ci.n, "failed": failed.get(cell.name, 0)}
        row.update(mean=ci.mean, low=ci.low, high=ci.high)
        base = grid.baseline_of(cell)
        row["baseline"] = base.name if base is not None else ""
        if base is not None and base != cell:
            row.update(_pair(mine, values.get(base.name, {})))
        else:
            row.update(NO_PAIR)
        for col, by_cell in changes.items():  # mean over seeds ("" when not analyzed)
            seen = by_cell[cell.name]
            row[col] = math.fsum(seen.values()) / len(seen) if seen else ""
        out.append(row)
    return out


def _pair(cell: dict[int, float], other: dict[int, float]) -> dict[str, Any]:
    d = paired_difference(cell, other)
    detectable = paired_detectable(cell, other, power=POWER)
    return dict(
        diff_seeds=d.n, diff_mean=d.mean, diff_low=d.low, diff_high=d.high, diff_detectable=detectable
    )


def every_pair(grid: Grid, rows: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """The paired difference (``cell − minus``, :data:`PAIR_COLUMNS`) of every pair of cells,
    each pair once, in grid order (the earlier cell is ``minus``)."""
    rows = read_results(grid) if rows is None else rows
    values = cell_values(grid, rows)
    names = [c.name for c in grid.cells]
    return [
        {"cell": b, "minus": a, **_pair(values[b], values[a])}
        for i, a in enumerate(names)
        for b in names[i + 1 :]
    ]


def _verdict(row: dict[str, Any]) -> str:
    if row["diff_mean"] == "" or math.isnan(row["diff_low"]):
        return ""
    return "covers 0" if row["diff_low"] <= 0 <= row["diff_high"] else "resolved"


def _f(value: Any, fmt: str = ".3f") -> str:
    if value == "" or value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return format(value, fmt)


def markdown(
    grid: Grid,
    summary: list[dict[str, Any]],
    rows: list[dict[str, Any]],
    pairs: list[dict[str, Any]] | None = None,
) -> str:
    """``summary.md``: the per-cell table, every pair (``pairs``) and the failed runs."""
    pct = f"{LEVEL:.0%}"
    lines = [
        f"# Sweep {grid.path.name}: {grid.metric}",
        "",
        f"`wadi sweep {grid.path}`: backbone {grid.backbone}, seeds {', '.join(map(str, grid.seeds))}, "
        f"`wadi eval {' '.join(grid.eval)}`. Mean over seeds with its {pct} t interval; the paired "
        f"difference is cell − baseline over the seeds both have (t interval of the per-seed differences; "
        f"'covers 0' = not resolved; 'detectable' = the smallest true difference this pairing finds with "
        f"power {POWER:g}, from the seeds' spread of differences)."
        + (
            " NM / DM: mean over seeds of the layer-averaged relative norm change and direction change "
            "(chord) of the student against its base (`wadi analyze RUN`)."
            if grid.analyze
            else ""
        ),
        "",
        f"| cell | seeds | {grid.metric} mean | {pct} interval | baseline | difference | {pct} interval | "
        "| detectable |" + (" NM | DM |" if grid.analyze else ""),
        "|---|---|---|---|---|---|---|---|---|" + ("---|---|" if grid.analyze else ""),
    ]
    for s in summary:
        failed = f" ({s['failed']} failed)" if s["failed"] else ""
        lines.append(
            f"| {s['cell']} | {s['seeds']}{failed} | {_f(s['mean'])} | {_f(s['low'])} – {_f(s['high'])} | "
            f"{s['baseline']} | {_f(s['diff_mean'], '+.3f')} | {_f(s['diff_low'], '+.3f')} – "
            f"{_f(s['diff_high'], '+.3f')} | {_verdict(s)} | {_f(s['diff_detectable'])} |"
            + (f" {_f(s['nm'], '.3g')} | {_f(s['dm'], '.3g')} |" if grid.analyze else "")
        )
    if pairs:
        lines += [
            "",
            "## Every pair",
            "",
            f"| cell | minus | seeds | difference | {pct} interval | | detectable |",
            "|---|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {p['cell']} | {p['minus']} | {p['diff_seeds']} | {_f(p['diff_mean'], '+.3f')} | "
            f"{_f(p['diff_low'], '+.3f')} – {_f(p['diff_high'], '+.3f')} | {_verdict(p)} | "
            f"{_f(p['diff_detectable'])} |"
            for p in pairs
        ]
    bad = [r for r in rows if r.get("status") != "ok"]
    if bad:
        lines += ["", "## Failed runs", "", "| cell | seed | error |", "|---|---|---|"]
        lines += [f"| {r['cell']} | {r['seed']} | {str(r.get('error', '')).replace('|', '/')} |" for r in bad]
    return "\n".join(lines) + "\n"


def write_report(grid: Grid) -> list[Path]:
    """Write ``summary.csv``, ``summary.md`` and the plots into ``OUT``; returns the paths."""
    import csv

    from wadi_cli.io.atomic import write_text_atomic

    rows = read_results(grid)
    summary = summarise(grid, rows)
    pairs = every_pair(grid, rows) if len(grid.cells) > 2 else []

    def table(columns: tuple[str, ...], records: list[dict[str, Any]]) -> str:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(records)
        return buf.getvalue()

    grid.out.mkdir(parents=True, exist_ok=True)
    paths = [write_text_atomic(grid.out / "summary.csv", table(SUMMARY_COLUMNS, summary))]
    if pairs:
        paths.append(write_text_atomic(grid.out / "pairs.csv", table(PAIR_COLUMNS, pairs)))
    paths.append(write_text_atomic(grid.out / "summary.md", markdown(grid, summary, rows, pairs)))
    if any(s["seeds"] for s in summary):
        steps = convergence_table(grid, rows)
        paths.append(write_text_atomic(grid.out / "convergence.csv", table(CONVERGENCE_COLUMNS, steps)))
        paths += plot_bars(grid, summary), plot_convergence(grid, steps)
        if len(grid.axes) == 2 == len(grid.fields):
            paths.append(plot_heatmap(grid, summary))
    return paths


def _figure(width: float, height: float) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(width, height))


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    from wadi_cli.io.atomic import atomic_file

    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_bars(grid: Grid, summary: list[dict[str, Any]]) -> Path:
    """``bars.png``: the metric's mean per cell with its interval as error bars."""
    fig, ax = _figure(max(4.0, 0.9 * len(summary) + 1), 3.6)
    xs = range(len(summary))
    means = [s["mean"] for s in summary]
    errs = [[0.0 if math.isnan(s["low"]) else s["mean"] - s["low"] for s in summary],
            [0.0 if math.isnan(s["high"]) else s["high"] - s["mean"] for s in summary]]  # fmt: skip
    ax.bar(xs, means, yerr=errs, capsize=4, color="#4c72b0")
    ax.set_xticks(list(xs), [s["cell"].replace(",", "\n") for s in summary], fontsize=7)
    ax.set_ylabel(f"{grid.metric} (mean, {LEVEL:.0%} interval over seeds)")
    ax.set_title(grid.path.name)
    return _save(fig, grid.out / "bars.png")


def step_values(
    grid: Grid, rows: list[dict[str, Any]] | None = None
) -> dict[str, dict[float, dict[int, float]]]:
    """Cell name → step → {seed: the grid's metric at that checkpoint}, from the ``eval.csv`` of
    every run whose ``results.csv`` row is ``ok`` (a failed or unfinished run adds nothing)."""
    rows = read_results(grid) if rows is None else rows
    ok = {(r["cell"], int(r["seed"])) for r in rows if r.get("status") == "ok"}
    out: dict[str, dict[float, dict[int, float]]] = {}
    for cell in grid.cells:
        by_step: dict[float, dict[int, float]] = {}
        for seed in grid.seeds:
            if (cell.name, seed) not in ok:
                continue
            for r in read_eval_csv(grid.run_dir(cell, seed)):
                if grid.metric in r:
                    by_step.setdefault(r["step"], {})[seed] = r[grid.metric]
        out[cell.name] = dict(sorted(by_step.items()))
    return out


def convergence_curves(
    grid: Grid, rows: list[dict[str, Any]] | None = None
) -> dict[str, list[tuple[float, float]]]:
    """Cell name → [(step, mean metric over the seeds scored at that step)]."""
    return {
        name: [(step, math.fsum(v.values()) / len(v)) for step, v in steps.items()]
        for name, steps in step_values(grid, rows).items()
        if steps
    }


def convergence_table(grid: Grid, rows: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """``convergence.csv`` (:data:`CONVERGENCE_COLUMNS`): per cell and checkpoint step the mean
    over seeds with its interval, and the paired difference to the baseline cell at the same
    step — whether one kind is ahead early (converges faster) and not only at the end."""
    values = step_values(grid, rows)
    out = []
    for cell in grid.cells:
        base = grid.baseline_of(cell)
        for step, mine in values[cell.name].items():
            ci = t_interval([mine[s] for s in sorted(mine)])
            row: dict[str, Any] = {"cell": cell.name, "step": step, "seeds": ci.n}
            row.update(mean=ci.mean, low=ci.low, high=ci.high, baseline=base.name if base is not None else "")
            if base is not None and base != cell:
                row.update(_pair(mine, values.get(base.name, {}).get(step, {})))
            else:
                row.update(NO_PAIR)
            out.append(row)
    return out


def plot_convergence(grid: Grid, table: list[dict[str, Any]] | None = None) -> Path:
    """``convergence.png``: the metric against the step, one line per cell, its interval shaded."""
    table = convergence_table(grid) if table is None else table
    fig, ax = _figure(6.0, 3.8)
    for cell in grid.cells:
        mine = [r for r in table if r["cell"] == cell.name]
        if not mine:
            continue
        steps = [r["step"] for r in mine]
        (line,) = ax.plot(steps, [r["mean"] for r in mine], marker="o", label=cell.name)
        if all(not math.isnan(r["low"]) for r in mine):
            ax.fill_between(steps, [r["low"] for r in mine], [r["high"] for r in mine],
                            color=line.get_color(), alpha=0.12, linewidth=0)  # fmt: skip
    ax.set_xlabel("training step")
    ax.set_ylabel(f"{grid.metric} (mean over seeds, {LEVEL:.0%} interval)")
    ax.legend(fontsize=6)
    return _save(fig, grid.out / "convergence.png")


def plot_heatmap(grid: Grid, summary: list[dict[str, Any]]) -> Path:
    """``heatmap.png``: the mean over the grid's two axes (rows: the first axis)."""
    (ya, yv), (xa, xv) = grid.axes.items()
    means = {s["cell"]: s["mean"] for s in summary}
    data = [[means[Cell(((ya, y), (xa, x))).name] for x in xv] for y in yv]
    fig, ax = _figure(1.2 * len(xv) + 2, 0.8 * len(yv) + 1.5)
    im = ax.imshow(data, cmap="viridis_r")
    ax.set_xticks(range(len(xv)), [str(x) for x in xv])
    ax.set_yticks(range(len(yv)), [str(y) for y in yv])
    ax.set_xlabel(xa)
    ax.set_ylabel(ya)
    for i, row in enumerate(data):
        for j, v in enumerate(row):
            ax.text(j, i, _f(v, ".2f"), ha="center", va="center", color="w", fontsize=8)
    fig.colorbar(im, ax=ax, label=f"{grid.metric} (mean)")
    return _save(fig, grid.out / "heatmap.png")
