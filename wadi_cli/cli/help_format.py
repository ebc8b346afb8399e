"""How ``wadi CMD --help`` looks, in one place for every command:

- the ``Examples:`` of a help text become a code block whose commands break with `` \\``
  before 80 columns (the shell's own continuation), so no example wraps mid-command and
  each one can be pasted as printed;
- a flag shows no ``<bool>`` type (it takes no value);
- a positional argument whose help ends with ``required.`` (the commands keep them
  optional so that a missing one gets a one-line error naming the next step) shows as
  ``TEACHER`` in the usage line and the Arguments panel, an optional one as ``[PROMPTS]...``.
"""

from __future__ import annotations

import re
from typing import Any

#: Longest example line in ``--help`` (a code block indents by 2 in an 80-column terminal).
EXAMPLE_WIDTH = 74
_COMMAND = re.compile(r"^(wadi|accelerate|python|python3|PYTHONPATH=\S+)\s")
_COMMENT = re.compile(r"\s{3,}\((?P<text>[^()]*(?:\([^()]*\)[^()]*)*)\)\s*$")
_TOKEN = re.compile(r'"[^"]*"|\'[^\']*\'|\S+')


def wrap_command(command: str, width: int = EXAMPLE_WIDTH) -> list[str]:
    """``command`` as lines of at most ``width`` characters (a longer single token stays
    whole), every line but the last ending in `` \\``, continuations indented by 4."""
    lines: list[str] = []
    line = ""
    for token in _units(_TOKEN.findall(command)):
        indent = "    " if lines else ""
        candidate = f"{line} {token}" if line else indent + token
        if line and len(candidate) + 2 > width:
            lines.append(line + " \\")
            line = "    " + token
        else:
            line = candidate
    lines.append(line)
    return lines


def _units(tokens: list[str]) -> list[str]:
    """Tokens with each option kept beside its value (``--out DIR`` never splits)."""
    out: list[str] = []
    for token in tokens:
        if out and out[-1].startswith("-") and " " not in out[-1] and not token.startswith("-"):
            out[-1] = f"{out[-1]} {token}"
        else:
            out.append(token)
    return out


def _examples(lines: list[str]) -> list[tuple[str, str]]:
    """(command, comment) pairs of an Examples section's lines (continuations joined)."""
    out: list[tuple[str, str]] = []
    joining = False
    for raw in lines:
        text = raw.strip()
        if not text:
            joining = False
            continue
        if out and (joining or not _COMMAND.match(text)):
            out[-1] = (f"{out[-1][0]} {text.removesuffix(chr(92)).strip()}", "")
        else:
            out.append((text.removesuffix(chr(92)).strip(), ""))
        joining = text.endswith("\\")
    pairs = []
    for command, _ in out:
        m = _COMMENT.search(command)
        pairs.append((command[: m.start()].strip(), m.group("text")) if m else (command, ""))
    return pairs


def format_examples(help_text: str, width: int = EXAMPLE_WIDTH) -> str:
    """``help_text`` with its ``Examples:`` section as a code block (see the module doc);
    text after the examples (a paragraph that is not a command) stays as it was."""
    head, sep, rest = help_text.partition("Examples:")
    if not sep:
        return help_text
    paragraphs = re.split(r"\n\s*\n", rest.strip("\n"))
    commands, tail = [], []
    for i, para in enumerate(paragraphs):
        first = para.strip().splitlines()[0].strip() if para.strip() else ""
        if not _COMMAND.match(first) and not (commands and first.startswith("--")):
            tail = paragraphs[i:]
            break
        commands.append(para)
    block: list[str] = []
    for command, comment in _examples("\n\n".join(commands).splitlines()):
        if block:
            block.append("")
        if comment:
            block.append(f"# {comment}")
        block.extend(wrap_command(command, width))
    body = head + sep + "\n\n```\n" + "\n".join(block) + "\n```\n"
    return body + ("\n" + "\n\n".join(tail) + "\n" if tail else "")


def _required_by_help(param: Any) -> bool:
    return (param.help or "").rstrip().endswith("required.")


def patch_typer_help() -> None:
    """Install the flag and argument display rules of the module doc on typer's classes
    (idempotent; a typer without these hooks keeps its own display, and the help tests say so)."""
    from typer.core import TyperArgument, TyperOption

    if getattr(TyperOption, "_wadi_patched", False):
        return
    option_type = TyperOption.display_type_rich

    def display_type_rich(self: Any, ctx: Any) -> str | None:
        return None if self.is_flag and not self.count else option_type(self, ctx)

    def argument_name(self: Any) -> str:
        name = (self.metavar or self.name).upper()
        return name + ("..." if self.nargs != 1 else "")

    def usage_name(self: Any) -> str:
        name = (self.metavar or self.name).upper()
        if not (self.required or _required_by_help(self)):
            name = f"[{name}]"
        return name + ("..." if self.nargs != 1 else "")

    TyperOption.display_type_rich = display_type_rich  # type: ignore[method-assign]
    TyperArgument.display_name_raw = property(lambda self: (self.metavar or self.name).upper())  # type: ignore[assignment]
    if hasattr(TyperArgument, "_rich_display_name"):
        TyperArgument._rich_display_name = argument_name  # type: ignore[method-assign]
    if hasattr(TyperArgument, "_usage_display_name"):
        TyperArgument._usage_display_name = usage_name  # type: ignore[method-assign]
    TyperOption._wadi_patched = True  # type: ignore[attr-defined]
