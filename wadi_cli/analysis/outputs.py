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
    "timings.json",
)
#: keys of the summary that differ from run to run (wall-clock time): written to
#: ``timings.json`` so every other file of two runs on the same inputs is byte-identical
TIMING_KEYS = ("seconds",)
#: the date every member of ``spectra.npz`` carries (numpy would record the time of writing)
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)


def _save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """``np.savez`` without timestamps: the same arrays give the same bytes."""
    import io
    import zipfile

    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for name, array in arrays.items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.asanyarray(array), allow_pickle=False)
            z.writestr(zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_DATE), buf.getvalue())


def write_report_files(result: AnalysisResult, folder: Path, plots: bool = True) -> None:
    """Write the report files into an existing ``folder`` (no atomicity; see :func:`write_report`);
    the two figures only with ``plots``."""
    write_layers_csv(result.layers, folder / "layers.csv")
    summary = result.summary()
    timings = {k: summary.pop(k) for k in TIMING_KEYS if k in summary}
    (folder / "summary.json").write_text(
        json.dumps(summary, indent=2, allow_nan=False) + "\n", encoding="utf-8"
    )
    (folder / "timings.json").write_text(json.dumps(timings) + "\n", encoding="utf-8")
    _save_npz(folder / "spectra.npz", dict(result.spectra))
    if not plots:
        return
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
