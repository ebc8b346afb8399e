"""``wadi eval``: the COCO zero-shot protocol (FID, KID, CLIP score, precision/recall) for
any backbone, and the tiny model's attribute accuracy and Fréchet distance."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Annotated, Any

import typer

from wadi_cli.cli.common import (
    Base,
    JsonFlag,
    OutDir,
    Seed,
    console,
    err_console,
    handle_errors,
    use_backbone_cpu_threads,
    weights_for_sampling,
)

HELP = """Score generated images.

The protocol of the paper's Table 1 (sd15, sd21, pixart; tiny too): one image
per caption of --captions (seed = --seed + index) into --out EVAL (PNG +
manifest.json, resumable), then FID / KID (clean-fid, clean mode), CLIP score
(OpenCLIP ViT-g-14, "A photo depicts " + caption, 0-1) and precision / recall
(torch-fidelity, k = 3) against --ref (real images or a --save-ref file).
Every image is first center-cropped on its long edge and resized to 256 px
with PIL LANCZOS. Needs: pip install "wadi-cli[eval]".

Tiny, without protocol flags: draw N tiny prompts with --seed, generate (by
default with the one-step student shipped with wadi; --base for the
undistilled model in one step), and report the shipped classifier's accuracy (colour, shape and position all
right) and fd (Fréchet distance of classifier features to rendered real
images with the same attributes; compare only at equal N).

Examples:

  wadi eval -b sd15 -w RUN --captions coco2014_30k.csv --ref coco2014_256.npz -n 30000 --out eval/sd15

  wadi eval -b sd15 --teacher --steps 25 --cfg 3 --captions coco2014_30k.csv --ref coco2014_256.npz \
    --out eval/teacher

  wadi eval --ref val2014/ --save-ref coco2014_256.npz

  wadi eval --images other_method/ --captions coco2014_30k.csv --ref coco2014_256.npz

  wadi eval --watch runs/sd15 -n 5000 --captions coco2014_30k.csv --ref coco2014_256.npz

  wadi eval -b tiny -n 500 --seed 0

  wadi eval -b tiny --base -n 500 --seed 0

  wadi eval --backbone tiny --weights student.safetensors -n 256 --seed 0

  wadi eval --backbone tiny --teacher --steps 25 -n 256 --seed 0 --json

  wadi eval -b tiny -w runs/tiny -n 1000 --metrics accuracy,fd,fid,kid,pr --out eval/tiny
"""


def register(app: typer.Typer) -> None:
    @app.command("eval", help=HELP)
    @handle_errors
    def eval_(
        backbone: Annotated[
            str, typer.Option("--backbone", "-b", help="sd15, sd21, pixart or tiny.")
        ] = "tiny",
        weights: Annotated[
            Path | None,
            typer.Option(
                "--weights",
                "-w",
                help="One-step weights: merged file, LoRaD adapter, folder, or a `wadi distill` run "
                "(tiny default: the shipped one-step student).",
            ),
        ] = None,
        base: Base = False,
        teacher: Annotated[bool, typer.Option("--teacher", help="Evaluate the multi-step teacher.")] = False,
        steps: Annotated[int | None, typer.Option("--steps", help="Teacher steps (default 25).")] = None,
        cfg: Annotated[
            float | None, typer.Option("--cfg", help="Teacher guidance scale (default 3).")
        ] = None,
        alpha_bar_t: Annotated[
            float | None, typer.Option("--alpha-bar-t", help="One-step ᾱ_T (default: registry, 0.0047).")
        ] = None,
        num_images: Annotated[
            int | None,
            typer.Option(
                "--num-images", "-n", help="Images (= captions) to score (default: tiny 256; all captions)."
            ),
        ] = None,
        seed: Seed = 0,
        real_seed: Annotated[
            int | None,
            typer.Option("--real-seed", help="Seed of the tiny real reference images (default: --seed)."),
        ] = None,
        model: Annotated[
            str | None, typer.Option("--model", help="Base pipeline folder or hub id (default: registry).")
        ] = None,
        batch_size: Annotated[
            int | None, typer.Option("--batch-size", help="Images per forward pass (default: tiny 32, 8).")
        ] = None,
        device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda, mps.")] = "auto",
        dtype: Annotated[
            str, typer.Option("--dtype", help="auto (fp32 on CPU, fp16/bf16 on GPU), fp32, fp16, bf16.")
        ] = "auto",
        classifier: Annotated[
            Path | None,
            typer.Option("--classifier", help="Tiny classifier weights (default: the shipped one)."),
        ] = None,
        captions: Annotated[
            Path | None,
            typer.Option("--captions", help="Captions: .txt, .jsonl/.csv/.parquet ('caption'), COCO .json."),
        ] = None,
        caption_column: Annotated[
            str | None, typer.Option("--caption-column", help="Column of --captions (default: caption).")
        ] = None,
        ref: Annotated[
            str | None,
            typer.Option("--ref", help="Real images: a folder, or a statistics file from --save-ref."),
        ] = None,
        save_ref: Annotated[
            Path | None,
            typer.Option("--save-ref", help="Save the statistics of --ref DIR to this .npz and exit."),
        ] = None,
        images: Annotated[
            Path | None, typer.Option("--images", help="Score this folder of images instead of generating.")
        ] = None,
        metrics: Annotated[
            str | None,
            typer.Option(
                "--metrics", help="fid,kid,clip,pr (default: all four; tiny: accuracy,fd, also accepted)."
            ),
        ] = None,
        watch: Annotated[
            Path | None,
            typer.Option(
                "--watch", help="Evaluate each new checkpoint of this `wadi distill` run until it ends."
            ),
        ] = None,
        poll: Annotated[float, typer.Option("--poll", help="--watch: seconds between looks.")] = 60.0,
        num_processes: Annotated[
            int | None, typer.Option("--num-processes", help="Split the work over N processes (accelerate).")
        ] = None,
        inception_weights: Annotated[
            Path | None,
            typer.Option(
                "--inception-weights", help="clean-fid's inception-2015-12-05.pt (default: its cache)."
            ),
        ] = None,
        clip_weights: Annotated[
            Path | None,
            typer.Option(
                "--clip-weights",
                help="OpenCLIP weights file, or a folder with open_clip_config.json (default: HF cache).",
            ),
        ] = None,
        clip_model: Annotated[
            str | None, typer.Option("--clip-model", help="OpenCLIP architecture (default: the protocol's).")
        ] = None,
        protocol_name: Annotated[
            str,
            typer.Option(
                "--protocol",
                help="Whose evaluation to reproduce: wadi, dmd2 or gigagan (crop, CLIP input and text, "
                "CLIP model, captions, image order, seeding; docs/evaluation-protocols.md).",
            ),
        ] = "wadi",
        dry_run: Annotated[
            bool, typer.Option("--dry-run", help="Show the work and a time estimate here; run nothing.")
        ] = False,
        workers: Annotated[int, typer.Option("--workers", help="Image decoding workers.")] = 0,
        out: OutDir = None,
        json_out: JsonFlag = False,
    ) -> None:
        from wadi_cli.errors import BadInputError

        protocol_flags = (captions, ref, save_ref, images, metrics, watch, inception_weights, clip_weights)
        classifier_only = not dry_run and protocol_name.strip().lower() == "wadi"  # else: the protocol path
        if backbone.strip().lower() == "tiny" and all(f is None for f in protocol_flags) and classifier_only:
            if num_processes is not None:  # the launched processes would each run all of it
                raise BadInputError(
                    "--num-processes splits the protocol metrics (--captions, --ref, --metrics, "
                    "--images, --watch); the tiny classifier's accuracy and fd run in one process"
                )
            _tiny_classifier_eval(
                weights, teacher, steps, cfg, alpha_bar_t, 256 if num_images is None else num_images, seed,
                real_seed, model, 32 if batch_size is None else batch_size, device, classifier, out, json_out,
                base,
            )  # fmt: skip
            return
        if num_processes is not None:
            _launch(num_processes)
            return
        if teacher and weights is not None:
            raise BadInputError("--teacher evaluates the base model: drop --weights (or drop --teacher)")
        if not teacher and (steps is not None or cfg is not None):
            raise BadInputError("--steps and --cfg apply to --teacher only")
        args = dict(locals())
        _protocol_eval(args)


def _tiny_classifier_eval(
    weights: Path | None,
    teacher: bool,
    steps: int | None,
    cfg: float | None,
    alpha_bar_t: float | None,
    num_images: int,
    seed: int,
    real_seed: int | None,
    model: str | None,
    batch_size: int,
    device: str,
    classifier: Path | None,
    out: Path | None,
    json_out: bool,
    base: bool,
) -> None:
    """The tiny classifier's accuracy and fd (no protocol flag given)."""
    from wadi_cli.errors import BadInputError
    from wadi_cli.machine import resolve_device
    from wadi_cli.sample.evaluate import evaluate_tiny
    from wadi_cli.sample.output import check_output_dir, save_samples

    use_backbone_cpu_threads("tiny", device)
    if teacher and weights is not None:
        raise BadInputError("--teacher evaluates the base model: drop --weights (or drop --teacher)")
    if not teacher and (steps is not None or cfg is not None):
        raise BadInputError("--steps and --cfg apply to --teacher only")
    if out is not None:
        check_output_dir(out)
    with weights_for_sampling(weights) as (run_weights, _):
        result, gen = evaluate_tiny(
            weights=run_weights,
            teacher=teacher,
            steps=steps,
            cfg=cfg,
            alpha_bar_T=alpha_bar_t,
            num_images=num_images,
            seed=seed,
            real_seed=real_seed,
            model=model,
            device=resolve_device(device),
            batch_size=batch_size,
            classifier=classifier,
            base=base,
        )
    if out is not None:
        save_samples(out, gen.images, gen.prompts, gen.seeds, result)
        result["out"] = str(out)
    if json_out:
        typer.echo(json.dumps(result, indent=2))
        return
    console.print(
        f"tiny {result['mode']}: accuracy [bold]{result['accuracy']:.3f}[/], "
        f"fd [bold]{result['fd']:.3f}[/] "
        f"({result['num_images']} images, seed {seed}, {result['seconds']:.1f} s)",
        highlight=False,
    )


def _launch(num_processes: int) -> None:
    import sys

    from wadi_cli.distill.launch import run_launched, strip_option

    args = strip_option(sys.argv[sys.argv.index("eval") + 1 :], "--num-processes")
    code = run_launched(num_processes, args, command="eval")
    if code:
        raise typer.Exit(code)


def _str(path: Path | None) -> str | None:
    return None if path is None else str(path)


def _protocol_eval(a: dict[str, Any]) -> None:
    """Generate + score, score --images, --save-ref, or --watch (see HELP)."""
    from wadi_cli.backbones import get_backbone
    from wadi_cli.errors import BadInputError
    from wadi_cli.evaluation import protocol
    from wadi_cli.evaluation.evaluate import evaluate_folder, make_reference
    from wadi_cli.evaluation.parallel import processes
    from wadi_cli.evaluation.report import progress_bars
    from wadi_cli.evaluation.run import EvalOptions
    from wadi_cli.machine import resolve_device

    name = get_backbone(_watched_backbone(a["watch"]) or a["backbone"]).name  # unknown: registry's message
    tiny = name == "tiny" and a["images"] is None
    default = "accuracy,fd" if tiny else ",".join(protocol.PROTOCOL_METRICS)
    options = EvalOptions(
        metrics=protocol.parse_metrics(a["metrics"] or default, tiny=tiny),
        inception_weights=_str(a["inception_weights"]),
        clip_model=a["clip_model"],
        clip_weights=_str(a["clip_weights"]),
        workers=a["workers"],
        protocol=protocol.get_protocol(a["protocol_name"]).name,
    )
    if a["images"] is None and a["save_ref"] is None:  # scoring alone keeps torch's thread count
        use_backbone_cpu_threads(name, a["device"])
    if a["dry_run"]:
        _dry_run(a, name, tiny, options)
        return
    procs = processes(resolve_device(a["device"]))
    bars = progress_bars(err_console, enabled=procs.is_main)
    if a["save_ref"] is not None:
        if a["ref"] is None:
            raise BadInputError("--save-ref FILE needs --ref DIR (the folder of real images)")
        summary = make_reference(a["ref"], a["save_ref"], options, procs, bars)
        if summary is not None:
            _print(summary, a["json_out"], f"saved {summary['num_images']} reference images' statistics")
        return
    texts = _captions(a, tiny)
    if a["images"] is not None:
        result = evaluate_folder(
            a["images"], options, procs, captions=texts, num_images=a["num_images"], ref=a["ref"],
            out=a["out"], progress=bars,
        )  # fmt: skip
    elif a["watch"] is not None:
        _watch(a, name, texts, options, procs, bars)
        return
    else:
        result = _evaluate_model(a, name, texts, options, procs, bars)
    if result is not None:
        _show(result, a["json_out"])


def _dry_run(a: dict[str, Any], name: str, tiny: bool, options: Any) -> None:
    """--dry-run: the plan and the time estimate (wadi_cli.evaluation.estimate)."""
    from wadi_cli.evaluation.estimate import describe, estimate, to_json
    from wadi_cli.evaluation.folders import list_images
    from wadi_cli.machine import resolve_device

    metrics = options.metrics
    if a["save_ref"] is not None:
        generate, score, metrics = 0, 0, ("fid", "kid", "pr")
    elif a["images"] is not None:
        score = len(list_images(a["images"], "--images", options.rules.image_order))
        generate, score = 0, min(score, a["num_images"] or score)
    else:
        generate = score = len(_captions(a, tiny) or [])
    plan = estimate(generate=generate, score=score, ref=a["ref"], metrics=metrics, backbone=name,
                    device=resolve_device(a["device"]), protocol_name=options.protocol)  # fmt: skip
    typer.echo(to_json(plan) if a["json_out"] else describe(plan))


def _watched_backbone(run: Path | None) -> str | None:
    """The backbone of a ``--watch`` run (from its config.json), checked to be a run."""
    if run is None:
        return None
    from wadi_cli.evaluation.watch import check_run

    with contextlib.suppress(OSError, ValueError, AttributeError):
        return json.loads((check_run(run) / "config.json").read_text()).get("backbone")
    return None


def _captions(a: dict[str, Any], tiny: bool) -> list[str] | None:
    """--captions (first -n), or for tiny the prompts drawn with --seed."""
    from wadi_cli.errors import BadInputError
    from wadi_cli.evaluation import protocol
    from wadi_cli.evaluation.captions import read_captions, select_captions

    if a["captions"] is not None:
        style = protocol.get_protocol(a["protocol_name"]).captions
        return select_captions(
            read_captions(a["captions"], a["caption_column"], style), a["num_images"], str(a["captions"])
        )
    if a["images"] is not None:
        return None
    if not tiny:
        raise BadInputError("--captions FILE is required: one image is generated per caption")
    from wadi_cli.tiny.data import prompt_for, sample_attributes

    return [
        prompt_for(x)
        for x in sample_attributes(256 if a["num_images"] is None else a["num_images"], a["seed"])
    ]


def _request(a: dict[str, Any], name: str, texts: list[str], weights: str | None, out: Path) -> Any:
    from wadi_cli.evaluation.evaluate import ModelRequest

    return ModelRequest(
        backbone=name, out=out, captions=texts, weights=weights, model=a["model"], teacher=a["teacher"],
        steps=a["steps"], cfg=a["cfg"], alpha_bar_T=a["alpha_bar_t"], seed=a["seed"],
        batch_size=a["batch_size"] or (32 if name == "tiny" else 8), dtype=a["dtype"],
        real_seed=a["real_seed"], classifier=_str(a["classifier"]), base=a["base"],
    )  # fmt: skip


def _evaluate_model(
    a: dict[str, Any], name: str, texts: list[str], options: Any, procs: Any, bars: Any
) -> Any:
    import dataclasses

    from wadi_cli.errors import BadInputError
    from wadi_cli.evaluation.evaluate import evaluate_model

    if a["out"] is None:
        raise BadInputError("--out EVAL is required: the generated images and manifest.json go there")
    with weights_for_sampling(_str(a["weights"])) as (run_weights, label):
        request = dataclasses.replace(_request(a, name, texts, run_weights, a["out"]), weights_label=label)
        return evaluate_model(request, options, procs, ref=a["ref"], progress=bars)


def _watch(a: dict[str, Any], name: str, texts: list[str], options: Any, procs: Any, bars: Any) -> None:
    from wadi_cli.evaluation.evaluate import evaluate_model
    from wadi_cli.evaluation.run import Scorer
    from wadi_cli.evaluation.watch import check_run, watch, watch_request

    run = check_run(a["watch"])
    template = _request(a, name, texts, None, run)
    scorer = Scorer.load(options, procs, bars)

    def one(weights: tuple[str, str], out: Path, config: dict[str, Any]) -> Any:
        request = watch_request(template, weights, out, config)
        return evaluate_model(request, options, procs, ref=a["ref"], scorer=scorer, progress=bars)

    def row(r: dict[str, Any]) -> None:
        shown = ", ".join(f"{k} {v:.4g}" for k, v in r.items() if k != "step")
        console.print(f"step {r['step']}: {shown}", highlight=False)

    rows = watch(run, one, procs, poll_s=a["poll"], on_row=row)
    if procs.is_main:
        console.print(f"{run}: finished; {len(rows)} checkpoint(s) evaluated into {run / 'eval.csv'}")


def _print(summary: dict[str, Any], as_json: bool, text: str) -> None:
    if as_json:
        typer.echo(json.dumps(summary, indent=2, default=str))
    else:
        console.print(f"{text} to [bold]{summary['saved']}[/]", highlight=False)


def _show(result: dict[str, Any], as_json: bool) -> None:
    from wadi_cli.evaluation.report import results_table

    for warning in result.get("warnings", []):
        err_console.print(f"[yellow]warning:[/] {warning}", highlight=False)
    if as_json:
        typer.echo(json.dumps(result, indent=2, default=str))
        return
    console.print(results_table(result))
    if result.get("out"):
        console.print(f"metrics.json and images in [bold]{result['out']}[/]", highlight=False)
