"""Driving a training run: checks before work, the loop, and when it checkpoints, logs,
validates and stops (the logs are :mod:`wadi_cli.distill.logs`, the stop on Ctrl-C / SIGTERM
:mod:`wadi_cli.distill.signals`, the ranks :mod:`wadi_cli.distill.topology`).

The loop (:func:`run_loop`, in a folder that :func:`open_run` created and locked) drives any
:class:`TrainingRecipe` under any :class:`LoopConfig`: the WaDi distiller of :func:`distill`
and the DreamBooth fine-tune of :mod:`wadi_cli.finetune` share it.

Everything that can be checked is checked before the model loads: the config, the prompt
file, the ``--out`` folder (writable; no checkpoints unless resuming; no live process
training in it), and on resume the checkpoint's compatibility (backbone, base model,
adapter kind, ranks, then targets).

Crash safety: the main process holds the run folder's lock (:mod:`wadi_cli.distill.lock`)
while it trains. A (re)started run first clears what a killed one left behind: temporary
files, and the rows of ``metrics.csv`` / ``validation.csv`` and the validation images of
steps after the checkpoint it starts from, so the logs read as if the run had never
stopped. A checkpoint or log that cannot be written (disk full, read-only) stops the run
with one line naming the file and the last good checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

from wadi_cli.distill.checkpoint import (
    CHECKPOINTS,
    Checkpoint,
    check_compatible,
    check_run_dir,
    create_run_dir,
    find_checkpoint,
    list_checkpoints,
    load_checkpoint,
    read_state,
    save_checkpoint,
)
from wadi_cli.distill.config import DistillConfig, resolve_config
from wadi_cli.distill.data import load_prompts
from wadi_cli.distill.lock import acquire_run_lock, check_run_lock
from wadi_cli.distill.logs import MetricsLog, TensorBoardLog, keep_rows_up_to
from wadi_cli.distill.phases import PhaseCallback, Phases
from wadi_cli.distill.signals import stop_on_signals
from wadi_cli.distill.topology import (
    Topology,
    barrier,
    launch_rank,
    process_topology,
    rank_checksums,
    synced_stop,
)
from wadi_cli.distill.trainer import Distiller, StepResult
from wadi_cli.errors import CheckpointError, WriteError
from wadi_cli.io import remove_stale_temps, write_text_atomic
from wadi_cli.io.sd_single_file_read import model_file_record

if TYPE_CHECKING:
    from wadi_cli.pipeline import LoadedPipeline


class LoopConfig(Protocol):
    """What :func:`run_loop` reads of a run's config (``DistillConfig``, ``FinetuneConfig``)."""

    max_steps: int
    checkpoint_every: int
    keep_last: int
    log_every: int
    validate_every: int
    tensorboard: bool

    def to_dict(self) -> dict[str, Any]: ...


class TrainingRecipe(Protocol):
    """What :func:`run_loop` drives (an :class:`~wadi_cli.distill.recipe.AdapterRecipe`):
    ``train_step()`` returns a result whose attributes named by ``metric_fields`` (``step``
    first, ``seconds`` last, which the loop measures) are the rows of ``metrics.csv``;
    ``validate(run)`` returns a row of validation metrics, or ``None``."""

    step: int
    topology: Topology
    device: torch.device
    metric_fields: tuple[str, ...]

    def train_step(self) -> Any: ...
    def checkpoint(self) -> Checkpoint: ...
    def load(self, ckpt: Checkpoint) -> None: ...
    def student_weights(self, ema: bool = False) -> dict[str, torch.Tensor]: ...
    def validate(self, run: Path) -> dict[str, Any] | None: ...


@dataclass
class RunSummary:
    """What a call to :func:`distill` (or another recipe's run) did; ``prompts``: the size
    of its data (prompts, or instance images)."""

    run: Path
    start_step: int
    step: int
    checkpoint: Path | None
    interrupted: bool
    seconds: float
    prompts: int
    world_size: int = 1
    rank: int = 0
    tensorboard: Path | None = None  # where the event files went (None: off or not installed)
    # what stopped it early: "SIGINT" (Ctrl-C), "SIGTERM", or a signal to another rank
    stopped_by: str | None = None


def weights_dtype(cfg: Any, device: torch.device) -> torch.dtype:
    """Storage dtype of the frozen base: ``auto`` = the backbone's on CUDA, fp32 on CPU."""
    from wadi_cli.backbones import get_backbone

    mode = cfg.mixed_precision
    if mode == "auto":
        mode = get_backbone(cfg.backbone).mixed_precision if device.type == "cuda" else "no"
    return {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[mode]


#: RUN/model_file.json: name, bytes and sha256 of a ``--model`` single file
MODEL_FILE_RECORD = "model_file.json"
_VALIDATION_PNG = re.compile(r"^step-(\d{8})\.png$")


def clear_leftovers(run: Path, start: int) -> None:
    """Before a run (re)starts at step ``start``: remove what a killed run left in ``run``
    (temporary files, validation rows and images of steps after ``start``)."""
    for folder in (run, run / CHECKPOINTS, run / "validation"):
        remove_stale_temps(folder)
    keep_rows_up_to(run / "validation.csv", start)
    if (run / "validation").is_dir():
        for png in (run / "validation").iterdir():
            m = _VALIDATION_PNG.match(png.name)
            if m and int(m.group(1)) > start:
                png.unlink()


def prepare(
    cfg: DistillConfig, out: str | os.PathLike[str], resume: str | None
) -> tuple[Path, list[str], Any | None]:
    """Checks before any model loads (nothing is created): run folder, prompts, checkpoint
    compatibility."""
    if launch_rank() == 0:
        check_run_lock(out)  # a live run in the folder: say so first
    run = check_run_dir(out, resume is not None)
    prompts = load_prompts(cfg.prompts, cfg.prompt_column, cfg.backbone, cfg.seed)
    return run, prompts, checkpoint_to_resume(run, resume, cfg, resolve_config)


def checkpoint_to_resume(
    run: Path, resume: str | None, cfg: Any, resolve: Callable[..., Any]
) -> Checkpoint | None:
    """The checkpoint ``resume`` names in ``run`` (``None`` for a fresh run), checked against
    ``cfg``: its saved config (read back with ``resolve(base=…)``) must share ``cfg``'s
    fingerprint, and a ``--model`` single file must be the one the run started from."""
    if resume is None:
        return None
    path = find_checkpoint(run, resume)
    try:
        ckpt = load_checkpoint(path)
    except CheckpointError as exc:
        raise naming_previous(path, exc) from None
    check_compatible(resolve(base=ckpt.config).fingerprint(), cfg.fingerprint())
    check_model_file(run, cfg.model)
    return ckpt


def check_model_file(run: Path, model: str | None) -> None:
    """On resume: refuse a ``--model`` single file whose bytes differ from the one the run
    started from (recorded in ``RUN/model_file.json``; same path, other content)."""
    recorded = run / MODEL_FILE_RECORD
    if not recorded.is_file():
        return
    try:
        was = json.loads(recorded.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{recorded}: unreadable ({exc})") from None
    now = model_file_record(model)
    if now is None or now.get("sha256") != was.get("sha256"):
        what = f"{model} (sha256 {now['sha256'][:12]}…)" if now else f"--model {model}"
        raise CheckpointError(
            f"this run was trained from the single file {was.get('file')} (sha256 "
            f"{str(was.get('sha256'))[:12]}…, recorded in {recorded}); refusing to resume it from {what}"
        )


def naming_previous(path: Path, exc: CheckpointError) -> CheckpointError:
    """``exc`` about the checkpoint ``path``, plus the older checkpoint to resume from instead."""
    older = [p for p in list_checkpoints(path.parent.parent) if p.name < path.name]
    hint = f"; the previous checkpoint is --resume {older[-1]}" if older else ""
    return CheckpointError(f"{exc}{hint}")


def load_base(cfg: Any, phases: Phases | None = None) -> tuple[LoadedPipeline, Topology]:
    """The base pipeline (frozen teacher) on this process's device, and the process topology
    (``cfg``: any run config with ``backbone``, ``model``, ``components``, ``device`` and
    ``mixed_precision``)."""
    from wadi_cli.pipeline import load_pipeline

    topology, device = process_topology(cfg.device)
    with (phases or Phases()).phase(f"loading the {cfg.backbone} base model"):
        pipe = load_pipeline(
            cfg.backbone,
            model=cfg.model,
            components=cfg.components,
            teacher=True,
            device=device,
            dtype=weights_dtype(cfg, device),
        )
    return pipe, topology


def build_distiller(cfg: DistillConfig, prompts: list[str], phases: Phases | None = None) -> Distiller:
    """Load the base pipeline and set up the run's state, reporting the slow phases to
    ``phases``."""
    pipe, topology = load_base(cfg, phases)
    return Distiller(cfg, pipe, prompts, topology, phases=phases)


def _validate(
    recipe: TrainingRecipe,
    run: Path,
    on_validate: Callable[[dict[str, Any]], None] | None,
    board: TensorBoardLog | None = None,
) -> None:
    """Validation images (+ metrics) on the main rank; the others wait."""
    if recipe.topology.is_main:
        row = recipe.validate(run)
        if board is not None and row:
            board.write_validation(row)
        if on_validate is not None and row:
            on_validate(row)
    barrier(recipe.topology)


def distill(
    cfg: DistillConfig,
    out: str | os.PathLike[str],
    *,
    resume: str | None = None,
    on_step: Callable[[StepResult, float], None] | None = None,
    on_start: Callable[[int, int], None] | None = None,
    on_validate: Callable[[dict[str, Any]], None] | None = None,
    on_phase: PhaseCallback | None = None,
    on_run: Callable[[Path], None] | None = None,
) -> RunSummary:
    """Run (or continue, with ``resume="latest"`` or a checkpoint path) a distillation
    into the run folder ``out`` until ``cfg.max_steps``. Checkpoints every
    ``cfg.checkpoint_every`` steps, at the end, and on Ctrl-C. The main process holds the
    run folder's lock throughout (:class:`~wadi_cli.distill.lock.RunLockedError` if a live
    process already trains there). ``on_run(folder)`` is called (main process) once the base
    model has loaded, before the run's slower set-up; ``on_phase`` with the events of the
    phases before the first step (:mod:`wadi_cli.distill.phases`)."""
    run, prompts, ckpt = prepare(cfg, out, resume)
    main = launch_rank() == 0
    phases = Phases(on_phase if main else None)
    pipe, topology = load_base(cfg, phases)
    if on_run is not None and main:  # the base loaded: the run will start, before its slow set-up
        on_run(run)
    distiller = Distiller(cfg, pipe, prompts, topology, phases=phases)
    if ckpt is not None:
        distiller.load(ckpt)
    with open_run(run, distiller.topology.is_main, model_file=pipe.model_file):
        return run_loop(cfg, run, distiller, len(prompts), ckpt is not None, on_step, on_start, on_validate)


@contextlib.contextmanager
def open_run(
    run: Path, main: bool, kind: str = "distill-run", model_file: dict[str, Any] | None = None
) -> Iterator[Path]:
    """On the main process: create the run folder (marker ``kind``) and hold its lock for the
    block, recording the ``--model`` single file (``model_file``, see
    :func:`check_model_file`) when there is one; the other ranks only enter the block."""
    with contextlib.ExitStack() as stack:
        if main:
            create_run_dir(run, kind)
            stack.enter_context(acquire_run_lock(run))
            if model_file is not None:  # --model FILE: what a resume must start from again
                text = json.dumps(model_file, indent=2, sort_keys=True) + "\n"
                write_text_atomic(run / MODEL_FILE_RECORD, text)
        yield run


def run_loop(
    cfg: LoopConfig,
    run: Path,
    recipe: TrainingRecipe,
    units: int,
    resumed: bool,
    on_step: Callable[[Any, float], None] | None = None,
    on_start: Callable[[int, int], None] | None = None,
    on_validate: Callable[[dict[str, Any]], None] | None = None,
) -> RunSummary:
    """Train ``recipe`` in the run folder ``run`` (created and locked: :func:`open_run`) from
    its step to ``cfg.max_steps``, after clearing what a killed run left behind. A log or
    checkpoint that cannot be written stops it with one line naming the last good
    checkpoint. ``units``: the size of its data, for the summary."""
    if recipe.topology.is_main:
        clear_leftovers(run, recipe.step)
    try:
        return _train(cfg, run, recipe, units, resumed, on_step, on_start, on_validate)
    except WriteError as exc:
        found = list_checkpoints(run)
        last = f"the last good checkpoint is {found[-1]}" if found else "no checkpoint was saved"
        raise WriteError(f"{exc}; training stopped at step {recipe.step}, {last}") from None


def _train(
    cfg: LoopConfig,
    run: Path,
    distiller: TrainingRecipe,
    num_prompts: int,
    resumed: bool,
    on_step: Callable[[Any, float], None] | None,
    on_start: Callable[[int, int], None] | None,
    on_validate: Callable[[dict[str, Any]], None] | None,
) -> RunSummary:
    """The loop of :func:`run_loop`, in a run folder that is ready (and locked)."""
    topo = distiller.topology
    start = distiller.step
    metrics = board = None
    if topo.is_main:
        write_text_atomic(run / "config.json", json.dumps(cfg.to_dict(), indent=2, sort_keys=True) + "\n")
        fields = distiller.metric_fields
        metrics = MetricsLog(run / "metrics.csv", start, fields)
        board = TensorBoardLog.open(run, start, fields) if cfg.tensorboard else None
    if on_start is not None and topo.is_main:
        on_start(start, cfg.max_steps)
    saved_at, last = (start if resumed else -1), None

    def save() -> None:
        nonlocal saved_at, last
        if topo.is_main:
            last = save_checkpoint(run, distiller.checkpoint(), cfg.keep_last)
        saved_at = distiller.step
        barrier(topo)

    t0 = time.perf_counter()
    stopped_by = None
    with contextlib.ExitStack() as closing:
        if board is not None:  # on failure; at the end it closes after the last save
            closing.push(board.close_after_failure)
        with stop_on_signals() as flag:
            while distiller.step < cfg.max_steps:
                ts = time.perf_counter()
                result = distiller.train_step()
                elapsed = time.perf_counter() - ts
                if metrics is not None and result.step % cfg.log_every == 0:
                    metrics.write(result, elapsed)
                    if board is not None:
                        board.write(result, elapsed)
                if on_step is not None and topo.is_main:
                    on_step(result, elapsed)
                stop = synced_stop(flag["stop"] is not None, topo, distiller.device)
                if cfg.validate_every and result.step % cfg.validate_every == 0:
                    _validate(distiller, run, on_validate, board)
                if result.step % cfg.checkpoint_every == 0 or stop:
                    save()
                if stop:
                    stopped_by = flag["stop"] or "a signal to another process"
                    break
        checksums = rank_checksums(distiller.student_weights(), topo)
        if len(set(checksums)) > 1:
            raise RuntimeError(f"ranks hold different student adapters after training: {checksums}")
        if saved_at != distiller.step:
            save()
        if topo.is_main:
            ranks = json.dumps({"world_size": topo.world, "checksums": checksums}) + "\n"
            write_text_atomic(run / "ranks.json", ranks)
        if board is not None:
            board.close()
    return RunSummary(
        run,
        start,
        distiller.step,
        last,
        stopped_by is not None,
        time.perf_counter() - t0,
        num_prompts,
        topo.world,
        topo.rank,
        run / "tensorboard" if board is not None else None,
        stopped_by,
    )


def config_for_run(
    out: str | os.PathLike[str],
    resume: str | None = None,
    file: str | os.PathLike[str] | None = None,
    overrides: dict[str, Any] | None = None,
) -> DistillConfig:
    """The resolved config of a run: recipe → file → flags; when resuming, the
    checkpoint's saved config takes the place of the defaults (flags still override, and a
    changed backbone / model / adapter / rank is then refused by :func:`distill`)."""
    return resolve_config(file, overrides, base=saved_run_config(out, resume))


def saved_run_config(out: str | os.PathLike[str], resume: str | None) -> dict[str, Any] | None:
    """The config saved in the checkpoint ``resume`` names under ``out`` (``None`` without
    ``resume``): the base a resumed run's flags override (distill and finetune alike)."""
    if resume is None:
        return None
    ckpt_dir = find_checkpoint(out, resume)
    try:
        return read_state(ckpt_dir)["config"]
    except CheckpointError as exc:
        raise naming_previous(ckpt_dir, exc) from None
