"""Caption files for ``wadi eval --captions``: one caption per generated image.

- ``.txt``: one caption per line (``#`` comment lines and blank lines skipped);
- ``.jsonl`` / ``.csv`` / ``.parquet``: the ``caption`` column (``prompt`` when there is no
  ``caption``; ``--caption-column`` chooses another);
- ``.json``: COCO's own annotation file (``captions_val2014.json``,
  ``captions_val2017.json``): one caption per image, the one with the lowest annotation
  id, images in increasing id order.

Whitespace is normalised and empty captions are skipped; an empty file is refused.
Under ``--protocol dmd2|gigagan`` a ``.txt`` is read as DMD2's ``captions_coco14_test.txt``
is written: every line is one caption exactly as it stands (trailing and repeated spaces,
a leading ``#``), only blank lines skipped (:func:`read_caption_lines`).
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

from wadi_cli.errors import BadInputError
from wadi_cli.io.prompts import PROMPT_SUFFIXES, read_prompt_file

CAPTION_SUFFIXES: tuple[str, ...] = (*PROMPT_SUFFIXES, ".json")
_FLAG = "--captions"
_COLUMN_FLAG = "--caption-column"


def _first_row_keys(path: Path) -> list[str]:
    """Column names of a ``.csv`` (header) / ``.jsonl`` (first object) / ``.parquet`` file."""
    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            import pyarrow.parquet as pq  # optional dependency

            return list(pq.read_schema(path).names)
        with path.open(encoding="utf-8") as fh:
            for line in fh:
                if not line.strip():
                    continue
                if suffix == ".csv":
                    return next(csv.reader([line]))
                row = json.loads(line)
                return list(row) if isinstance(row, dict) else []
    except Exception:  # noqa: BLE001 - the reader below reports unreadable files in one line
        return []
    return []


def coco_captions(path: str | os.PathLike[str]) -> list[tuple[int, str, str]]:
    """``(image_id, file_name, caption)`` of a COCO caption annotation file: one caption per
    image (lowest annotation id), images in increasing id order."""
    p = Path(path).expanduser()
    where = f"{_FLAG} {p}"
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadInputError(f"{where}: cannot read it as JSON ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        raise BadInputError(f"{where}: not a COCO caption file (no 'annotations' list)")
    files = {int(im["id"]): str(im.get("file_name", "")) for im in data.get("images", []) if "id" in im}
    best: dict[int, tuple[int, str]] = {}
    for ann in data["annotations"]:
        try:
            image, ann_id, text = int(ann["image_id"]), int(ann.get("id", 0)), str(ann["caption"])
        except (KeyError, TypeError, ValueError):
            raise BadInputError(f"{where}: an annotation lacks image_id or caption") from None
        text = " ".join(text.split())
        if text and (image not in best or ann_id < best[image][0]):
            best[image] = (ann_id, text)
    if not best:
        raise BadInputError(f"{where}: holds no captions")
    return [(i, files.get(i, ""), best[i][1]) for i in sorted(best)]


def read_caption_lines(path: Path) -> list[str]:
    """Every non-blank line of a UTF-8 text file as one caption, unchanged but for its line
    end (DMD2's and GigaGAN's caption files)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise BadInputError(f"{_FLAG} {path}: cannot read it as UTF-8 text ({exc})") from None
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        raise BadInputError(f"{_FLAG} {path}: holds no captions")
    return lines


def read_captions(
    path: str | os.PathLike[str], column: str | None = None, style: str = "normalised"
) -> list[str]:
    """The captions of ``path`` in file order (see the module docstring for the formats);
    ``style="lines"`` reads a ``.txt`` line by line, as is."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise BadInputError(f"{_FLAG} {p}: no such file")
    suffix = p.suffix.lower()
    if style == "lines" and suffix == ".txt":
        return read_caption_lines(p)
    if suffix not in CAPTION_SUFFIXES:
        raise BadInputError(f"{_FLAG} {p}: unsupported type; use one of {', '.join(CAPTION_SUFFIXES)}")
    if suffix == ".json":
        return [caption for _, _, caption in coco_captions(p)]
    if column is None:
        keys = _first_row_keys(p) if suffix != ".txt" else []
        column = "prompt" if "caption" not in keys and "prompt" in keys else "caption"
    return read_prompt_file(p, column, flag=_FLAG, column_flag=_COLUMN_FLAG)


def select_captions(captions: list[str], num_images: int | None, source: str) -> list[str]:
    """The first ``num_images`` captions (all when ``None``). Asking for more images than
    there are captions is refused: captions are never repeated."""
    if num_images is None:
        return list(captions)
    if num_images < 1:
        raise BadInputError(f"--num-images must be at least 1, got {num_images}")
    if num_images > len(captions):
        raise BadInputError(
            f"--num-images {num_images} but {source} holds only {len(captions)} captions "
            f"(captions are never repeated): pass -n {len(captions)} or a longer caption file"
        )
    return list(captions[:num_images])
