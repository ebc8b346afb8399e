"""A relation-inversion run (``wadi invert``): checks before any model loads, then the loop of
:func:`wadi_cli.distill.run.run_loop` (run folder, checkpoints, ``--resume latest``, lock,
Ctrl-C / SIGTERM, logs) around :class:`~wadi_cli.invert.trainer.Inverter`, and the learned
embedding written as ``RUN/learned_embeds.safetensors`` (diffusers' default name, which
``pipe.load_textual_inversion(RUN)`` finds; the format: :mod:`wadi_cli.io.embeddings`).

Exemplar captions (:func:`read_captions`): a JSON file mapping each image's file name (its
path relative to the images folder) to a caption or a list of captions; each caption holds
the token, or ReVersion's ``{}`` placeholder (``text.json`` of the ReVersion benchmark reads
as is). Without ``--captions``: ``IMAGES/captions.json``, else ``IMAGES/text.json``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from wadi_cli.distill.checkpoint import check_run_dir, find_checkpoint, read_state
from wadi_cli.distill.lock import check_run_lock
from wadi_cli.distill.phases import PhaseCallback, Phases
from wadi_cli.distill.run import (
    RunSummary,
    checkpoint_to_resume,
    load_base,
    naming_previous,
    open_run,
    run_loop,
)
from wadi_cli.distill.topology import launch_rank
from wadi_cli.errors import BadInputError, CheckpointError
from wadi_cli.invert.config import InvertConfig, resolve_invert_config
from wadi_cli.io.embeddings import EMBEDDING_FILE, save_embedding

if TYPE_CHECKING:
    from PIL import Image

    from wadi_cli.distill.checkpoint import Checkpoint

#: The ``.wadi`` marker kind of an inversion's run folder.
RUN_KIND = "invert-run"
#: Caption files looked for in the images folder without ``--captions`` (wadi's, ReVersion's).
CAPTION_FILES: tuple[str, ...] = ("captions.json", "text.json")


def read_captions(images: Path, files: list[Path], token: str, captions: str | None) -> list[list[str]]:
    """The captions of each of ``files`` (images under ``images``), each holding ``token``
    (ReVersion's ``{}`` is replaced by it). A missing file, an image without a caption, or a
    caption without the token is one :class:`BadInputError` line."""
    if captions is not None:
        path = Path(captions).expanduser()
    else:
        found = [images / name for name in CAPTION_FILES if (images / name).is_file()]
        if not found:
            raise BadInputError(
                f"--images {images}: no captions; pass --captions FILE.json "
                f'({{"0.png": "a cat {token} a wall"}}) '
                f"or put {' or '.join(CAPTION_FILES)} in the folder"
            )
        path = found[0]
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise BadInputError(
            f"--captions {path}: not a readable JSON file ({str(exc).splitlines()[0]})"
        ) from None
    if not isinstance(data, dict):
        raise BadInputError(f"--captions {path}: expected an object {{image file name: caption(s)}}")
    out = []
    for f in files:
        rel = f.relative_to(images).as_posix()
        entry = data.get(rel, data.get(f.name))
        entries = [entry] if isinstance(entry, str) else entry
        if not entries or not isinstance(entries, list) or not all(isinstance(c, str) for c in entries):
            raise BadInputError(f"--captions {path}: no caption (a string or a list of strings) for {rel}")
        texts = [c.replace("{}", token) for c in entries]
        bad = [c for c in texts if token not in c]
        if bad:
            raise BadInputError(
                f"--captions {path}: the caption {bad[0]!r} of {rel} does not hold the token {token}"
            )
        out.append(texts)
    return out


def read_exemplars(cfg: InvertConfig) -> tuple[list[Image.Image], list[list[str]]]:
    """The decoded exemplar images (any PIL mode and size) and their captions."""
    from wadi_cli.evaluation.folders import list_images, read_image

    images = Path(cfg.images or "").expanduser()
    files = list_images(images, "--images")
    captions = read_captions(images, files, cfg.token, cfg.captions)
    return [read_image(f) for f in files], captions


def prepare(
    cfg: InvertConfig, out: str | os.PathLike[str], resume: str | None
) -> tuple[Path, list[Image.Image], list[list[str]], Checkpoint | None]:
    """Checks before any model loads (nothing is created): run folder, lock, images and
    captions, checkpoint compatibility."""
    if launch_rank() == 0:
        check_run_lock(out)
    run = check_run_dir(out, resume is not None)
    images, captions = read_exemplars(cfg)
    return run, images, captions, checkpoint_to_resume(run, resume, cfg, resolve_invert_config)


def invert(
    cfg: InvertConfig,
    out: str | os.PathLike[str],
    *,
    resume: str | None = None,
    on_step: Callable[[Any, float], None] | None = None,
    on_start: Callable[[int, int], None] | None = None,
    on_phase: PhaseCallback | None = None,
    on_run: Callable[[Path], None] | None = None,
) -> RunSummary:
    """Run (or continue, with ``resume="latest"`` or a checkpoint path) a relation inversion
    into the run folder ``out`` until ``cfg.max_steps``, then write the learned embedding as
    ``out/learned_embeds.safetensors``; everything else as :func:`wadi_cli.distill.run.distill`."""
    from wadi_cli.finetune.images import to_resolution
    from wadi_cli.invert.trainer import Inverter, check_token

    run, images, captions, ckpt = prepare(cfg, out, resume)
    main = launch_rank() == 0
    phases = Phases(on_phase if main else None)
    pipe, topology = load_base(cfg, phases)
    check_token(pipe, cfg)  # before the run folder exists
    if on_run is not None and main:
        on_run(run)
    with open_run(run, main, RUN_KIND, model_file=pipe.model_file):
        with phases.phase("encoding the exemplars (VAE, once)"):
            inverter = Inverter(cfg, pipe, to_resolution(images, pipe.resolution), captions, topology)
        if ckpt is not None:
            inverter.load(ckpt)
        summary = run_loop(cfg, run, inverter, len(images), ckpt is not None, on_step, on_start)
        if main:
            width = str(inverter.embedding.shape[-1])
            extra = {"step": str(inverter.step), "init_word": cfg.init_word, "backbone": cfg.backbone}
            extra["text_encoder_width"] = width
            save_embedding(run / EMBEDDING_FILE, cfg.token, inverter.embedding, cfg.to_dict(), extra)
        return summary


def invert_config_for_run(
    out: str | os.PathLike[str],
    resume: str | None = None,
    file: str | os.PathLike[str] | None = None,
    overrides: dict[str, Any] | None = None,
) -> InvertConfig:
    """The resolved config of an inversion: recipe → file → flags; when resuming, the
    checkpoint's saved config takes the place of the recipe (flags still override)."""
    if resume is None:
        return resolve_invert_config(file, overrides)
    ckpt_dir = find_checkpoint(out, resume)
    try:
        saved = read_state(ckpt_dir)["config"]
    except CheckpointError as exc:
        raise naming_previous(ckpt_dir, exc) from None
    return resolve_invert_config(file, overrides, base=saved)
