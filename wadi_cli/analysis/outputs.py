"""Write an :class:`~wadi_cli.analysis.run.AnalysisResult` to a folder, all at once."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from wadi_cli.analysis.plots import plot_norm_vs_direction, plot_residual_spectra
from wadi_cli.analysis.report import write_layers_csv
from wadi_cli.analysis.run import AnalysisResult
from wadi_cli.io import atomic_output_dir

OUTPUT_FILES = (
    "layers.csv",
    "summary.json",
    "spectra.npz",
    "norm_vs_direction.png",
    "residual_spectra.png",
)


def write_report_files(result: AnalysisResult, folder: Path) -> None:
    """Write the report files into an existing ``folder`` (no atomicity; see :func:`write_report`)."""
    write_layers_csv(result.layers, folder / "layers.csv")
    (folder / "summary.json").write_text(
        json.dumps(result.summary(), indent=2, allow_nan=False) + "\n", encoding="utf-8"
    )
    np.savez(folder / "spectra.npz", **{name: sq for name, sq in result.spectra.items()})
    plot_norm_vs_direction(result.layers, folder / "norm_vs_direction.png")
    plot_residual_spectra(result.spectra, folder / "residual_spectra.png")


def write_report(result: AnalysisResult, out_dir: str | Path) -> Path:
    """Write ``layers.csv``, ``summary.json``, ``spectra.npz`` (squared singular values per
    layer, float32, loadable with ``np.load(allow_pickle=False)``) and the two figures
    ``norm_vs_direction.png`` and ``residual_spectra.png``.

    The folder appears atomically (:func:`wadi_cli.io.atomic_output_dir`): on any error
    nothing is left behind.
    """

    with atomic_output_dir(out_dir) as tmp:
        write_report_files(result, Path(tmp))
    return Path(out_dir)
