"""What a distillation run trains on when ``--prompts`` names no file: the built-in prompt
sets and the words ``--dry-run``, ``wadi info`` and the refusal use for them. Light on
purpose (no torch): ``wadi info`` imports it.

- ``--backbone tiny``: :data:`TINY_PROMPT_COUNT` prompts drawn from the tiny model's grammar;
- ``--prompts smoke``: :data:`SMOKE_PROMPTS`, 16 prompts for smoke runs of any backbone;
- sd15 / sd21 / pixart have no default set (the paper trains on ~1.4M JourneyDB captions):
  ``wadi distill`` refuses to start without ``--prompts`` (:func:`require_prompts`).
"""

from __future__ import annotations

import os

from wadi_cli.errors import BadInputError

#: A small built-in prompt set for smoke runs of the SD / PixArt backbones.
SMOKE_PROMPTS: tuple[str, ...] = (
    "a photo of a red fox sitting in fresh snow",
    "an astronaut riding a horse on the moon, digital art",
    "a bowl of ramen with a soft-boiled egg, studio lighting",
    "a lighthouse on a cliff at sunset, oil painting",
    "a close-up portrait of an old fisherman, black and white photo",
    "a cozy reading nook with a window and rain outside",
    "a futuristic city skyline at night with neon lights",
    "a watercolor painting of a hummingbird and flowers",
    "a wooden cabin in a pine forest, morning fog",
    "a corgi wearing sunglasses on a beach",
    "a steaming cup of coffee on a rustic table",
    "a mountain lake reflecting snowy peaks, landscape photography",
    "a vintage red car parked on a cobblestone street",
    "a bouquet of sunflowers in a glass vase",
    "an isometric illustration of a tiny island with a castle",
    "a macro photo of a dew drop on a green leaf",
)


#: ``--prompts smoke``: :data:`SMOKE_PROMPTS` by name. A real backbone has no default prompt
#: set (the paper trains on about 1.4M JourneyDB captions), so ``wadi distill`` refuses to
#: start an sd15 / sd21 / pixart run without ``--prompts`` (:func:`require_prompts`).
SMOKE_SET = "smoke"
#: Prompts drawn from the tiny model's grammar when ``--backbone tiny`` has no ``--prompts``.
TINY_PROMPT_COUNT = 1024


def prompt_source(prompts: str | os.PathLike[str] | None, backbone: str) -> str:
    """In words, what a run of ``backbone`` with ``--prompts prompts`` trains on (for
    ``--dry-run`` and ``wadi info``)."""
    if prompts is not None and str(prompts) == SMOKE_SET:
        return f"wadi's {len(SMOKE_PROMPTS)} built-in smoke-test prompts (--prompts {SMOKE_SET})"
    if prompts is not None:
        return f"the prompts in {prompts}"
    if backbone == "tiny":
        return (
            f"{TINY_PROMPT_COUNT:,} prompts drawn from the tiny model's grammar "
            "('a red circle at the top left'); --prompts FILE replaces them"
        )
    return (
        "none: pass a caption file with --prompts FILE (.txt, .jsonl, .csv, .parquet; the paper "
        f"trained on ~1.4M JourneyDB captions), or --prompts {SMOKE_SET} for wadi's "
        f"{len(SMOKE_PROMPTS)} smoke-test prompts"
    )


def require_prompts(prompts: str | os.PathLike[str] | None, backbone: str) -> None:
    """Refuse a run of a real backbone (no default prompt set) that names no prompts."""
    if prompts is None and backbone != "tiny":
        raise BadInputError(
            f"wadi distill -b {backbone} has no default prompts (the paper trained on ~1.4M JourneyDB "
            f"captions; --prompts {SMOKE_SET} gives {len(SMOKE_PROMPTS)} built-in smoke-test prompts): "
            "pass a caption file (.txt one a line, .jsonl, .csv, .parquet) with --prompts FILE"
        )
