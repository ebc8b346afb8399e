"""What wadi records inside the safetensors files it writes: provenance (tool version,
sources, resolved config) and the keys other parts of wadi read back.

Nothing here depends on time or on the process: the same inputs give the same metadata,
so a rerun writes a byte-identical file (see :mod:`wadi_cli.io.safetensors_writer`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping

import torch

from wadi_cli import __version__

#: Metadata key under which every adapter, merged file and exported pipeline wadi writes
#: records the ᾱ_T its student was trained with (sampling reads it back).
ALPHA_BAR_T_METADATA = "alpha_bar_T"


def provenance_metadata(
    config: Mapping[str, object] | None = None, sources: list[str] | None = None
) -> dict[str, str]:
    """Metadata written into every file wadi produces: tool version, sources, config.

    Values are strings (safetensors requires it): ``sources`` and ``config`` are JSON.
    """
    meta = {"format": "pt", "wadi_version": __version__, "wadi_torch_version": torch.__version__}
    if sources:
        meta["wadi_sources"] = json.dumps([str(s) for s in sources])
    if config:
        meta["wadi_config"] = json.dumps(config, default=str, sort_keys=True)
    return meta
