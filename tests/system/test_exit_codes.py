"""One exit code per failure kind, for every command (the table is ``docs/errors.md``):

- 2, bad input: a path, file or value wadi cannot use (here: an input that does not exist);
- 3, hub: a model id that cannot be fetched (offline, not in the cache);
- 4, an output that cannot be written (here: a read-only file system under ``--out``),
  whether the early check finds it or the write itself;
- 1 (a bug) and 130 (Ctrl-C) come from the one handler every command is wrapped in.

Each failure is exactly one ``error:`` line on stderr, no traceback, and nothing written.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import typer
from _helpers_hub import use_hub_cache
from typer.testing import CliRunner

from wadi_cli.cli.common import handle_errors
from wadi_cli.cli.main import app

pytestmark = pytest.mark.usefixtures("one_thread")

COMMANDS = (
    "analyze",
    "merge",
    "swap",
    "export",
    "sample",
    "eval",
    "distill",
    "finetune",
    "invert",
    "info",
    "demo",
    "sweep",
)
BAD_INPUT, HUB, UNWRITABLE = 2, 3, 4
MISSING_REPO = "wadi-test/no-such-model"


@pytest.fixture(scope="module")
def files(tmp_path_factory, pipe_dir):
    """A tiny run, its adapter and merged student, the tiny base U-Net."""
    from wadi_cli.distill import distill, resolve_config
    from wadi_cli.distill.export import export_run

    root = tmp_path_factory.mktemp("codes")
    over = dict(model=str(pipe_dir), batch_size=1, max_steps=1, device="cpu", regression_weight=0.0)
    over.update(validate_every=0, tensorboard=False)
    distill(resolve_config(overrides=over), root / "run")
    export_run(root / "run", "adapter", root / "adapter.safetensors")
    export_run(root / "run", "merged", root / "merged.safetensors")
    from PIL import Image

    (root / "instance").mkdir()
    for i in range(2):
        Image.new("RGB", (32, 32), (40 * i, 90, 200)).save(root / "instance" / f"{i}.png")
    captions = '{"0.png": "a red circle <R>", "1.png": "a blue square <R>"}'
    (root / "instance" / "captions.json").write_text(captions)
    (root / "grid.toml").write_text('[fixed]\nmax_steps = 1\n[grid]\nadapter = ["lorad"]\n')
    return {
        "grid": str(root / "grid.toml"),
        "instance": str(root / "instance"),
        "pipe": str(pipe_dir),
        "base": str(pipe_dir / "unet" / "diffusion_pytorch_model.safetensors"),
        "run": str(root / "run"),
        "adapter": str(root / "adapter.safetensors"),
        "merged": str(root / "merged.safetensors"),
        "missing": str(root / "missing.safetensors"),
    }


TINY = ["-b", "tiny", "--device", "cpu"]


def args_for(kind: int, command: str, f: dict[str, str], out: str) -> list[str] | None:
    """The command line that fails with ``kind`` (``None``: the command has no such input or
    output: ``info`` writes nothing, ``export`` and ``demo`` read nothing from the hub)."""
    m = f["missing"] if kind == BAD_INPUT else MISSING_REPO
    model = f["pipe"] if kind == UNWRITABLE else m
    table = {
        "analyze": ["analyze", f["base"] if kind == UNWRITABLE else m, f["merged"], "--out", out],
        "merge": ["merge", f["base"] if kind == UNWRITABLE else m, f["adapter"], "--out", out],
        "swap": ["swap", f["base"] if kind == UNWRITABLE else m, f["merged"], "--keep", "direction",
                 "--out", out],
        "export": ["export", f["run"] if kind == UNWRITABLE else m, "-f", "adapter", "--out", out],
        "sample": ["sample", "a red circle", *TINY, "--model", model, "--teacher", "--steps", "1",
                   "--out", out],
        "eval": ["eval", *TINY, "--model", model, "--teacher", "--steps", "1", "-n", "2", "--out", out],
        "distill": ["distill", *TINY, "--model", model, "--max-steps", "1", "--out", out],
        "finetune": ["finetune", *TINY, "--model", model, "--instance-images", f["instance"],
                     "--instance-prompt", "a sks circle", "--max-steps", "1", "--out", out],
        "invert": ["invert", *TINY, "--model", model, "--images", f["instance"], "--token", "<R>",
                   "--init-word", "and", "--max-steps", "1", "--out", out],
        "info": ["info", "--backbone", "sd99"],
        "demo": ["demo", "--out", out if kind == UNWRITABLE else f["base"]],
        "sweep": ["sweep", f["grid"] if kind == UNWRITABLE else f["missing"], "--out", out],
    }  # fmt: skip
    if (command == "info" and kind != BAD_INPUT) or (command in ("export", "demo", "sweep") and kind == HUB):
        return None
    return table[command]


def _read_only_under(monkeypatch, ro: str) -> None:
    """Every creation, write-open and rename under ``ro`` fails with EROFS, as on a read-only
    mount (root ignores permission bits, so a chmod would not do)."""
    real_open, real_mkdir, real_replace = os.open, os.mkdir, os.replace

    def under(path) -> bool:
        return os.path.abspath(os.fspath(path)).startswith(ro + os.sep)

    def erofs(path):
        return OSError(errno.EROFS, os.strerror(errno.EROFS), os.fspath(path))

    def refusing_open(path, flags, *a, **k):
        if under(path) and flags & (os.O_CREAT | os.O_WRONLY | os.O_RDWR):
            raise erofs(path)
        return real_open(path, flags, *a, **k)

    def refusing_mkdir(path, *a, **k):
        if under(path):
            raise erofs(path)
        return real_mkdir(path, *a, **k)

    def refusing_replace(src, dst, *a, **k):
        if under(dst):
            raise erofs(dst)
        return real_replace(src, dst, *a, **k)

    monkeypatch.setattr(os, "open", refusing_open)
    monkeypatch.setattr(os, "mkdir", refusing_mkdir)
    monkeypatch.setattr(os, "replace", refusing_replace)


@pytest.mark.parametrize("kind", [BAD_INPUT, HUB, UNWRITABLE], ids=["bad-input", "hub", "unwritable"])
@pytest.mark.parametrize("command", COMMANDS)
def test_each_failure_kind_has_its_exit_code_for_every_command(files, tmp_path, monkeypatch, kind, command):
    ro = tmp_path / "ro"
    ro.mkdir()
    out = str(ro / ("out.safetensors" if command in ("merge", "swap", "export") else "out"))
    args = args_for(kind, command, files, out)
    if args is None:
        pytest.skip(f"{command} has no input or output of this kind")
    if kind == HUB:  # an empty hub cache, offline: the model cannot be fetched
        use_hub_cache(monkeypatch, tmp_path / "empty-hub")
    if kind == UNWRITABLE:
        _read_only_under(monkeypatch, str(ro))
    result = CliRunner().invoke(app, args)
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert result.exit_code == kind, (args, result.exit_code, result.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert "Traceback" not in result.output + result.stderr
    assert list(ro.iterdir()) == []


def test_every_command_runs_inside_the_one_error_handler():
    """Codes 1 and 130 come from ``handle_errors``; every command is wrapped in it."""
    wrapped = {c.name: getattr(c.callback, "__wrapped__", None) is not None for c in app.registered_commands}
    assert set(wrapped) == set(COMMANDS) and all(wrapped.values()), wrapped


@pytest.mark.parametrize(("error", "code", "text"), [(RuntimeError("boom"), 1, "internal error"),
                                                      (KeyboardInterrupt(), 130, "interrupted")])  # fmt: skip
def test_a_bug_and_ctrl_c_have_their_codes(error, code, text):
    one = typer.Typer()

    @one.command()
    @handle_errors
    def cmd() -> None:
        raise error

    result = CliRunner().invoke(one, [])
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert result.exit_code == code and len(lines) == 1 and text in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_the_error_table_lists_every_code():
    """``docs/errors.md`` states each code this module checks."""
    text = (Path(__file__).resolve().parents[2] / "docs" / "errors.md").read_text(encoding="utf-8")
    for code in (0, 1, 2, 3, 4, 130, 143):
        assert f"| {code} |" in text, code
