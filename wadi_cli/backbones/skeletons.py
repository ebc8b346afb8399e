"""Shape tables of the shipped denoiser architectures, so that adapter plans need no network.

Counting a backbone's LoRaD targets needs the name and ``(out, in)`` shape of every
``nn.Linear`` of its denoiser, and the total parameter count. Building the network on the
meta device gives them exactly, but importing diffusers and building an SD U-Net takes
seconds; ``wadi info`` should answer at once. So the package ships those facts as data
(``configs/skeletons.json``), one entry per backbone, keyed by a hash of the architecture
config it was computed from. :func:`skeleton` uses an entry only when that hash matches the
config in hand, and otherwise builds the network on the meta device (always correct, only
slower). ``tests/backbones/test_skeletons.py`` rebuilds every entry and compares, so a diffusers
release that adds or reshapes a layer fails the tests instead of skewing a count.

Regenerate the table after changing a shipped config (or diffusers):
``python -m wadi_cli.backbones.skeletons``.

This module sits below the registry: it knows an architecture only as a name, a diffusers
class and a config (:class:`Architecture`, which a registry ``Backbone`` is), and never
imports the registry; the regeneration command above hands it the registry's backbones.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

#: name -> (out_features, in_features) of every nn.Linear, in module order; and the total
#: parameter count of the denoiser.
Skeleton = tuple[dict[str, tuple[int, int]], int]

SKELETONS_FILE: Path = Path(__file__).resolve().parent.parent / "configs" / "skeletons.json"


class Architecture(Protocol):
    """What a shape table needs of a backbone (:class:`wadi_cli.backbones.Backbone` is one)."""

    @property
    def name(self) -> str: ...

    @property
    def denoiser_class(self) -> str: ...

    def denoiser_config(self) -> dict[str, Any]: ...


def config_digest(config: dict[str, Any]) -> str:
    """SHA-256 of the canonical JSON of an architecture config (key order does not matter)."""
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()


def build_skeleton(denoiser_class: str, config: dict[str, Any]) -> Skeleton:
    """Linear shapes and parameter count from a weightless (meta-device) build of the
    diffusers class ``denoiser_class`` (the reference the shipped table is checked against)."""
    import diffusers  # start-up time: `wadi info` reads the shipped tables, builds nothing
    import torch
    from torch import nn

    cls = getattr(diffusers, denoiser_class)
    with torch.device("meta"):
        model = cls.from_config(config)
    linears = (n_m for n_m in model.named_modules() if isinstance(n_m[1], nn.Linear))
    shapes = {n: (m.out_features, m.in_features) for n, m in linears}
    return shapes, sum(p.numel() for p in model.parameters())


def _read_table(path: Path = SKELETONS_FILE) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}  # a missing or damaged table only costs speed


def shipped_skeleton(backbone: Architecture, config: dict[str, Any]) -> Skeleton | None:
    """The table's entry for ``backbone`` if it was computed from exactly ``config``."""
    entry = _read_table().get(backbone.name)
    if not isinstance(entry, dict) or entry.get("config_sha256") != config_digest(config):
        return None
    if entry.get("denoiser_class") != backbone.denoiser_class:
        return None
    shapes = {str(n): (int(s[0]), int(s[1])) for n, s in entry["linears"]}
    return shapes, int(entry["base_params"])


def skeleton(backbone: Architecture, config: dict[str, Any] | None = None) -> Skeleton:
    """Linear shapes and parameter count of ``backbone``'s denoiser built from ``config``
    (default: the shipped architecture config): from the shipped table when it was computed
    from that very config, else from a meta-device build."""
    config = backbone.denoiser_config() if config is None else config
    found = shipped_skeleton(backbone, config)
    if found is not None:
        return found
    return build_skeleton(backbone.denoiser_class, config)


def table_entry(backbone: Architecture) -> dict[str, Any]:
    """One entry of ``skeletons.json``, computed by building the network on the meta device."""
    import diffusers

    config = backbone.denoiser_config()
    shapes, total = build_skeleton(backbone.denoiser_class, config)
    return {
        "denoiser_class": backbone.denoiser_class,
        "config_sha256": config_digest(config),
        "diffusers_version": diffusers.__version__,
        "base_params": total,
        "linears": [[n, list(s)] for n, s in shapes.items()],
    }


def write_table(backbones: Mapping[str, Architecture], path: Path = SKELETONS_FILE) -> Path:
    """Recompute the entry of every one of ``backbones`` and write the table (atomically)."""
    from wadi_cli.io import write_text_atomic  # start-up time: io imports torch

    table = {name: table_entry(b) for name, b in backbones.items()}
    # one line per backbone: small diffs when one architecture changes
    text = "{\n" + ",\n".join(f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in table.items()) + "\n}\n"
    return write_text_atomic(path, text)


if __name__ == "__main__":  # the command, run as a script: the registry is loaded by then
    from wadi_cli.backbones import BACKBONES

    print(write_table(BACKBONES))
