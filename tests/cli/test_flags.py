"""One answer per question: every `wadi distill` default lives in its backbone's recipe file,
and `wadi info -b NAME`, `wadi distill -b NAME --dry-run` and `wadi distill --help` give the
same numbers; every config field has exactly one flag and every flag a field; every
`--flag` an error message of the package names exists. Likewise for sampling: every
`SamplingOptions` field a command takes is exactly one flag of `wadi sample`, `wadi eval` and
`wadi swap` with the declared help, the teacher's defaults come from the backbone's sampling
recipe (configs/sample/NAME.toml), which `wadi info` shows, and no help text quotes them.

The expectations are read here from the recipe files with tomllib and from the dataclass
fields, independently of the code that builds the flags and resolves the config."""

from __future__ import annotations

import ast
import dataclasses
import json
import re
from pathlib import Path

import pytest
import tomllib
import typer
from typer.testing import CliRunner

from wadi_cli.cli.distill import COMMAND_OPTIONS
from wadi_cli.cli.eval import EvalFlags
from wadi_cli.cli.main import app
from wadi_cli.distill.config import DistillConfig
from wadi_cli.errors import BadInputError
from wadi_cli.pipeline.options import SamplingOptions

PACKAGE = Path(__file__).resolve().parents[2] / "wadi_cli"
RECIPES = PACKAGE / "configs" / "distill"
BACKBONES = ("sd15", "sd21", "pixart", "sdxl", "tiny")
runner = CliRunner()


def _recipe(name: str) -> dict:
    return tomllib.loads((RECIPES / f"{name}.toml").read_text())


def _values(recipe: dict, adapter: str | None) -> dict:
    flat = {k: v for k, v in recipe.items() if k != "per_adapter"}
    return {**flat, **recipe.get("per_adapter", {}).get(adapter, {})}


def _command(name: str) -> typer.core.TyperCommand:
    return typer.main.get_command(app).commands[name]  # type: ignore[attr-defined]


def _flag(field: str) -> str:
    return "--" + field.replace("_", "-").lower()


def _options(name: str) -> list[typer.core.TyperOption]:
    return [p for p in _command(name).params if p.param_type_name == "option"]


def test_every_config_field_has_one_flag_and_every_flag_a_field():
    fields = [f.name for f in dataclasses.fields(DistillConfig)]
    by_flag: dict[str, list[typer.core.TyperOption]] = {}
    for opt in _options("distill"):
        for flag in opt.opts:
            by_flag.setdefault(flag, []).append(opt)
    for field in fields:
        (opt,) = by_flag[_flag(field)]  # exactly one option answers to the field's flag
        assert opt.name == field and not opt.hidden
        assert [f for f in opt.opts if f.startswith("--")] == [_flag(field)]  # and it has one long flag
    visible = {o.name for o in _options("distill") if not o.hidden} - {"help"}
    command_only = {o.name for o in _options("distill") if set(o.opts) & set(COMMAND_OPTIONS)}
    assert len(command_only) == len(COMMAND_OPTIONS)
    assert visible - command_only == set(fields)  # every other visible flag is a field
    hidden = [o for o in _options("distill") if o.hidden]
    assert [o.opts for o in hidden] == [["--alpha-bar-T"]]  # the old spelling, kept working
    # the spelling sample and eval use
    assert "--alpha-bar-t" in {f for o in _options("sample") + _options("eval") for f in o.opts}


def test_a_flag_reaches_the_config_and_the_old_spelling_still_works():
    for flag in ("--alpha-bar-t", "--alpha-bar-T"):
        result = runner.invoke(app, ["distill", flag, "0.005", "--t-min", "30", "--dry-run", "--json"])
        assert result.exit_code == 0, result.output
        cfg = json.loads(result.stdout)["config"]
        assert (cfg["alpha_bar_T"], cfg["t_min"]) == (0.005, 30)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_info_dry_run_help_and_the_recipe_file_agree(backbone):
    recipe = _recipe(backbone)
    info = json.loads(runner.invoke(app, ["info", "-b", backbone, "--json"]).stdout)
    assert info["recipe"]["values"] == recipe
    assert Path(info["recipe"]["file"]) == RECIPES / f"{backbone}.toml"
    assert (info["student"]["rank"], info["fake"]["rank"]) == (recipe["rank"], recipe["fake_rank"])
    for adapter in ("lorad", "lora", "dora", "dora-frozen-norm", "orthogonal", "full"):
        result = runner.invoke(app, ["distill", "-b", backbone, "--adapter", adapter, "--dry-run", "--json"])
        assert result.exit_code == 0, result.output
        config = json.loads(result.stdout)["config"]
        expected = _values(recipe, adapter) | {"adapter": adapter}
        assert {k: config[k] for k in expected} == expected, adapter
        # `wadi info --adapter` plans the student `wadi distill --adapter` trains
        plan = json.loads(result.stdout)["plan"]["student"]
        shown = json.loads(
            runner.invoke(app, ["info", "-b", backbone, "--adapter", adapter, "--json"]).stdout
        )
        assert {k: shown["student"][k] for k in ("rank", "layers", "trainable_params")} == {
            k: plan[k] for k in ("rank", "layers", "trainable_params")
        }, adapter
    # every field a recipe does not hold means "the backbone's" / "built in"
    for f in dataclasses.fields(DistillConfig):
        if f.name not in recipe:
            assert f.default is None, f.name


def _shown(value: object) -> str:
    return ("on" if value else "off") if isinstance(value, bool) else str(value)


def test_help_quotes_a_default_only_where_every_recipe_agrees():
    helps = {o.name: o.help or "" for o in _options("distill")}
    recipes = [_recipe(b) for b in BACKBONES]
    every = [_values(r, a) for r in recipes for a in (None, *r.get("per_adapter", {}))]
    quoted = 0
    for f in dataclasses.fields(DistillConfig):
        values = {repr(v.get(f.name)) for v in every}
        if f.name == "backbone":  # it picks the recipe
            assert helps[f.name].endswith("(default tiny)")
        elif f.name not in recipes[0]:
            assert "default" in helps[f.name], f.name  # "the backbone's" / "built-in", in words
        elif len(values) == 1:
            assert helps[f.name].endswith(f"(default {_shown(every[0][f.name])})"), f.name
            quoted += 1
        else:
            assert helps[f.name].endswith("(backbone default, see --dry-run)"), f.name
            assert "default" not in helps[f.name].removesuffix("(backbone default, see --dry-run)")
    assert quoted >= 20  # the AdamW constants, timestep ranges, run plumbing...
    assert (
        json.loads(runner.invoke(app, ["distill", "--dry-run", "--json"]).stdout)["config"]["backbone"]
        == "tiny"
    )
    # the command's own help quotes no recipe number either (its examples aside)
    text = (_command("distill").help or "").split("Examples:")[0]
    assert not re.search(r"\b(lr|rank|CFG|EMA|steps)\s+\d", text) and "default 32" not in text


_FLAG = re.compile(r"(?<![\w-])--[A-Za-z][\w-]*")
_ERROR_CALLS = {"require", "need", "fail", "_MissingDownload"}


def _error_strings(tree: ast.AST) -> list[tuple[int, str]]:
    """String pieces inside ``raise`` statements and calls of ``*Error`` classes and the
    error helpers (f-strings contribute their literal parts)."""
    out = []
    for node in ast.walk(tree):
        target = None
        if isinstance(node, ast.Raise) and node.exc is not None:
            target = node.exc
        elif isinstance(node, ast.Call):
            f = node.func
            name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else ""
            if name in _ERROR_CALLS or name.endswith("Error"):
                target = node
        if target is not None:
            out += [
                (node.lineno, n.value)
                for n in ast.walk(target)
                if isinstance(n, ast.Constant) and isinstance(n.value, str)
            ]
    return out


def test_every_flag_an_error_message_names_exists():
    flags = {"--help"}
    for command in typer.main.get_command(app).commands.values():  # type: ignore[attr-defined]
        for p in command.params:
            flags.update(getattr(p, "opts", []), getattr(p, "secondary_opts", []))
    named, missing = 0, []
    for path in sorted(PACKAGE.rglob("*.py")):
        for line, text in _error_strings(ast.parse(path.read_text(encoding="utf-8"))):
            for flag in _FLAG.findall(text):
                named += 1
                if flag.rstrip("-") not in flags:
                    missing.append(f"{path.relative_to(PACKAGE)}:{line}: {flag}")
    assert named > 100  # the scan sees the messages
    assert not missing, missing


# ---- the sampling declaration: sample, eval and swap take their sampling flags from it ----------
SAMPLING_RECIPES = PACKAGE / "configs" / "sample"
#: The options each command has beyond the sampling declaration (its own work).
COMMAND_OWN = {
    "sample": {"prompts", "out", "prompts_file", "json_out", "embedding"},
    "eval": {f.name for f in dataclasses.fields(EvalFlags)},
    "swap": {"teacher", "student", "keep", "out", "alpha", "filter", "overwrite", "sample", "rows",
             "samples_dir", "no_eval", "json_out"},
}  # fmt: skip


def _sampling_recipe(name: str) -> dict:
    return tomllib.loads((SAMPLING_RECIPES / f"{name}.toml").read_text())


@pytest.mark.parametrize("command", ["sample", "eval", "swap"])
def test_every_sampling_field_a_command_takes_has_one_flag_and_its_help(command):
    taken = [f for f in dataclasses.fields(SamplingOptions) if command in f.metadata["commands"]]
    assert {"backbone", "seed", "steps", "cfg", "device"} <= {f.name for f in taken}
    options = {o.name: o for o in _options(command) if o.name != "help"}
    for f in taken:
        opt = options[f.name]
        assert not opt.hidden and [x for x in opt.opts if x.startswith("--")] == [_flag(f.name)], f.name
        assert opt.help == f.metadata["commands"][command].get("help", f.metadata["help"]), f.name
        if f.metadata["short"]:
            assert f.metadata["short"] in opt.opts
    # every other option is the command's own; no sampling option is declared twice
    assert set(options) - {f.name for f in taken} == COMMAND_OWN[command] - {
        p.name for p in _command(command).params if p.param_type_name == "argument"
    }
    # the declared per-command defaults are the flags' defaults (user-visible defaults kept)
    expected = {"sample": {"backbone": "sd21", "num_images": 1, "batch_size": 4},
                "eval": {"backbone": "tiny", "num_images": None, "batch_size": None},
                "swap": {"backbone": "tiny", "num_images": 500}}[command]  # fmt: skip
    assert {k: options[k].default for k in expected} == expected


@pytest.mark.parametrize("backbone", BACKBONES)
def test_teacher_defaults_come_from_the_sampling_recipe_and_help_quotes_none(backbone):
    from wadi_cli.backbones import get_backbone
    from wadi_cli.pipeline import SampleConfig

    teacher = _sampling_recipe(backbone)["teacher"]
    resolved = SampleConfig(teacher=True).resolved(get_backbone(backbone))
    assert (resolved.steps, resolved.cfg) == (teacher["steps"], teacher["cfg"])
    info = json.loads(runner.invoke(app, ["info", "-b", backbone, "--json"]).stdout)
    assert info["sampling"]["values"] == _sampling_recipe(backbone)
    assert Path(info["sampling"]["file"]) == SAMPLING_RECIPES / f"{backbone}.toml"
    for command in ("sample", "eval", "swap"):
        helps = {o.name: o.help or "" for o in _options(command)}
        for name in ("steps", "cfg"):  # the recipe's word, not its number
            assert "backbone" in helps[name] and not re.search(r"\d", helps[name]), (command, name)
        assert "0.0047" not in " ".join(helps.values()) + (_command(command).help or "")
        if "alpha_bar_T" in helps:
            assert "weights record" in helps["alpha_bar_T"] and not re.search(r"\d", helps["alpha_bar_T"])


def test_one_validator_refuses_bad_sampling_options_before_any_work():
    for kwargs, message in (
        ({"base": True, "teacher": True}, "--base"),
        ({"steps": 3}, "--teacher only"),
        ({"teacher": True, "steps": 0}, "--steps must be at least 1"),
        ({"alpha_bar_T": 1.5}, "--alpha-bar-t"),
        ({"batch_size": 0}, "--batch-size"),
        ({"num_images": 0}, "--num-images"),
    ):
        with pytest.raises(BadInputError, match=re.escape(message)):
            SamplingOptions(**kwargs)
    for args in (["sample", "x", "-b", "tiny", "--steps", "3"], ["eval", "-b", "tiny", "--cfg", "2"]):
        result = runner.invoke(app, args)
        assert result.exit_code != 0 and "--teacher only" in result.stderr, result.output
