"""How every command's ``--help`` reads in an 80-column terminal: examples that break only
with the shell's `` \\`` continuation, no ``<bool>`` type on flags, required positionals
shown as required, ``distill --help`` in panels."""

from __future__ import annotations

import re

import pytest
from typer.testing import CliRunner

from wadi_cli.cli.help_format import _examples, format_examples, wrap_command
from wadi_cli.cli.main import app

runner = CliRunner()
COMMANDS = ("", "analyze", "swap", "merge", "info", "sample", "eval", "distill", "export", "demo")


def _help(command: str) -> str:
    args = [command, "--help"] if command else ["--help"]
    res = runner.invoke(app, args, env={"COLUMNS": "80", "TERMINAL_WIDTH": "80"})
    assert res.exit_code == 0, res.output
    return res.stdout


def _source_examples(command: str) -> list[str]:
    cmd = next(c for c in app.registered_commands if c.name == command) if command else None
    help_text = (cmd.help if cmd else app.info.help) or ""
    block = help_text.split("```")[1]
    lines = [x for x in block.replace(" \\\n", " ").splitlines() if not x.startswith("#")]
    return [c for c, _ in _examples(lines)]


def _rendered_examples(text: str) -> list[str]:
    section = text.split("Examples:", 1)[1]
    section = re.split(r"\n\s*\n\s*\n(?=\S|╭| [A-Z])|╭", section, maxsplit=1)[0]
    lines = [x.rstrip() for x in section.splitlines()]
    joined = "\n".join(lines).replace(" \\\n", " ")
    out = []
    for line in joined.splitlines():
        text_ = " ".join(line.split())
        if text_ and not text_.startswith("#"):
            out.append(text_)
    return out


@pytest.mark.parametrize("command", COMMANDS)
def test_examples_never_wrap_mid_command_at_80_columns(command):
    text = _help(command)
    from rich.cells import cell_len

    assert max(cell_len(x) for x in text.splitlines()) <= 80
    rendered = _rendered_examples(text)
    expected = [" ".join(c.split()) for c in _source_examples(command)]
    assert rendered[: len(expected)] == expected  # every example whole, in order, nothing split


@pytest.mark.parametrize("command", COMMANDS)
def test_flags_show_no_bool_type(command):
    assert "<bool>" not in _help(command)


@pytest.mark.parametrize(
    ("command", "usage"),
    [("analyze", "analyze [OPTIONS] TEACHER [STUDENT]"), ("swap", "swap [OPTIONS] TEACHER STUDENT"),
     ("merge", "merge [OPTIONS] BASE ADAPTER"), ("export", "export [OPTIONS] RUN"),
     ("sample", "sample [OPTIONS] [PROMPTS]...")],
)  # fmt: skip
def test_required_positionals_look_required(command, usage):
    assert usage in " ".join(_help(command).split())


def test_distill_help_is_grouped_into_panels():
    from dataclasses import fields

    from wadi_cli.cli.distill import PANELS
    from wadi_cli.distill.config import DistillConfig

    names = [n for group in PANELS.values() for n in group]
    assert sorted(names) == sorted(f.name for f in fields(DistillConfig))  # each field once
    text = _help("distill")
    for panel in ("Run folder and mode", *PANELS):
        assert f"╭─ {panel} " in text
    assert text.index("╭─ VSD objective") < text.index("--guidance") < text.index("╭─ Regression")


def test_wrap_command_keeps_options_with_values_and_quotes_whole():
    cmd = 'wadi sample "a red circle at the top left" -b tiny -w student.safetensors -o tiny/ --json'
    lines = wrap_command(cmd, 50)
    assert all(len(x) <= 50 for x in lines) and all(x.endswith(" \\") for x in lines[:-1])
    assert '"a red circle at the top left"' in lines[0] and "-w student.safetensors" in " ".join(lines)
    assert " ".join(x.removesuffix(" \\").strip() for x in lines) == cmd
    text = format_examples("Do.\n\nExamples:\n\n  wadi info       (one line per backbone)\n\nMore text.\n")
    assert "```\n# one line per backbone\nwadi info\n```" in text and text.rstrip().endswith("More text.")


def test_counted_nouns_agree_with_their_number():
    from wadi_cli.words import plural

    assert (plural(1, "image"), plural(2, "image"), plural(0, "layer")) == ("1 image", "2 images", "0 layers")
    assert plural(1_024, "prompt") == "1,024 prompts" and plural(3, "child", "children") == "3 children"
