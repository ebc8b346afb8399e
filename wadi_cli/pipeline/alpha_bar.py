"""Where the one-step ᾱ_T of a sampling run is decided (WaDi §3: x0 = (z − sqrt(1 − ᾱ_T) ε̂) /
sqrt(ᾱ_T)), and the one warning about it.

The rule, in order: ``--alpha-bar-t`` when given; else the value the one-step weights
record in their metadata (what their student was trained with); else the backbone
registry's constant (:data:`wadi_cli.backbones.ALPHA_BAR_T`, the method's value).
:class:`~wadi_cli.pipeline.loaded.LoadedPipeline` applies it once, when it is built;
``wadi eval`` applies it before loading too, to write its manifest first.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from wadi_cli.backbones import Backbone
from wadi_cli.io.checkpoints import recorded_alpha_bar_T


def resolve_alpha_bar_T(requested: float | None, recorded: float | None, registry: float) -> float:
    """The rule: ``requested`` (``--alpha-bar-t``) when given, else ``recorded`` (the
    weights' metadata), else ``registry`` (the backbone's constant)."""
    if requested is not None:
        return float(requested)
    return float(recorded) if recorded is not None else float(registry)


def alpha_bar_T_warning(requested: float | None, recorded: float | None) -> str | None:
    """The warning for an ``--alpha-bar-t`` that differs from the value the weights
    record (``None`` when they agree or either is unknown)."""
    if requested is None or recorded is None or abs(float(requested) - float(recorded)) <= 1e-12:
        return None
    return (
        f"--alpha-bar-t {requested:g} differs from the alpha_bar_T = {recorded:g} recorded in the weights "
        f"(what their student was trained with); sampling with {requested:g}"
    )


def weights_alpha_bar_T(
    path: str | os.PathLike[str] | None, backbone: Backbone | None = None
) -> float | None:
    """ᾱ_T recorded in one-step weights (``alpha_bar_T`` metadata of an adapter, merged
    file or the denoiser file of an exported pipeline folder), or ``None``."""
    if path is None:
        return None
    p = Path(path).expanduser()
    component = None
    if p.is_dir() and (p / "model_index.json").is_file() and backbone is not None:
        component = backbone.denoiser_subfolder
    return recorded_alpha_bar_T(p, component)


@dataclass(frozen=True)
class AlphaBarT:
    """The one-step ᾱ_T of a pipeline (``value``) and what it was decided from: the
    ``--alpha-bar-t`` asked for (``requested``) and the value the weights record
    (``recorded``)."""

    value: float
    requested: float | None = None
    recorded: float | None = None

    @property
    def warning(self) -> str | None:
        """The mismatch warning (``--alpha-bar-t`` differs from the weights' value), or ``None``."""
        return alpha_bar_T_warning(self.requested, self.recorded)


def decide_alpha_bar_T(
    backbone: Backbone,
    weights: str | os.PathLike[str] | None = None,
    requested: float | None = None,
) -> AlphaBarT:
    """The one-step ᾱ_T of sampling ``backbone`` with ``weights`` (their metadata is read,
    no tensor) when ``requested`` (``--alpha-bar-t``, or for ``wadi swap`` the student's
    recorded value) may be ``None``."""
    recorded = weights_alpha_bar_T(weights, backbone)
    return AlphaBarT(resolve_alpha_bar_T(requested, recorded, backbone.alpha_bar_T), requested, recorded)
