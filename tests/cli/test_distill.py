"""``wadi distill`` / ``wadi export`` through Typer's CliRunner, and Ctrl-C handling."""

from __future__ import annotations

import json
import os
import signal

import pytest
from typer.testing import CliRunner

from wadi_cli.cli.main import app
from wadi_cli.distill import distill, list_checkpoints, resolve_config

runner = CliRunner()


pytestmark = pytest.mark.usefixtures("one_thread")


def test_help_has_examples():
    for cmd in ("distill", "export"):
        result = runner.invoke(app, [cmd, "--help"])
        assert result.exit_code == 0 and "Examples" in result.stdout and f"wadi {cmd}" in result.stdout


def test_dry_run_prints_config_and_plan(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text("rank = 64\n")
    result = runner.invoke(
        app, ["distill", "-b", "sd15", "--config", str(cfg), "--lr", "2e-4", "--dry-run", "--json"]
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["config"]["rank"] == 64 and data["config"]["lr"] == 2e-4 and data["config"]["fake_lr"] == 0.01
    assert data["plan"]["student"]["trainable_params"] == 20_948_992
    assert not (tmp_path / "run").exists()


def test_the_paper_objective_reaches_the_tiny_config():
    """The demo and the studies pin the paper's objective with `--config tiny_paper`."""
    import tomllib

    from wadi_cli.backbones.recipes import RECIPES_DIR

    file = tomllib.loads((RECIPES_DIR / "tiny_paper.toml").read_text())
    default = json.loads(runner.invoke(app, ["distill", "--dry-run", "--json"]).stdout)["config"]
    result = runner.invoke(app, ["distill", "--config", "tiny_paper", "--dry-run", "--json"])
    assert result.exit_code == 0, result.output
    paper = json.loads(result.stdout)["config"]
    assert {k: paper[k] for k in file} == file
    assert {k: default[k] for k in file} != file
    assert {k: v for k, v in paper.items() if k not in file} == {
        k: v for k, v in default.items() if k not in file
    }


@pytest.mark.parametrize(
    ("setup", "args", "needle"),
    [
        (lambda p: (p / "e.txt").write_text("  \n\n"), ["--prompts", "{d}/e.txt"], "no prompts"),
        (lambda p: (p / "c.yaml").write_text("rnk: 3\n"), ["--config", "{d}/c.yaml"], "unknown key"),
        (lambda p: None, ["--prompts", "{d}/missing.txt"], "no such file"),
        (lambda p: (p / "file").write_text("x"), ["--out", "{d}/file"], "not a folder"),
        (lambda p: None, ["--rank", "0"], "at least 1"),
        (lambda p: None, ["--regression-pairs", "0"], "pairs and steps must be >= 1"),
    ],
)
def test_bad_input_gives_one_line_and_exit_2(tmp_path, pipe_dir, setup, args, needle):
    setup(tmp_path)
    args = [a.format(d=tmp_path) for a in args]
    if "--out" not in args:
        args += ["--out", str(tmp_path / "run")]
    result = runner.invoke(app, ["distill", "--model", str(pipe_dir), "--device", "cpu", *args])
    assert result.exit_code == 2, result.output
    assert needle in result.stderr and "Traceback" not in result.output
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()  # nothing half-written


def test_train_then_export_through_the_cli(tmp_path, pipe_dir):
    run = tmp_path / "run"
    base = ["distill", "--model", str(pipe_dir), "--out", str(run), "--device", "cpu", "--batch-size", "2"]
    base += ["--ema-decay", "0.9"]  # tiny's default has no EMA; export must pick the EMA copy
    base += ["--regression-weight", "0"]  # skip the tiny default's 1024 teacher pairs
    result = runner.invoke(app, [*base, "--max-steps", "2", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["steps"] == 2
    again = runner.invoke(app, [*base, "--max-steps", "3"])
    assert again.exit_code == 2 and "--resume latest" in again.stderr
    resumed = runner.invoke(
        app, ["distill", "--out", str(run), "--resume", "latest", "--max-steps", "3", "--json"]
    )
    assert resumed.exit_code == 0, resumed.output
    assert json.loads(resumed.stdout)["from_step"] == 2
    out = tmp_path / "student.safetensors"
    exported = runner.invoke(app, ["export", str(run), "--format", "adapter", "--out", str(out), "--json"])
    assert exported.exit_code == 0, exported.output
    assert out.is_file() and json.loads(exported.stdout)["ema"] is True
    # `wadi sample --weights RUN` samples the run's latest (EMA) student: the same images
    # as the exported adapter file.
    images = {}
    for label, weights in (("run", run), ("file", out)):
        dest = tmp_path / f"samples-{label}"
        sampled = runner.invoke(
            app,
            [
                "sample",
                "a red circle at the top left",
                "-b",
                "tiny",
                "--model",
                str(pipe_dir),
                "--weights",
                str(weights),
                "--device",
                "cpu",
                "--seed",
                "3",
                "--out",
                str(dest),
            ],
        )
        assert sampled.exit_code == 0, sampled.output
        images[label] = (dest / "0000.png").read_bytes()
    assert images["run"] == images["file"]


def _sigterm_not_caught(signum, frame):
    raise AssertionError("SIGTERM reached the handler from before the run")


@pytest.fixture
def sigint_handler():
    """Run with Python's own SIGINT handler (a background job starts with SIG_IGN) and a
    SIGTERM handler that fails the test (instead of the default, which would end pytest),
    and put back whatever was there."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    term = signal.signal(signal.SIGTERM, _sigterm_not_caught)
    yield
    signal.signal(signal.SIGINT, before)
    signal.signal(signal.SIGTERM, term)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_stop_signal_saves_a_checkpoint_and_stops(tmp_path, pipe_dir, sigint_handler, sig):
    over = dict(model=str(pipe_dir), batch_size=2, max_steps=5, device="cpu", regression_weight=0.0)
    cfg = resolve_config(overrides=over)

    def interrupt(result, seconds):
        if result.step == 2:
            os.kill(os.getpid(), sig)

    summary = distill(cfg, tmp_path / "run", on_step=interrupt)
    assert summary.interrupted and summary.step == 2 and summary.stopped_by == sig.name
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["step-00000002"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert signal.getsignal(signal.SIGTERM) is _sigterm_not_caught


@pytest.mark.parametrize("launched", [False, True], ids=["alone", "launched"])
def test_repeated_signals(sigint_handler, monkeypatch, launched):
    """Alone, a second Ctrl-C stops at once; repeated SIGTERMs (a scheduler may send more
    than one) never do, nor does anything under a launcher, where every worker can get a
    signal twice (from the scheduler and passed on by the launcher)."""
    from wadi_cli.distill.signals import stop_on_signals

    if launched:
        monkeypatch.setenv("WORLD_SIZE", "2")
    else:
        monkeypatch.delenv("WORLD_SIZE", raising=False)
    try:
        with stop_on_signals() as flag:
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)
            assert flag["stop"] == "SIGTERM"
        with stop_on_signals() as flag:
            os.kill(os.getpid(), signal.SIGINT)
            if launched:
                os.kill(os.getpid(), signal.SIGINT)
            else:
                with pytest.raises(KeyboardInterrupt):
                    os.kill(os.getpid(), signal.SIGINT)
            assert flag["stop"] == "SIGINT"
    except KeyboardInterrupt:
        pytest.fail("a repeated signal stopped at once")


def test_an_ignored_sigint_stays_ignored(tmp_path, pipe_dir, sigint_handler):
    """`nohup wadi distill … &`: SIGINT was ignored before the run, so it is during it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    seen = []
    over = dict(model=str(pipe_dir), batch_size=2, max_steps=1, device="cpu", regression_weight=0.0)
    on_step = lambda result, seconds: seen.append(signal.getsignal(signal.SIGINT))  # noqa: E731
    distill(resolve_config(overrides=over), tmp_path / "run", on_step=on_step)
    assert seen == [signal.SIG_IGN] and signal.getsignal(signal.SIGINT) is signal.SIG_IGN


@pytest.mark.parametrize("backbone", ["sd15", "sd21", "pixart"])
def test_real_backbone_without_prompts_is_refused_and_the_dry_run_says_so(backbone, tmp_path):
    """sd15/sd21/pixart have no default prompt set: --dry-run, wadi info and the refusal say
    what to pass; --prompts smoke names the built-in smoke set."""
    dry = runner.invoke(app, ["distill", "-b", backbone, "--dry-run"], env={"COLUMNS": "300"})
    assert dry.exit_code == 0, dry.output
    assert (
        "trains on: none: pass a caption file with --prompts FILE" in dry.stdout and "JourneyDB" in dry.stdout
    )
    plan = json.loads(runner.invoke(app, ["distill", "-b", backbone, "--dry-run", "--json"]).stdout)["plan"]
    assert plan["prompts"].startswith("none: pass a caption file with --prompts FILE")
    info = json.loads(runner.invoke(app, ["info", "-b", backbone, "--json"]).stdout)
    assert info["trains_on"] == plan["prompts"]
    run = tmp_path / "run"
    res = runner.invoke(app, ["distill", "-b", backbone, "--out", str(run)])
    assert res.exit_code == 2 and not run.exists()
    lines = [x for x in res.output.splitlines() if x.strip()]
    assert len(lines) == 1 and "has no default prompts" in lines[0], res.output
    smoke = json.loads(
        runner.invoke(app, ["distill", "-b", backbone, "--prompts", "smoke", "--dry-run", "--json"]).stdout
    )
    assert smoke["plan"]["prompts"] == "wadi's 16 built-in smoke-test prompts (--prompts smoke)"


def test_tiny_without_prompts_draws_from_its_grammar_and_smoke_names_the_set():
    from wadi_cli.distill.data import SMOKE_PROMPTS, load_prompts

    plan = json.loads(runner.invoke(app, ["distill", "--dry-run", "--json"]).stdout)["plan"]
    assert plan["prompts"].startswith("1,024 prompts drawn from the tiny model's grammar")
    assert len(load_prompts(None, backbone="tiny")) == 1024
    assert load_prompts("smoke", backbone="sd21") == list(SMOKE_PROMPTS) and len(SMOKE_PROMPTS) == 16


def test_dry_run_predicts_peak_memory_for_sdxl():
    """`wadi distill -b sdxl --dry-run`: the predicted peak and its parts (text and JSON),
    from the shipped trace of the recipe (fp16 weights on a GPU, checkpointing on)."""
    text = runner.invoke(app, ["distill", "-b", "sdxl", "--dry-run"], env={"COLUMNS": "300"})
    assert text.exit_code == 0, text.output
    for line in (
        "predicted peak GPU memory:", "batch 2, weights float16, gradient checkpointing on",
        "frozen text_encoder_2:", "frozen vae:", "student optimizer:", "generator phase", "per sample x 2",
        "largest batch within 80 GiB (predicted):", "largest batch within 24 GiB (predicted):",
        "activation bytes: shipped trace",
    ):  # fmt: skip
        assert line in text.stdout, line
    res = runner.invoke(app, ["distill", "-b", "sdxl", "--batch-size", "3", "--dry-run", "--json"])
    memory = json.loads(res.stdout)["plan"]["memory"]
    assert set(memory["frozen"]) == {"unet", "text_encoder", "text_encoder_2", "vae"}
    assert memory["frozen"]["unet"] == 2 * 2_567_463_684  # fp16 SDXL U-Net (`wadi info -b sdxl`)
    gen, fake = memory["phases"]["generator"], memory["phases"]["fake"]
    static = sum(memory["frozen"].values()) + sum(memory["adapters"].values())
    assert memory["static_bytes"] == static and memory["batch_size"] == 3
    assert memory["peak_bytes"] == static + max(p["fixed"] + 3 * p["per_sample"] for p in (gen, fake))


def test_dry_run_of_an_architecture_without_a_trace_gives_a_lower_bound():
    res = runner.invoke(app, ["distill", "-b", "pixart", "--dry-run"], env={"COLUMNS": "300"})
    assert res.exit_code == 0 and "predicted GPU memory: at least" in res.stdout
    assert "activations not modelled: no shipped trace" in res.stdout
