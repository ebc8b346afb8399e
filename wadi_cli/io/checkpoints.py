"""open_checkpoint: find the weights behind a path and open them as a TensorSource.

Accepted inputs, in the order they are recognised:

- a folder with ``model_index.json`` (diffusers pipeline): the denoiser subfolder,
  ``unet`` if present else ``transformer`` (``component=`` overrides);
- a folder with diffusers weights (``diffusion_pytorch_model[.VARIANT].safetensors``,
  its sharded ``.safetensors.index[.VARIANT].json``, transformers' ``model.safetensors``,
  or exactly one ``*.safetensors``);
- a ``.safetensors`` file (diffusers names, or original SD names ``model.diffusion_model.*``
  which are mapped to diffusers names lazily) or a ``*.safetensors.index.json``;
- ``.ckpt/.bin/.pt/.pth`` files, only through ``torch.load(weights_only=True)``: files
  that need real unpickling are refused;
- a hub id ``org/name`` that is not a local path: the denoiser folder of that hub
  pipeline, fetched alone (cache first; see :func:`wadi_cli.io.hub.resolve_model`).
"""

from __future__ import annotations

import io
import json
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from wadi_cli.errors import CheckpointError
from wadi_cli.io.hub import looks_like_repo_id, resolve_model
from wadi_cli.io.metadata import ALPHA_BAR_T_METADATA
from wadi_cli.io.paths import input_path_problem
from wadi_cli.io.sd_single_file import is_ldm_checkpoint, ldm_unet_table
from wadi_cli.io.sources import DictStore, SafetensorsStore, Store, TensorSource, require_tensors

PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth")
DENOISERS = ("unet", "transformer")
WEIGHT_STEMS = ("diffusion_pytorch_model", "model")  # diffusers, then transformers
CONVERT_HINT = (
    'convert it to safetensors once, in an environment you trust: python -c "import torch; '
    "from safetensors.torch import save_file; sd = torch.load('IN', weights_only=False); "
    "save_file(sd.get('state_dict', sd), 'OUT.safetensors')\""
)


def _plain_source(path: Path, stores: list[Store], kind: str) -> TensorSource:
    entries: dict[str, tuple[Store, str]] = {}
    for store in stores:
        for raw in store.names():
            entries[raw] = (store, raw)
    return TensorSource(path, entries, f"{kind} ({len(entries)} tensors)", stores=stores)


def _ldm_source(path: Path, store: Store, config: Mapping[str, Any] | None, ema: bool) -> TensorSource:
    shapes = {k: store.dtype_shape(k)[1] for k in store.names()}
    try:
        table = ldm_unet_table(shapes, config=config, ema=ema)
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    desc = (
        f"original {table.label} single file, {len(table.names)} U-Net tensors mapped to diffusers "
        f"names{' (EMA copy)' if table.ema else ''}; {table.ignored} non-U-Net tensors ignored"
    )
    return TensorSource(path, {new: (store, old) for new, old in table.names.items()}, desc)


def _unpickler_reason(exc: BaseException) -> str:
    """The one informative line of torch's long weights-only error (for files that are not
    pickled code, only broken: wadi's own words say what a refusal of code means)."""
    text = str(exc)
    at = text.find("WeightsUnpickler error:")
    if at >= 0:
        text = text[at + len("WeightsUnpickler error:") :]
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return (lines[0] if lines else type(exc).__name__)[:200]


#: what torch's safe loader itself needs: tensors rebuilt from storages, plain containers
_TENSOR_GLOBALS = ("torch.", "collections.OrderedDict", "_codecs.encode", "builtins.set")


def _pickled_globals(path: Path) -> list[str]:
    """The Python callables and classes ``path``'s pickles name (``module.name``), beyond
    what a file of plain tensors needs, found by reading the pickle opcodes (nothing is
    executed, and torch's error text is not needed): a pickle can only run code by naming
    one. A zip checkpoint's ``data.pkl`` and every pickle of a legacy file are read."""
    import pickletools
    import zipfile

    streams: list[bytes] = []
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                streams = [z.read(n) for n in z.namelist() if n.endswith(".pkl")]
        else:
            streams = [path.read_bytes()]
    except (OSError, zipfile.BadZipFile, RuntimeError):
        return []
    found: list[str] = []
    for data in streams:
        pos, strings = 0, []
        while pos < len(data):
            try:
                for op, arg, at in pickletools.genops(io.BytesIO(data[pos:])):
                    if op.name in ("GLOBAL", "INST"):
                        found.append(str(arg).replace(" ", "."))
                    elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                        found.append(f"{strings[-2]}.{strings[-1]}")
                    elif isinstance(arg, str):
                        strings.append(arg)
                    end = at
                pos += end + 1  # legacy files hold several pickles back to back
            except Exception:  # noqa: BLE001 - junk after (or instead of) a pickle
                break
    unsafe = [g for g in dict.fromkeys(found) if not g.startswith(_TENSOR_GLOBALS)]
    return unsafe


def pickled_code_error(path: Path, names: list[str]) -> CheckpointError:
    """The refusal of a file that holds pickled code, in wadi's words."""
    shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    return CheckpointError(
        f"{path}: holds pickled Python code ({shown}), not just tensors; wadi will not run it, "
        f"since loading it could execute anything. If you trust the file, {CONVERT_HINT}"
    )


def load_pickle_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """Load a ``.ckpt/.bin/.pt/.pth`` file with the safe loader, or refuse with one line."""
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: empty file (0 bytes)")
    try:
        with warnings.catch_warnings():  # torch warns about odd pickle protocols in junk files
            warnings.simplefilter("ignore")
            try:
                obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as exc:
                if "mmap" not in str(exc):
                    raise
                obj = torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except Exception as exc:  # noqa: BLE001 - on junk, torch's loader raises anything (KeyError, ...)
        names = _pickled_globals(path)
        if names:
            raise pickled_code_error(path, names) from None
        raise CheckpointError(
            f"{path}: not a readable PyTorch checkpoint ({_unpickler_reason(exc)})"
        ) from None
    return require_tensors(path, obj)


def _open_index(index: Path) -> list[Store]:
    """Open the shards of a ``*.safetensors.index.json``; each store exposes only its listed names."""
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ValueError("weight_map must map names to file names")
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{index}: not a valid sharded-checkpoint index ({exc})") from None
    by_shard: dict[str, list[str]] = {}
    for name, shard in weight_map.items():
        by_shard.setdefault(shard, []).append(name)
    stores: list[Store] = []
    try:
        for shard, names in by_shard.items():
            shard_path = index.parent / shard
            if Path(shard).is_absolute() or ".." in Path(shard).parts or not shard_path.is_file():
                raise CheckpointError(f"{index}: shard {shard!r} listed in the index is missing")
            stores.append(SafetensorsStore(shard_path, only=names))
    except BaseException:
        for store in stores:  # do not leak the shards already opened
            store.close()
        raise
    return stores


def _open_file(path: Path, config: Mapping[str, Any] | None, ema: bool) -> tuple[TensorSource, int]:
    """Open one file; returns the source and its number of shards."""
    name = path.name.lower()
    if name.endswith(".index.json") and ".safetensors" in name:
        stores = _open_index(path)
        return _plain_source(path, stores, f"sharded safetensors, {len(stores)} files"), len(stores)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        store: Store = DictStore(path, load_pickle_checkpoint(path))
        kind = "PyTorch file read with the safe loader (weights_only)"
    elif path.suffix.lower() == ".safetensors" or _looks_like_safetensors(path):
        store = SafetensorsStore(path)
        kind = "safetensors file"
    else:
        raise CheckpointError(
            f"{path}: unknown checkpoint format "
            "(expected .safetensors, a diffusers folder, or .ckpt/.bin/.pt)"
        )
    if is_ldm_checkpoint(store.names()):
        return _ldm_source(path, store, config, ema), 1
    return _plain_source(path, [store], kind), 1


def _looks_like_safetensors(path: Path) -> bool:
    with open(path, "rb") as fh:
        head = fh.read(9)
    return len(head) == 9 and head[8:9] == b"{"


def _weight_candidates(variant: str | None) -> list[str]:
    """File names to look for in a model folder, most preferred first."""
    variants = [variant] if variant else [None, "fp16"]
    out: list[str] = []
    for stem in WEIGHT_STEMS:
        for v in variants:
            tag = f".{v}" if v else ""
            out += [f"{stem}{tag}.safetensors", f"{stem}.safetensors.index{tag}.json"]
    for v in variants:
        tag = f".{v}" if v else ""
        out += [f"{stem}{tag}{ext}" for stem in WEIGHT_STEMS for ext in (".bin", ".ckpt", ".pt", ".pth")]
    return out


def _find_weights(folder: Path, variant: str | None) -> Path:
    for cand in _weight_candidates(variant):
        if (folder / cand).is_file():
            return folder / cand
    loose = sorted(p.name for p in folder.glob("*.safetensors"))
    if variant is None and len(loose) == 1:
        return folder / loose[0]
    found = ", ".join(loose) if loose else "no .safetensors files"
    wanted = f"diffusion_pytorch_model{'.' + variant if variant else ''}.safetensors"
    hint = "; pick one with variant=..." if len(loose) > 1 else ""
    raise CheckpointError(f"{folder}: no model weights found (looked for {wanted}; found {found}){hint}")


def _pick_component(folder: Path, component: str | None) -> str:
    if component is not None:
        if (folder / component).is_dir():
            return component
        raise CheckpointError(f"{folder}: pipeline has no {component!r} folder (has: {_components(folder)})")
    for name in DENOISERS:
        if (folder / name).is_dir():
            return name
    raise CheckpointError(
        f"{folder}: pipeline has neither unet/ nor transformer/ (has: {_components(folder)}); pass component="
    )


def _components(folder: Path) -> str:
    names = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    return ", ".join(names) or "no subfolders"


def open_checkpoint(
    path: str | os.PathLike[str],
    component: str | None = None,
    *,
    variant: str | None = None,
    ldm_config: Mapping[str, Any] | None = None,
    ema: bool = False,
) -> TensorSource:
    """Open a checkpoint for lazy reading under diffusers tensor names.

    ``component`` picks a pipeline subfolder (default: ``unet``, else ``transformer``);
    ``variant`` picks e.g. ``fp16`` weights (default: non-variant, else ``fp16``);
    ``ldm_config`` is the diffusers U-Net config of an original SD single file (default:
    the shipped SD1.5 / SD2.1 config, chosen by the detected version); ``ema`` takes the
    EMA copy of such a file. Raises :class:`CheckpointError` with one line on bad input.
    """
    p = Path(path).expanduser()
    if not p.exists() and _is_hub_model_id(str(path)):
        p = resolve_model(str(path), variant=variant)  # the denoiser folder of a hub pipeline
    problem = input_path_problem(p)
    if problem:
        raise CheckpointError(f"{p}: {problem}")
    if p.is_file():
        if component is not None:
            raise CheckpointError(f"{p}: component={component!r} needs a pipeline folder, not a file")
        return _open_file(p, ldm_config, ema)[0]
    where = "diffusers model folder"
    folder = p
    if (p / "model_index.json").is_file():
        component = _pick_component(p, component)
        folder = p / component
        where = f"diffusers pipeline folder ({component}"
    elif component is not None:
        if not (p / component).is_dir():
            raise CheckpointError(f"{p}: has no {component!r} subfolder")
        folder = p / component
    elif not any(p.glob("*.safetensors*")) and any((p / d).is_dir() for d in DENOISERS):
        # a denoiser-only repository (PixArt-α 256: transformer/ and no model_index.json)
        component = _pick_component(p, None)
        folder = p / component
        where = f"diffusers pipeline folder ({component}"
    weights = _find_weights(folder, variant)
    src, shards = _open_file(weights, ldm_config, ema)
    parts = [f"sharded: {shards} files" if shards > 1 else None]
    if variant or ".fp16." in weights.name:
        parts.append(f"{variant or 'fp16'} variant")
    extra = ", ".join(x for x in parts if x)
    if where.endswith("folder"):
        where += f" ({extra})" if extra else ""
    else:
        where += f", {extra})" if extra else ")"
    src.path = p
    src.description = f"{where}: {src.description}"
    return src


def _is_hub_model_id(text: str) -> bool:
    """``org/name`` that is not a local file name (no checkpoint suffix, one slash)."""

    lowered = text.lower()
    suffixes = (".safetensors", ".json", *PICKLE_SUFFIXES)
    if text.count("/") != 1 or not looks_like_repo_id(text) or lowered.endswith(suffixes):
        return False
    return not Path(text).parent.exists()  # "runs/sd15" with a local runs/ is a missing local path


def recorded_alpha_bar_T(path: str | os.PathLike[str], component: str | None = None) -> float | None:
    """ᾱ_T recorded in the metadata of weights wadi wrote (an adapter, a merged or swapped
    file, the denoiser of an exported pipeline folder), or ``None`` when there is none."""

    p = Path(path).expanduser()
    if not p.exists():
        return None
    try:
        with open_checkpoint(p, component) as src:
            value = dict(src.metadata()).get(ALPHA_BAR_T_METADATA)
    except (CheckpointError, OSError, AttributeError):
        return None
    try:
        return float(value) if value not in (None, "") else None
    except ValueError:
        return None


def load_state_dict(path: str | os.PathLike[str], **kwargs: Any) -> dict[str, torch.Tensor]:
    """Eagerly read a whole checkpoint (convenience for small models); kwargs as open_checkpoint."""
    with open_checkpoint(path, **kwargs) as src:
        return dict(src.items())
