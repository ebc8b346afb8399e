"""A full disk (ENOSPC) or a read-only file system (EROFS) in the middle of a run or an
export: the previous checkpoint / output stays intact, one line says what failed, and
training stops at the last good checkpoint instead of carrying on without saving.

The failures are injected where the OS reports them: ``safetensors.save_file`` raises
``SafetensorError("... No space left on device (os error 28)")`` on a full disk (checked on
a 1 MB tmpfs), creating a temporary file or folder on a read-only mount raises
``OSError(EROFS)``, and appending to a log on a full disk raises ``OSError(ENOSPC)`` (here a
real one: the log is pointed at ``/dev/full``).
"""

from __future__ import annotations

import errno
import os
import threading
from pathlib import Path

import pytest
import torch
from _helpers_crash import leftovers, temp_siblings, tree
from _helpers_sample import one_torch_thread
from safetensors import SafetensorError
from typer.testing import CliRunner

from wadi_cli.cli.main import app
from wadi_cli.distill import distill, list_checkpoints, load_checkpoint, resolve_config
from wadi_cli.distill.run import config_for_run
from wadi_cli.errors import WriteError
from wadi_cli.io import atomic, safetensors_writer

runner = CliRunner()
ENOSPC = SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")


pytestmark = pytest.mark.usefixtures("one_thread")


def _cfg(pipe_dir, **kw):
    over = dict(model=str(pipe_dir), batch_size=2, max_steps=4, checkpoint_every=1, device="cpu")
    over.update(regression_weight=0.0, validate_every=0, tensorboard=False, ema_decay=0.9, seed=2)
    return resolve_config(overrides={**over, **kw})


def _fail_in(monkeypatch, name, predicate, error):
    """Make ``safetensors_writer.save_file`` or ``tempfile.<name>`` raise ``error`` on calls
    whose first argument matches."""
    real = getattr(safetensors_writer if name == "save_file" else atomic.tempfile, name)

    def failing(*args, **kwargs):
        target = kwargs.get("dir") if name == "mkdtemp" else args[1]
        if predicate(str(target), kwargs):
            raise error
        return real(*args, **kwargs)

    if name == "save_file":
        monkeypatch.setattr(safetensors_writer, "save_file", failing)
    else:
        monkeypatch.setattr(atomic.tempfile, name, failing)


@pytest.mark.parametrize(
    ("how", "reason"),
    [
        ("enospc", "No space left on device"),  # the disk fills up while a checkpoint file is written
        ("erofs", "Read-only file system"),  # the mount turns read-only before the checkpoint starts
    ],
)
def test_a_checkpoint_that_cannot_be_written_stops_training_at_the_last_good_one(
    pipe_dir, tmp_path, monkeypatch, how, reason
):
    run = tmp_path / "run"
    steps_seen = []
    if how == "enospc":  # the third checkpoint's optimizer file
        _fail_in(monkeypatch, "save_file", lambda t, kw: "step-00000003" in t and "optim_fake" in t, ENOSPC)
    else:  # the folder of the third checkpoint cannot even be created
        err = OSError(errno.EROFS, "Read-only file system")
        monkeypatch.setattr(
            atomic.tempfile,
            "mkdtemp",
            _raising_for(atomic.tempfile.mkdtemp, lambda kw: ".step-00000003." in kw.get("prefix", ""), err),
        )
    good = None

    def on_step(result, seconds):
        nonlocal good
        steps_seen.append(result.step)
        if result.step == 3:  # what step 2's checkpoint holds, before anything can touch it
            good = {p.name: p.read_bytes() for p in (run / "checkpoints" / "step-00000002").iterdir()}

    with pytest.raises(WriteError) as info:
        distill(_cfg(pipe_dir), run, on_step=on_step)
    msg = str(info.value)
    assert "\n" not in msg and reason in msg and "training stopped at step 3" in msg
    assert msg.startswith(f"cannot write {run / 'checkpoints'}")
    assert msg.endswith(f"the last good checkpoint is {run / 'checkpoints' / 'step-00000002'}")
    assert steps_seen == [1, 2, 3]  # it did not carry on to step 4
    assert [p.name for p in list_checkpoints(run)] == ["step-00000001", "step-00000002"]
    assert {p.name: p.read_bytes() for p in (run / "checkpoints" / "step-00000002").iterdir()} == good
    assert leftovers(run) == []  # no temporary files, and the lock is released
    monkeypatch.undo()  # space again: the run continues from step 2 and finishes
    summary = distill(config_for_run(run, "latest"), run, resume="latest")
    assert (summary.start_step, summary.step) == (2, 4)
    assert load_checkpoint(list_checkpoints(run)[-1]).step == 4


def _raising_for(real, predicate, error):
    def fn(*args, **kwargs):
        if predicate(kwargs):
            raise error
        return real(*args, **kwargs)

    return fn


def test_a_full_disk_under_the_metrics_log_stops_training(pipe_dir, tmp_path):
    """A real ENOSPC: after step 2 metrics.csv is pointed at /dev/full."""
    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full on this system")
    run = tmp_path / "run"

    def on_step(result, seconds):
        if result.step == 2:
            (run / "metrics.csv").unlink()
            os.symlink("/dev/full", run / "metrics.csv")

    with pytest.raises(WriteError, match=r"cannot write .*metrics.csv: No space left on device; training "):
        distill(_cfg(pipe_dir), run, on_step=on_step)
    assert [p.name for p in list_checkpoints(run)] == ["step-00000001", "step-00000002"]
    assert leftovers(run) == []


def test_a_full_disk_under_the_tensorboard_events_stops_training(pipe_dir, tmp_path, monkeypatch):
    """TensorBoard writes from a background thread: its real ENOSPC (the event file pointed
    at /dev/full after step 2) surfaces at step 3, before its checkpoint, as the same
    one-line error as the metrics log, and the thread prints no traceback."""
    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full on this system")
    pytest.importorskip("tensorboard")
    run = tmp_path / "run"

    def on_step(result, seconds):
        if result.step == 2:
            (events,) = (run / "tensorboard").glob("events.out.tfevents.*")
            events.unlink()
            os.symlink("/dev/full", events)

    printed = []  # what Python's hook would print as "Exception in thread ..."
    monkeypatch.setattr(threading, "excepthook", lambda args: printed.append(args.exc_value))
    hook = threading.excepthook
    pattern = r"cannot write .*tensorboard: No space left on device; training stopped at step 3, "
    with pytest.raises(WriteError, match=pattern + r"the last good checkpoint is .*step-00000002$"):
        distill(_cfg(pipe_dir, tensorboard=True), run, on_step=on_step)
    assert [p.name for p in list_checkpoints(run)] == ["step-00000001", "step-00000002"]
    assert leftovers(run) == []
    assert threading.excepthook is hook and printed == []


def test_the_cli_says_it_in_one_line_with_exit_4(pipe_dir, tmp_path, monkeypatch):
    _fail_in(monkeypatch, "save_file", lambda t, kw: "step-00000002" in t, ENOSPC)
    run = tmp_path / "run"
    args = ["distill", "--model", str(pipe_dir), "--out", str(run), "--device", "cpu", "--batch-size", "2"]
    args += ["--max-steps", "3", "--checkpoint-every", "1", "--regression-weight", "0", "--no-tensorboard"]
    result = runner.invoke(app, args)
    assert result.exit_code == 4, result.output
    # the progress rows (the phases before training, the training bar) and the run-folder notice
    status = ("distill ", "run folder: ", "loading the ")
    lines = [ln for ln in result.stderr.splitlines() if not ln.startswith(status)]
    assert len(lines) == 1 and "Traceback" not in result.output, result.stderr
    assert lines[0].startswith("error: cannot write ") and "No space left on device" in lines[0]
    assert lines[0].endswith("the last good checkpoint is " + str(run / "checkpoints" / "step-00000001"))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, pipe_dir):
    run = tmp_path_factory.mktemp("disk") / "run"
    with one_torch_thread():
        distill(_cfg(pipe_dir, max_steps=1), run)
    return run


@pytest.mark.parametrize("how", ["enospc", "erofs"])
@pytest.mark.parametrize("command", ["export", "export-diffusers", "merge", "swap"])
def test_exports_that_cannot_be_written_leave_the_old_output(
    run_dir, pipe_dir, tmp_path, monkeypatch, command, how
):
    from wadi_cli.distill.export import export_run

    base = pipe_dir / "unet" / "diffusion_pytorch_model.safetensors"
    adapter = tmp_path / "adapter.safetensors"
    export_run(run_dir, "adapter", adapter)
    is_folder = command == "export-diffusers"
    out = tmp_path / ("pipeline" if is_folder else "out.safetensors")
    if is_folder:
        export_run(run_dir, "diffusers", out)
    else:
        out.write_bytes(adapter.read_bytes())
    before = tree(out)
    args = {
        "export": ["export", str(run_dir), "-f", "merged", "--out", str(out), "--overwrite"],
        "export-diffusers": ["export", str(run_dir), "-f", "diffusers", "--out", str(out), "--overwrite"],
        "merge": ["merge", str(base), str(adapter), "--out", str(out), "--overwrite"],
        "swap": ["swap", str(base), str(adapter), "--keep", "direction", "--out", str(out), "--overwrite"],
    }[command]
    if how == "enospc":
        _fail_in(monkeypatch, "save_file", lambda t, kw: True, ENOSPC)
        reason = "No space left on device"
    else:  # read-only at the final rename
        real = atomic.os.replace
        err = OSError(errno.EROFS, "Read-only file system")

        def replace(src, dst, *a, **k):
            if Path(dst).name == out.name:
                raise err
            return real(src, dst, *a, **k)

        monkeypatch.setattr(atomic.os, "replace", replace)
        monkeypatch.setattr(atomic, "exchange_paths", lambda a, b: (_ for _ in ()).throw(err))
        reason = "Read-only file system"
    result = runner.invoke(app, args)
    assert result.exit_code == 4, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.output, result.stderr
    assert lines[0].startswith("error: cannot write ") and reason in lines[0]
    assert tree(out) == before
    assert temp_siblings(out) == []


def test_torch_tensors_still_round_trip(tmp_path):
    """The write path is unchanged for a healthy disk (safetensors reads what we wrote)."""
    from safetensors.torch import load_file

    t = {"a": torch.randn(3, 4), "b": torch.arange(5, dtype=torch.int16), "c": torch.zeros(0)}
    safetensors_writer.save_safetensors(t, tmp_path / "x.safetensors")
    got = load_file(tmp_path / "x.safetensors")
    assert all(torch.equal(got[k], v) for k, v in t.items())
