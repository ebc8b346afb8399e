"""Textual-inversion embedding files: one learned token, one safetensors file.

The format is the one every common loader reads (checked against their source):

- diffusers' ``load_textual_inversion`` takes a state dict with exactly one key, the token,
  whose tensor is (D,) or (n, D) (``(n > 1, D)``: a multi-vector token ``<R>``, ``<R>_1`` …);
- AUTOMATIC1111 (``create_embedding_from_data``, "diffuser concepts") takes a dict with one
  tensor, (D,) or (n, D), and names the embedding after the FILE (the prompt uses the name);
- ComfyUI (``sd1_clip.load_embed``) takes every tensor whose last dimension is the text
  encoder's width, reshaped to (−1, D), also named after the file (``embedding:NAME``).

So wadi writes ``{token: (1, D) float32}`` with its provenance in the metadata, atomically,
and reads back any single-tensor safetensors file (a ``emb_params`` key, as kohya's files,
takes its token from the file name). Nothing is unpickled: ``.pt``/``.bin`` embeddings are
refused with one line.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

from wadi_cli.errors import BadInputError
from wadi_cli.io.metadata import provenance_metadata
from wadi_cli.io.paths import input_path_problem
from wadi_cli.io.safetensors_writer import save_safetensors

#: The ``adapter`` metadata value of a wadi embedding file (and of a checkpoint's).
EMBEDDING_KIND = "textual-inversion"
#: diffusers' default file name, which ``load_textual_inversion(FOLDER)`` finds by itself.
EMBEDDING_FILE = "learned_embeds.safetensors"
_ANONYMOUS_KEYS = ("emb_params", "*")


def save_embedding(
    path: str | os.PathLike[str],
    token: str,
    vectors: Tensor,
    config: Mapping[str, object] | None = None,
    extra: Mapping[str, str] | None = None,
) -> Path:
    """Write ``{token: vectors}`` ((D,) is stored as (1, D), float32) to ``path`` atomically,
    with provenance metadata (``config``) and ``extra`` string metadata."""
    v = vectors.detach().to("cpu", torch.float32).reshape(-1, vectors.shape[-1]).contiguous()
    meta = provenance_metadata(config=dict(config) if config is not None else None)
    meta.update(adapter=EMBEDDING_KIND, token=token, width=str(v.shape[-1]))
    meta.update(dict(extra or {}))
    return save_safetensors({token: v}, path, meta)


def load_embedding(path: str | os.PathLike[str]) -> tuple[str, Tensor, dict[str, str]]:
    """``(token, (n, D) float32 vectors, metadata)`` of an embedding file; a file that is
    missing, not safetensors, or not ONE tensor of rank 1 or 2 is one :class:`BadInputError`."""
    from safetensors import SafetensorError, safe_open

    p = Path(path).expanduser()
    problem = input_path_problem(p)
    if problem:
        raise BadInputError(f"--embedding {p}: {problem}")
    if p.is_dir():  # a `wadi invert` run folder (or any folder holding diffusers' default name)
        if not (p / EMBEDDING_FILE).is_file():
            raise BadInputError(f"--embedding {p}: a folder without {EMBEDDING_FILE}")
        p = p / EMBEDDING_FILE
    if p.suffix.lower() in (".pt", ".bin", ".ckpt"):
        raise BadInputError(
            f"--embedding {p}: pickle files are never loaded; convert it to .safetensors ({{token: tensor}})"
        )
    try:
        with safe_open(str(p), framework="pt", device="cpu") as f:
            keys = list(f.keys())
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in keys[:2]}
    except (SafetensorError, OSError, ValueError) as exc:
        raise BadInputError(f"--embedding {p}: not a safetensors file ({str(exc).splitlines()[0]})") from None
    if {"clip_l", "clip_g"} <= set(keys):
        raise BadInputError(
            f"--embedding {p}: an SDXL (clip_l + clip_g) embedding; wadi reads one-encoder ones"
        )
    if len(keys) != 1:
        raise BadInputError(
            f"--embedding {p}: holds {len(keys)} tensors; an embedding file holds one (the token)"
        )
    key = keys[0]
    vec = tensors[key]
    if vec.ndim not in (1, 2) or vec.numel() == 0:
        raise BadInputError(
            f"--embedding {p}: tensor {key!r} has shape {tuple(vec.shape)}; expected (D,) or (n, D)"
        )
    token = p.stem if key in _ANONYMOUS_KEYS else key
    return token, vec.reshape(-1, vec.shape[-1]).float(), meta


def embedding_config(meta: Mapping[str, str]) -> dict[str, object]:
    """The resolved config recorded in a wadi embedding file's metadata (``{}`` if none)."""
    try:
        found = json.loads(meta.get("wadi_config", "{}"))
    except ValueError:
        return {}
    return found if isinstance(found, dict) else {}
