"""What makes a ``--format diffusers`` export answer the plain one-step call of a diffusers
user, ``pipe(prompt, num_inference_steps=1, guidance_scale=0)``, with the student's image:
its scheduler config and its model card.

The scheduler (:func:`one_step_scheduler_config`) is DDIM with *trailing* timestep spacing
(one step is ``[999]``, as SD-Turbo's export does with Euler) and ``set_alpha_to_one``, so
the single step returns the predicted x0 exactly (no noise, no clipping):

    x0 = (z − sqrt(1 − ᾱ_999) ε̂(z, 999, c)) / sqrt(ᾱ_999)

which is WaDi's one-step generator (method §3) when ᾱ_999 = ᾱ_T. The base schedule's
ᾱ_999 (0.00466 for SD's scaled-linear betas, 4e-5 for PixArt's linear ones) is not the
ᾱ_T the student was trained with (0.0047 by default), so the config lists the base's betas
(``trained_betas``) with the LAST one replaced by ``1 − ᾱ_T / ᾱ_998``: ᾱ_999 becomes the
recorded ᾱ_T and every other ᾱ_t is the base's. (When ᾱ_T > ᾱ_998 that β is negative; only
the step at t = 999 reads it.)
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

#: The keys that make one step land on t = 999 and return x0 as it is.
ONE_STEP_SCHEDULER: dict[str, Any] = {
    "_class_name": "DDIMScheduler",
    "timestep_spacing": "trailing",
    "set_alpha_to_one": True,
    "steps_offset": 1,  # unused by trailing spacing; SD pipelines rewrite any other value, with a warning
    "clip_sample": False,
    "thresholding": False,
    "rescale_betas_zero_snr": False,
}


def base_betas(config: Mapping[str, Any]) -> torch.Tensor:
    """The betas (float32, as diffusers computes them) of a scheduler config's schedule."""
    from diffusers import DDIMScheduler

    keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas")
    sched = DDIMScheduler(**{k: config[k] for k in keys if config.get(k) is not None})
    return sched.betas.to(torch.float32)


def betas_with_last_alpha_bar(betas: torch.Tensor, alpha_bar_T: float) -> list[float]:
    """``betas`` with the last one set so that ``cumprod(1 − β)[-1]`` (float32, as diffusers
    computes it) equals ``alpha_bar_T``; the others are returned unchanged."""
    if not 0 < alpha_bar_T < 1:
        raise ValueError(f"alpha_bar_T must lie in (0, 1), got {alpha_bar_T}")
    ac = torch.cumprod(1.0 - betas.to(torch.float32), dim=0)
    out = betas.to(torch.float32).clone()
    out[-1] = 1.0 - alpha_bar_T / float(ac[-2])
    return [float(b) for b in out]


def one_step_scheduler_config(source: Mapping[str, Any], alpha_bar_T: float | None) -> dict[str, Any]:
    """The exported ``scheduler_config.json``: the base's schedule and prediction type,
    :data:`ONE_STEP_SCHEDULER`, and (with ``alpha_bar_T``) ᾱ_999 = ᾱ_T."""
    config: dict[str, Any] = {
        "num_train_timesteps": int(source.get("num_train_timesteps", 1000)),
        "beta_start": float(source.get("beta_start", 0.0001)),
        "beta_end": float(source.get("beta_end", 0.02)),
        "beta_schedule": str(source.get("beta_schedule", "linear")),
        "trained_betas": source.get("trained_betas"),
        "prediction_type": str(source.get("prediction_type", "epsilon")),
        **ONE_STEP_SCHEDULER,
    }
    if source.get("_diffusers_version"):
        config["_diffusers_version"] = source["_diffusers_version"]
    if alpha_bar_T is not None:
        config["trained_betas"] = betas_with_last_alpha_bar(base_betas(config), float(alpha_bar_T))
    return config


def write_one_step_scheduler(folder: Path, alpha_bar_T: float | None) -> dict[str, Any]:
    """Replace the scheduler of the pipeline folder ``folder`` (being written) by the
    one-step config and name its class in ``model_index.json``."""
    path = folder / "scheduler" / "scheduler_config.json"
    source = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    config = one_step_scheduler_config(source, alpha_bar_T)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)  # the copy may be a hard link to a hub-cache blob: never write through it
    path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    index_path = folder / "model_index.json"
    index = json.loads(index_path.read_text(encoding="utf-8"))
    index["scheduler"] = ["diffusers", ONE_STEP_SCHEDULER["_class_name"]]
    index_path.write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return config


def _is_hub_id(ref: str) -> bool:
    """``owner/name`` that is not a local path (a model card's ``base_model`` names hub repos)."""
    parts = ref.split("/")
    return len(parts) == 2 and all(parts) and not Path(ref).expanduser().exists() and not ref.startswith(".")


def read_eval_metrics(folder: str | Path) -> dict[str, Any]:
    """The ``metrics`` and ``num_images`` of a ``wadi eval --out`` folder's ``metrics.json``."""
    from wadi_cli.errors import BadInputError

    path = Path(folder).expanduser() / "metrics.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        metrics = dict(data["metrics"])
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError):
        msg = f"--eval {folder}: not a `wadi eval --out` folder (no readable metrics.json)"
        raise BadInputError(msg) from None
    return {"metrics": metrics, "num_images": data.get("num_images")}


def finetune_model_card(*, pipeline_class: str, base_ref: str, recipe: Mapping[str, Any]) -> str:
    """The ``README.md`` of an exported ``wadi finetune`` run: a DreamBooth fine-tune of
    ``base_ref``, sampled with the base's own scheduler and many steps."""
    from wadi_cli import __version__

    config = recipe.get("run_config", {})
    head = ["---"] + ([f"base_model: {base_ref}"] if _is_hub_id(base_ref) else [])
    head += ["library_name: diffusers", "pipeline_tag: text-to-image", "tags:", "- wadi", "- dreambooth"]
    head.append("---")
    prompt = config.get("instance_prompt") or "a photo of sks dog"
    body = [
        "",
        "# DreamBooth fine-tune",
        "",
        f"`{base_ref}` fine-tuned with wadi {__version__} (DreamBooth, adapter {config.get('adapter')!r},",
        f"rank {config.get('rank')}, merged), on images captioned `{prompt}`.",
        "",
        "## Usage",
        "",
        "```python",
        "import torch",
        f"from diffusers import {pipeline_class}",
        "",
        f'pipe = {pipeline_class}.from_pretrained("PATH_OR_REPO", torch_dtype=torch.float16).to("cuda")',
        f"image = pipe({json.dumps(prompt)}).images[0]",
        "```",
        "",
        "## Recipe",
        "",
        "```json",
        json.dumps(recipe, indent=2, sort_keys=True, default=str),
        "```",
        "",
    ]
    return "\n".join(head + body)


def model_card(
    *,
    pipeline_class: str,
    base_ref: str,
    family: str,
    alpha_bar_T: float | None,
    recipe: Mapping[str, Any],
    metrics: Mapping[str, Any] | None = None,
) -> str:
    """The export's ``README.md`` in the hub's model-card convention: a YAML header
    (base_model, library_name, pipeline_tag, tags), the one-step usage snippet, ᾱ_T, the
    recipe and, when given, the metrics of a ``wadi eval`` folder."""
    from wadi_cli import __version__

    tags = ["wadi", "one-step", "distillation", "text-to-image"]
    tags.append("stable-diffusion" if family == "unet" else "pixart-alpha")
    head = ["---"]
    if _is_hub_id(base_ref):
        head.append(f"base_model: {base_ref}")
    head += ["library_name: diffusers", "pipeline_tag: text-to-image", "tags:"]
    head += [f"- {t}" for t in tags]
    head.append("---")
    alpha = f"{alpha_bar_T:g}" if alpha_bar_T is not None else "not recorded"
    body = [
        "",
        "# One-step WaDi student",
        "",
        f"A one-step text-to-image generator distilled with wadi {__version__} (WaDi: weight-direction-aware",
        f"distillation, arXiv 2603.08258) from `{base_ref}`. One denoiser call at t = 999 turns Gaussian",
        "latents into the image; classifier-free guidance is not used.",
        "",
        "## Usage",
        "",
        "```python",
        "import torch",
        f"from diffusers import {pipeline_class}",
        "",
        f'pipe = {pipeline_class}.from_pretrained("PATH_OR_REPO", torch_dtype=torch.float16).to("cuda")',
        'image = pipe("a photo of a cat", num_inference_steps=1, guidance_scale=0).images[0]',
        "```",
        "",
        "The scheduler is DDIM with trailing timesteps, so one step samples t = 999 and returns the",
        f"student's x0. Its schedule is the base's except ᾱ_999, set to the student's ᾱ_T = {alpha}",
        "(the value it was trained with; the base's own ᾱ_999 differs).",
        "",
        'With wadi: `wadi sample "a photo of a cat" --weights PATH_OR_REPO`.',
    ]
    if metrics:
        body += ["", "## Metrics", "", f"From `wadi eval` ({metrics.get('num_images')} images):", ""]
        body += ["| metric | value |", "|---|---|"]
        for key, value in metrics["metrics"].items():
            body.append(f"| {key} | {value:.4g} |" if isinstance(value, float) else f"| {key} | {value} |")
    recipe_json = json.dumps(recipe, indent=2, default=str, sort_keys=True)
    body += ["", "## Recipe", "", "```json", recipe_json, "```", ""]
    return "\n".join(head + body)
