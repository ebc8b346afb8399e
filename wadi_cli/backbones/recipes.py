"""The recipes shipped with wadi: ``wadi_cli/configs/distill/NAME.toml`` (distillation) and
``wadi_cli/configs/sample/NAME.toml`` (sampling: the teacher's steps and guidance).

One file per backbone (``sd15``, ``sd21``, ``pixart``, ``tiny``) holds every default of
``wadi distill -b NAME``, headed by the command that uses it and the evidence for its
values; other files (``tiny_paper``) are variants that ``--config NAME`` layers over a
backbone's recipe. A recipe is flat ``key = value`` pairs (the ``DistillConfig`` field
names) plus an optional ``[per_adapter.KIND]`` table per student kind, whose values
replace the flat ones for ``--adapter KIND``.

Read with :mod:`tomllib` only (no torch): ``wadi info`` and ``wadi distill --help`` read
them, and the backbone registry takes its ranks from them.
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import Any

import tomllib

from wadi_cli.errors import BadInputError

#: Where the shipped recipes live.
RECIPES_DIR: Path = Path(__file__).resolve().parent.parent / "configs" / "distill"
#: The table of per-student-kind values inside a recipe.
PER_ADAPTER = "per_adapter"


def shipped_recipes() -> list[str]:
    """Names of the shipped recipes (``--config NAME`` takes any of them)."""
    return sorted(p.stem for p in RECIPES_DIR.glob("*.toml"))


def shipped_recipe_path(name: str) -> Path | None:
    """The shipped recipe file called ``name`` (without ``.toml``), or ``None``."""
    path = RECIPES_DIR / f"{name}.toml"
    return path if "/" not in name and path.is_file() else None


def read_recipe(path: Path, where: str | None = None) -> dict[str, Any]:
    """A TOML recipe file as a dict; one-line :class:`BadInputError` naming ``where``
    (default: the path) for a file that cannot be read or is not valid TOML."""
    where = where or f"recipe {path}"
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise BadInputError(f"{where}: cannot read ({exc})") from None
    except tomllib.TOMLDecodeError as exc:
        raise BadInputError(f"{where}: not valid TOML ({exc})") from None


@functools.cache
def _shipped(folder: Path, backbone: str, what: str) -> dict[str, Any]:
    """``folder/<backbone>.toml`` (read once per process); ``what`` names it in errors."""
    path = folder / f"{backbone}.toml"
    if not path.is_file():
        have = sorted(p.stem for p in folder.glob("*.toml"))
        raise BadInputError(
            f"backbone {backbone!r} has no {what} recipe ({folder} has: {', '.join(have) or 'none'})"
        )
    return read_recipe(path)


def shipped_recipe(folder: Path, backbone: str, what: str) -> dict[str, Any]:
    """A copy of the shipped recipe ``folder/<backbone>.toml`` of a command (``what``:
    ``"fine-tune"``, ``"inversion"``…, named in the one-line error when there is none)."""
    return copy.deepcopy(_shipped(folder, backbone, what))


def _backbone_recipe(backbone: str) -> dict[str, Any]:
    return _shipped(RECIPES_DIR, backbone, "distillation")


def backbone_recipe(backbone: str) -> dict[str, Any]:
    """The recipe of ``backbone`` (``RECIPES_DIR/<backbone>.toml``, read once per process;
    a copy)."""
    return copy.deepcopy(_backbone_recipe(backbone))


def recipe_values(recipe: dict[str, Any], adapter: str | None) -> dict[str, Any]:
    """The flat values of ``recipe`` with its ``[per_adapter.<adapter>]`` table applied."""
    flat = {k: v for k, v in recipe.items() if k != PER_ADAPTER}
    per = recipe.get(PER_ADAPTER, {})
    if not isinstance(per, dict) or not all(isinstance(v, dict) for v in per.values()):
        raise BadInputError(f"[{PER_ADAPTER}.KIND] tables must map option names to values")
    return {**flat, **per.get(str(adapter), {})}


# ---- sampling recipes ------------------------------------------------------------------------
#: Where the shipped sampling recipes live: one file per backbone, ``NAME.toml``, whose
#: ``[teacher]`` table holds the multi-step teacher's default ``steps`` and ``cfg``.
SAMPLING_DIR: Path = Path(__file__).resolve().parent.parent / "configs" / "sample"


def sampling_recipe(backbone: str) -> dict[str, Any]:
    """The sampling recipe of ``backbone`` (``SAMPLING_DIR/<backbone>.toml``, read once per
    process; a copy)."""
    return copy.deepcopy(_sampling_recipe(backbone))


def _sampling_recipe(backbone: str) -> dict[str, Any]:
    return _shipped(SAMPLING_DIR, backbone, "sampling")


def teacher_defaults(backbone: str) -> tuple[int, float]:
    """``(steps, cfg)`` of ``backbone``'s multi-step teacher when ``--steps`` / ``--cfg`` are
    not given: the ``[teacher]`` table of its sampling recipe."""
    table = _sampling_recipe(backbone).get("teacher", {})
    try:
        return int(table["steps"]), float(table["cfg"])
    except (KeyError, TypeError, ValueError):
        where = SAMPLING_DIR / f"{backbone}.toml"
        raise BadInputError(
            f"recipe {where}: [teacher] needs steps (an integer) and cfg (a number)"
        ) from None
