"""The kill -9 harness: run wadi commands as separate processes, SIGKILL them at chosen
moments (in training, in the middle of a checkpoint or output write, at a random time),
start them again, and check what they leave behind.

Two ways to start a command, same checks:

- :class:`ForkLauncher` forks the test process (every module already imported, so a
  process is ready in well under a second): the short variants in the default suite;
- :class:`SubprocessLauncher` runs ``python -m wadi_cli ...`` in a fresh interpreter,
  exactly what a user runs: the long, ``slow``-marked loops.

Both run with one intra-op thread (results are compared bit for bit) and with
``WADI_TEST_WRITE_PAUSE`` set, which holds every atomic write open, complete but not yet
renamed, for that many seconds, so a kill inside a checkpoint write is a matter of
watching for its temporary folder, not of luck.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import random
import re
import signal
import struct
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from wadi_cli.distill import list_checkpoints, load_checkpoint
from wadi_cli.io import load_state_dict

PAUSE_ENV = "WADI_TEST_WRITE_PAUSE"
_TEMP = re.compile(r"^\..+\.wadi-[A-Za-z0-9_-]+-\d+\.[A-Za-z0-9_]+\.(tmp|old|del)$")
_CKPT_TEMP = re.compile(r"^\.step-\d{8}\.wadi-.*\.tmp$")


# ---- starting processes -----------------------------------------------------------------
class Proc:
    """A started wadi command: its pid, a log file, and how to wait for it."""

    def __init__(self, pid: int, log: Path, popen: subprocess.Popen | None = None) -> None:
        self.pid, self.log, self.popen = pid, log, popen
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            if self.popen is not None:
                self.returncode = self.popen.poll()
            else:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
                if pid:
                    self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float = 300.0) -> int:
        end = time.monotonic() + timeout
        while self.poll() is None:
            if time.monotonic() > end:
                self.kill()
                raise TimeoutError(f"pid {self.pid} ran over {timeout} s; log: {self.output()[-2000:]}")
            time.sleep(0.01)
        return self.returncode  # type: ignore[return-value]

    def kill(self) -> None:
        """SIGKILL and reap (a zombie would still look alive to the lock and the cleanup)."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)
        self.wait()

    def output(self) -> str:
        return self.log.read_text(errors="replace")


class _Launcher:
    """Starts ``wadi ARGS`` processes, each with its own log file under ``logs``."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.count = 0

    def _log(self) -> Path:
        self.count += 1
        self.logs.mkdir(parents=True, exist_ok=True)
        return self.logs / f"proc-{self.count:03d}.log"


class ForkLauncher(_Launcher):
    """Fork this process and run ``wadi ARGS`` in the child (see the module docstring)."""

    def start(self, args: list[str], env: dict[str, str]) -> Proc:
        log = self._log()
        pid = os.fork()
        if pid == 0:  # the child: never return into pytest
            code = 1
            try:
                fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                os.dup2(fd, 1)
                os.dup2(fd, 2)
                sys.stdout = open(1, "w", closefd=False)  # noqa: SIM115
                sys.stderr = open(2, "w", closefd=False)  # noqa: SIM115
                os.environ.update(env)
                torch.set_num_threads(1)
                signal.signal(signal.SIGINT, signal.default_int_handler)
                from wadi_cli.cli.main import app

                try:
                    app(args=args, prog_name="wadi")
                    code = 0
                except SystemExit as exc:
                    code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            except BaseException as exc:  # noqa: BLE001 - report, then leave
                with open(log, "a") as fh:
                    fh.write(f"child crashed: {exc!r}\n")
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        return Proc(pid, log)


class SubprocessLauncher(_Launcher):
    """``python -m wadi_cli ARGS`` in a fresh interpreter."""

    def start(self, args: list[str], env: dict[str, str]) -> Proc:
        log = self._log()
        full = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **env}
        with open(log, "wb") as fh:
            popen = subprocess.Popen(
                [sys.executable, "-m", "wadi_cli", *args], stdout=fh, stderr=subprocess.STDOUT, env=full
            )
        return Proc(popen.pid, log, popen)


def run_to_end(launcher, args: list[str], env: dict[str, str] | None = None, timeout: float = 600) -> str:
    """Run a command without killing it; its output (it must succeed)."""
    proc = launcher.start(args, env or {})
    code = proc.wait(timeout)
    assert code == 0, f"wadi {' '.join(args)} failed ({code}):\n{proc.output()[-3000:]}"
    return proc.output()


def kill_when(proc: Proc, ready, delay: float = 0.0, timeout: float = 300.0) -> bool:
    """Poll ``ready()`` every 5 ms; once true, wait ``delay`` s and SIGKILL ``proc``.
    False if the process ended on its own first."""
    end = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            return False
        if time.monotonic() > end:
            proc.kill()
            raise TimeoutError(f"the kill moment never came; log:\n{proc.output()[-2000:]}")
        time.sleep(0.005)
    time.sleep(delay)
    if proc.poll() is not None:
        return False
    proc.kill()
    return True


# ---- what a run folder must look like ----------------------------------------------------
def leftovers(root: Path, allowed: tuple[str, ...] = (".wadi",)) -> list[str]:
    """Hidden entries under ``root`` that are not ours to keep: temporaries of killed writers
    (ours or safetensors' own ``.tmpXXXXXX``), a lock file left behind."""
    found = []
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            if name.startswith(".") and name not in allowed:
                found.append(str(Path(dirpath, name).relative_to(root)))
    return sorted(found)


def temp_checkpoints(run: Path, pid: int | None = None) -> list[str]:
    """Half-written checkpoint folders (of process ``pid`` only, when given)."""
    folder = run / "checkpoints"
    if not folder.is_dir():
        return []
    names = [p.name for p in folder.iterdir() if _CKPT_TEMP.match(p.name)]
    return sorted(n for n in names if pid is None or f"-{pid}." in n)


#: torch's global CPU generator starts from a random state in every fresh interpreter
#: (torch 2.13: ``torch.initial_seed()`` differs between two ``python`` processes). Training
#: never draws from it (every draw comes from the run's own generator); only validation
#: does (building the tiny classifier initialises layers before loading its weights). A
#: checkpoint saves it and a resume restores it, so between two runs started in separate
#: fresh interpreters it differs and nothing else does; what must match is where it changes.
GLOBAL_RNG = "torch_cpu"


def checkpoint_differences(a: Path, b: Path, *, global_rng: bool = True) -> list[str]:
    """Everything that differs between two checkpoints (empty: bit for bit the same state);
    ``global_rng=False`` leaves torch's global generator out (see :data:`GLOBAL_RNG`)."""
    ca, cb = load_checkpoint(a), load_checkpoint(b)
    diffs = []
    if (ca.step, ca.data_position) != (cb.step, cb.data_position):
        diffs.append(f"step/position {ca.step, ca.data_position} vs {cb.step, cb.data_position}")
    for name in sorted(set(ca.adapters) | set(cb.adapters)):
        ta, tb = ca.adapters.get(name, {}), cb.adapters.get(name, {})
        if set(ta) != set(tb) or any(not torch.equal(ta[k], tb[k]) for k in ta):
            diffs.append(f"adapter {name}")
    for name in sorted(set(ca.optimizers) | set(cb.optimizers)):
        sa, sb = ca.optimizers[name]["state"], cb.optimizers[name]["state"]
        for idx in set(sa) | set(sb):
            ea, eb = sa.get(idx, {}), sb.get(idx, {})
            if set(ea) != set(eb) or any(
                not torch.equal(torch.as_tensor(ea[k]), torch.as_tensor(eb[k])) for k in ea
            ):
                diffs.append(f"optimizer {name} param {idx}")
                break
    keys = [k for k in ca.rng if global_rng or k != GLOBAL_RNG]
    if set(ca.rng) != set(cb.rng) or any(not torch.equal(ca.rng[k], cb.rng[k]) for k in keys):
        diffs.append("rng")
    return diffs


def csv_rows(path: Path, drop: tuple[str, ...] = ()) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return [{k: v for k, v in row.items() if k not in drop} for row in csv.DictReader(fh)]


# ---- the distill kill loop ------------------------------------------------------------------
@dataclass
class KillStats:
    """What a kill loop did (the numbers the closing note reports)."""

    launches: int = 0
    kills: int = 0
    resumes: int = 0  # launches with --resume latest (killed or finished)
    fresh_restarts: int = 0  # launches after a kill that came before the first checkpoint
    by_mode: Counter = field(default_factory=Counter)
    inside_checkpoint_write: int = 0  # kills that left a half-written checkpoint folder behind
    checkpoints_checked: int = 0  # checkpoint folders compared with the straight run's
    seconds: float = 0.0

    def to_dict(self) -> dict[str, object]:
        d = dict(self.__dict__)
        d["by_mode"] = dict(self.by_mode)
        return d


def distill_args(
    pipe: Path, run: Path, max_steps: int, *, full: bool = True, tensorboard: bool = False
) -> list[str]:
    """A quick tiny run that still exercises everything a checkpoint holds: checkpoints every
    step (two kept), an EMA, validation every 2 steps; ``full`` adds the regression term
    (8 teacher pairs, rebuilt at every start) and validation every 3 steps instead."""
    args = ["distill", "-b", "tiny", "--model", str(pipe), "--out", str(run), "--device", "cpu"]
    args += ["--batch-size", "2", "--max-steps", str(max_steps), "--checkpoint-every", "1"]
    args += ["--ema-decay", "0.9", "--seed", "3", "--tensorboard" if tensorboard else "--no-tensorboard"]
    if full:
        return [*args, "--validate-every", "3", "--regression-pairs", "8"]
    return [*args, "--validate-every", "2", "--regression-weight", "0"]


def straight_run(launcher, pipe: Path, folder: Path, max_steps: int, **kw: bool) -> tuple[Path, float]:
    """The reference: the same run without kills, every checkpoint kept. Returns its folder
    and wall time."""
    t0 = time.monotonic()
    run_to_end(launcher, [*distill_args(pipe, folder, max_steps, **kw), "--keep-last", "1000"])
    return folder, time.monotonic() - t0


def _latest_step(run: Path) -> int | None:
    found = list_checkpoints(run)
    return int(found[-1].name.split("-")[1]) if found else None


def _global_rng(ckpt: Path) -> bytes:
    return load_state_dict(ckpt / "rng.safetensors")[GLOBAL_RNG].numpy().tobytes()


def _check_checkpoints(run: Path, reference: Path, stats: KillStats, seen: dict[int, bytes] | None) -> None:
    """(a) Every checkpoint folder in the run is complete and equals the straight run's.
    ``seen`` (fresh interpreters only): torch's global RNG state per step so far, whose
    changes from step to step must follow the straight run's (see :data:`GLOBAL_RNG`)."""
    for ckpt in list_checkpoints(run):
        ref = reference / "checkpoints" / ckpt.name
        diffs = checkpoint_differences(ckpt, ref, global_rng=seen is None)
        assert not diffs, f"{ckpt.name} differs from the straight run: {diffs}"
        stats.checkpoints_checked += 1
        if seen is None:
            continue
        step, state = int(ckpt.name.split("-")[1]), _global_rng(ckpt)
        assert seen.setdefault(step, state) == state, f"{ckpt.name} was saved twice with different states"
        for other, other_state in seen.items():
            same_ref = _global_rng(reference / "checkpoints" / f"step-{other:08d}") == _global_rng(ref)
            assert (other_state == state) == same_ref, f"global RNG of steps {other}, {step}"


def _metric_steps(path: Path) -> list[int]:
    if not path.is_file():
        return []
    text = path.read_bytes()
    lines = text[: text.rfind(b"\n") + 1].decode(errors="replace").splitlines()[1:]
    return [int(ln.split(",")[0]) for ln in lines if ln.split(",")[0].isdigit()]


def _kill(proc: Proc, run: Path, mode: str, rng: random.Random, start: int | None, est: float) -> bool:
    """SIGKILL ``proc`` at a moment of kind ``mode``; False if it finished first."""
    metrics = run / "metrics.csv"
    inode0 = metrics.stat().st_ino if metrics.is_file() else None
    base = start or 0
    mode, _, fixed = mode.partition(":")  # "checkpoint:2": inside the 2nd checkpoint write
    if mode == "checkpoint":  # inside the write of the k-th checkpoint of this launch
        k = int(fixed) if fixed else rng.randint(1, 2)
        return kill_when(
            proc,
            lambda: bool(temp_checkpoints(run, proc.pid)) and (_latest_step(run) or 0) >= base + k - 1,
            delay=rng.uniform(0, 0.25),
        )
    if mode == "train":  # a little after the k-th new step
        k = int(fixed) if fixed else rng.randint(1, 3)

        def stepped() -> bool:
            try:
                fresh = metrics.stat().st_ino != inode0  # the log was rewritten by this launch
            except FileNotFoundError:
                return False
            return fresh and sum(s > base for s in _metric_steps(metrics)) >= k

        return kill_when(proc, stepped, delay=rng.uniform(0, 0.3))
    return kill_when(proc, lambda: True, delay=rng.uniform(0, est))  # "random": any moment


def kill_loop(
    launcher,
    pipe: Path,
    run: Path,
    reference: Path,
    max_steps: int,
    *,
    kills: int,
    modes: list[str] | None = None,
    seed: int = 0,
    est_seconds: float = 5.0,
    pause: float = 0.05,
    **kw: bool,
) -> KillStats:
    """Start the run, SIGKILL it ``kills`` times (modes in order from ``modes``, else drawn
    at random from checkpoint / train / random), restart it with ``--resume latest`` after
    each kill, then let it finish; checks (a)-(d) of the issue along the way and at the end.
    """
    rng = random.Random(seed)
    stats = KillStats()
    seen: dict[int, bytes] | None = {} if isinstance(launcher, SubprocessLauncher) else None
    t0 = time.monotonic()
    env = {PAUSE_ENV: str(pause)}
    args = distill_args(pipe, run, max_steps, **kw)
    finished = False  # a start that ran to its end without being killed
    while stats.kills < kills and not finished:
        start = _latest_step(run)
        _check_checkpoints(run, reference, stats, seen)
        resume = start is not None
        proc = launcher.start([*args, "--resume", "latest"] if resume else args, env)
        stats.launches += 1
        stats.resumes += resume
        stats.fresh_restarts += (not resume) and stats.kills > 0
        mode = modes[stats.kills % len(modes)] if modes else rng.choice(["checkpoint", "train", "random"])
        if not _kill(proc, run, mode, rng, start, est_seconds):
            code = proc.wait()
            assert code == 0, f"a run that was not killed failed ({code}):\n{proc.output()[-3000:]}"
            finished = True
            continue
        stats.kills += 1
        stats.by_mode[mode.partition(":")[0]] += 1
        stats.inside_checkpoint_write += bool(temp_checkpoints(run, proc.pid))
    if not finished:
        # one more start, to the end, as a user would after a kill; it continues from the last
        # checkpoint (after a kill past the last one: resumes a finished run, a clean no-op)
        start = _latest_step(run)
        _check_checkpoints(run, reference, stats, seen)
        resume = start is not None
        final = [*args, "--json"] + (["--resume", "latest"] if resume else [])
        out = run_to_end(launcher, final, env)
        stats.launches += 1
        stats.resumes += resume
        summary, _ = json.JSONDecoder().raw_decode(out[out.rindex("\n{\n") + 1 :])  # the --json summary
        assert summary["from_step"] == (start or 0) and summary["steps"] == max_steps, summary
    stats.seconds = time.monotonic() - t0
    check_finished_run(run, reference, max_steps, stats, seen)
    return stats


def check_finished_run(
    run: Path, reference: Path, max_steps: int, stats: KillStats, seen: dict[int, bytes] | None
) -> None:
    """(b) the final state equals the straight run's bit for bit, (c) nothing temporary is
    left, (d) the CSV logs hold each step once, complete, equal to the straight run's."""
    _check_checkpoints(run, reference, stats, seen)
    final = run / "checkpoints" / f"step-{max_steps:08d}"
    assert not checkpoint_differences(final, reference / "checkpoints" / final.name, global_rng=seen is None)
    assert leftovers(run) == [], leftovers(run)
    got, want = csv_rows(run / "metrics.csv", ("seconds",)), csv_rows(reference / "metrics.csv", ("seconds",))
    assert [r["step"] for r in got] == [str(i) for i in range(1, max_steps + 1)]
    assert got == want
    assert csv_rows(run / "validation.csv") == csv_rows(reference / "validation.csv")
    assert sorted(p.name for p in (run / "validation").iterdir()) == sorted(
        p.name for p in (reference / "validation").iterdir()
    )


# ---- killing the writers of export / merge / swap ----------------------------------------
def _content(path: Path) -> object:
    """What a file holds: for a safetensors file its metadata and tensors (safetensors writes
    its metadata in a per-process hash order, so the bytes of two identical exports made by
    two processes differ), else its bytes. A file that does not parse is its bytes."""
    data = path.read_bytes()
    if path.suffix != ".safetensors":
        return data
    try:
        (n,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8 : 8 + n])
        meta = header.pop("__metadata__", {})
        body = data[8 + n :]
        tensors = {k: (v["dtype"], v["shape"], body[slice(*v["data_offsets"])]) for k, v in header.items()}
        return ("safetensors", sorted(meta.items()), tensors, len(data))
    except (ValueError, KeyError, TypeError, struct.error):
        return data


#: files whose content differs from run to run by design (wall-clock time)
TIMINGS = "timings.json"


def tree(path: Path) -> dict[str, object] | object | None:
    """A file's content, a folder's {relative path: content} (without its ``timings.json``),
    or None if absent."""
    if path.is_file():
        return _content(path)
    if path.is_dir():
        files = [p for p in sorted(path.rglob("*")) if p.is_file() and p.name != TIMINGS]
        return {str(p.relative_to(path)): _content(p) for p in files}
    return None


def temp_siblings(target: Path) -> list[str]:
    prefix = f".{target.name}.wadi-"
    return sorted(p.name for p in target.parent.iterdir() if p.name.startswith(prefix))


@dataclass
class WriterStats:
    kills: int = 0
    old: int = 0  # the target held its previous content after the kill
    new: int = 0  # the target held the complete new content
    inside_write: int = 0  # kills while the temporary copy existed
    swept: int = 0  # kills whose leftovers the next writer in the folder removed (and said so)
    left_after_sweep: int = 0  # files left in the folder after that writer ran (must stay 0)


def kill_writer(
    launcher,
    args: list[str],
    target: Path,
    restore,
    *,
    kills: int,
    seed: int = 0,
    est_seconds: float = 2.0,
    pause: float = 0.3,
    sweeper: list[str] | None = None,
) -> WriterStats:
    """Kill a command that writes ``target`` ``kills`` times (even kills inside the write:
    its complete temporary copy exists, not yet renamed; odd kills at a random moment),
    ``restore()`` putting the previous content back before each start; then run it to the
    end. After every kill the target must be exactly the previous content or exactly what
    the finished command writes, and nothing temporary may be left.

    ``sweeper``: another writer's command line with its output in the same folder, run to
    the end after every kill: it must remove what the killed writer left (and say so in a
    ``note:`` line), leaving no hidden file in the folder."""
    rng = random.Random(seed)
    stats = WriterStats()
    env = {PAUSE_ENV: str(pause)}
    # random moments fall inside the command's life: its measured length (a fast machine
    # finishes long before ``est_seconds``, and a kill after the end is no kill)
    if kills > 1:  # (only odd kills are random)
        restore()
        start = time.monotonic()
        run_to_end(launcher, args)
        est_seconds = min(est_seconds, 0.9 * (time.monotonic() - start))
    seen = []
    for i in range(kills):
        old = restore()
        proc = launcher.start(args, env)
        if i % 2 == 0:
            killed = kill_when(proc, lambda: bool(temp_siblings(target)), delay=rng.uniform(0, pause))
        else:
            killed = kill_when(proc, lambda: True, delay=rng.uniform(0, est_seconds))
        if not killed:
            assert proc.wait() == 0, proc.output()[-3000:]
        stats.kills += killed
        stats.inside_write += killed and bool(temp_siblings(target))
        seen.append(tree(target))
        if sweeper is not None and killed:
            left = temp_siblings(target)
            said = run_to_end(launcher, sweeper)
            after = leftovers(target.parent)
            stats.left_after_sweep += len(after)
            if left:
                assert "removed" in said and all(n in " ".join(said.split()) for n in left), said[-2000:]
                stats.swept += 1
    old = restore()
    run_to_end(launcher, args)
    new = tree(target)
    assert new is not None and new != old
    for i, got in enumerate(seen):
        assert got in (old, new), f"after kill {i} {target} was neither the old nor the new content"
        stats.old += got == old
        stats.new += got == new
    assert temp_siblings(target) == [], temp_siblings(target)
    return stats
