"""Export a distillation run: ``merged`` (the authors' release format: a full denoiser
state dict that loads strictly into the base U-Net / transformer), ``adapter`` (the LoRaD
adapter file of ``wadi merge``), ``diffusers`` (a pipeline folder with the base's own
components only) or ``single-file`` (the original Stable Diffusion checkpoint layout of
ComfyUI / AUTOMATIC1111, sd15/sd21).

Merging works on state dicts (no network is built): the base denoiser's tensors are read
lazily from the run's base pipeline and rotated by :func:`wadi_cli.lorad.merge_adapter_into_state_dict`.
Every exported file of a one-step run records the run's ᾱ_T (metadata ``alpha_bar_T``),
which ``wadi sample`` uses.

Runs of any recipe export alike: what is read of a run is its checkpoint's student file and
config (``backbone``, ``model``, ``components``, ``adapter``, ``rank``, ``mixed_precision``
and, for a one-step student, ``alpha_bar_T``). A run without a one-step ᾱ_T (a ``wadi
finetune`` DreamBooth run: a fine-tuned base, sampled with many steps) keeps the base's own
scheduler in a ``diffusers`` export (see :func:`trains_one_step`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from wadi_cli.backbones import Backbone
from wadi_cli.distill.checkpoint import find_checkpoint, read_state
from wadi_cli.distill.export_diffusers import (
    finetune_model_card,
    model_card,
    read_eval_metrics,
    write_one_step_scheduler,
)
from wadi_cli.distill.export_lora import KOHYA_ALPHA, LORA_KEYS, LoraRank, extract_lora
from wadi_cli.errors import BadInputError, CheckpointError
from wadi_cli.io import (
    atomic_output_dir,
    check_writable,
    open_checkpoint,
    provenance_metadata,
    save_safetensors,
)
from wadi_cli.io.metadata import ALPHA_BAR_T_METADATA
from wadi_cli.lorad import load_adapter, merge_adapter_into_state_dict, save_adapter
from wadi_cli.pipeline.base import PipelineSource, open_base_denoiser

FORMATS: tuple[str, ...] = ("merged", "adapter", "diffusers", "single-file", "lora")


def trains_one_step(config: dict[str, Any]) -> bool:
    """Whether a run's config is that of a one-step student (``wadi distill``: it records the
    one-step ᾱ_T) rather than of a fine-tuned base sampled with many steps (``wadi finetune``)."""
    return config.get("alpha_bar_T") is not None


def run_student_file(
    run: str | os.PathLike[str], checkpoint: str | None = None, ema: bool = True
) -> tuple[Path, dict[str, Any]]:
    """Path of the student file in a run's checkpoint (``checkpoint``: ``latest`` by
    default, or a checkpoint folder) and the checkpoint's config: the adapter tensors, or
    every weight for ``--adapter full``. ``ema=True`` takes the EMA copy when the run kept
    one."""
    ckpt = find_checkpoint(run, checkpoint or "latest")
    config = read_state(ckpt)["config"]
    file = ckpt / "ema.safetensors"
    if not (ema and file.is_file()):
        file = ckpt / "student.safetensors"
    if not file.is_file():
        raise CheckpointError(f"{ckpt}: holds no student adapter")
    return file, config


@contextlib.contextmanager
def run_weights(
    run: str | os.PathLike[str], checkpoint: str | None = None, *, merged: bool = False, private: bool = False
) -> Iterator[tuple[Path, Path, dict[str, Any]]]:
    """A run's student as one file that ``--weights`` (and ``wadi swap``) take: the LoRaD
    adapter file of the checkpoint itself, or, for LoRA / DoRA / full students or with
    ``merged``, its merged state dict exported to a temporary file that is removed
    afterwards. ``private`` copies an adapter file too (the run may delete the checkpoint
    meanwhile). EMA when the run kept one. Yields ``(file, checkpoint file, run config)``."""
    student, config = run_student_file(run, checkpoint)
    lorad = config.get("adapter", "lorad") == "lorad" and not merged
    if lorad and not private:
        yield student, student, config
        return
    with tempfile.TemporaryDirectory(prefix="wadi-run-") as tmp:
        dest = Path(tmp) / "student.safetensors"
        if lorad:
            shutil.copyfile(student, dest)
        else:
            export_run(run, "merged", dest, checkpoint=checkpoint)
        yield dest, student, config


@contextlib.contextmanager
def student_weights(student: str | os.PathLike[str]) -> Iterator[tuple[Path, bool]]:
    """STUDENT as ``wadi swap`` and ``wadi analyze`` take it: a ``wadi distill`` run folder
    becomes its latest student (EMA when kept), merged into a temporary file; anything else
    (a file, a folder, an adapter) passes through. Yields ``(path, came_from_a_run)``."""
    from wadi_cli.distill.run_dirs import is_run_folder

    if not is_run_folder(student):
        yield Path(student), False
        return
    with run_weights(student, merged=True) as (merged, _, _):
        yield merged, True


def run_base_weights(run: str | os.PathLike[str]) -> Path:
    """The weights a run's student started from: its ``--model`` single file, or the base
    denoiser's folder (what ``wadi analyze RUN`` compares the latest student with)."""
    _, config = run_student_file(run)
    _, source = _base_source(config)
    return source.single_file or source.denoiser_root / source.subfolder


def run_variant(config: dict[str, Any]) -> str | None:
    """The hub weights variant of the run's base: ``fp16`` when it trained in fp16."""
    return "fp16" if config.get("mixed_precision") == "fp16" else None


def _base_source(config: dict[str, Any], with_components: bool = False) -> tuple[Backbone, PipelineSource]:
    from wadi_cli.backbones import get_backbone
    from wadi_cli.pipeline import resolve_pipeline_source

    backbone = get_backbone(config["backbone"])
    source = resolve_pipeline_source(
        backbone,
        config.get("model"),
        config.get("components"),
        variant=run_variant(config),
        with_components=with_components,
    )
    return backbone, source


def _merged_state(
    adapter_file: Path, config: dict[str, Any], with_components: bool = False
) -> tuple[dict[str, Any], Backbone, PipelineSource]:
    backbone, source = _base_source(config, with_components)
    kind = config.get("adapter", "lorad")
    if source.single_file is not None and (with_components or kind not in ("lorad", "full")):
        raise BadInputError(
            f"this run was trained from the single file {source.single_file}: export it --format merged, "
            "adapter or lora (a pipeline folder or single file of it, and LoRA/DoRA students, are not "
            "written from a single-file base yet)"
        )
    if kind == "full":  # the student IS a full state dict
        from wadi_cli.distill.checkpoint import read_adapter_tensors

        return read_adapter_tensors(adapter_file), backbone, source
    if kind != "lorad":
        return _merged_baseline(adapter_file, config, backbone, source), backbone, source
    tensors, _ = load_adapter(adapter_file)
    with open_base_denoiser(source) as src:
        merged = merge_adapter_into_state_dict(src, tensors)
    return merged, backbone, source


def _merged_baseline(
    adapter_file: Path, config: dict[str, Any], backbone: Backbone, source: PipelineSource
) -> dict[str, Any]:
    """LoRA / DoRA / orthogonal: build the base denoiser, attach the adapter, probe effective
    weights."""
    import diffusers

    from wadi_cli.distill.checkpoint import read_adapter_tensors
    from wadi_cli.distill.config import adapter_options
    from wadi_cli.lorad.multi_adapter import add_switchable_adapter, load_adapter_tensors, merged_state_dict

    with open_checkpoint(adapter_file) as src:
        targets = json.loads(src.metadata().get("targets", "[]"))
    cls = getattr(diffusers, backbone.denoiser_class)
    net = cls.from_pretrained(
        str(source.denoiser_root), subfolder=backbone.denoiser_subfolder, local_files_only=True
    ).eval()
    add_switchable_adapter(
        net, "student", targets, int(config["rank"]), kind=config["adapter"], options=adapter_options(config)
    )
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
    eval_dir: str | os.PathLike[str] | None = None,
    lora: LoraRank | None = None,
    lora_keys: str = "kohya",
) -> dict[str, Any]:
    """Export the student of ``run`` in format ``fmt`` to ``out`` (atomically).

    ``diffusers`` folders get the one-step scheduler and a model card (with the metrics of
    the ``wadi eval`` folder ``eval_dir`` when given; see :mod:`wadi_cli.distill.export_diffusers`).
    ``lora`` (the rank rule) and ``lora_keys`` (``kohya`` or ``diffusers``) shape
    ``--format lora`` (see :mod:`wadi_cli.distill.export_lora`), whose summary adds the
    per-layer and total relative errors (``lora``).
    Returns a summary: ``out``, ``format``, ``checkpoint``, ``ema``, ``tensors``.
    """
    if fmt not in FORMATS:
        raise BadInputError(f"--format must be one of {', '.join(FORMATS)}; got {fmt!r}")
    if eval_dir is not None and fmt != "diffusers":
        raise BadInputError("--eval adds metrics to the model card of --format diffusers only")
    metrics = read_eval_metrics(eval_dir) if eval_dir is not None else None
    if fmt == "lora" and lora is None:
        raise BadInputError("--format lora needs exactly one of --lora-rank R and --lora-energy E")
    if fmt == "lora" and lora_keys not in LORA_KEYS:
        raise BadInputError(f"--lora-keys must be one of {', '.join(LORA_KEYS)}; got {lora_keys!r}")
    out_path = Path(out).expanduser()
    folder = fmt == "diffusers"
    check_writable(out_path, directory=folder)
    # one rule for files and folders: an existing output is replaced only with --overwrite
    # (an empty folder made beforehand is not an output)
    occupied = out_path.exists() and not (folder and out_path.is_dir() and not any(out_path.iterdir()))
    if occupied and not overwrite:
        raise BadInputError(f"{out_path} already exists (pass --overwrite to replace it)")
    adapter_file, config = run_student_file(run, checkpoint, ema)
    if fmt == "single-file":
        from wadi_cli.io.sd_single_file_write import check_single_file_backbone

        check_single_file_backbone(config["backbone"])
    used_ema = adapter_file.name == "ema.safetensors"
    recipe = {
        "operation": "export",
        "format": fmt,
        "run": str(run),
        "ema": used_ema,
        "distill_config" if trains_one_step(config) else "run_config": config,
    }
    alpha = {ALPHA_BAR_T_METADATA: str(config["alpha_bar_T"])} if config.get("alpha_bar_T") else {}
    summary = {"out": str(out_path), "format": fmt, "checkpoint": str(adapter_file.parent), "ema": used_ema}
    if fmt == "adapter":
        if config.get("adapter") == "full":
            raise BadInputError("a full fine-tune has no adapter; use --format merged or diffusers")
        extra = {"export": json.dumps(recipe, default=str), **alpha}
        if config.get("adapter", "lorad") != "lorad":  # baseline: copy tensors and metadata
            with open_checkpoint(adapter_file) as src:
                tensors, meta = {k: src.get(k) for k in src}, dict(src.metadata())
            save_safetensors(tensors, out_path, {**meta, **extra})
            return {**summary, "tensors": len(tensors)}
        tensors, lcfg = load_adapter(adapter_file)
        save_adapter(out_path, tensors, lcfg, extra_metadata=extra)
        return {**summary, "tensors": len(tensors)}
    merged, backbone, source = _merged_state(
        adapter_file, config, with_components=fmt not in ("merged", "lora")
    )
    sources = [source.denoiser_ref] + ([source.components_ref] if source.components_ref else [])
    meta = {**provenance_metadata(config=recipe, sources=[*sources, str(adapter_file)]), **alpha}
    if fmt == "merged":
        save_safetensors(merged, out_path, meta)
        return {**summary, "tensors": len(merged)}
    if fmt == "lora":
        assert lora is not None
        with open_base_denoiser(source) as base:
            tensors, report = extract_lora(base, merged, lora, keys=lora_keys, family=backbone.family)
        ranks = sorted({layer["rank"] for layer in report["layers"]})
        lora_meta = {"ss_network_module": "networks.lora", "ss_network_dim": str(max(ranks))}
        lora_meta |= {"ss_network_alpha": str(KOHYA_ALPHA), "wadi_lora_keys": lora_keys}
        save_safetensors(tensors, out_path, {**meta, **lora_meta})
        return {**summary, "tensors": len(tensors), "lora": report}
    if fmt == "single-file":
        from wadi_cli.io.sd_single_file_write import save_single_file

        unet_config = json.loads((source.denoiser_root / "unet" / "config.json").read_text(encoding="utf-8"))
        count = save_single_file(
            out_path, merged, unet_config, source.components_root, backbone.name, meta, source.vae_root
        )
        return {**summary, "tensors": count}
    from wadi_cli.io.pipeline_folder import write_pipeline_folder

    one_step = trains_one_step(config)
    alpha_bar_T = float(config.get("alpha_bar_T") or backbone.alpha_bar_T)
    with atomic_output_dir(out_path) as tmp:
        write_pipeline_folder(
            tmp,
            denoiser_root=source.denoiser_root,
            subfolder=backbone.denoiser_subfolder,
            denoiser_class=backbone.denoiser_class,
            denoiser_state=merged,
            components_root=source.components_root,
            components=backbone.components,
            family=backbone.family,
            variant=source.variant,
            metadata=meta,
            component_roots={"vae": source.vae_root} if source.vae_root is not None else None,
        )
        index = json.loads((tmp / "model_index.json").read_text(encoding="utf-8"))
        if not one_step:  # a fine-tuned base keeps its scheduler and is sampled with many steps
            card = finetune_model_card(
                pipeline_class=index["_class_name"], base_ref=source.denoiser_ref, recipe=recipe
            )
            (tmp / "README.md").write_text(card, encoding="utf-8")
            return {**summary, "tensors": len(merged)}
        write_one_step_scheduler(tmp, alpha_bar_T)
        card = model_card(
            pipeline_class=index["_class_name"],
            base_ref=source.denoiser_ref,
            family=backbone.family,
            alpha_bar_T=alpha_bar_T,
            recipe=recipe,
            metrics=metrics,
        )
        (tmp / "README.md").write_text(card, encoding="utf-8")
    return {**summary, "tensors": len(merged), "alpha_bar_T": alpha_bar_T}
