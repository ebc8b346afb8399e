"""LoRaD adapter files and merging on state dicts (no network needed).

File format: safetensors with keys ``<module path>.lorad_A`` [m, r] and
``<module path>.lorad_B`` [r, n/2] (fp32), where ``<module path>.weight`` is the base
weight rotated, and string metadata ``adapter=lorad``, ``rank``, ``role``, ``backbone``,
``base_model``, ``targets`` (JSON list) plus wadi's provenance keys.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from wadi_cli.errors import BadInputError, MismatchError
from wadi_cli.io import open_checkpoint, provenance_metadata, require_finite, save_safetensors
from wadi_cli.io.metadata import ALPHA_BAR_T_METADATA
from wadi_cli.io.tensor_map import Tensors, as_tensor_map, preview
from wadi_cli.lorad.config import LoRaDConfig
from wadi_cli.lorad.layer import lorad_theta, rotate_weight
from wadi_cli.lorad.model import A_SUFFIX, B_SUFFIX, inject_lorad, load_adapter_state_dict, remove_lorad

_RESERVED_METADATA = ("adapter", "rank", "role", "backbone", "base_model", "targets")


def adapter_paths(tensors: Mapping[str, Tensor]) -> tuple[list[str], int]:
    """Validate adapter tensors and return ``(module paths in key order, rank)``.

    Checks: every key ends in ``.lorad_A``/``.lorad_B``; every path has both; ``A`` is
    2-D [m, r], ``B`` is 2-D [r, h]; the rank is the same everywhere. Raises
    :class:`BadInputError` with the offending keys otherwise.
    """
    if not len(tensors):
        raise BadInputError("adapter holds no tensors")
    bad = [k for k in tensors if not k.endswith((A_SUFFIX, B_SUFFIX)) or k in (A_SUFFIX, B_SUFFIX)]
    if bad:
        raise BadInputError(
            "not a LoRaD adapter: keys must be '<module>.lorad_A' / '<module>.lorad_B'; "
            f"got {preview(bad, 5)}"
        )
    paths = list(dict.fromkeys(k[: -len(A_SUFFIX)] for k in tensors))
    unpaired = [p for p in paths if p + A_SUFFIX not in tensors or p + B_SUFFIX not in tensors]
    if unpaired:
        raise BadInputError(
            f"adapter has lorad_A without lorad_B (or the reverse) for: {preview(unpaired, 5)}"
        )
    ranks: dict[int, str] = {}
    for p in paths:
        a, b = tensors[p + A_SUFFIX], tensors[p + B_SUFFIX]
        if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0] or a.shape[1] < 1:
            raise BadInputError(
                f"{p}: lorad_A {tuple(a.shape)} and lorad_B {tuple(b.shape)} are not [m, r] and [r, n/2]"
            )
        if not (a.is_floating_point() and b.is_floating_point()):
            raise BadInputError(f"{p}: adapter tensors must be floating point")
        ranks.setdefault(int(a.shape[1]), p)
    if len(ranks) > 1:
        raise BadInputError(f"adapter mixes ranks {sorted(ranks)} (e.g. {preview(ranks.values(), 2)})")
    return paths, next(iter(ranks))


def save_adapter(
    path: str | os.PathLike[str],
    tensors: Mapping[str, Tensor],
    config: LoRaDConfig,
    extra_metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write an adapter file atomically (fp32 tensors + metadata). The rank and targets
    must agree with the tensors (empty ``config.targets`` means "those in the tensors")."""
    paths, rank = adapter_paths(tensors)
    if rank != config.rank:
        raise BadInputError(f"adapter tensors have rank {rank} but the config says {config.rank}")
    if config.targets and set(config.targets) != set(paths):
        diff = set(config.targets) ^ set(paths)
        raise BadInputError(f"config targets and adapter tensors differ: {preview(sorted(diff), 5)}")
    targets = list(config.targets) or paths
    meta = provenance_metadata(config={**config.to_dict(), "targets": targets})
    for key, value in (extra_metadata or {}).items():
        if key in _RESERVED_METADATA or not isinstance(value, str):
            raise BadInputError(f"extra adapter metadata {key!r} is reserved or not a string")
        meta[key] = value
    meta.update(
        adapter="lorad",
        rank=str(rank),
        role=config.role,
        backbone=config.backbone or "",
        base_model=config.base_model or "",
        targets=json.dumps(targets),
    )
    data = {k: v.detach().to(device="cpu", dtype=torch.float32).contiguous() for k, v in tensors.items()}
    return save_safetensors(data, path, meta)


def load_adapter(path: str | os.PathLike[str]) -> tuple[dict[str, Tensor], LoRaDConfig]:
    """Read and validate an adapter file; returns its tensors and its :class:`LoRaDConfig`
    (rank from the tensors; role, backbone, base model and targets from the metadata when
    present). Raises :class:`BadInputError` on anything inconsistent."""
    with open_checkpoint(path) as src:
        tensors = {k: src.get(k) for k in src}
        meta = src.metadata()
    where = str(path)
    try:
        paths, rank = adapter_paths(tensors)
    except BadInputError as exc:
        raise BadInputError(f"{where}: {exc}") from None
    for name, tensor in tensors.items():
        require_finite(where, name, tensor)
    if meta.get("rank") and meta["rank"] != str(rank):
        raise BadInputError(f"{where}: metadata says rank {meta['rank']} but the tensors have rank {rank}")
    targets = paths
    if meta.get("targets"):
        try:
            listed = json.loads(meta["targets"])
        except json.JSONDecodeError:
            raise BadInputError(f"{where}: metadata 'targets' is not valid JSON") from None
        if not isinstance(listed, list) or set(listed) != set(paths):
            raise BadInputError(f"{where}: metadata 'targets' does not match the adapter tensors")
        targets = listed
    try:
        config = LoRaDConfig(
            rank=rank,
            role=meta.get("role") or "student",
            targets=tuple(targets),
            backbone=meta.get("backbone") or None,
            base_model=meta.get("base_model") or None,
        )
    except BadInputError as exc:
        raise BadInputError(f"{where}: {exc}") from None
    return tensors, config


def _resolve_prefix(keys: set[str], paths: list[str], prefix: str | None) -> str:
    """The prefix to put before adapter paths to find their weights in ``keys``: the
    given one, else "" when everything matches, else the one prefix (e.g. ``unet.``) that
    makes every path match, else "" (and the caller reports the unmatched keys)."""
    if prefix is not None:
        return prefix
    if all(p + ".weight" in keys for p in paths):
        return ""
    probe = f".{paths[0]}.weight"
    candidates = {k[: -len(probe) + 1] for k in keys if k.endswith(probe)}
    fitting = [c for c in candidates if all(f"{c}{p}.weight" in keys for p in paths)]
    return fitting[0] if len(fitting) == 1 else ""


def merge_adapter_into_state_dict(
    base: Tensors,
    adapter: Mapping[str, Tensor],
    *,
    dtype: torch.dtype | None = None,
    prefix: str | None = None,
) -> dict[str, Tensor]:
    """Merge a LoRaD adapter into a base state dict without building the network.

    For every adapter path ``P`` the weight ``base[prefix + P + ".weight"]`` ([m, n], or a
    1×1 conv [m, n, 1, 1]) becomes ``R(A_P B_P) W`` (computed in fp32, fp64 for fp64
    bases); every other tensor passes through unchanged (bit-identical unless ``dtype``
    casts floating tensors). ``base`` may be a dict or a lazy
    :class:`wadi_cli.io.TensorSource`: shapes are checked from headers before any tensor
    is read, then tensors are read one at a time. ``prefix=None`` detects a common prefix
    such as ``unet.``.

    Raises:
        MismatchError: adapter paths without a matching weight (lists up to 5), or shapes
            that do not fit.
    """
    paths, _ = adapter_paths(adapter)
    base = as_tensor_map(base)
    keys = list(base.keys())
    keyset = set(keys)
    pre = _resolve_prefix(keyset, paths, prefix)
    unmatched = [p for p in paths if f"{pre}{p}.weight" not in keyset]
    if unmatched:
        raise MismatchError(
            f"{len(unmatched)} adapter module(s) have no '<path>.weight' in the base checkpoint: "
            f"{preview(unmatched, 5)}"
        )
    targets = {f"{pre}{p}.weight": p for p in paths}
    bad = []
    for key, p in targets.items():
        shape = tuple(base.shape(key))
        m, r = adapter[p + A_SUFFIX].shape
        half = adapter[p + B_SUFFIX].shape[1]
        if not (len(shape) == 2 or (len(shape) == 4 and shape[2:] == (1, 1))) or shape[:2] != (m, 2 * half):
            bad.append(f"{key} {shape} vs adapter [m={m}, n={2 * half}]")
    if bad:
        raise MismatchError(f"adapter shapes do not fit the base weights: {preview(bad)}")
    out: dict[str, Tensor] = {}
    for key in keys:
        tensor = base.get(key)
        if key in targets:
            p = targets[key]
            cd = torch.float64 if tensor.dtype == torch.float64 else torch.float32
            theta = lorad_theta(adapter[p + A_SUFFIX].to(cd), adapter[p + B_SUFFIX].to(cd))
            w2d = tensor.reshape(tensor.shape[0], tensor.shape[1])
            tensor = rotate_weight(w2d, theta, dtype=dtype or tensor.dtype).reshape(tensor.shape)
        elif dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        out[key] = tensor
    return out


_DTYPES: dict[str, torch.dtype] = {
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp32": torch.float32,
    "float32": torch.float32,
    "float": torch.float32,
}


def parse_dtype(value: str | torch.dtype | None) -> torch.dtype | None:
    """``"fp16"|"bf16"|"fp32"`` (or a torch floating dtype, or None) -> torch dtype."""
    if value is None or isinstance(value, torch.dtype):
        return value
    key = str(value).strip().lower()
    if key not in _DTYPES:
        raise BadInputError(f"unknown dtype {value!r}; use fp16, bf16 or fp32")
    return _DTYPES[key]


MERGE_FORMATS: tuple[str, ...] = ("merged", "single-file")


def merge_adapter_file(
    base: str | os.PathLike[str],
    adapter: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    dtype: str | torch.dtype | None = None,
    prefix: str | None = None,
    overwrite: bool = False,
    fmt: str = "merged",
    any_backbone: bool = False,
) -> dict[str, Any]:
    """Merge the adapter file ``adapter`` into the checkpoint ``base`` (anything
    :func:`wadi_cli.io.open_checkpoint` reads) and write one safetensors file ``out``
    atomically, with provenance metadata (and the adapter's recorded ᾱ_T). Nothing is
    written on error. ``fmt="single-file"`` writes the original Stable Diffusion layout
    instead (U-Net + the VAE and text encoder of ``base``, which must then be a pipeline
    folder or hub id of an sd15/sd21 adapter). An adapter recorded for one backbone is
    refused on a base of another architecture (:func:`check_base_backbone`) unless
    ``any_backbone`` (a deliberate transfer).

    Returns:
        A summary: ``out``, ``merged_layers``, ``tensors``, ``rank``, ``role``, ``dtype``.
    """
    if fmt not in MERGE_FORMATS:
        raise BadInputError(f"--format must be one of {', '.join(MERGE_FORMATS)}; got {fmt!r}")
    torch_dtype = parse_dtype(dtype)
    out_path = Path(out)
    if out_path.exists() and not overwrite:
        raise BadInputError(f"{out_path} already exists (pass --overwrite to replace it)")
    if out_path.is_dir():
        raise BadInputError(f"{out_path} is a folder; --out must be a .safetensors file path")
    tensors, config = load_adapter(adapter)
    with open_checkpoint(adapter) as src:
        alpha = src.metadata().get(ALPHA_BAR_T_METADATA)
    from wadi_cli.lorad.merge_checks import warn_if_absurd

    warn_if_absurd(tensors, str(adapter))
    base_path = Path(base)
    if base_path.exists() and out_path.exists() and out_path.resolve() == base_path.resolve():
        raise BadInputError("--out must differ from the base checkpoint it is read from")
    root = _single_file_base(base, config) if fmt == "single-file" else None
    with open_checkpoint(root or base, "unet" if root else None) as src:
        if not any_backbone:
            check_base_backbone(src, tensors, config, prefix)
        merged = merge_adapter_into_state_dict(src, tensors, dtype=torch_dtype, prefix=prefix)
        for name, tensor in merged.items():  # a rotation of finite weights is finite: NaN/Inf came with BASE
            require_finite(base, name, tensor)
        recipe = {
            "operation": "merge_lorad",
            "format": fmt,
            "base": str(base),
            "adapter": str(adapter),
            "dtype": str(torch_dtype).removeprefix("torch.") if torch_dtype else "unchanged",
            **{k: v for k, v in config.to_dict().items() if k != "targets"},
            "merged_layers": len(config.targets),
        }
        meta = provenance_metadata(config=recipe, sources=[str(base), str(adapter)])
        if alpha:
            meta[ALPHA_BAR_T_METADATA] = alpha
        if root is None:
            save_safetensors(merged, out_path, meta)
            count = len(merged)
        else:
            from wadi_cli.io.sd_single_file_write import save_single_file

            unet_config = json.loads((root / "unet" / "config.json").read_text(encoding="utf-8"))
            count = save_single_file(out_path, merged, unet_config, root, str(config.backbone), meta)
    return {
        "out": str(out_path),
        "merged_layers": len(config.targets),
        "tensors": count,
        "rank": config.rank,
        "role": config.role,
        "dtype": recipe["dtype"],
        "format": fmt,
    }


def check_base_backbone(
    base: Tensors, adapter: Mapping[str, Tensor], config: LoRaDConfig, prefix: str | None = None
) -> None:
    """Refuse a base whose denoiser is not built like the adapter's recorded backbone, from
    headers only: (1) LoRaD adapts ``nn.Linear`` layers only, so a target that is a 1×1 conv
    in ``base`` belongs to another architecture (an SD2.1 adapter's proj_in on SD1.5); (2)
    the transformer blocks' proj_in / proj_out must be Linear (2-D) exactly when the
    backbone's shipped U-Net config says ``use_linear_projection`` (an SD1.5 adapter on
    SD2.1). Other misfits (missing layers, other sizes) are refused by the merge itself."""
    name = getattr(config, "backbone", None)
    if not name:
        return
    from wadi_cli.backbones import get_backbone

    try:
        backbone = get_backbone(str(name))
    except BadInputError:
        return  # a backbone this version does not know: nothing to compare with
    base = as_tensor_map(base)
    keys = list(base.keys())
    paths, _ = adapter_paths(adapter)
    pre = _resolve_prefix(set(keys), paths, prefix)
    present = set(keys)
    weights = [f"{pre}{p}.weight" for p in paths if f"{pre}{p}.weight" in present]
    bad = [f"{w} is a conv {tuple(base.shape(w))}" for w in weights if len(base.shape(w)) == 4]
    missing = len(paths) - len(weights)
    if missing and not bad:  # another architecture (an SDXL adapter on SD1.5): say so, not a KeyError
        absent = next(f"{pre}{p}.weight" for p in paths if f"{pre}{p}.weight" not in present)
        bad = [f"{absent} is not in the base"] * missing
    if backbone.family == "unet" and not bad:
        linear = bool(backbone.denoiser_config().get("use_linear_projection", False))
        proj = [k for k in keys if k.startswith(pre) and _PROJ.search(k)]
        bad = [
            f"{k} is {'a conv' if linear else 'Linear'}" for k in proj if (len(base.shape(k)) == 2) != linear
        ]
    if bad:
        raise MismatchError(
            f"the adapter was made for backbone {name!r} but the base is not built like {name} "
            f"({bad[0]}; {len(bad)} such layer(s)); pass --any-backbone to merge it anyway"
        )


_PROJ = re.compile(r"attentions\.\d+\.proj_(in|out)\.weight$")


def _single_file_base(base: str | os.PathLike[str], config: LoRaDConfig) -> Path:
    """The pipeline folder a single-file merge reads its U-Net, VAE and text encoder from."""
    from wadi_cli.io.hub import looks_like_repo_id, resolve_repo
    from wadi_cli.io.hub_files import FetchPlan
    from wadi_cli.io.sd_single_file_write import check_single_file_backbone

    layout = check_single_file_backbone(str(config.backbone))
    path = Path(base).expanduser()
    folders = ("unet", "vae", "text_encoder") + (("text_encoder_2",) if layout == "sdxl" else ())
    if path.exists():
        if not all((path / f).is_dir() for f in folders):
            need = ", ".join(f"{f}/" for f in folders)
            raise BadInputError(f"{path}: --format single-file needs a pipeline folder (with {need})")
        return path
    if looks_like_repo_id(str(base)):
        return resolve_repo(str(base), FetchPlan(folders=folders, weights=folders))
    raise BadInputError(f"{path}: no such file or directory")


def apply_adapter(
    model: nn.Module, tensors: Mapping[str, Tensor], *, merge: bool = False, init_seed: int | None = None
) -> list[str]:
    """Wrap exactly the adapter's modules of ``model`` with LoRaD (rank read from the
    tensors) and load the tensors strictly. With ``merge=True`` the rotation is then
    baked into the weights and the wrappers removed (plain model, no adapter cost).

    Returns:
        The adapted module paths.
    """
    paths, rank = adapter_paths(tensors)
    inject_lorad(model, paths, rank, init_seed=init_seed)
    try:
        load_adapter_state_dict(model, tensors, strict=True)
    except BaseException:
        remove_lorad(model, merge=False)  # leave the model as it was
        raise
    if merge:
        remove_lorad(model, merge=True)
    return paths
