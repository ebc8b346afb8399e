"""kill -9 at random moments: distill resumes bit-exactly from complete checkpoints with
clean logs; export / merge / swap leave their target old or new, never half-written.

The harness is ``_helpers_crash.py``. The default suite runs short variants (a few kills,
forked processes); the ``slow`` loops run ``python -m wadi_cli`` in fresh interpreters and
kill it dozens of times (``python -m pytest -m slow tests/system/test_crash_kill.py -s`` prints
the counts).
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import asdict
from pathlib import Path

import pytest
from _helpers_crash import (
    ForkLauncher,
    SubprocessLauncher,
    _metric_steps,
    checkpoint_differences,
    distill_args,
    kill_loop,
    kill_writer,
    leftovers,
    run_to_end,
    straight_run,
    tree,
)
from _helpers_sample import one_torch_thread, tiny_sampler


@pytest.fixture(scope="module")
def forked(tmp_path_factory, pipe_dir):
    tiny_sampler()  # import and warm up everything before forking: each child starts in ~1 s
    return ForkLauncher(tmp_path_factory.mktemp("logs"))


def test_distill_killed_three_times_resumes_bit_exactly(pipe_dir, forked, tmp_path):
    reference, seconds = straight_run(forked, pipe_dir, tmp_path / "straight", 3, full=False)
    stats = kill_loop(
        forked,
        pipe_dir,
        tmp_path / "killed",
        reference,
        3,
        kills=3,
        # inside the write of checkpoint 2, after validation 2 wrote its row and image (which
        # the resume from checkpoint 1 must drop); then in training; then in the next checkpoint
        modes=["checkpoint:2", "train:1", "checkpoint:1"],
        est_seconds=seconds,
        pause=0.03,
        full=False,
    )
    print(json.dumps(stats.to_dict()))
    assert stats.kills == 3 and stats.resumes >= 3
    assert stats.inside_checkpoint_write >= 1  # a kill landed inside a checkpoint write


def test_sigterm_saves_at_a_step_boundary_and_the_resume_is_bit_exact(pipe_dir, forked, tmp_path):
    """A batch scheduler's preemption notice (SLURM: SIGTERM, SIGKILL after a grace period):
    the run saves a checkpoint of the step it is in, exits 143 and says so; with checkpoints
    otherwise far apart, ``--resume latest`` finishes bit-identical to a straight run."""
    import signal

    from wadi_cli.distill import list_checkpoints

    reference, _ = straight_run(forked, pipe_dir, tmp_path / "straight", 4, full=False)
    run = tmp_path / "term"
    args = [*distill_args(pipe_dir, run, 4, full=False), "--checkpoint-every", "100"]
    proc = forked.start(args, {})
    deadline = time.monotonic() + 300
    while not _metric_steps(run / "metrics.csv"):  # the first step is logged
        assert proc.poll() is None and time.monotonic() < deadline, proc.output()[-2000:]
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGTERM)
    assert proc.wait() == 143, proc.output()[-2000:]
    ckpts = list_checkpoints(run)
    assert len(ckpts) == 1, proc.output()[-2000:]
    step = int(ckpts[0].name.split("-")[1])
    assert 1 <= step < 4 and f"stopped (SIGTERM) at step {step}" in " ".join(proc.output().split())
    assert leftovers(run) == []
    run_to_end(forked, [*args, "--resume", "latest"])
    last = list_checkpoints(run)[-1]
    assert last.name == "step-00000004"
    assert checkpoint_differences(last, reference / "checkpoints" / last.name) == []
    assert _metric_steps(run / "metrics.csv") == [1, 2, 3, 4]


@pytest.fixture(scope="module")
def outputs(tmp_path_factory, pipe_dir):
    """A two-checkpoint run, its adapter and merged student, and the base U-Net file."""
    from typer.testing import CliRunner

    from wadi_cli.cli.main import app
    from wadi_cli.distill import distill, resolve_config
    from wadi_cli.distill.export import export_run

    root = tmp_path_factory.mktemp("outputs")
    over = dict(model=str(pipe_dir), batch_size=2, max_steps=2, checkpoint_every=1, device="cpu")
    over.update(regression_weight=0.0, validate_every=0, tensorboard=False)
    base = pipe_dir / "unet" / "diffusion_pytorch_model.safetensors"
    with one_torch_thread():
        distill(resolve_config(overrides=over), root / "run")
        export_run(root / "run", "adapter", root / "adapter.safetensors")
        export_run(root / "run", "merged", root / "merged.safetensors")
        first = str(root / "run" / "checkpoints" / "step-00000001")
        export_run(root / "run", "diffusers", root / "old-pipeline", checkpoint=first)
        for args in (  # earlier outputs of the folder writers (other inputs)
            ["sample", "a blue square", "-b", "tiny", "--model", str(pipe_dir), "--teacher", "--steps", "1",
             "--device", "cpu", "--out", str(root / "old-sample")],
            ["analyze", str(base), str(root / "merged.safetensors"), "--filter", "attn1", "--out",
             str(root / "old-analysis")],
        ):  # fmt: skip
            assert CliRunner().invoke(app, args).exit_code == 0, args
    return {
        "run": root / "run",
        "adapter": root / "adapter.safetensors",
        "merged": root / "merged.safetensors",
        "base": base,
        "pipe": pipe_dir,
        "old_pipeline": root / "old-pipeline",
        "old_sample": root / "old-sample",
        "old_analysis": root / "old-analysis",
    }


def _file_restorer(target, old_file):
    def restore():
        target.write_bytes(old_file.read_bytes())
        return tree(target)

    return restore


def _folder_restorer(target, old_folder):
    import shutil

    def restore():
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(old_folder, target)
        return tree(target)

    return restore


def writer_cases(o, tmp):
    """(name, args, target, restore) of every command that writes a model file or an output
    folder, all writing into the one folder ``tmp``."""
    t = {k: tmp / f"{k}.safetensors" for k in ("export", "adapter", "merge", "swap")}
    folder, sample, analysis = tmp / "pipeline", tmp / "sample", tmp / "analysis"
    tiny = ["-b", "tiny", "--model", str(o["pipe"]), "--device", "cpu"]
    return [
        ("export merged", ["export", str(o["run"]), "-f", "merged", "--out", str(t["export"]), "--overwrite"],
         t["export"], _file_restorer(t["export"], o["adapter"])),
        ("export adapter", ["export", str(o["run"]), "-f", "adapter", "--out", str(t["adapter"]),
                            "--overwrite"], t["adapter"], _file_restorer(t["adapter"], o["merged"])),
        ("export diffusers", ["export", str(o["run"]), "-f", "diffusers", "--out", str(folder),
                              "--overwrite"],
         folder, _folder_restorer(folder, o["old_pipeline"])),
        ("merge", ["merge", str(o["base"]), str(o["adapter"]), "--out", str(t["merge"]), "--overwrite"],
         t["merge"], _file_restorer(t["merge"], o["adapter"])),
        ("swap", ["swap", str(o["base"]), str(o["merged"]), "--keep", "direction", "--out", str(t["swap"]),
                  "--overwrite"], t["swap"], _file_restorer(t["swap"], o["adapter"])),
        ("sample", ["sample", "a red circle", *tiny, "--weights", str(o["adapter"]), "-n", "2", "--out",
                    str(sample)], sample, _folder_restorer(sample, o["old_sample"])),
        ("analyze", ["analyze", str(o["base"]), str(o["merged"]), "--out", str(analysis)],
         analysis, _folder_restorer(analysis, o["old_analysis"])),
    ]  # fmt: skip


def sweepers(cases):
    """For each writer, the next one (cyclically), writing an output of its own name
    (``sweep-NAME``) in the same folder: it must clear what the killed writer left there."""
    out = []
    for i in range(len(cases)):
        _, args, target, _ = cases[(i + 1) % len(cases)]
        own = str(target.with_name(f"sweep-{target.name}"))
        out.append([own if a == str(target) else a for a in args])
    return out


def test_export_merge_swap_killed_inside_the_write_leave_old_or_new(outputs, forked, tmp_path):
    cases = writer_cases(outputs, tmp_path)
    for (name, args, target, restore), sweeper in zip(cases, sweepers(cases), strict=True):
        stats = kill_writer(forked, args, target, restore, kills=1, pause=0.3, sweeper=sweeper)
        assert stats.kills == 1 and stats.inside_write == 1, (name, stats)
        assert stats.old == 1, (name, stats)  # killed before the rename: the old content, whole
        assert stats.swept == 1 and stats.left_after_sweep == 0, (name, stats)  # another writer cleared it


@pytest.mark.slow
def test_distill_kill_loop_in_fresh_interpreters(pipe_dir, tmp_path):
    """The long loop: ``python -m wadi_cli distill`` killed at random moments (inside
    checkpoint writes, in training, anywhere), each time resumed with --resume latest, over
    as many 12-step runs as it takes to reach 24 kills; every finished run is checked bit
    for bit against a straight run."""
    launcher = SubprocessLauncher(tmp_path / "logs")
    reference, seconds = straight_run(launcher, pipe_dir, tmp_path / "straight", 12, tensorboard=True)
    total = []
    while sum(s.kills for s in total) < 24 and len(total) < 8:
        seed = len(total)
        stats = kill_loop(
            launcher, pipe_dir, tmp_path / f"killed-{seed}", reference, 12,
            kills=12, seed=seed, est_seconds=seconds, pause=0.05, tensorboard=True,
        )  # fmt: skip
        print(f"run {seed}: " + json.dumps(stats.to_dict()))
        total.append(stats)
    _record("distill", [s.to_dict() for s in total])
    assert sum(s.kills for s in total) >= 24
    assert sum(s.inside_checkpoint_write for s in total) >= 4


@pytest.mark.slow
def test_export_merge_swap_kill_loop_in_fresh_interpreters(outputs, tmp_path):
    """Every writer killed 10 times (even kills inside its write window, odd ones at random
    moments); after each kill the next writer in the folder runs and must leave no file of
    the killed one behind."""
    launcher = SubprocessLauncher(tmp_path / "logs")
    found = {}
    cases = writer_cases(outputs, tmp_path)
    for (name, args, target, restore), sweeper in zip(cases, sweepers(cases), strict=True):
        stats = kill_writer(
            launcher, args, target, restore, kills=10, est_seconds=12.0, pause=0.5, sweeper=sweeper
        )
        print(f"{name}: {stats}")
        found[name] = asdict(stats)
        assert stats.kills >= 8 and stats.inside_write >= 5, (name, stats)
        assert stats.swept >= 5 and stats.left_after_sweep == 0, (name, stats)
    _record("writers", found)


def _record(key: str, value: object) -> None:
    """With WADI_KILL_STATS=FILE the slow loops add their counts to that JSON file
    (``analysis/kill_loop/results/kill_stats.json`` is made this way)."""
    path = os.environ.get("WADI_KILL_STATS")
    if not path:
        return
    data = json.loads(Path(path).read_text()) if Path(path).is_file() else {}
    data[key] = value
    data[f"{key}_meta"] = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.node()}, {os.cpu_count()} CPUs shared with other jobs",
    }
    Path(path).write_text(json.dumps(data, indent=1) + "\n")
