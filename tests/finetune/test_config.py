"""The fine-tune config (wadi_cli.finetune.config): recipes as data, flags over files over
recipes, and the refusals of values that would be silently unused."""

from __future__ import annotations

import pytest

from wadi_cli.backbones.recipes import backbone_recipe
from wadi_cli.errors import BadInputError
from wadi_cli.finetune.config import FINETUNE_RECIPES_DIR, finetune_recipe, resolve_finetune_config

NEEDED = {"instance_images": "imgs", "instance_prompt": "a photo of sks dog"}


@pytest.mark.parametrize("backbone", ["sd15", "sd21", "pixart", "tiny"])
def test_every_recipe_resolves_for_every_kind(backbone):
    assert (FINETUNE_RECIPES_DIR / f"{backbone}.toml").is_file()
    for kind in ("lorad", "lora", "dora", "full"):
        cfg = resolve_finetune_config(overrides={**NEEDED, "backbone": backbone, "adapter": kind})
        assert cfg.adapter == kind and cfg.rank >= 1 and not cfg.prior
        assert 400 <= cfg.max_steps <= 800 and 1 <= cfg.batch_size <= 4 and cfg.prior_loss_weight == 1.0
    # LoRaD at the lr its distillation recipe gives a LoRaD student
    lorad = resolve_finetune_config(overrides={**NEEDED, "backbone": backbone})
    assert lorad.lr == backbone_recipe(backbone)["lr"]


def test_dreambooth_lrs_of_the_real_backbones():
    for backbone in ("sd15", "sd21", "pixart"):
        assert finetune_recipe(backbone)["per_adapter"]["lora"]["lr"] == 1e-4
        assert (
            resolve_finetune_config(overrides={**NEEDED, "backbone": backbone, "adapter": "full"}).lr == 5e-6
        )


def test_flags_win_and_prior_needs_a_class_prompt(tmp_path):
    file = tmp_path / "ft.toml"
    file.write_text("lr = 3e-3\nrank = 7\n")
    cfg = resolve_finetune_config(file, {**NEEDED, "rank": 5})
    assert (cfg.lr, cfg.rank) == (3e-3, 5)
    with_prior = resolve_finetune_config(
        overrides={**NEEDED, "class_prompt": "a dog", "prior_loss_weight": 0.5}
    )
    assert with_prior.prior and with_prior.prior_loss_weight == 0.5
    for extra in ({"prior_loss_weight": 0.5}, {"num_class_images": 8}, {"class_images": "x"}):
        with pytest.raises(BadInputError, match="need.*--class-prompt"):
            resolve_finetune_config(overrides={**NEEDED, **extra})


@pytest.mark.parametrize(
    ("over", "needle"),
    [
        ({"instance_prompt": None}, "--instance-prompt is required"),
        ({"instance_prompt": "  "}, "--instance-prompt is required"),
        ({"instance_images": None}, "--instance-images DIR is required"),
        ({"adapter": "nope"}, "--adapter"),
        ({"rank": 0}, "--rank"),
        ({"lr": -1.0}, "--lr"),
        ({"bogus": 1}, "unknown config key"),
    ],
)
def test_bad_values_are_one_line(over, needle):
    with pytest.raises(BadInputError, match=needle):
        resolve_finetune_config(overrides={**NEEDED, **over})


def test_a_backbone_without_a_fine_tune_recipe_is_one_line_naming_the_ones_that_exist():
    with pytest.raises(BadInputError) as exc:
        finetune_recipe("sdxl")
    message = str(exc.value)
    assert "no fine-tune recipe" in message and "has: pixart, sd15, sd21, tiny" in message
    assert "\n" not in message
    first, second = finetune_recipe("tiny"), finetune_recipe("tiny")
    assert first == second and first is not second  # a copy each time: callers may edit it
