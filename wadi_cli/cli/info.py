"""``wadi info``: the LoRaD adapter plan of a backbone (layers and trainable parameters
per role), computed from the architecture config shipped with wadi (no download)."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.table import Table

from wadi_cli.backbones import BACKBONES, get_backbone
from wadi_cli.backbones.recipes import SAMPLING_DIR, sampling_recipe
from wadi_cli.cli.common import JsonFlag, console, handle_errors
from wadi_cli.distill.config import ADAPTERS
from wadi_cli.distill.prompt_sets import prompt_source
from wadi_cli.errors import BadInputError

HELP = """Show a backbone's LoRaD adapter plan: adapted layers and trainable parameters
for the student (one-step generator) and the fake score model, plus hub id, base
parameter count, resolution, text encoder, ᾱ_T and the distillation recipe (the defaults
of `wadi distill -b NAME`). Needs no download.

Examples:

  wadi info --backbone sd15

  wadi info --backbone sd15 --rank 64 --json

  wadi info --backbone pixart --fake-rank 16

  wadi info --backbone sd15 --adapter dora-frozen-norm   (another student kind)

  wadi info            (one line per backbone)
"""


def _plan_table(plan: dict) -> Table:
    kind = plan["student"].get("adapter", "lorad")
    title = f"LoRaD plan: {plan['backbone']}" if kind == "lorad" else f"{kind} plan: {plan['backbone']}"
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column("field", style="bold")
    table.add_column("value")
    src = plan["sources"]
    den, comp = src["denoiser"], src["components"]
    if comp["repo"] == den["repo"]:
        table.add_row("base model", f"{den['repo']} (another pipeline: --model PATH_OR_ID)")
    else:
        table.add_row("denoiser", f"{den['repo']} ({den['folder']}/ only; another: --model PATH_OR_ID)")
        table.add_row(
            "other components",
            f"{comp['repo']} (another source: --components PATH_OR_ID)",
        )
    for alt in src["alternatives"]:
        table.add_row("also supported", f"{alt['what']}: {alt['flag']}")
    table.add_row("architecture", f"{plan['denoiser']} ({plan['base_params']:,} parameters)")
    for role, label in (("student", "student (generator)"), ("fake", "fake score")):
        r = plan[role]
        share = 100.0 * r["trainable_params"] / plan["base_params"]
        what = f"rank {r['rank']}" if r["rank"] is not None else r.get("adapter", "")
        table.add_row(
            label,
            f"{what}, {r['layers']} layers, {r['trainable_params']:,} trainable ({share:.2f}%)",
        )
    table.add_row(
        "resolution",
        f"{plan['resolution']} px (latents {plan['latent_size']}×{plan['latent_size']}); "
        "a model whose config says otherwise runs at its own",
    )
    table.add_row("text encoder", f"{plan['text_encoder']} (max {plan['text_max_length']} tokens)")
    table.add_row("ᾱ_T", f"{plan['alpha_bar_T']} (unless the weights record theirs; --alpha-bar-t)")
    table.add_row("prediction", f"{plan['prediction_type']} (the scheduler config of the model decides)")
    table.add_row("mixed precision", plan["mixed_precision"])
    if plan.get("fp16_vae"):
        table.add_row("VAE in fp16", f"{plan['fp16_vae']} (the base VAE overflows fp16; fp32/bf16 keep it)")
    r = plan["recipe"]["values"]
    table.add_row(
        "distill recipe",
        f"{plan['recipe']['file']}: lr {r['lr']} / fake {r['fake_lr']}, CFG {r['guidance']} / "
        f"fake {r['fake_guidance']}, EMA {r['ema_decay']}, regression {r['regression_weight']}, "
        f"batch {r['batch_size']}, {r['max_steps']} steps "
        f"(all of it: wadi distill -b {plan['backbone']} --dry-run)",
    )
    if plan["recipe"].get("note"):
        table.add_row("recipe status", plan["recipe"]["note"])
    t = plan["sampling"]["values"]["teacher"]
    table.add_row(
        "sampling recipe",
        f"{plan['sampling']['file']}: teacher {t['steps']} steps, cfg {t['cfg']} (--steps, --cfg)",
    )
    table.add_row("trains on (no --prompts)", plan["trains_on"])
    return table


def _summary_table() -> Table:
    table = Table(title="Backbones (wadi info --backbone NAME for the adapter plan)", title_justify="left")
    for col in ("name", "hub id", "resolution", "text encoder", "student rank", "fake rank"):
        table.add_column(col)
    for b in BACKBONES.values():
        table.add_row(
            b.name, b.hub_id, str(b.resolution), b.text_encoder, str(b.student_rank), str(b.fake_rank)
        )
    return table


def register(app: typer.Typer) -> None:
    @app.command("info", help=HELP)
    @handle_errors
    def info(
        backbone: Annotated[
            str | None,
            typer.Option("--backbone", "-b", help=f"Backbone: {', '.join(BACKBONES)}. Omit to list them."),
        ] = None,
        rank: Annotated[
            int | None, typer.Option("--rank", help="Student LoRaD rank (default: the recipe's).")
        ] = None,
        fake_rank: Annotated[
            int | None, typer.Option("--fake-rank", help="Fake-score LoRaD rank (default: the recipe's).")
        ] = None,
        adapter: Annotated[
            str,
            typer.Option(
                "--adapter",
                help=f"Student kind to plan: {', '.join(ADAPTERS)} (the counts of `wadi distill --adapter`).",
            ),
        ] = "lorad",
        json_out: JsonFlag = False,
    ) -> None:
        if backbone is None:
            if rank is not None or fake_rank is not None:
                raise BadInputError("--rank/--fake-rank need --backbone NAME")
            if json_out:
                rows = [
                    {
                        "backbone": b.name,
                        "hub_id": b.hub_id,
                        "student_rank": b.student_rank,
                        "fake_rank": b.fake_rank,
                    }
                    for b in BACKBONES.values()
                ]
                typer.echo(json.dumps(rows, indent=2))
            else:
                console.print(_summary_table())
            return
        if adapter not in ADAPTERS:
            raise BadInputError(f"--adapter must be one of {', '.join(ADAPTERS)}; got {adapter!r}")
        spec = get_backbone(backbone)
        plan = spec.adapter_plan(rank=rank, fake_rank=fake_rank, adapter=adapter)
        plan["sampling"] = {
            "file": str(SAMPLING_DIR / f"{spec.name}.toml"),
            "values": sampling_recipe(spec.name),
        }
        plan["trains_on"] = prompt_source(None, plan["backbone"])
        if json_out:
            typer.echo(json.dumps(plan, indent=2))
        else:
            console.print(_plan_table(plan))
