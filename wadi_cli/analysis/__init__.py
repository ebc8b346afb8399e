"""Norm/direction analysis of a teacher vs student checkpoint (``wadi analyze``).

Pure functions over tensors, plus the streaming driver:

- :mod:`.decompose`: row norms, directions, chord/angle changes, residual ``D_S - D_T``;
- :mod:`.spectrum`: all singular values of the residual (Gram eigenvalues or exact SVD)
  and their summaries (energy at k, rank90/93/99, effective rank);
- :mod:`.report`: per-layer rows, per-block/overall aggregates, CSV, definitions;
- :mod:`.run`: pairing and the streaming loop; :mod:`.outputs`/:mod:`.plots`: files.
"""

from wadi_cli.analysis.decompose import RowDecomposition, chord_to_angle, decompose_rows, layer_kind
from wadi_cli.analysis.report import DEFINITIONS, LayerResult, aggregate, block_of
from wadi_cli.analysis.run import (
    AnalysisResult,
    AnalyzeOptions,
    Pairing,
    analyze_checkpoints,
    analyze_sources,
    pair_tensors,
)
from wadi_cli.analysis.spectrum import SpectrumStats, spectrum_stats, squared_singular_values
from wadi_cli.io.tensor_map import DictSource

__all__ = [
    "DEFINITIONS",
    "AnalysisResult",
    "AnalyzeOptions",
    "DictSource",
    "LayerResult",
    "Pairing",
    "RowDecomposition",
    "SpectrumStats",
    "aggregate",
    "analyze_checkpoints",
    "analyze_sources",
    "block_of",
    "chord_to_angle",
    "decompose_rows",
    "layer_kind",
    "pair_tensors",
    "spectrum_stats",
    "squared_singular_values",
]
