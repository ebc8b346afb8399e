"""Per-layer rows, per-block and overall aggregates, and their CSV/JSON forms.

Every number written by ``wadi analyze`` is defined in :data:`DEFINITIONS` (copied into
``summary.json``), so a reader of the outputs never has to guess what was divided by what.
"""

from __future__ import annotations

import csv
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from wadi_cli.analysis.decompose import RowDecomposition
from wadi_cli.analysis.spectrum import SpectrumStats

#: Below this mean relative row-norm change a layer's (or a group's) norms count as unchanged:
#: a float32 weight holds a row norm to about half an ulp (6e-8 relative), so a student that only
#: rotates rows (LoRaD, by construction) shows ~1e-8..1e-7 from rounding alone; 1e-6 leaves a
#: margin of ~8 ulps. A direction/norm ratio over such a norm change divides a real change by
#: rounding, so the CLI, the plots and the demo say "unchanged" instead of printing it.
NORM_FLOOR = 1e-6


def norms_unchanged(norm_rel_change_mean: float | None) -> bool:
    """Whether a mean relative norm change lies below :data:`NORM_FLOOR` (NaN/None: no)."""
    return norm_rel_change_mean is not None and 0.0 <= norm_rel_change_mean < NORM_FLOOR


DEFINITIONS: dict[str, str] = {
    "rows/cols": "Every weight with >= 2 dims is a matrix of rows: Linear (m, n) -> m x n, "
    "Conv (out, in, kh, kw) -> out x in*kh*kw. Row i splits into norm ||W_i|| and direction "
    "W_i / ||W_i||. T = teacher, S = student.",
    "kind": "linear (2-D), conv (3-D to 5-D), other (2-D embedding tables, > 5-D).",
    "norm_rel_change": "per row |(||S_i|| - ||T_i||)| / ||T_i||; rows with a zero teacher norm "
    "or any NaN/Inf are excluded; _mean/_std are over the remaining rows (population std).",
    "direction_change": "per row chord ||S_i/||S_i|| - T_i/||T_i||||, in [0, 2], = 2 sin(theta/2), "
    "dimensionless like norm_rel_change; rows with a zero norm (either side) or NaN/Inf excluded.",
    "angle_deg": "per row angle between S_i and T_i in degrees, theta = 2 atan2(c, sqrt(4 - c^2)) "
    "with c the chord above (float64; exact for tiny angles, unlike arccos of a cosine).",
    "direction_residual_fro": "||D_S - D_T||_F with D the matrix of unit rows (excluded rows count "
    "as zero rows of the residual R).",
    "energy_at_k": "share of ||R||_F^2 held by the top k singular values of R (k = rank_k).",
    "rank90/rank93/rank99": "fewest singular values of R whose squares hold >= 90/93/99 % of ||R||_F^2.",
    "rank_frac90/93/99": "rank90/93/99 divided by min(rows, cols).",
    "effective_rank": "exp(-sum p_i log p_i), p_i = sigma_i / sum_j sigma_j (Roy & Vetterli 2007).",
    "top_singular_values": "largest singular values of R, descending.",
    "rows_zero/rows_nonfinite": "rows with a zero norm in either checkpoint / with NaN or Inf in either.",
    "block": "down_blocks.N, mid_block, up_blocks.N, transformer_blocks.N, else the first name component.",
    "aggregates": "per block and overall: X_mean = mean over layers of the per-layer X "
    "(every layer counts once, as in the paper's NM/DM), also for the per-layer _std columns.",
    "direction_to_norm_ratio_mean": "mean over layers of direction_change_mean divided by mean over "
    "layers of norm_rel_change_mean (the paper reports ~22x between direction and norm changes).",
    "direction_to_norm_ratio_std": "mean over layers of direction_change_std divided by mean over "
    "layers of norm_rel_change_std (paper: ~10x).",
    "angle_to_norm_ratio_mean/_std": "as above with the angle in radians instead of the chord.",
    "norm_floor": f"a mean relative norm change below {NORM_FLOOR:g} is float32 rounding (~8 ulps): the "
    "norms count as unchanged and the direction/norm ratios, still written here, divide by rounding "
    "(wadi analyze prints 'unchanged' instead).",
}

_BLOCK = re.compile(r"(?:^|\.)((?:down_blocks|up_blocks|transformer_blocks|blocks)\.\d+|mid_block)\.")


def block_of(name: str) -> str:
    """Group a tensor name into its block (``down_blocks.1``, ``mid_block``, ``conv_in``...)."""
    m = _BLOCK.search(name)  # leftmost, i.e. outermost, block
    if m:
        return m.group(1)
    return name.split(".", 1)[0]


def _mean_std(x: torch.Tensor) -> tuple[float, float]:
    if x.numel() == 0:
        return math.nan, math.nan
    x = x.to(torch.float64)
    return float(x.mean()), float(x.std(unbiased=False))


@dataclass
class LayerResult:
    """One row of ``layers.csv`` (names and meanings in :data:`DEFINITIONS`)."""

    layer: str
    block: str
    kind: str
    rows: int
    cols: int
    rows_zero: int
    rows_nonfinite: int
    norm_rel_change_mean: float
    norm_rel_change_std: float
    direction_change_mean: float
    direction_change_std: float
    angle_deg_mean: float
    angle_deg_std: float
    direction_residual_fro: float
    energy_at_k: float
    rank90: int
    rank93: int
    rank99: int
    rank_frac90: float
    rank_frac93: float
    rank_frac99: float
    effective_rank: float
    top_singular_values: list[float] = field(default_factory=list)


def layer_result(name: str, kind: str, dec: RowDecomposition, spec: SpectrumStats) -> LayerResult:
    """Assemble the per-layer row from the row decomposition and the residual spectrum."""
    rows, cols = dec.rows, int(dec.residual.shape[1])  # the residual may have been released
    side = max(1, min(rows, cols))
    nm, ns = _mean_std(dec.norm_rel_change())
    cm, cs = _mean_std(dec.direction_chord())
    am, as_ = _mean_std(torch.rad2deg(dec.angle_rad()))
    return LayerResult(
        layer=name,
        block=block_of(name),
        kind=kind,
        rows=int(rows),
        cols=int(cols),
        rows_zero=dec.rows_zero,
        rows_nonfinite=dec.rows_nonfinite,
        norm_rel_change_mean=nm,
        norm_rel_change_std=ns,
        direction_change_mean=cm,
        direction_change_std=cs,
        angle_deg_mean=am,
        angle_deg_std=as_,
        direction_residual_fro=math.sqrt(max(spec.energy, 0.0)),
        energy_at_k=spec.energy_at_k,
        rank90=spec.rank90,
        rank93=spec.rank93,
        rank99=spec.rank99,
        rank_frac90=spec.rank90 / side,
        rank_frac93=spec.rank93 / side,
        rank_frac99=spec.rank99 / side,
        effective_rank=spec.effective_rank,
        top_singular_values=list(spec.top_singular_values),
    )


def _nanmean(values: list[float]) -> float:
    vals = [v for v in values if not math.isnan(v)]
    return sum(vals) / len(vals) if vals else math.nan


def _ratio(a: float, b: float) -> float:
    if math.isnan(a) or math.isnan(b) or b == 0.0:
        return math.nan
    return a / b


_AVERAGED = (
    "norm_rel_change_mean",
    "norm_rel_change_std",
    "direction_change_mean",
    "direction_change_std",
    "angle_deg_mean",
    "angle_deg_std",
    "energy_at_k",
    "rank_frac90",
    "rank_frac93",
    "rank_frac99",
    "effective_rank",
)


def aggregate(layers: list[LayerResult]) -> dict[str, Any]:
    """Layer-averaged statistics of a group of layers, plus the direction/norm ratios.

    NaN entries (e.g. a layer whose rows were all excluded) are skipped in the means.
    """
    out: dict[str, Any] = {
        "layers": len(layers),
        "rows": sum(x.rows for x in layers),
        "params": sum(x.rows * x.cols for x in layers),
        "rows_zero": sum(x.rows_zero for x in layers),
        "rows_nonfinite": sum(x.rows_nonfinite for x in layers),
    }
    for key in _AVERAGED:
        out[key] = _nanmean([getattr(x, key) for x in layers])
    out["direction_residual_fro"] = math.sqrt(sum(x.direction_residual_fro**2 for x in layers))
    nm, ns = out["norm_rel_change_mean"], out["norm_rel_change_std"]
    out["direction_to_norm_ratio_mean"] = _ratio(out["direction_change_mean"], nm)
    out["direction_to_norm_ratio_std"] = _ratio(out["direction_change_std"], ns)
    out["angle_to_norm_ratio_mean"] = _ratio(math.radians(out["angle_deg_mean"]), nm)
    out["angle_to_norm_ratio_std"] = _ratio(math.radians(out["angle_deg_std"]), ns)
    return out


def group_by_block(layers: list[LayerResult]) -> dict[str, dict[str, Any]]:
    """Aggregates per block, in first-seen order of the blocks."""
    groups: dict[str, list[LayerResult]] = {}
    for layer in layers:
        groups.setdefault(layer.block, []).append(layer)
    return {name: aggregate(members) for name, members in groups.items()}


CSV_COLUMNS = [f for f in LayerResult.__dataclass_fields__]


def _csv_cell(value: Any) -> Any:
    if isinstance(value, float):
        return "" if math.isnan(value) else repr(value)
    if isinstance(value, list):
        return " ".join(repr(float(v)) for v in value)
    return value


def write_layers_csv(layers: list[LayerResult], path: str | Path) -> None:
    """Write one row per layer; NaN is an empty cell, top singular values are space-separated."""
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(CSV_COLUMNS)
        for layer in layers:
            row = asdict(layer)
            writer.writerow([_csv_cell(row[c]) for c in CSV_COLUMNS])


def jsonable(value: Any) -> Any:
    """Replace NaN/Inf by ``None`` recursively so the output is strict JSON."""
    if isinstance(value, float):
        return None if (math.isnan(value) or math.isinf(value)) else value
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value
