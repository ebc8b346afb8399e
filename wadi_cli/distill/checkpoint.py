"""Run folders and checkpoints that resume exactly.

Layout of ``--out RUN``::

    RUN/.wadi                      marker (only wadi folders are ever replaced)
    RUN/config.json                the resolved config of the latest start / resume
    RUN/metrics.csv                one row per logged step
    RUN/checkpoints/step-00000300/ one folder per checkpoint, written atomically:
        student.safetensors        student adapter (LoRaD adapter file format; for ``wadi invert``
                                   the learned token, a textual-inversion file)
        fake.safetensors           fake-score adapter (same format, role "fake")
        ema.safetensors            EMA of the student adapter (when enabled)
        optim_student.safetensors  AdamW state (tensors; param groups in the metadata)
        optim_fake.safetensors
        rng.safetensors            every RNG state (trainer generator, torch CPU / CUDA)
        state.json                 step, data position, targets, resolved config

Only safetensors and JSON are read back: nothing is ever unpickled. A checkpoint folder
gets its ``step-NNNNNNNN`` name only once every file in it is complete and on disk, and an
old one loses its name before it is deleted, so every ``step-*`` folder is whole, also
after a ``kill -9``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from wadi_cli.errors import BadInputError, CheckpointError, MismatchError
from wadi_cli.io import (
    atomic_output_dir,
    check_writable,
    create_output_dir,
    discard_dir,
    open_checkpoint,
    provenance_metadata,
    save_safetensors,
    write_text_atomic,
)
from wadi_cli.io.embeddings import EMBEDDING_KIND, save_embedding
from wadi_cli.io.metadata import ALPHA_BAR_T_METADATA
from wadi_cli.lorad import LoRaDConfig, load_adapter, save_adapter

CHECKPOINTS = "checkpoints"
_STEP_RE = re.compile(r"^step-(\d{8})$")


@dataclass
class Checkpoint:
    """Everything a run needs to continue bit-exactly."""

    step: int
    data_position: int
    adapters: dict[str, dict[str, Tensor]]  # "student" / "fake" / "ema" -> adapter tensors
    optimizers: dict[str, dict[str, Any]]  # "student" / "fake" -> optimizer.state_dict()
    rng: dict[str, Tensor]
    config: dict[str, Any]
    targets: dict[str, list[str]]  # "student" / "fake" -> module paths
    extra: dict[str, Any] = field(default_factory=dict)


# ---- optimizer state <-> safetensors ----------------------------------------------
def _flatten_state(
    entry: Mapping[str, Any], prefix: str, tensors: dict[str, Tensor], scalars: dict[str, Any]
) -> None:
    """Tensors and JSON scalars of one parameter's optimizer state; nested dicts (e.g.
    bitsandbytes' quantisation state) are flattened with ``/`` in the key."""
    for key, value in entry.items():
        path = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, Tensor):
            tensors[path] = value
        elif isinstance(value, Mapping):
            _flatten_state(value, path, tensors, scalars)
        else:
            scalars[path] = value


def _nest(flat: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for path, value in flat.items():
        *parents, leaf = path.split("/")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


def _optimizer_to_file(state: Mapping[str, Any], path: Path) -> None:
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, entry in state["state"].items():
        flat: dict[str, Tensor] = {}
        _flatten_state(entry, "", flat, scalars.setdefault(str(idx), {}))
        tensors.update({f"state.{idx}.{k}": v for k, v in flat.items()})
    meta = {"param_groups": json.dumps(state["param_groups"]), "scalars": json.dumps(scalars)}
    save_safetensors(tensors, path, meta)


def _optimizer_from_file(path: Path) -> dict[str, Any]:
    with open_checkpoint(path) as src:
        tensors = {k: src.get(k) for k in src}
        meta = src.metadata()
    try:
        groups = json.loads(meta["param_groups"])
        scalars = json.loads(meta.get("scalars", "{}"))
    except (KeyError, json.JSONDecodeError):
        raise CheckpointError(f"{path}: not an optimizer state written by wadi") from None
    flat: dict[int, dict[str, Any]] = {}
    try:
        for key, value in tensors.items():
            _, idx, name = key.split(".", 2)
            flat.setdefault(int(idx), {})[name] = value
        for idx, entry in scalars.items():
            flat.setdefault(int(idx), {}).update(entry)
        if not isinstance(groups, list) or not all(isinstance(g, dict) for g in groups):
            raise TypeError("param_groups is not a list of objects")
    except (ValueError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"{path}: not an optimizer state written by wadi ({exc})") from None
    state = {idx: _nest(entry) for idx, entry in flat.items()}
    for group in groups:
        if "betas" in group:
            group["betas"] = tuple(group["betas"])
    return {"state": state, "param_groups": groups}


# ---- run folder -------------------------------------------------------------------
def check_run_dir(run: str | os.PathLike[str], resume: bool) -> Path:
    """Check (before any training) that ``run`` can hold a run: writable, and either new,
    empty, or a wadi run folder; refuse to start over a run that has checkpoints unless
    resuming. Creates nothing."""
    path = check_writable(run, directory=True)
    if not resume and list_checkpoints(path):
        raise BadInputError(
            f"--out {path} already holds checkpoints; pass --resume latest to continue it "
            "or choose another --out"
        )
    return path


def create_run_dir(path: Path, kind: str = "distill-run") -> Path:
    """Create the run folder with its ``.wadi`` marker (``kind``; after every check passed)."""
    return create_output_dir(path, kind)


def list_checkpoints(run: str | os.PathLike[str]) -> list[Path]:
    """Checkpoint folders of ``run``, oldest first."""
    root = Path(run) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _STEP_RE.match(p.name)]
    return sorted(found, key=lambda p: int(_STEP_RE.match(p.name).group(1)))  # type: ignore[union-attr]


def find_checkpoint(run: str | os.PathLike[str], which: str | os.PathLike[str] = "latest") -> Path:
    """``latest`` (the newest checkpoint of ``run``), a checkpoint folder, or a run folder
    (its latest checkpoint)."""
    if str(which) == "latest":
        found = list_checkpoints(run)
        if not found:
            what = "no such folder" if not Path(run).exists() else "not a folder"
            if Path(run).is_dir():
                what = f"holds no checkpoints (nothing under {CHECKPOINTS}/); not a wadi distill run folder?"
            raise CheckpointError(f"{run}: {what}")
        return found[-1]
    path = Path(which).expanduser()
    if (path / "state.json").is_file():
        return path
    if path.is_dir() and list_checkpoints(path):
        return list_checkpoints(path)[-1]
    raise CheckpointError(f"{path}: not a wadi distill checkpoint or run folder")


def save_checkpoint(run: str | os.PathLike[str], ckpt: Checkpoint, keep_last: int) -> Path:
    """Write ``ckpt`` atomically as ``run/checkpoints/step-NNNNNNNN`` and delete all but
    the newest ``keep_last`` checkpoints."""
    dest = Path(run) / CHECKPOINTS / f"step-{ckpt.step:08d}"
    dest.parent.mkdir(parents=True, exist_ok=True)
    backbone, base = ckpt.config.get("backbone"), ckpt.config.get("model")
    kind = ckpt.config.get("adapter", "lorad")
    with atomic_output_dir(dest) as tmp:
        for name, tensors in ckpt.adapters.items():
            if ckpt.extra.get("kind") == EMBEDDING_KIND:  # `wadi invert`: an embedding file
                (token, vector), config = next(iter(tensors.items())), ckpt.config
                save_embedding(tmp / f"{name}.safetensors", token, vector, config, {"step": str(ckpt.step)})
                continue
            role = "fake" if name == "fake" else "student"
            cfg = LoRaDConfig(
                rank=int(ckpt.config["fake_rank" if role == "fake" else "rank"]),
                role=role,
                targets=tuple(ckpt.targets[role]),
                backbone=backbone,
                base_model=base,
            )
            extra = {"ema_decay": str(ckpt.config.get("ema_decay"))} if name == "ema" else {}
            if role == "student" and ckpt.config.get("alpha_bar_T") is not None:
                extra[ALPHA_BAR_T_METADATA] = str(ckpt.config["alpha_bar_T"])
            if role == "student" and kind == "orthogonal":  # an adapter file names its map
                extra["orthogonal_map"] = str(ckpt.config["orthogonal_map"])
            if role == "student" and kind != "lorad":
                save_baseline_adapter(tmp / f"{name}.safetensors", tensors, kind, cfg, extra)
            else:
                save_adapter(tmp / f"{name}.safetensors", tensors, cfg, extra_metadata=extra)
        for name, state in ckpt.optimizers.items():
            _optimizer_to_file(state, tmp / f"optim_{name}.safetensors")
        save_safetensors(ckpt.rng, tmp / "rng.safetensors")
        state = {
            "step": ckpt.step,
            "data_position": ckpt.data_position,
            "targets": ckpt.targets,
            "config": ckpt.config,
            "extra": ckpt.extra,
        }
        write_text_atomic(tmp / "state.json", json.dumps(state, indent=2, sort_keys=True) + "\n")
    for old in list_checkpoints(run)[:-keep_last]:
        with contextlib.suppress(OSError):
            discard_dir(old)
    return dest


def save_baseline_adapter(
    path: Path, tensors: Mapping[str, Tensor], kind: str, cfg: LoRaDConfig, extra: Mapping[str, str]
) -> None:
    """A LoRA / DoRA baseline adapter: peft's tensor names under each module path
    (``<path>.lora_A.default.weight`` …) with ``adapter``/``rank``/``role``/``targets`` metadata."""
    meta = provenance_metadata(config={**cfg.to_dict(), "adapter": kind})
    meta.update(extra)
    meta.update(adapter=kind, rank=str(cfg.rank), role=cfg.role, backbone=cfg.backbone or "")
    meta["targets"] = json.dumps(list(cfg.targets))
    save_safetensors({k: v.detach().float() for k, v in tensors.items()}, path, meta)


def read_adapter_tensors(path: Path) -> dict[str, Tensor]:
    """Tensors of a checkpoint's adapter file (LoRaD files are validated by
    :func:`wadi_cli.lorad.load_adapter`)."""
    with open_checkpoint(path) as src:
        kind = src.metadata().get("adapter", "lorad")
        if kind != "lorad":
            return {k: src.get(k) for k in src}
    return load_adapter(path)[0]


def required_files(roles: list[str], ema: bool) -> list[str]:
    """Files every checkpoint of a run that trains ``roles`` holds (``ema.safetensors`` too
    when the run keeps an EMA)."""
    return [
        "state.json",
        *(f"{role}.safetensors" for role in roles),
        *(f"optim_{role}.safetensors" for role in roles),
        "rng.safetensors",
        *(["ema.safetensors"] if ema else []),
    ]


def checkpoint_roles(state: Mapping[str, Any]) -> list[str]:
    """The trained roles of a checkpoint (the keys of its targets), the student first."""
    return sorted(state["targets"], key=lambda role: (role != "student", role))


def read_state(folder: Path) -> dict[str, Any]:
    """The ``state.json`` of a checkpoint folder, checked to be whole: every file of
    :func:`required_files` (adapter and optimizer state of each role, RNG, and the EMA when
    the run keeps one) is there. One :class:`CheckpointError` line naming the folder otherwise."""
    try:
        state = json.loads((folder / "state.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{folder}: unreadable checkpoint state ({exc})") from None
    try:
        state["config"], state["targets"] = dict(state["config"]), dict(state["targets"])
        state["step"], state["data_position"] = int(state["step"]), int(state["data_position"])
        state["extra"] = dict(state.get("extra") or {})
        ema = float(state["config"].get("ema_decay") or 0) > 0
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{folder}: state.json is not a wadi checkpoint state ({exc!r})") from None
    needed = required_files(checkpoint_roles(state), ema)
    missing = [f for f in needed if not (folder / f).is_file()]
    if missing:
        raise CheckpointError(f"{folder}: incomplete checkpoint, missing {', '.join(missing)}")
    return state


def load_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    """Read a checkpoint folder written by :func:`save_checkpoint`; anything missing or
    inconsistent is one :class:`CheckpointError` line naming the folder."""
    folder = Path(path)
    state = read_state(folder)
    roles = checkpoint_roles(state)
    adapters = {}
    for name in (*roles, "ema"):
        file = folder / f"{name}.safetensors"
        if file.is_file():
            adapters[name] = read_adapter_tensors(file)
    optimizers = {name: _optimizer_from_file(folder / f"optim_{name}.safetensors") for name in roles}
    with open_checkpoint(folder / "rng.safetensors") as src:
        rng = {k: src.get(k) for k in src}
    return Checkpoint(
        step=state["step"],
        data_position=state["data_position"],
        adapters=adapters,
        optimizers=optimizers,
        rng=rng,
        config=state["config"],
        targets=state["targets"],
        extra=state["extra"],
    )


def check_compatible(saved: Mapping[str, Any], current: Mapping[str, Any]) -> None:
    """Refuse to resume when the backbone, base model, adapter kind, ranks or targets
    differ between a checkpoint and the current run (:class:`MismatchError` with the reason)."""
    diffs = [
        f"{k}: checkpoint {saved.get(k)!r} vs now {current.get(k)!r}"
        for k in current
        if saved.get(k) != current[k]
    ]
    if diffs:
        raise MismatchError("cannot resume: the run differs from its checkpoint (" + "; ".join(diffs) + ")")


def rng_state(generator: torch.Generator) -> dict[str, Tensor]:
    """Every RNG state a step can touch: the trainer's generator, torch's CPU and CUDA RNGs."""
    out = {"trainer": generator.get_state(), "torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"torch_cuda_{i}"] = s
    return out


def restore_rng(generator: torch.Generator, states: Mapping[str, Tensor]) -> None:
    """Inverse of :func:`rng_state`."""
    generator.set_state(states["trainer"])
    torch.set_rng_state(states["torch_cpu"])
    cuda = [states[k] for k in sorted(states) if k.startswith("torch_cuda_")]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
