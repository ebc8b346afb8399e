"""The declared dependency floors (pyproject.toml) cover what the code calls. Each
minimum below is the version that first has something wadi uses; the test reads the
declared minimums and fails when one is lower."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]

#: package -> (lowest version that works, what needs it)
NEEDED = {
    "python": ("3.11", "tomllib (wadi_cli/distill/config.py reads TOML configs)"),
    "torch": (
        "2.4",
        "torch.amp.is_autocast_available in every LoRaD forward (2.4); torch.amp.GradScaler(device) (2.3)",
    ),
    "diffusers": (
        "0.32",
        "gradient checkpointing of networks in eval() mode (diffusers PR #9878, first in 0.32)",
    ),
    "sentencepiece": ("0.1.99", "PixArt's T5 tokenizer ships as spiece.model"),
    "protobuf": ("3.20", "reading spiece.model when converting the T5 tokenizer"),
}


def _declared() -> dict[str, Version | None]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    out: dict[str, Version | None] = {}
    for text in project["dependencies"]:
        req = Requirement(text)
        floors = [Version(s.version) for s in req.specifier if s.operator in (">=", "==", "~=")]
        out[req.name.lower()] = max(floors) if floors else None
    match = re.fullmatch(r">=\s*([\d.]+)", project["requires-python"].strip())
    out["python"] = Version(match.group(1)) if match else None
    return out


@pytest.mark.parametrize("package", list(NEEDED))
def test_declared_floor_covers_what_the_code_calls(package):
    minimum, why = NEEDED[package]
    declared = _declared()
    assert package in declared, f"{package} is not declared in pyproject.toml ({why})"
    assert declared[package] is not None and declared[package] >= Version(minimum), (
        f"pyproject.toml admits {package} {declared[package]}, but {why} needs >= {minimum}"
    )


def test_the_calls_behind_the_floors_are_still_there():
    """If one of these disappears, its floor may be lowered (and this table updated)."""
    sources = "\n".join(p.read_text() for p in (ROOT / "wadi_cli").rglob("*.py"))
    for needle in ("is_autocast_available", "GradScaler", "import tomllib", "enable_gradient_checkpointing"):
        assert needle in sources, needle
