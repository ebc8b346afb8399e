"""One run folder, one writer: the run lock refuses a second trainer, and a lock left by a
killed (or vanished) process is taken over."""

from __future__ import annotations

import json
import os
import signal
import socket
import time

import pytest
from _helpers_crash import PAUSE_ENV, ForkLauncher, distill_args
from _helpers_sample import tiny_sampler
from typer.testing import CliRunner

from wadi_cli.cli.main import app
from wadi_cli.distill import lock as lock_mod
from wadi_cli.distill.lock import LOCK_NAME, RunLockedError, acquire_run_lock, check_run_lock

runner = CliRunner()


def _dead_pid() -> int:
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    return pid


def test_a_second_holder_is_refused_and_release_frees_the_folder(tmp_path):
    with acquire_run_lock(tmp_path) as held:
        holder = json.loads((tmp_path / LOCK_NAME).read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        assert held.previous == {}
        for attempt in (lambda: acquire_run_lock(tmp_path), lambda: check_run_lock(tmp_path)):
            with pytest.raises(RunLockedError) as info:
                attempt()
            msg = str(info.value)
            assert "\n" not in msg and f"pid {os.getpid()}" in msg and "is in use" in msg
    assert not (tmp_path / LOCK_NAME).exists()  # released: the file is gone
    check_run_lock(tmp_path)
    acquire_run_lock(tmp_path).release()


def test_the_lock_of_a_killed_holder_is_taken_over(tmp_path):
    """The holder is SIGKILLed while it holds the lock: its file stays, its flock does not."""
    ready = tmp_path / "ready"
    pid = os.fork()
    if pid == 0:
        try:
            acquire_run_lock(tmp_path)
            ready.touch()
            time.sleep(60)
        finally:
            os._exit(0)
    try:
        deadline = time.monotonic() + 30
        while not ready.exists():
            assert time.monotonic() < deadline
            time.sleep(0.01)
        with pytest.raises(RunLockedError, match=f"pid {pid} "):
            acquire_run_lock(tmp_path)
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == pid  # left behind
    with acquire_run_lock(tmp_path) as held:
        assert held.previous["pid"] == pid


@pytest.mark.parametrize(
    ("holder", "age", "refused"),
    [
        ("live", 0, True),  # no flock: a running pid on this host holds it
        ("dead", 0, False),  # a pid that is gone: stale
        ("other-host", 0, True),  # another host, refreshed recently
        ("other-host", 2 * lock_mod.STALE_AFTER_S, False),  # another host, silent for too long
    ],
)
def test_without_flock_the_recorded_holder_decides(tmp_path, monkeypatch, holder, age, refused):
    monkeypatch.setattr(lock_mod, "_try_flock", lambda fd: False)
    pid = {"live": os.getppid(), "dead": _dead_pid(), "other-host": 12345}[holder]
    host = "elsewhere" if holder == "other-host" else socket.gethostname()
    path = tmp_path / LOCK_NAME
    path.write_text(json.dumps({"pid": pid, "host": host, "started": "then", "command": "wadi distill"}))
    os.utime(path, (time.time() - age, time.time() - age))
    if refused:
        with pytest.raises(RunLockedError, match=f"pid {pid} on {host}"):
            acquire_run_lock(tmp_path)
    else:
        with acquire_run_lock(tmp_path) as held:
            assert held.previous["pid"] == pid


def test_a_second_wadi_distill_on_a_live_run_is_refused(pipe_dir, tmp_path):
    """A live `wadi distill` (held inside a write by the test pause) owns RUN: a second one,
    fresh or --resume, gets one line and exit 2; after a kill -9, --resume takes over."""
    tiny_sampler()
    run = tmp_path / "run"
    launcher = ForkLauncher(tmp_path / "logs")
    args = distill_args(pipe_dir, run, 2, full=False)
    first = launcher.start([*args, "--max-steps", "1"], {})
    assert first.wait() == 0, first.output()
    live = launcher.start([*args, "--resume", "latest"], {PAUSE_ENV: "60"})
    lock = run / LOCK_NAME
    try:
        deadline = time.monotonic() + 60
        while not (lock.is_file() and f'"pid": {live.pid},' in lock.read_text()):
            assert live.poll() is None and time.monotonic() < deadline, live.output()
            time.sleep(0.01)
        for extra in ([], ["--resume", "latest"]):
            result = runner.invoke(app, [*args, *extra])
            assert result.exit_code == 2, result.output
            assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.output
            assert "is in use" in result.stderr and f"pid {live.pid} " in result.stderr
    finally:
        live.kill()
    assert lock.is_file()  # the killed run left its lock file behind: stale, taken over now
    result = runner.invoke(app, [*args, "--resume", "latest", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["from_step"] == 1 and not lock.exists()


def test_only_the_main_process_checks_and_takes_the_lock(pipe_dir, tmp_path, monkeypatch):
    """Under accelerate every rank runs `prepare`; ranks > 0 train in the folder rank 0 holds."""
    from wadi_cli.distill import resolve_config
    from wadi_cli.distill.run import prepare

    cfg = resolve_config(overrides=dict(model=str(pipe_dir), device="cpu", regression_weight=0.0))
    from wadi_cli.distill.checkpoint import create_run_dir

    run = create_run_dir(tmp_path / "run")
    with acquire_run_lock(run):  # rank 0 of this launch holds it
        monkeypatch.setenv("RANK", "1")
        prepare(cfg, run, None)  # rank 1 goes ahead
        monkeypatch.setenv("RANK", "0")
        with pytest.raises(RunLockedError):
            prepare(cfg, run, None)  # a second launch's rank 0 does not
