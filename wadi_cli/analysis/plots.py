"""The two figures of ``wadi analyze`` (in the spirit of the WaDi paper's Fig. 1):

- :func:`plot_norm_vs_direction` (Fig. 1a): per-layer mean relative norm change against
  mean direction change (chord), and both per layer in network order;
- :func:`plot_residual_spectra` (Fig. 1b): singular-value spectra of the direction
  residuals, normalised, and their cumulative energy, for a few layers and the median.

matplotlib runs on the non-interactive Agg backend; nothing is shown on screen.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from wadi_cli.analysis.report import NORM_FLOOR, LayerResult, norms_unchanged
from wadi_cli.words import plural

_GRID = np.linspace(0.0, 1.0, 201)


def _pyplot():
    import matplotlib  # imported on first plot: slow to load, and the Agg backend is chosen first

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _family(block: str) -> str:
    for prefix in ("down_blocks", "mid_block", "up_blocks", "transformer_blocks"):
        if block.startswith(prefix):
            return prefix
    return "other"


#: Where the plots draw a value below :data:`NORM_FLOOR` (exact zeros included): a tenth of the
#: floor, inside a shaded band that the legend names, instead of an unexplained 1e-12.
DRAWN_AT = NORM_FLOOR / 10


def plot_norm_vs_direction(layers: list[LayerResult], path: str | Path) -> None:
    """Scatter of per-layer mean norm change vs mean direction change, plus a per-layer profile."""
    plt = _pyplot()
    fig = norm_vs_direction_figure(layers)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def norm_vs_direction_figure(layers: list[LayerResult]) -> Any:
    """The figure of :func:`plot_norm_vs_direction` (returned open, for tests and notebooks).

    Values below :data:`NORM_FLOOR` (unchanged norms: float32 rounding) are drawn at
    :data:`DRAWN_AT` in a shaded band, and the legend says how many layers sit there."""
    plt = _pyplot()
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(12, 4.8), gridspec_kw={"width_ratios": [1, 1.6]})
    norm = np.array([x.norm_rel_change_mean for x in layers], dtype=float)
    dirc = np.array([x.direction_change_mean for x in layers], dtype=float)
    low = np.isfinite(norm) & (norm < NORM_FLOOR)
    floor_label = f"below {NORM_FLOOR:g} (unchanged: float32 rounding), drawn at {DRAWN_AT:g}"
    families = [_family(x.block) for x in layers]
    for fam in dict.fromkeys(families):
        sel = np.array([f == fam for f in families])
        ax0.scatter(_floored(norm[sel]), _floored(dirc[sel]), s=14, alpha=0.75, label=fam)
    finite = np.isfinite(norm) & np.isfinite(dirc) & ((norm > 0) | (dirc > 0))
    if finite.any():
        lo = DRAWN_AT / 3 if low.any() else min(norm[finite].min(), dirc[finite].min()) / 2
        hi = max(norm[finite].max(), dirc[finite].max()) * 2
        ax0.plot([lo, hi], [lo, hi], "k--", lw=0.8, label="equal change")
        ax0.set_xscale("log")
        ax0.set_yscale("log")
        if low.any():
            band = f"{plural(int(low.sum()), 'layer')}: norm change {floor_label}"
            ax0.axvspan(lo, NORM_FLOOR, color="grey", alpha=0.12, label=band)
    mean_norm = float(np.nanmean(norm)) if np.isfinite(norm).any() else math.nan
    if norms_unchanged(mean_norm):
        title = f"per layer (norms unchanged: mean change {mean_norm:.1e} < {NORM_FLOOR:g})"
    else:
        ratio = np.nanmean(dirc) / mean_norm if mean_norm > 0 else math.nan
        title = f"per layer (direction / norm = {ratio:.1f}x)"
    ax0.set_xlabel("mean relative norm change  |‖S_i‖-‖T_i‖| / ‖T_i‖")
    ax0.set_ylabel("mean direction change  ‖d_S,i - d_T,i‖")
    ax0.set_title(title)
    ax0.legend(fontsize=7)
    idx = np.arange(len(layers))
    ax1.plot(idx, _floored(dirc), ".-", lw=0.8, ms=3, label="direction change (chord)")
    ax1.plot(idx, _floored(norm), ".-", lw=0.8, ms=3, label="relative norm change")
    if finite.any():
        ax1.set_yscale("log")
        if low.any():
            ax1.axhspan(DRAWN_AT / 3, NORM_FLOOR, color="grey", alpha=0.12, label=floor_label)
    ax1.set_xlabel("layer index (checkpoint order)")
    ax1.set_ylabel("mean over rows")
    ax1.set_title("norm vs direction change across the network")
    ax1.legend(fontsize=7)
    fig.tight_layout()
    return fig


def _floored(values: np.ndarray) -> np.ndarray:
    """``values`` with everything below :data:`NORM_FLOOR` at :data:`DRAWN_AT` (NaN stays NaN)."""
    return np.where(values < NORM_FLOOR, DRAWN_AT, values)


def _curves(sq: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """(normalised singular values, cumulative energy) sampled on a 0..1 rank-fraction grid."""
    total = float(sq.sum())
    if sq.size == 0 or total <= 0:
        return None
    frac = np.arange(1, sq.size + 1) / sq.size
    cum = np.cumsum(sq) / total
    sv = np.sqrt(sq / sq[0])
    x = np.concatenate([[0.0], frac])
    return (
        np.interp(_GRID, x, np.concatenate([[1.0], sv])),
        np.interp(_GRID, x, np.concatenate([[0.0], cum])),
    )


def plot_residual_spectra(spectra: dict[str, np.ndarray], path: str | Path, examples: int = 6) -> None:
    """Normalised spectra and cumulative energy of the residuals: a few layers + the median."""
    plt = _pyplot()
    fig = residual_spectra_figure(spectra, examples)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def residual_spectra_figure(spectra: dict[str, np.ndarray], examples: int = 6) -> Any:
    """The figure of :func:`plot_residual_spectra` (returned open); the example layers are
    named in full in a legend under both panels."""
    plt = _pyplot()
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(12, 4.8))
    curves = {name: c for name, sq in spectra.items() if (c := _curves(np.asarray(sq, dtype=float)))}
    names = list(curves)
    if names:
        # Examples spread over the network: evenly spaced in checkpoint order.
        picks = [names[round(i)] for i in np.linspace(0, len(names) - 1, min(examples, len(names)))]
        for name in dict.fromkeys(picks):
            sv, cum = curves[name]
            ax0.plot(_GRID, np.maximum(sv, 1e-8), lw=0.9, alpha=0.8, label=name)  # full names, below
            ax1.plot(_GRID, cum, lw=0.9, alpha=0.8)
        med_sv = np.median(np.stack([c[0] for c in curves.values()]), axis=0)
        med_cum = np.median(np.stack([c[1] for c in curves.values()]), axis=0)
        ax0.plot(
            _GRID, np.maximum(med_sv, 1e-8), "k", lw=2.2, label=f"median of {plural(len(names), 'layer')}"
        )
        ax1.plot(_GRID, med_cum, "k", lw=2.2, label=f"median of {plural(len(names), 'layer')}")
        at30 = float(np.interp(0.3, _GRID, med_cum))
        ax1.axvline(0.3, color="grey", ls=":", lw=0.8)
        ax1.axhline(at30, color="grey", ls=":", lw=0.8)
        ax1.annotate(f"median: {at30:.0%} of energy in top 30%", (0.31, at30 - 0.08), fontsize=8)
        ax0.set_yscale("log")
    ax0.set_xlabel("singular value index / min(rows, cols)")
    ax0.set_ylabel("sigma_i / sigma_1 (below 1e-8 drawn at 1e-8)")
    ax0.set_title("direction residual D_S - D_T: singular values")
    ax1.set_xlabel("fraction of singular values kept")
    ax1.set_ylabel("cumulative share of ‖R‖_F²")
    ax1.set_ylim(0, 1.02)
    ax1.set_title("cumulative energy")
    ax1.legend(fontsize=8, loc="lower right")
    # the layers' full names under both panels (a legend inside the panel cut long SD names)
    handles, labels = ax0.get_legend_handles_labels()
    if handles:
        ncol = 2 if len(labels) > 4 else 1
        fig.legend(handles, labels, loc="lower center", fontsize=7, ncol=ncol, frameon=False)
        rows = math.ceil(len(labels) / ncol)
        fig.tight_layout(rect=(0, min(0.45, (0.16 * rows + 0.1) / fig.get_figheight()), 1, 1))
    else:
        fig.tight_layout()
    return fig
