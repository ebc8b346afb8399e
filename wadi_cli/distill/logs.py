"""The per-step logs of a training run: ``metrics.csv`` (:class:`MetricsLog`) and
TensorBoard event files (:class:`TensorBoardLog`), and the rewrite that trims a CSV log
back to a step (:func:`keep_rows_up_to`), so that a resumed run's logs read as if it had
never stopped.

A row is read from a step result's attributes named by the log's ``fields`` (the column
``seconds`` is the step's wall time); a failed write is one
:class:`~wadi_cli.errors.WriteError` line naming the file.
"""

from __future__ import annotations

import contextlib
import csv
import io
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from wadi_cli.errors import WriteError
from wadi_cli.io import write_error, write_text_atomic


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
    """``metrics.csv``: one row per logged step with the columns ``fields`` (``step`` first,
    ``seconds`` last); rows after ``resume_step`` are dropped so a resumed run's log reads
    as if it had never stopped."""

    def __init__(self, path: Path, resume_step: int, fields: tuple[str, ...]) -> None:
        self.path, self.fields = path, fields
        keep_rows_up_to(path, resume_step, fields)

    def write(self, result: Any, seconds: float) -> None:
        row = {k: getattr(result, k) for k in self.fields if k != "seconds"}
        row["seconds"] = round(seconds, 4)
        try:
            with self.path.open("a", newline="") as fh:
                csv.DictWriter(fh, self.fields).writerow(row)
        except OSError as exc:
            raise write_error(self.path, exc) from None


class TensorBoardLog:
    """TensorBoard event files in ``RUN/tensorboard`` (``torch.utils.tensorboard``): the
    scalars of ``metrics.csv`` plus validation metrics. :meth:`open` returns ``None`` when
    the ``tensorboard`` package is missing.

    TensorBoard writes from a background thread, which keeps a failed write (disk full,
    read-only folder) to raise it at the next call; every call here turns it into the
    one-line :class:`~wadi_cli.errors.WriteError` naming the folder (training then stops
    at its last checkpoint, as for ``metrics.csv``), and the thread's own traceback is not
    printed. :meth:`close` flushes first, so a failure of the last writes is reported too."""

    def __init__(self, writer: Any, folder: Path, fields: tuple[str, ...]) -> None:
        self.writer, self.folder, self.fields, self._closed = writer, folder, fields, False
        self._hook = threading.excepthook
        threading.excepthook = self._quiet_writer_thread

    @classmethod
    def open(cls, run: Path, start_step: int, fields: tuple[str, ...]) -> TensorBoardLog | None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            return None
        folder = run / "tensorboard"
        try:  # purge_step: a resumed run drops the events written after its checkpoint
            writer = SummaryWriter(str(folder), purge_step=start_step + 1 if start_step else None)
        except OSError as exc:
            raise write_error(folder, exc) from None
        return cls(writer, folder, fields)

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

    def write(self, result: Any, seconds: float) -> None:
        with self._writing():
            for key in self.fields[1:]:
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
