"""Does the memory model of ``wadi distill --dry-run`` (wadi_cli/distill/memory.py) predict the
peak memory of real training steps? Measured on CPU for the tiny model, the miniature SDXL
(tests/_helpers_hub.py) and the real SDXL U-Net layout at reduced width (random weights), at
several latent sizes and batches; see README.md.

Measured peak of a real step: a :class:`wadi_cli.pipeline.LoadedPipeline` and a
:class:`wadi_cli.distill.Distiller` are built as ``wadi distill`` builds them, one step runs
(so both AdamW states exist), then the second step runs under two independent counters:

- ``profiler``: torch.profiler's memory timeline (allocator events of every tensor, with
  ``profile_memory``; the largest sum over the step, minus its value at the start) added to
  the bytes of every tensor storage alive before the step (found through ``gc``);
- ``live``: the same ``gc`` baseline plus :class:`wadi_cli.distill.memory.LiveBytes` over the
  step (bytes of storages the step creates, while alive).

Usage: ``python analysis/sdxl_memory/run.py [--quick]`` (writes results/memory.json and
prints the markdown table; ``--quick``: tiny and the miniature only).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import gc
import json
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the miniature SDXL repository builder

#: (model, latent side, batch, precision, gradient checkpointing) of every measured step.
RUNS: list[tuple[str, int, int, str, bool]] = [
    ("tiny", 8, 4, "no", False),
    ("tiny", 16, 2, "no", False),
    ("tiny", 16, 2, "no", True),
    ("sdxl-miniature", 8, 2, "no", False),
    ("sdxl-miniature", 16, 1, "no", False),
    ("sdxl-miniature", 16, 2, "bf16", True),
    ("sdxl-reduced", 16, 1, "no", False),
    ("sdxl-reduced", 24, 1, "no", False),
    ("sdxl-reduced", 16, 2, "no", True),
]


def reduced_sdxl_unet(miniature_unet: dict[str, Any]) -> dict[str, Any]:
    """The real SDXL base U-Net config (wadi_cli/configs/sdxl) at a fifth of its width: block
    widths 320/640/1280 → 64/128/256 with the same 64-channel heads, the same block types,
    2 resnets per level and 1/2/10 transformer layers; text and time widths of the miniature's
    text encoders (so its pipeline folder serves)."""
    from wadi_cli.backbones import get_backbone

    cfg = get_backbone("sdxl").denoiser_config()
    cfg["block_out_channels"] = [c // 5 for c in cfg["block_out_channels"]]
    cfg["attention_head_dim"] = [max(1, h // 5) for h in cfg["attention_head_dim"]]
    for key in ("cross_attention_dim", "addition_time_embed_dim", "projection_class_embeddings_input_dim"):
        cfg[key] = miniature_unet[key]
    return cfg


def pipeline_folder(work: Path, model: str, side: int) -> Path:
    """A local SDXL pipeline folder (the miniature's, or with the reduced real U-Net) whose
    U-Net samples ``side``² latents."""
    import _helpers_hub as hub
    from diffusers import UNet2DConditionModel

    base = work / "sdxl-miniature-base"
    if not base.is_dir():
        hub._sdxl_repo(base, 70)
    folder = work / f"{model}-{side}"
    if not folder.is_dir():
        shutil.copytree(base, folder)
        unet = json.loads((folder / "unet" / "config.json").read_text())
        if model == "sdxl-reduced":
            cfg = reduced_sdxl_unet(unet)
            shutil.rmtree(folder / "unet")
            torch.manual_seed(0)
            hub._model_folder(
                folder / "unet", UNet2DConditionModel(**cfg), 0, "diffusion_pytorch_model", {"": "real"}
            )
            unet = json.loads((folder / "unet" / "config.json").read_text())
        unet["sample_size"] = side
        (folder / "unet" / "config.json").write_text(json.dumps(unet))
    return folder


def tiny_folder(work: Path, side: int) -> Path:
    """The shipped tiny pipeline with its U-Net sampling ``side``² latents."""
    from wadi_cli.tiny.arch import TINY_PIPELINE_DIR

    folder = work / f"tiny-{side}"
    if not folder.is_dir():
        shutil.copytree(TINY_PIPELINE_DIR, folder)
        path = folder / "unet" / "config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "sample_size": side}))
    return folder


def alive_bytes() -> int:
    """Bytes of the distinct storages of every tensor Python can reach."""
    gc.collect()
    seen: dict[int, int] = {}
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor) and not obj.is_meta:
            storage = obj.untyped_storage()
            seen[storage._cdata] = storage.nbytes()
    return sum(seen.values())


def measure(distiller: Any, profiler: bool) -> dict[str, int | None]:
    """Peak bytes of the second training step by the ``live`` counter and (``profiler``) of
    the third by the profiler's (see the module docstring; its timeline takes minutes to
    build on this machine even for tiny, so it runs for the first row only)."""
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import MemoryProfileTimeline

    from wadi_cli.distill.memory import LiveBytes

    distiller.train_step()
    base = alive_bytes()
    with LiveBytes() as live:
        distiller.train_step()
    if not profiler:
        return {"live": base + live.peak, "profiler": None, "baseline": base}
    base2 = alive_bytes()
    opts = {"profile_memory": True, "record_shapes": True, "with_stack": True}
    with profile(activities=[ProfilerActivity.CPU], **opts) as prof:
        distiller.train_step()
    _, sizes = MemoryProfileTimeline(prof._memory_profile())._coalesce_timeline("cpu")
    totals = [sum(s) for s in sizes]
    return {"live": base + live.peak, "profiler": base2 + max(totals) - totals[0], "baseline": base}


def one_run(work: Path, model: str, side: int, batch: int, precision: str, ckpt: bool) -> dict[str, Any]:
    """Prediction and measurement of one configuration."""
    from wadi_cli.distill.config import resolve_config
    from wadi_cli.distill.memory import predict_memory
    from wadi_cli.distill.run import build_distiller

    folder = tiny_folder(work, side) if model == "tiny" else pipeline_folder(work, model, side)
    backbone = "tiny" if model == "tiny" else "sdxl"
    cfg = resolve_config(
        overrides={
            "backbone": backbone, "model": str(folder), "batch_size": batch, "grad_accum": 1,
            "mixed_precision": precision, "gradient_checkpointing": ckpt, "device": "cpu",
            "ema_decay": 0.999, "regression_weight": 0.0, "rank": 8, "fake_rank": 4, "text_cache": 0,
        }
    )  # fmt: skip
    t0 = time.perf_counter()
    pred = predict_memory(cfg, trace=True)  # trace every row's own step (the dry-run ships large ones)
    predict_s = time.perf_counter() - t0
    distiller = build_distiller(cfg, ["a photo of a cat", "a red bus", "two dogs", "a house"] * 4)
    t0 = time.perf_counter()
    got = measure(distiller, profiler=(model, side, batch) == RUNS[0][:3])
    del distiller
    gc.collect()
    peak = pred.peak_bytes()
    return {
        "model": model, "latent": side, "batch": batch, "precision": precision, "checkpointing": ckpt,
        "predicted": peak, "measured_profiler": got["profiler"], "measured_live": got["live"],
        "rel_error_profiler": None if got["profiler"] is None else (peak - got["profiler"]) / got["profiler"],
        "rel_error_live": (peak - got["live"]) / got["live"],
        "predicted_parts": pred.to_dict(), "predict_s": round(predict_s, 1),
        "measure_s": round(time.perf_counter() - t0, 1),
    }  # fmt: skip


def real_sdxl_folder(work: Path, device: str) -> Path:
    """A pipeline folder of the real SDXL base architecture (shipped U-Net, text encoder and
    VAE configs) with random fp16 weights, built on ``device``; tokenizers and scheduler from
    the miniature (any CLIP tokenizer serves: its ids lie inside the real vocabulary)."""
    import _helpers_hub as hub
    import transformers
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from wadi_cli.backbones import get_backbone

    folder = work / "sdxl-real-architecture"
    if (folder / "unet" / "config.json").is_file():
        return folder
    base = work / "sdxl-miniature-base"
    if not base.is_dir():
        hub._sdxl_repo(base, 70)
    shutil.copytree(base, folder)
    configs = get_backbone("sdxl").config_path.parent.parent
    for sub in ("unet", "vae", "text_encoder", "text_encoder_2"):
        config = json.loads((configs / sub / "config.json").read_text())
        shutil.rmtree(folder / sub)
        with torch.device(device):
            if sub == "unet":
                model = UNet2DConditionModel.from_config(config)
            elif sub == "vae":
                model = AutoencoderKL.from_config(config)
            else:
                cls = getattr(transformers, config["architectures"][0])
                model = cls(cls.config_class.from_dict(config))
        model.half().save_pretrained(str(folder / sub))
        del model
    return folder


def gpu_block(device: str, tiny: bool, work: Path) -> dict[str, Any]:
    """Predicted vs measured peak and seconds per step of ``wadi distill -b sdxl`` on ``device``
    (analysis/gpu_acceptance.py's ``sdxl_memory`` step): the real architecture at 1024 px
    (real weights when the hub cache holds them, else random ones), fp16, gradient
    checkpointing on, batch 1 and 2; peak = ``torch.cuda.max_memory_allocated`` over two
    steps after a first (which allocates AdamW's states). ``tiny``: the miniature at 16²
    latents on the CPU, peak by the ``live`` counter (checks the code path, not a GPU)."""
    from wadi_cli.distill.config import resolve_config
    from wadi_cli.distill.memory import LiveBytes, predict_memory
    from wadi_cli.distill.run import build_distiller

    cuda = device.startswith("cuda")
    model, source = None, "real weights (hub cache)"
    if tiny:
        model, source = str(pipeline_folder(work, "sdxl-miniature", 16)), "miniature (CPU check)"
    else:
        try:
            from huggingface_hub import snapshot_download

            from wadi_cli.backbones import get_backbone

            snapshot_download(get_backbone("sdxl").hub_id, local_files_only=True)
        except Exception:  # noqa: BLE001 - not in the cache (or no hub): the real config, random weights
            model, source = str(real_sdxl_folder(work, device)), "random weights of the real config"
    rows = []
    for batch in (1, 2):
        cfg = resolve_config(
            overrides={
                "backbone": "sdxl", "model": model, "batch_size": batch, "grad_accum": 1, "device": device,
                "mixed_precision": "fp16" if cuda else "no", "gradient_checkpointing": True,
            }
        )  # fmt: skip
        pred = predict_memory(cfg)
        distiller = build_distiller(cfg, ["a photo of a red fox in the snow", "a bowl of soup"] * 4)
        distiller.train_step()
        gc.collect()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        base = 0 if cuda else alive_bytes()
        t0 = time.perf_counter()
        live = LiveBytes()  # the CPU check's counter; on CUDA the allocator's own (no overhead)
        with contextlib.nullcontext() if cuda else live:
            for _ in range(2):
                distiller.train_step()
        if cuda:
            torch.cuda.synchronize()
        seconds = (time.perf_counter() - t0) / 2
        measured = torch.cuda.max_memory_allocated() if cuda else base + live.peak
        peak = pred.peak_bytes()
        rows.append(
            {
                "batch": batch, "latent": distiller.pipe.latent_shape[-1], "predicted_bytes": peak,
                "measured_bytes": int(measured), "rel_error": (peak - measured) / measured,
                "seconds_per_step": round(seconds, 3), "traced": pred.traced,
            }
        )  # fmt: skip
        del distiller
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    return {"weights": source, "precision": "fp16" if cuda else "fp32", "checkpointing": True, "rows": rows}


def sdxl_plan() -> tuple[list[dict[str, Any]], str]:
    """The model's SDXL predictions at 1024 px (the recipe: LoRaD 128 / fake 32, AdamW, EMA;
    fp16 weights) with gradient checkpointing on and off, for a few batches, and the largest
    batch within 80 and 24 GiB (rows whose trace is not shipped are left out)."""
    from wadi_cli.distill.config import resolve_config
    from wadi_cli.distill.memory import GIB, predict_memory

    rows, lines = (
        [],
        ["| checkpointing | static GiB | batch 1 | batch 2 | batch 4 | largest batch 80 GiB | 24 GiB |"],
    )
    lines.append("|---|---|---|---|---|---|---|")
    for ckpt in (True, False):
        cfg = resolve_config(overrides={"backbone": "sdxl", "gradient_checkpointing": ckpt})
        pred = predict_memory(cfg)
        if not pred.phases:
            continue
        peaks = {b: pred.peak_bytes(b) for b in (1, 2, 4)}
        fits = {budget: pred.largest_batch(budget * GIB) for budget in (80, 24)}
        rows.append(
            {"checkpointing": ckpt, "prediction": pred.to_dict(), "peaks": peaks, "largest_batch": fits}
        )
        lines.append(
            f"| {'on' if ckpt else 'off'} | {pred.static_bytes / GIB:.1f} | "
            + " | ".join(f"{peaks[b] / GIB:.1f}" for b in (1, 2, 4))
            + f" | {fits[80]} | {fits[24]} |"
        )
    return rows, "\n".join(lines)


def table(rows: list[dict[str, Any]]) -> str:
    """The README's markdown table."""
    mib = 1024**2
    out = [
        "| model | latent | batch | weights | ckpt | predicted MiB | measured MiB (profiler) | error "
        "| measured MiB (live) | error |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        out.append(
            f"| {r['model']} | {r['latent']}² | {r['batch']} | {r['precision']} | "
            f"{'on' if r['checkpointing'] else 'off'} | {r['predicted'] / mib:.1f} | "
            + (
                f"{r['measured_profiler'] / mib:.1f} | {100 * r['rel_error_profiler']:+.1f} % | "
                if r["measured_profiler"] is not None
                else "– | – | "
            )
            + f"{r['measured_live'] / mib:.1f} | {100 * r['rel_error_live']:+.1f} % |"
        )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny and the miniature only")
    ap.add_argument("--sdxl-only", action="store_true", help="only the SDXL predictions (no measurement)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/wadi-sdxl-memory"))
    ap.add_argument("--out", type=Path, default=HERE / "results" / "memory.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    args.work.mkdir(parents=True, exist_ok=True)
    runs = [r for r in RUNS if not (args.quick and r[0] == "sdxl-reduced")]
    if args.sdxl_only:
        print(sdxl_plan()[1])
        return 0
    from wadi_cli.io import write_text_atomic

    sdxl_rows, sdxl_md = sdxl_plan()
    doc = {
        "date_utc": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M"),
        "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} thread, torch {torch.__version__}",
        "command": "python analysis/sdxl_memory/run.py" + (" --quick" if args.quick else ""),
        "rows": [],
        "sdxl_1024_predicted": sdxl_rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for run in runs:  # the file after every row: a slow machine keeps what finished
        doc["rows"].append(one_run(args.work, *run))
        write_text_atomic(args.out, json.dumps(doc, indent=1) + "\n")
        print(table(doc["rows"][-1:]).splitlines()[-1], flush=True)
    print(table(doc["rows"]))
    print(sdxl_md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
