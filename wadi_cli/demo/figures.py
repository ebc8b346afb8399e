"""The demo's figures, after the panels of the WaDi paper's Fig. 1:

(a) relative norm change vs direction change per layer, one colour per student;
(b) cumulative energy of the direction residual's singular values (is the change low-rank?);
(c) the swap metrics (accuracy and fd of teacher, student and both hybrids);
(d) an image grid of the same prompts and seeds through teacher, student and hybrids.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from wadi_cli.analysis import LayerResult
from wadi_cli.analysis.report import NORM_FLOOR, norms_unchanged
from wadi_cli.analysis.spectrum import rank_at_share
from wadi_cli.words import plural

_TINY = 1e-9
#: One colour per model kind in every panel (a student keeps its colour from run to run and
#: from (a) to (c)); keys are the students' names and the swap's variants.
KIND_COLOURS: dict[str, str] = {
    "teacher": "#4c4c4c",
    "lorad": "#4c72b0",
    "lora": "#dd8452",
    "full": "#55a868",
    "teacher_norms": "#8172b2",
    "teacher_directions": "#c44e52",
}


def colour(kind: str) -> str:
    """The fixed colour of ``kind`` (:data:`KIND_COLOURS`; grey for a name not listed)."""
    return KIND_COLOURS.get(kind, "#999999")


def _pyplot():  # imported on first plot: matplotlib is slow to load and picks the Agg backend
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_norm_vs_direction(students: Mapping[str, Sequence[LayerResult]], path: Path) -> None:
    """Panel (a): per layer, mean relative norm change (x) vs mean direction change (y).
    Norm changes below :data:`~wadi_cli.analysis.report.NORM_FLOOR` (LoRaD, by construction:
    float32 rounding) are drawn at a tenth of it, in the shaded band the legend explains."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 5.0))
    lo, hi = 1.0, _TINY
    drawn_at = NORM_FLOOR / 10
    for name, layers in students.items():
        norm = np.array([x.norm_rel_change_mean for x in layers], dtype=float)
        dirc = np.array([x.direction_change_mean for x in layers], dtype=float)
        ok = np.isfinite(norm) & np.isfinite(dirc)
        moved = ok & ((norm > _TINY) | (dirc > _TINY))  # layers an adapter does not touch stay put
        x, y = np.where(norm[moved] < NORM_FLOOR, drawn_at, norm[moved]), np.maximum(dirc[moved], _TINY)
        mean_norm, mean_dir = np.mean(norm[ok]), np.mean(dirc[ok])
        if norms_unchanged(mean_norm):
            label = f"{name}: norms unchanged (mean change {mean_norm:.1e} < {NORM_FLOOR:g})"
        else:
            label = f"{name}: direction/norm = {mean_dir / mean_norm:.1f}x"
        untouched = int((ok & ~moved).sum())
        if untouched:
            label += f"; {plural(untouched, 'layer')} unchanged, not shown"
        if x.size:
            ax.scatter(x, y, s=14, alpha=0.7, label=label, color=colour(name))
            lo, hi = min(lo, x.min(), y.min()), max(hi, x.max(), y.max())
    if lo <= drawn_at:
        band = f"norm change < {NORM_FLOOR:g} (float32 rounding): drawn at {drawn_at:g}"
        ax.axvspan(drawn_at / 3, NORM_FLOOR, color="grey", alpha=0.12, label=band)
    ax.plot([lo, hi], [lo, hi], "k--", lw=0.8, label="equal change")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("mean relative norm change |‖S_i‖−‖T_i‖| / ‖T_i‖")
    ax.set_ylabel("mean direction change ‖d_S,i − d_T,i‖")
    ax.set_title("(a) what distillation changed, per layer")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def energy_curve(spectra: Mapping[str, np.ndarray], points: int = 101) -> tuple[np.ndarray, np.ndarray]:
    """Layer-averaged cumulative energy share of the residual's squared singular values
    at rank fractions ``0 … 1`` (each layer's curve interpolated onto a common grid)."""
    grid = np.linspace(0.0, 1.0, points)
    curves = []
    for sq in spectra.values():
        sq = np.asarray(sq, dtype=np.float64)
        total = sq.sum()
        if sq.size == 0 or not np.isfinite(total) or total <= 0:
            continue
        frac = np.arange(0, sq.size + 1) / sq.size
        cum = np.concatenate([[0.0], np.cumsum(sq) / total])
        curves.append(np.interp(grid, frac, cum))
    return grid, (np.mean(curves, axis=0) if curves else np.full(points, np.nan))


def plot_residual_spectrum(students: Mapping[str, Mapping[str, np.ndarray]], path: Path) -> None:
    """Panel (b): cumulative energy vs rank fraction of the direction residual D_S − D_T."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 5.0))
    for name, spectra in students.items():
        grid, curve = energy_curve(spectra)
        if np.isnan(curve).all():
            continue
        fracs = [rank_at_share(np.asarray(sq), 0.9) / len(sq) for sq in spectra.values()
                 if len(sq) and float(np.sum(sq)) > 0]  # fmt: skip
        ax.plot(grid, curve, lw=1.6, color=colour(name),
                label=f"{name}: mean rank for 90% energy = {np.mean(fracs):.0%} of full")  # fmt: skip
    ax.plot([0, 1], [0, 1], "k:", lw=0.8, label="flat spectrum")
    ax.axhline(0.9, color="grey", lw=0.6)
    ax.set_xlabel("rank / full rank")
    ax.set_ylabel("share of residual energy (layer mean)")
    ax.set_title("(b) spectrum of the direction residual")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_swap_metrics(variants: Mapping[str, Mapping[str, float]], kinds: Sequence[str], path: Path) -> None:
    """Panel (c): accuracy and fd of each variant (teacher, student, the two hybrids), the bar
    of each in the colour of its kind (``kinds``, in the order of ``variants``)."""
    plt = _pyplot()
    names = list(variants)
    acc = [variants[n]["accuracy"] for n in names]
    fd = [variants[n]["fd"] for n in names]
    colors = [colour(k) for k in kinds]
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(10, 4.2))
    for ax, values, title in ((ax0, acc, "accuracy (higher is better)"), (ax1, fd, "fd (lower is better)")):
        bars = ax.bar(range(len(names)), values, color=colors)
        ax.set_xticks(range(len(names)), names, fontsize=8)
        ax.set_title(title)
        for bar, v in zip(bars, values, strict=True):
            ax.annotate(f"{v:.3g}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom", fontsize=8)  # fmt: skip
    fig.suptitle("(c) the swap: which half of the weights carries what the student learned?")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def distinct_rows(prompts: Sequence[str], rows: int) -> list[int]:
    """Indices of the first ``rows`` distinct prompts (the grid shows each prompt once)."""
    seen: dict[str, int] = {}
    for i, p in enumerate(prompts):
        if len(seen) == rows:
            break
        seen.setdefault(p, i)
    return list(seen.values())


def plot_image_grid(images: Mapping[str, np.ndarray], prompts: Sequence[str], path: Path,
                    caption: str = "") -> None:  # fmt: skip
    """Panel (d): rows = prompts (same seed across a row), columns = variants; ``caption``
    (what to look at) under the grid."""
    plt = _pyplot()
    cols, rows = list(images), len(prompts)
    fig, axes = plt.subplots(rows, len(cols), figsize=(1.7 * len(cols) + 2.2, 1.7 * rows), squeeze=False)
    for j, name in enumerate(cols):
        for i in range(rows):
            ax = axes[i][j]
            ax.imshow(images[name][i], interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(name, fontsize=8)
            if j == 0:
                ax.set_ylabel(prompts[i].removeprefix("a "), fontsize=7, rotation=0, ha="right", va="center")
    fig.suptitle("(d) same prompt and noise through each variant", fontsize=9)
    if caption:
        import textwrap

        text = textwrap.fill(caption, int(14 * fig.get_figwidth()))  # ~14 characters of 7 pt per inch
        fig.text(0.5, 0.01, text, ha="center", va="bottom", fontsize=7)
        bottom = (0.14 * (text.count("\n") + 1) + 0.1) / fig.get_figheight()  # 7 pt lines, in inches
        fig.tight_layout(rect=(0, bottom, 1, 1))
    else:
        fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
