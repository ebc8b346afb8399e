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

import numpy as np

from wadi_cli.analysis.report import LayerResult

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


def plot_norm_vs_direction(layers: list[LayerResult], path: str | Path) -> None:
    """Scatter of per-layer mean norm change vs mean direction change, plus a per-layer profile."""
    plt = _pyplot()
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(12, 4.8), gridspec_kw={"width_ratios": [1, 1.6]})
    tiny = 1e-12
    norm = np.array([x.norm_rel_change_mean for x in layers], dtype=float)
    dirc = np.array([x.direction_change_mean for x in layers], dtype=float)
    families = [_family(x.block) for x in layers]
    for fam in dict.fromkeys(families):
        sel = np.array([f == fam for f in families])
        ax0.scatter(np.maximum(norm[sel], tiny), np.maximum(dirc[sel], tiny), s=14, alpha=0.75, label=fam)
    finite = np.isfinite(norm) & np.isfinite(dirc) & (norm > 0) & (dirc > 0)
    if finite.any():
        lo = min(norm[finite].min(), dirc[finite].min()) / 2
        hi = max(norm[finite].max(), dirc[finite].max()) * 2
        ax0.plot([lo, hi], [lo, hi], "k--", lw=0.8, label="equal change")
        ax0.set_xscale("log")
        ax0.set_yscale("log")
    ratio = np.nanmean(dirc) / np.nanmean(norm) if np.nanmean(norm) > 0 else math.nan
    ax0.set_xlabel("mean relative norm change  |‖S_i‖-‖T_i‖| / ‖T_i‖")
    ax0.set_ylabel("mean direction change  ‖d_S,i - d_T,i‖")
    ax0.set_title(f"per layer (direction / norm = {ratio:.1f}x)")
    ax0.legend(fontsize=8)
    idx = np.arange(len(layers))
    ax1.plot(idx, np.maximum(dirc, tiny), ".-", lw=0.8, ms=3, label="direction change (chord)")
    ax1.plot(idx, np.maximum(norm, tiny), ".-", lw=0.8, ms=3, label="relative norm change")
    if finite.any():
        ax1.set_yscale("log")
    ax1.set_xlabel("layer index (checkpoint order)")
    ax1.set_ylabel("mean over rows")
    ax1.set_title("norm vs direction change across the network")
    ax1.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


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
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(12, 4.8))
    curves = {name: c for name, sq in spectra.items() if (c := _curves(np.asarray(sq, dtype=float)))}
    names = list(curves)
    if names:
        # Examples spread over the network: evenly spaced in checkpoint order.
        picks = [names[round(i)] for i in np.linspace(0, len(names) - 1, min(examples, len(names)))]
        for name in dict.fromkeys(picks):
            sv, cum = curves[name]
            label = name if len(name) < 48 else "..." + name[-45:]
            ax0.plot(_GRID, np.maximum(sv, 1e-8), lw=0.9, alpha=0.8, label=label)
            ax1.plot(_GRID, cum, lw=0.9, alpha=0.8)
        med_sv = np.median(np.stack([c[0] for c in curves.values()]), axis=0)
        med_cum = np.median(np.stack([c[1] for c in curves.values()]), axis=0)
        ax0.plot(_GRID, np.maximum(med_sv, 1e-8), "k", lw=2.2, label=f"median of {len(names)} layers")
        ax1.plot(_GRID, med_cum, "k", lw=2.2, label=f"median of {len(names)} layers")
        at30 = float(np.interp(0.3, _GRID, med_cum))
        ax1.axvline(0.3, color="grey", ls=":", lw=0.8)
        ax1.axhline(at30, color="grey", ls=":", lw=0.8)
        ax1.annotate(f"median: {at30:.0%} of energy in top 30%", (0.31, at30 - 0.08), fontsize=8)
        ax0.set_yscale("log")
    ax0.set_xlabel("singular value index / min(rows, cols)")
    ax0.set_ylabel("sigma_i / sigma_1")
    ax0.set_title("direction residual D_S - D_T: singular values")
    ax0.legend(fontsize=7)
    ax1.set_xlabel("fraction of singular values kept")
    ax1.set_ylabel("cumulative share of ‖R‖_F²")
    ax1.set_ylim(0, 1.02)
    ax1.set_title("cumulative energy")
    ax1.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
