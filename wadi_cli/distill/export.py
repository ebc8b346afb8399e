"""Export a distillation run: ``merged`` (the authors' release format: a full denoiser
state dict that loads strictly into the base U-Net / transformer), ``adapter`` (the LoRaD
adapter file of ``wadi merge``) or ``diffusers`` (a complete pipeline folder).

Merging works on state dicts (no network is built): the base denoiser's tensors are read
lazily from the run's base pipeline and rotated by :func:`wadi_cli.lorad.merge_adapter_into_state_dict`.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from wadi_cli.distill.checkpoint import find_checkpoint, read_state
from wadi_cli.errors import BadInputError, CheckpointError
from wadi_cli.io import (
    atomic_output_dir,
    check_writable,
    open_checkpoint,
    provenance_metadata,
    save_safetensors,
)
from wadi_cli.lorad import load_adapter, merge_adapter_into_state_dict, save_adapter

FORMATS: tuple[str, ...] = ("merged", "adapter", "diffusers")
_WEIGHT_PREFIXES = ("diffusion_pytorch_model", "model.safetensors", "pytorch_model")


def run_student_adapter(
    run: str | os.PathLike[str], checkpoint: str | None = None, ema: bool = True
) -> tuple[Path, dict[str, Any]]:
    """Path of the student adapter file in a run's checkpoint (``checkpoint``: ``latest``
    by default, or a checkpoint folder) and the checkpoint's config. ``ema=True`` takes the
    EMA copy when the run kept one."""
    ckpt = find_checkpoint(run, checkpoint or "latest")
    config = read_state(ckpt)["config"]
    file = ckpt / "ema.safetensors"
    if not (ema and file.is_file()):
        file = ckpt / "student.safetensors"
    if not file.is_file():
        raise CheckpointError(f"{ckpt}: holds no student adapter")
    return file, config


def _base_source(config: dict[str, Any]) -> tuple[Any, Path]:
    from wadi_cli.backbones import get_backbone
    from wadi_cli.sample import resolve_pipeline_source

    backbone = get_backbone(config["backbone"])
    return backbone, resolve_pipeline_source(backbone, config.get("model"))


def _merged_state(adapter_file: Path, config: dict[str, Any]) -> tuple[dict[str, Any], Any, Path]:
    backbone, source = _base_source(config)
    kind = config.get("adapter", "lorad")
    if kind == "full":  # the student IS a full state dict
        from wadi_cli.distill.checkpoint import read_adapter_tensors

        return read_adapter_tensors(adapter_file), backbone, source
    if kind != "lorad":
        return _merged_baseline(adapter_file, config, backbone, source), backbone, source
    tensors, _ = load_adapter(adapter_file)
    with open_checkpoint(source, backbone.denoiser_subfolder) as src:
        merged = merge_adapter_into_state_dict(src, tensors)
    return merged, backbone, source


def _merged_baseline(
    adapter_file: Path, config: dict[str, Any], backbone: Any, source: Path
) -> dict[str, Any]:
    """LoRA / DoRA: build the base denoiser, attach the adapter, probe effective weights."""
    import diffusers

    from wadi_cli.distill.adapters import add_switchable_adapter, load_adapter_tensors, merged_state_dict
    from wadi_cli.distill.checkpoint import read_adapter_tensors

    with open_checkpoint(adapter_file) as src:
        targets = json.loads(src.metadata().get("targets", "[]"))
    cls = getattr(diffusers, backbone.denoiser_class)
    net = cls.from_pretrained(
        str(source), subfolder=backbone.denoiser_subfolder, local_files_only=True
    ).eval()
    add_switchable_adapter(net, "student", targets, int(config["rank"]), kind=config["adapter"])
    load_adapter_tensors(net, "student", read_adapter_tensors(adapter_file))
    return merged_state_dict(net, "student")


def export_run(
    run: str | os.PathLike[str],
    fmt: str,
    out: str | os.PathLike[str],
    *,
    checkpoint: str | None = None,
    ema: bool = True,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Export the student of ``run`` in format ``fmt`` to ``out`` (atomically).

    Returns a summary: ``out``, ``format``, ``checkpoint``, ``ema``, ``tensors``.
    """
    if fmt not in FORMATS:
        raise BadInputError(f"--format must be one of {', '.join(FORMATS)}; got {fmt!r}")
    out_path = Path(out).expanduser()
    if fmt != "diffusers":
        check_writable(out_path)
        if out_path.exists() and not overwrite:
            raise BadInputError(f"{out_path} already exists (pass --overwrite to replace it)")
    else:
        check_writable(out_path, directory=True)
    adapter_file, config = run_student_adapter(run, checkpoint, ema)
    used_ema = adapter_file.name == "ema.safetensors"
    recipe = {
        "operation": "export",
        "format": fmt,
        "run": str(run),
        "ema": used_ema,
        "distill_config": config,
    }
    summary = {"out": str(out_path), "format": fmt, "checkpoint": str(adapter_file.parent), "ema": used_ema}
    if fmt == "adapter":
        if config.get("adapter") == "full":
            raise BadInputError("a full fine-tune has no adapter; use --format merged or diffusers")
        if config.get("adapter", "lorad") != "lorad":  # baseline: copy tensors and metadata
            with open_checkpoint(adapter_file) as src:
                tensors, meta = {k: src.get(k) for k in src}, dict(src.metadata())
            save_safetensors(tensors, out_path, {**meta, "export": json.dumps(recipe, default=str)})
            return {**summary, "tensors": len(tensors)}
        tensors, lcfg = load_adapter(adapter_file)
        save_adapter(out_path, tensors, lcfg, extra_metadata={"export": json.dumps(recipe, default=str)})
        return {**summary, "tensors": len(tensors)}
    merged, backbone, source = _merged_state(adapter_file, config)
    meta = provenance_metadata(config=recipe, sources=[str(source), str(adapter_file)])
    if fmt == "merged":
        save_safetensors(merged, out_path, meta)
        return {**summary, "tensors": len(merged)}
    sub = backbone.denoiser_subfolder
    with atomic_output_dir(out_path) as tmp:
        shutil.copytree(source, tmp, dirs_exist_ok=True, ignore=_skip_denoiser_weights(source / sub))
        save_safetensors(merged, tmp / sub / "diffusion_pytorch_model.safetensors", meta)
    return {**summary, "tensors": len(merged)}


def _skip_denoiser_weights(denoiser_dir: Path):
    """``shutil.copytree`` ignore function: the denoiser's weight files (replaced by the
    merged ones) and hidden files; everything else of the pipeline is copied."""

    def ignore(folder: str, names: list[str]) -> list[str]:
        skip = [n for n in names if n.startswith(".")]
        if Path(folder).resolve() == denoiser_dir.resolve():
            skip += [n for n in names if n.startswith(_WEIGHT_PREFIXES)]
        return skip

    return ignore
