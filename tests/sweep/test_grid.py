"""Grid files: cells as the cartesian product of the axes, names and folders, bad input as
one line each, and run arguments that `wadi distill` itself resolves to the cell's values."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from wadi_cli.cli.main import app
from wadi_cli.errors import BadInputError
from wadi_cli.sweep.grid import Cell, check_cells, distill_args, eval_args, load_grid

GRID = """
[sweep]
backbone = "tiny"
eval = "-n 64 --seed 3"
baseline = {adapter = "lorad"}

[fixed]
max_steps = 7
tensorboard = false
lr = 0.003

[grid]
adapter = ["lorad", "lora"]
rank = [2, 6]
gradient-checkpointing = [true, false]
seed = [5, 1]
"""


def _grid(tmp_path, text=GRID):
    path = tmp_path / "g.toml"
    path.write_text(text)
    return load_grid(path)


def test_cells_are_the_product_of_the_axes(tmp_path):
    g = _grid(tmp_path)
    assert g.seeds == [5, 1] and list(g.axes) == ["adapter", "rank", "gradient_checkpointing"]
    assert len(g.cells) == 8 and len(set(g.cells)) == 8
    assert g.cells[0].name == "adapter=lorad,rank=2,gradient_checkpointing=true"
    assert g.cells[-1].folder == "adapter-lora_rank-6_gradient_checkpointing-false"
    assert g.out == tmp_path / "g" and g.eval == ["-n", "64", "--seed", "3"]
    lora = g.cells[5]
    assert lora.as_dict() == {"adapter": "lora", "rank": 2, "gradient_checkpointing": False}
    assert g.baseline_of(lora) == g.cells[1]
    assert g.run_dir(lora, 1) == tmp_path / "g" / "runs" / lora.folder / "seed-1"
    assert eval_args(g, g.run_dir(lora, 1))[:4] == ["eval", "-b", "tiny", "--watch"]


def test_run_arguments_resolve_to_the_cell_in_wadi_distill(tmp_path):
    g = _grid(tmp_path)
    cell = g.cells[5]
    args = distill_args(g, cell, 1, tmp_path / "run")
    result = CliRunner().invoke(app, [*args, "--dry-run", "--json"])
    assert result.exit_code == 0, result.output
    config = json.loads(result.stdout)["config"]
    want = {"adapter": "lora", "rank": 2, "gradient_checkpointing": False, "max_steps": 7, "seed": 1}
    assert {k: config[k] for k in want} == want
    assert config["lr"] == 0.003 and config["tensorboard"] is False
    assert distill_args(g, cell, 1, tmp_path / "run", resume=True)[-2:] == ["--resume", "latest"]


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (("rank = [2, 6]", "rnak = [2, 6]"), "unknown key(s) rnak"),
        (("rank = [2, 6]", 'rank = [2, "six"]'), "rank: config rank: expected an integer"),
        (("max_steps = 7", 'max_steps = "7"'), "[fixed]: config max_steps: expected an integer"),
        (("rank = [2, 6]", "rank = []"), "[grid] rank is an empty axis"),
        (("rank = [2, 6]", "rank = 2"), "[grid] rank must be a list of values"),
        (("rank = [2, 6]", "rank = [2, 2]"), "[grid] rank repeats a value"),
        (('baseline = {adapter = "lorad"}', 'baseline = {adapter = "dora"}'), "baseline adapter = 'dora'"),
        (("[fixed]", "[fixd]"), "unknown table(s) fixd"),
        (('eval = "-n 64 --seed 3"', 'evals = "-n 64"'), "unknown [sweep] key(s) evals"),
        (("seed = [5, 1]", "seed = [5, 1.5]"), "seed must be a list of integers"),
        (("[fixed]", "[fixed]\nrank = 3"), "rank is both [fixed] and a [grid] axis"),
        (("[grid]", "[grid"), "not valid TOML"),
        (("rank = [2, 6]", '"adapter+rank" = [["dora", 2]]'), "sets adapter on more than one axis"),
        (("rank = [2, 6]", '"lr+rank" = [[0.1, 2], [0.2]]'), "lr+rank: each value must be a list of 2"),
        (("rank = [2, 6]", '"lr+rank" = [[0.1, "two"]]'), "rank: expected an integer"),
        (("rank = [2, 6]", '"rank+seed" = [[2, 1]]'), "seed is set by [grid] seed"),
    ],
)
def test_bad_grids_are_one_line(tmp_path, edit, message):
    with pytest.raises(BadInputError) as exc:
        _grid(tmp_path, GRID.replace(*edit))
    assert message in str(exc.value) and "\n" not in str(exc.value)


def test_cells_resolve_like_wadi_distill(tmp_path):
    check_cells(_grid(tmp_path))
    g = _grid(tmp_path, GRID.replace("rank = [2, 6]", "rank = [2, 0]"))
    with pytest.raises(
        BadInputError, match="cell adapter=lorad,rank=0,gradient_checkpointing=true: --rank must"
    ):
        check_cells(g)
    assert Cell(()).name == "all"


LINKED = """
[sweep]
backbone = "tiny"
baseline = {adapter = "lorad"}
[grid]
"adapter+rank" = [["lora", 3], ["lorad", 4], ["full", 1]]
ema_decay = [0.9, 0.99]
seed = [0, 2]
"""


def test_a_linked_axis_sets_its_fields_together_and_the_baseline_takes_the_whole_value(tmp_path):
    """Kinds at matched parameters: ``"adapter+rank"`` pairs each kind with its own rank."""
    g = _grid(tmp_path, LINKED)
    assert g.fields == ["adapter", "rank", "ema_decay"] and len(g.cells) == 6
    assert [c.name for c in g.cells[:3]] == [
        "adapter=lora,rank=3,ema_decay=0.9", "adapter=lora,rank=3,ema_decay=0.99",
        "adapter=lorad,rank=4,ema_decay=0.9",
    ]  # fmt: skip
    full = g.cells[5]
    assert full.as_dict() == {"adapter": "full", "rank": 1, "ema_decay": 0.99}
    assert g.baseline_of(full).name == "adapter=lorad,rank=4,ema_decay=0.99"  # rank 4, not 1
    args = distill_args(g, g.cells[0], 2, tmp_path / "run")
    assert args[args.index("--adapter") + 1] == "lora" and args[args.index("--rank") + 1] == "3"
    with pytest.raises(BadInputError, match="baseline rank = 2 is not a value"):
        _grid(tmp_path, LINKED.replace('{adapter = "lorad"}', "{rank = 2}"))
