"""Driving a distillation run: checks before work, the loop, checkpoints, metrics, Ctrl-C and SIGTERM.

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
import csv
import io
import json
import os
import re
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from wadi_cli.distill.checkpoint import (
    CHECKPOINTS,
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
from wadi_cli.distill.launch import launched_world_size
from wadi_cli.distill.lock import acquire_run_lock, check_run_lock
from wadi_cli.distill.trainer import Distiller, StepResult, Topology
from wadi_cli.errors import CheckpointError, WriteError
from wadi_cli.io import remove_stale_temps, write_error, write_text_atomic
from wadi_cli.machine import resolve_device

METRIC_FIELDS = ("step", "loss_g", "loss_fake", "grad_norm_g", "grad_norm_fake", "lr", "fake_lr", "seconds")


@dataclass
class RunSummary:
    """What a call to :func:`distill` did."""

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


def weights_dtype(cfg: DistillConfig, device: torch.device) -> torch.dtype:
    """Storage dtype of the frozen base: ``auto`` = the backbone's on CUDA, fp32 on CPU."""
    from wadi_cli.backbones import get_backbone

    mode = cfg.mixed_precision
    if mode == "auto":
        mode = get_backbone(cfg.backbone).mixed_precision if device.type == "cuda" else "no"
    return {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[mode]


def _complete_rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    """Header and complete rows of a CSV log. Rows are appended one at a time, so only the
    last line can be cut short (by a kill); it has no line end and is dropped."""
    raw = path.read_bytes()
    text = raw[: raw.rfind(b"\n") + 1].decode("utf-8", errors="replace")
    reader = csv.DictReader(io.StringIO(text, newline=""))
    rows = [r for r in reader if None not in r and None not in r.values()]
    return list(reader.fieldnames or []), rows


def keep_rows_up_to(path: Path, step: int, fields: tuple[str, ...] | None = None) -> None:
    """Rewrite the per-step CSV log ``path`` (atomically) with one complete row per step
    ``<= step``: what a run that starts at ``step`` would hold had it never stopped. Rows
    of later steps (written after the checkpoint a resumed run starts from), duplicated
    and torn rows are dropped. ``fields``: the columns (default: the file's own header)."""
    header, rows = _complete_rows(path) if path.is_file() else ([], [])
    header = list(fields or header)
    if not header:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        return
    by_step: dict[int, dict[str, str]] = {}
    for row in rows:
        try:
            at = int(row["step"])
        except (KeyError, TypeError, ValueError):
            continue
        if at <= step:
            by_step[at] = row
    out = io.StringIO(newline="")
    writer = csv.DictWriter(out, header, extrasaction="ignore", restval="")
    writer.writeheader()
    writer.writerows(by_step[k] for k in sorted(by_step))
    write_text_atomic(path, out.getvalue())


class MetricsLog:
    """``metrics.csv``: one row per logged step; rows after ``resume_step`` are dropped so a
    resumed run's log reads as if it had never stopped."""

    def __init__(self, path: Path, resume_step: int) -> None:
        self.path = path
        keep_rows_up_to(path, resume_step, METRIC_FIELDS)

    def write(self, result: StepResult, seconds: float) -> None:
        row = {k: getattr(result, k) for k in METRIC_FIELDS if k != "seconds"}
        row["seconds"] = round(seconds, 4)
        try:
            with self.path.open("a", newline="") as fh:
                csv.DictWriter(fh, METRIC_FIELDS).writerow(row)
        except OSError as exc:
            raise write_error(self.path, exc) from None


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


class TensorBoardLog:
    """TensorBoard event files in ``RUN/tensorboard`` (``torch.utils.tensorboard``): the
    scalars of ``metrics.csv`` plus validation metrics. :meth:`open` returns ``None`` when
    the ``tensorboard`` package is missing.

    TensorBoard writes from a background thread, which keeps a failed write (disk full,
    read-only folder) to raise it at the next call; every call here turns it into the
    one-line :class:`~wadi_cli.errors.WriteError` naming the folder (training then stops
    at its last checkpoint, as for ``metrics.csv``), and the thread's own traceback is not
    printed. :meth:`close` flushes first, so a failure of the last writes is reported too."""

    def __init__(self, writer: Any, folder: Path) -> None:
        self.writer, self.folder, self._closed = writer, folder, False
        self._hook = threading.excepthook
        threading.excepthook = self._quiet_writer_thread

    @classmethod
    def open(cls, run: Path, start_step: int) -> TensorBoardLog | None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            return None
        folder = run / "tensorboard"
        try:  # purge_step: a resumed run drops the events written after its checkpoint
            writer = SummaryWriter(str(folder), purge_step=start_step + 1 if start_step else None)
        except OSError as exc:
            raise write_error(folder, exc) from None
        return cls(writer, folder)

    def _quiet_writer_thread(self, args: Any) -> None:
        """The writer thread's failure is reported by the next call in the main thread."""
        if not (issubclass(args.exc_type, OSError) and type(args.thread).__name__ == "_AsyncWriterThread"):
            self._hook(args)

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        try:
            yield
        except OSError as exc:
            raise write_error(self.folder, exc) from None

    def write(self, result: StepResult, seconds: float) -> None:
        with self._writing():
            for key in METRIC_FIELDS[1:]:
                value = seconds if key == "seconds" else getattr(result, key)
                self.writer.add_scalar(f"train/{key}", value, result.step)
            self.writer.flush()  # on disk with the step's metrics.csv row (and any failure now)

    def write_validation(self, row: dict[str, Any]) -> None:
        with self._writing():
            for key, value in row.items():
                if key != "step" and isinstance(value, int | float):
                    self.writer.add_scalar(f"validation/{key}", value, row["step"])
            self.writer.flush()

    def close_after_failure(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        """Close when leaving the loop on an exception (the failure that stopped training is
        the one to report); on a normal exit leave it to :meth:`close`. An exit callback."""
        if exc_type is not None:
            with contextlib.suppress(WriteError):
                self.close()
        return False

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            with self._writing():
                try:
                    self.writer.flush()
                finally:
                    self.writer.close()
        finally:
            threading.excepthook = self._hook


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def _stop_on_signals() -> Iterator[dict[str, Any]]:
    """The first Ctrl-C (SIGINT) or SIGTERM (what a batch scheduler such as SLURM sends
    before it kills a job) sets ``flag["stop"]`` to the signal's name: the loop saves a
    checkpoint and exits after the current step. A second Ctrl-C of a process on its own
    interrupts at once. Repeats are otherwise ignored: under ``accelerate launch`` every
    worker gets each signal twice (from the terminal or scheduler, and passed on by the
    launcher, which also enforces its own deadline), and schedulers may repeat SIGTERM
    before their SIGKILL. A signal that is ignored (SIGINT of a job started with ``nohup``
    or in the background of a script) stays ignored."""
    flag: dict[str, Any] = {"stop": None}
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    launched = launched_world_size() > 1

    def handler(signum: int, frame: Any) -> None:
        if flag["stop"] is None:
            flag["stop"] = signal.Signals(signum).name
        elif signum == signal.SIGINT and not launched:
            raise KeyboardInterrupt

    previous = {}
    for sig in STOP_SIGNALS:
        if signal.getsignal(sig) is not signal.SIG_IGN:
            previous[sig] = signal.signal(sig, handler)
    try:
        yield flag
    finally:
        for sig, before in previous.items():
            signal.signal(sig, before)


def prepare(
    cfg: DistillConfig, out: str | os.PathLike[str], resume: str | None
) -> tuple[Path, list[str], Any | None]:
    """Checks before any model loads (nothing is created): run folder, prompts, checkpoint
    compatibility."""
    if launch_rank() == 0:
        check_run_lock(out)  # a live run in the folder: say so first
    run = check_run_dir(out, resume is not None)
    prompts = load_prompts(cfg.prompts, cfg.prompt_column, cfg.backbone, cfg.seed)
    ckpt = None
    if resume is not None:
        path = find_checkpoint(run, resume)
        try:
            ckpt = load_checkpoint(path)
        except CheckpointError as exc:
            raise _naming_previous(path, exc) from None
        saved = resolve_config(base=ckpt.config)
        check_compatible(saved.fingerprint(), cfg.fingerprint())
    return run, prompts, ckpt


def _naming_previous(path: Path, exc: CheckpointError) -> CheckpointError:
    """``exc`` about the checkpoint ``path``, plus the older checkpoint to resume from instead."""
    older = [p for p in list_checkpoints(path.parent.parent) if p.name < path.name]
    hint = f"; the previous checkpoint is --resume {older[-1]}" if older else ""
    return CheckpointError(f"{exc}{hint}")


def launch_rank() -> int:
    """This process's rank as set by ``accelerate launch`` / ``torchrun`` (0 when alone),
    known before the process group exists."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def process_topology(cfg: DistillConfig) -> tuple[Topology, torch.device]:
    """This process's rank and device. Under ``accelerate launch`` (``WORLD_SIZE`` > 1) the
    process group is set up by accelerate (gloo on CPU, NCCL on GPUs)."""
    if launched_world_size() <= 1:
        return Topology(), resolve_device(cfg.device)
    from accelerate import PartialState

    state = PartialState(cpu=cfg.device == "cpu")
    return Topology(state.process_index, state.num_processes), state.device


def _barrier(topology: Topology) -> None:
    if topology.world > 1:
        from accelerate import PartialState

        PartialState().wait_for_everyone()


def build_distiller(cfg: DistillConfig, prompts: list[str]) -> Distiller:
    """Load the base pipeline (frozen teacher) and set up the run's state."""
    from wadi_cli.pipeline import load_pipeline

    topology, device = process_topology(cfg)
    pipe = load_pipeline(
        cfg.backbone,
        model=cfg.model,
        components=cfg.components,
        teacher=True,
        device=device,
        dtype=weights_dtype(cfg, device),
    )
    return Distiller(cfg, pipe, prompts, topology)


def _validate(
    distiller: Distiller,
    run: Path,
    on_validate: Callable[[dict[str, Any]], None] | None,
    board: TensorBoardLog | None = None,
) -> None:
    """Validation images (+ tiny metrics) on the main rank; the others wait."""
    if distiller.topology.is_main:
        from wadi_cli.distill.validate import validate

        row = validate(distiller, run)
        if board is not None and row:
            board.write_validation(row)
        if on_validate is not None and row:
            on_validate(row)
    _barrier(distiller.topology)


def _synced_stop(stop: bool, distiller: Distiller) -> bool:
    """Ctrl-C on any rank stops every rank at the same step."""
    if distiller.topology.world == 1:
        return stop
    flag = torch.tensor([float(stop)], device=distiller.device)
    return float(distiller.topology.mean(flag)) > 0


def _adapter_checksum(distiller: Distiller) -> str:
    import hashlib

    h = hashlib.sha256()
    for k, v in sorted(distiller.student_weights().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _rank_checksums(distiller: Distiller) -> list[str]:
    """Checksum of the student adapter on every rank (they must agree)."""
    mine = _adapter_checksum(distiller)
    if distiller.topology.world == 1:
        return [mine]
    from accelerate.utils import gather_object

    return list(gather_object([mine]))


def distill(
    cfg: DistillConfig,
    out: str | os.PathLike[str],
    *,
    resume: str | None = None,
    on_step: Callable[[StepResult, float], None] | None = None,
    on_start: Callable[[int, int], None] | None = None,
    on_validate: Callable[[dict[str, Any]], None] | None = None,
) -> RunSummary:
    """Run (or continue, with ``resume="latest"`` or a checkpoint path) a distillation
    into the run folder ``out`` until ``cfg.max_steps``. Checkpoints every
    ``cfg.checkpoint_every`` steps, at the end, and on Ctrl-C. The main process holds the
    run folder's lock throughout (:class:`~wadi_cli.distill.lock.RunLockedError` if a live
    process already trains there)."""
    run, prompts, ckpt = prepare(cfg, out, resume)
    distiller = build_distiller(cfg, prompts)
    if ckpt is not None:
        distiller.load(ckpt)
    with contextlib.ExitStack() as stack:
        if distiller.topology.is_main:
            create_run_dir(run)
            stack.enter_context(acquire_run_lock(run))
            clear_leftovers(run, distiller.step)
        try:
            return _train(cfg, run, distiller, len(prompts), ckpt is not None, on_step, on_start, on_validate)
        except WriteError as exc:
            found = list_checkpoints(run)
            last = f"the last good checkpoint is {found[-1]}" if found else "no checkpoint was saved"
            raise WriteError(f"{exc}; training stopped at step {distiller.step}, {last}") from None


def _train(
    cfg: DistillConfig,
    run: Path,
    distiller: Distiller,
    num_prompts: int,
    resumed: bool,
    on_step: Callable[[StepResult, float], None] | None,
    on_start: Callable[[int, int], None] | None,
    on_validate: Callable[[dict[str, Any]], None] | None,
) -> RunSummary:
    """The loop of :func:`distill`, in a run folder that is ready (and locked)."""
    topo = distiller.topology
    start = distiller.step
    metrics = board = None
    if topo.is_main:
        write_text_atomic(run / "config.json", json.dumps(cfg.to_dict(), indent=2, sort_keys=True) + "\n")
        metrics = MetricsLog(run / "metrics.csv", start)
        board = TensorBoardLog.open(run, start) if cfg.tensorboard else None
    if on_start is not None and topo.is_main:
        on_start(start, cfg.max_steps)
    saved_at, last = (start if resumed else -1), None

    def save() -> None:
        nonlocal saved_at, last
        if topo.is_main:
            last = save_checkpoint(run, distiller.checkpoint(), cfg.keep_last)
        saved_at = distiller.step
        _barrier(topo)

    t0 = time.perf_counter()
    stopped_by = None
    with contextlib.ExitStack() as closing:
        if board is not None:  # on failure; at the end it closes after the last save
            closing.push(board.close_after_failure)
        with _stop_on_signals() as flag:
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
                stop = _synced_stop(flag["stop"] is not None, distiller)
                if cfg.validate_every and result.step % cfg.validate_every == 0:
                    _validate(distiller, run, on_validate, board)
                if result.step % cfg.checkpoint_every == 0 or stop:
                    save()
                if stop:
                    stopped_by = flag["stop"] or "a signal to another process"
                    break
        checksums = _rank_checksums(distiller)
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
    if resume is None:
        return resolve_config(file, overrides)
    ckpt_dir = find_checkpoint(out, resume)
    try:
        saved = read_state(ckpt_dir)["config"]
    except CheckpointError as exc:
        raise _naming_previous(ckpt_dir, exc) from None
    return resolve_config(file, overrides, base=saved)
