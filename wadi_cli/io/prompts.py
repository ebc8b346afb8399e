"""Prompt files: the one reader that ``wadi sample``, ``wadi eval`` and ``wadi distill`` share."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from wadi_cli.errors import BadInputError
from wadi_cli.io.paths import input_path_problem

PROMPT_SUFFIXES: tuple[str, ...] = (".txt", ".jsonl", ".csv", ".parquet")


def _clean(values: Sequence[object], where: str) -> list[str]:
    out = []
    for v in values:
        if v is None or (isinstance(v, float) and v != v):  # missing / NaN cells
            continue
        s = " ".join(str(v).split())
        if s:
            out.append(s)
    if not out:
        raise BadInputError(f"{where}: holds no prompts (empty or whitespace only)")
    return out


def _column(rows: list[dict], column: str, where: str, column_flag: str) -> list[object]:
    if rows and column not in rows[0]:
        raise BadInputError(
            f"{where}: no column {column!r} (has {', '.join(map(str, rows[0]))}); set {column_flag}"
        )
    return [r.get(column) for r in rows]


def _parquet_column(p: Path, column: str, where: str, column_flag: str) -> list[object]:
    import pandas as pd

    try:
        frame = pd.read_parquet(p)
        if column not in frame.columns:
            cols = ", ".join(map(str, frame.columns))
            raise BadInputError(f"{where}: no column {column!r} (has {cols}); set {column_flag}")
        return frame[column].tolist()  # strings are decoded here (invalid UTF-8 fails here)
    except (BadInputError, OSError, ValueError, ImportError):
        raise
    except Exception as exc:  # noqa: BLE001 - pyarrow raises its own types on a corrupt file (ArrowException)
        reason = (str(exc).splitlines() or [""])[0]
        raise BadInputError(f"{where}: cannot read ({type(exc).__name__}: {reason})") from None


def read_prompt_file(
    path: str | os.PathLike[str],
    column: str = "prompt",
    flag: str = "--prompts",
    column_flag: str = "--prompt-column",
) -> list[str]:
    """Prompts of a ``.txt`` (one per line, ``#`` comment lines) / ``.jsonl`` / ``.csv`` /
    ``.parquet`` (``column``) file, whitespace normalised, blank entries skipped.
    :class:`BadInputError` if unreadable or empty; messages name ``flag`` / ``column_flag``."""
    p = Path(path).expanduser()
    where = f"{flag} {p}"
    problem = input_path_problem(p)
    if problem:
        raise BadInputError(f"{where}: {problem}")
    if p.is_dir():
        raise BadInputError(f"{where}: is a folder, not a prompt file")
    suffix = p.suffix.lower()
    if suffix not in PROMPT_SUFFIXES:
        raise BadInputError(f"{where}: unsupported type; use one of {', '.join(PROMPT_SUFFIXES)}")
    try:
        if suffix == ".parquet":
            return _clean(_parquet_column(p, column, where, column_flag), where)
        text = p.read_text(encoding="utf-8")
    except BadInputError:
        raise
    except (OSError, UnicodeDecodeError, ValueError, ImportError) as exc:
        raise BadInputError(
            f"{where}: cannot read ({str(exc).splitlines()[0] if str(exc) else exc})"
        ) from None
    if suffix == ".txt":  # one prompt per line; lines starting with '#' are comments
        return _clean([ln for ln in text.splitlines() if not ln.lstrip().startswith("#")], where)
    if suffix == ".jsonl":
        rows = []
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except (ValueError, RecursionError):  # RecursionError: [[[[... nested too deep
                raise BadInputError(f"{where}: line {i} is not valid JSON") from None
            if not isinstance(row, dict):
                raise BadInputError(f"{where}: line {i} is not a JSON object")
            rows.append(row)
        missing = [i for i, r in enumerate(rows, 1) if column not in r]
        if rows and len(missing) == len(rows):
            raise BadInputError(f"{where}: no row has the key {column!r}; set {column_flag}")
        return _clean([r.get(column) for r in rows], where)
    import csv
    import io

    try:
        rows = list(csv.DictReader(io.StringIO(text, newline="")))
    except csv.Error as exc:  # e.g. a field over csv's 128 KiB limit
        raise BadInputError(f"{where}: not a readable CSV file ({exc})") from None
    return _clean(_column(rows, column, where, column_flag), where)
