"""``wadi eval``: the COCO zero-shot protocol (FID, KID, CLIP score, precision/recall) for
any backbone, and the tiny model's attribute accuracy and Fréchet distance."""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from wadi_cli.cli.common import (
    JsonFlag,
    OutDir,
    console,
    err_console,
    handle_errors,
    use_backbone_cpu_threads,
    weights_for_sampling,
)
from wadi_cli.cli.sampling_flags import option_group, sampling_flags

if TYPE_CHECKING:  # the CLI imports the library inside command bodies (start-up time)
    from wadi_cli.pipeline.options import SamplingOptions

#: Tiny prompts drawn when no --captions and no -n are given.
TINY_NUM_IMAGES = 256

HELP = """Score generated images.

The protocol of the paper's Table 1 (sd15, sd21, pixart; tiny too): one image
per caption of --captions (seed = --seed + index) into --out EVAL (PNG +
manifest.json, resumable), then FID / KID (clean-fid, clean mode), CLIP score
(OpenCLIP ViT-g-14, "A photo depicts " + caption, 0-1) and precision / recall
(torch-fidelity, k = 3) against --ref (real images or a --save-ref file).
Every image is first center-cropped on its long edge and resized to 256 px
with PIL LANCZOS. sdxl uses --protocol dmd2-sdxl unless told otherwise: 1024-px
images scored as 256-px squares against DMD2's COCO-10k (--captions, -n 10000,
--ref; docs/sdxl.md). Needs: pip install "wadi-cli[eval]".

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

  wadi eval --protocol dmd2 -b sd15 -w RUN --captions captions_coco14_test.txt \
    --ref val2014/ --out eval/dmd2 --dry-run

  wadi eval -b sdxl -w RUN --captions coco10k_captions.txt -n 10000 --ref coco10k/ --out eval/sdxl

  wadi eval --images other_method/ --captions coco2014_30k.csv --ref coco2014_256.npz

  wadi eval --watch runs/sd15 -n 5000 --captions coco2014_30k.csv --ref coco2014_256.npz

  wadi eval -b tiny -n 500 --seed 0

  wadi eval -b tiny --base -n 500 --seed 0

  wadi eval --backbone tiny --weights student.safetensors -n 256 --seed 0

  wadi eval --backbone tiny --teacher --steps 25 -n 256 --seed 0 --json

  wadi eval -b tiny -w runs/tiny -n 1000 --metrics accuracy,fd,fid,kid,pr --out eval/tiny

The downstream flags of `wadi sample` (--controlnet/--control-image/
--control-scale, --init-image/--strength, --height/--width) make the images
scored; a folder of control or init images pairs with the prompts (tiny: the
drawn ones) in sorted order. Tiny with a control adds control_iou: the IoU
of the shape segmented from each image (no model: colour far from the
border's) against the control's white pixels, with its 95 % interval:

  wadi eval -b tiny -n 4 --controlnet tiny --control-image masks/ --json

  wadi eval -b sd15 -w RUN --captions prompts.txt --controlnet
  lllyasviel/control_v11p_sd15_canny --control-image edges/ --ref real/ --out eval/cn
"""


@dataclass(frozen=True, kw_only=True)
class EvalFlags:
    """``wadi eval``'s own options (its sampling options are
    :class:`~wadi_cli.pipeline.options.SamplingOptions`): the tiny classifier's, and the
    protocol's (captions, reference, metrics, extractor weights, parallelism, output)."""

    real_seed: Annotated[
        int | None,
        typer.Option("--real-seed", help="Seed of the tiny real reference images (default: --seed)."),
    ] = None
    classifier: Annotated[
        Path | None,
        typer.Option("--classifier", help="Tiny classifier weights (default: the shipped one)."),
    ] = None
    captions: Annotated[
        Path | None,
        typer.Option("--captions", help="Captions: .txt, .jsonl/.csv/.parquet ('caption'), COCO .json."),
    ] = None
    caption_column: Annotated[
        str | None, typer.Option("--caption-column", help="Column of --captions (default: caption).")
    ] = None
    ref: Annotated[
        str | None,
        typer.Option("--ref", help="Real images: a folder, or a statistics file from --save-ref."),
    ] = None
    save_ref: Annotated[
        Path | None,
        typer.Option("--save-ref", help="Save the statistics of --ref DIR to this .npz and exit."),
    ] = None
    images: Annotated[
        Path | None, typer.Option("--images", help="Score this folder of images instead of generating.")
    ] = None
    metrics: Annotated[
        str | None,
        typer.Option(
            "--metrics", help="fid,kid,clip,pr (default: all four; tiny: accuracy,fd, also accepted)."
        ),
    ] = None
    watch: Annotated[
        Path | None,
        typer.Option(
            "--watch", help="Evaluate each new checkpoint of this `wadi distill` run until it ends."
        ),
    ] = None
    poll: Annotated[float, typer.Option("--poll", help="--watch: seconds between looks.")] = 60.0
    num_processes: Annotated[
        int | None, typer.Option("--num-processes", help="Split the work over N processes (accelerate).")
    ] = None
    inception_weights: Annotated[
        Path | None,
        typer.Option("--inception-weights", help="clean-fid's inception-2015-12-05.pt (default: its cache)."),
    ] = None
    clip_weights: Annotated[
        Path | None,
        typer.Option(
            "--clip-weights",
            help="OpenCLIP weights file, or a folder with open_clip_config.json (default: HF cache).",
        ),
    ] = None
    clip_model: Annotated[
        str | None, typer.Option("--clip-model", help="OpenCLIP architecture (default: the protocol's).")
    ] = None
    protocol_name: Annotated[
        str | None,
        typer.Option(
            "--protocol",
            help="Whose evaluation to reproduce: wadi, dmd2, dmd2-sdxl or gigagan (crop, CLIP input and "
            "text, CLIP model, captions, image order, seeding; docs/evaluation-protocols.md). "
            "Default: dmd2-sdxl for -b sdxl (1024 px scored at 256, COCO-10k), else wadi.",
        ),
    ] = None
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Show the work and a time estimate here; run nothing.")
    ] = False
    workers: Annotated[int, typer.Option("--workers", help="Image decoding workers.")] = 0
    out: OutDir = None
    json_out: JsonFlag = False

    @property
    def protocol_flags_given(self) -> bool:
        """Whether any flag of the protocol (beyond the tiny classifier) was given."""
        given = (self.captions, self.ref, self.save_ref, self.images, self.metrics, self.watch)
        return any(f is not None for f in (*given, self.inception_weights, self.clip_weights))


def register(app: typer.Typer) -> None:
    @app.command("eval", help=HELP)
    @handle_errors
    @option_group(EvalFlags, "flags")
    @sampling_flags("eval")
    def eval_(*, sampling: SamplingOptions, flags: EvalFlags) -> None:
        from wadi_cli.errors import BadInputError

        classifier_only = not flags.dry_run and (flags.protocol_name or "wadi").strip().lower() == "wadi"
        if sampling.backbone.strip().lower() == "tiny" and not flags.protocol_flags_given and classifier_only:
            if flags.num_processes is not None:  # the launched processes would each run all of it
                raise BadInputError(
                    "--num-processes splits the protocol metrics (--captions, --ref, --metrics, "
                    "--images, --watch); the tiny classifier's accuracy and fd run in one process"
                )
            _tiny_classifier_eval(sampling, flags)
            return
        if flags.num_processes is not None:
            _launch(flags.num_processes)
            return
        _protocol_eval(sampling, flags)


def _tiny_classifier_eval(sampling: SamplingOptions, flags: EvalFlags) -> None:
    """The tiny classifier's accuracy and fd (no protocol flag given)."""
    from wadi_cli.evaluation.tiny import evaluate_tiny
    from wadi_cli.machine import resolve_device
    from wadi_cli.sample.output import check_output_dir, save_samples

    use_backbone_cpu_threads("tiny", sampling.device)
    if flags.out is not None:
        check_output_dir(flags.out)
    num_images = TINY_NUM_IMAGES if sampling.num_images is None else sampling.num_images
    inputs = _tiny_inputs(sampling, num_images)
    with weights_for_sampling(sampling.weights, sampling.teacher) as (run_weights, _):
        result, gen = evaluate_tiny(
            weights=run_weights,
            teacher=sampling.teacher,
            steps=sampling.steps,
            cfg=sampling.cfg,
            alpha_bar_T=sampling.alpha_bar_T,
            num_images=num_images,
            seed=sampling.seed,
            real_seed=flags.real_seed,
            model=sampling.model,
            device=resolve_device(sampling.device),
            batch_size=_batch_size(sampling, "tiny"),
            classifier=flags.classifier,
            base=sampling.base,
            inputs=inputs,
        )
    if flags.out is not None:
        save_samples(flags.out, gen.images, gen.prompts, gen.seeds, result)
        result["out"] = str(flags.out)
    if flags.json_out:
        typer.echo(json.dumps(result, indent=2))
        return
    iou = (
        f"control IoU [bold]{result['control_iou']:.3f}[/] ± {result['control_iou_ci95']:.3f}, "
        if "control_iou" in result
        else ""
    )
    console.print(
        f"tiny {result['mode']}: accuracy [bold]{result['accuracy']:.3f}[/], "
        f"fd [bold]{result['fd']:.3f}[/], {iou}"
        f"({result['num_images']} images, seed {sampling.seed}, {result['seconds']:.1f} s)",
        highlight=False,
    )


def _tiny_inputs(sampling: SamplingOptions, count: int) -> Any:
    """The init and control images of ``count`` tiny prompts (checked before any model
    loads), at the classifier's 32 px."""
    from wadi_cli.errors import BadInputError
    from wadi_cli.evaluation.tiny import DownstreamInputs
    from wadi_cli.pipeline.images import paired_images
    from wadi_cli.sample.run import input_images
    from wadi_cli.tiny.data import IMAGE_SIZE

    for name, value in (("--height", sampling.height), ("--width", sampling.width)):
        if value is not None and value != IMAGE_SIZE:
            raise BadInputError(
                f"{name} {value}: the tiny classifier scores {IMAGE_SIZE}-px images; drop {name} "
                "(or score another size with --metrics fid,kid --out EVAL)"
            )
    init, control = input_images(sampling, "unet", count)
    fit = IMAGE_SIZE, IMAGE_SIZE
    return DownstreamInputs(
        init_images=paired_images(init, *fit, "--init-image") if init else None,
        strength=sampling.strength,
        controlnet=sampling.controlnet,
        control_scale=sampling.control_scale,
        control_images=paired_images(control, *fit, "--control-image") if control else None,
        files={k: str(v) for k, v in (("init_image", sampling.init_image),
                                      ("control_image", sampling.control_image)) if v is not None},
    )  # fmt: skip


def _batch_size(sampling: SamplingOptions, backbone: str) -> int:
    """--batch-size, else 32 for tiny and 8 for the others."""
    if sampling.batch_size is not None:
        return sampling.batch_size
    return 32 if backbone == "tiny" else 8


def _launch(num_processes: int) -> None:
    import sys

    from wadi_cli.distill.launch import run_launched, strip_option

    args = strip_option(sys.argv[sys.argv.index("eval") + 1 :], "--num-processes")
    code = run_launched(num_processes, args, command="eval")
    if code:
        raise typer.Exit(code)


def _str(path: Path | None) -> str | None:
    return None if path is None else str(path)


def _protocol_eval(sampling: SamplingOptions, flags: EvalFlags) -> None:
    """Generate + score, score --images, --save-ref, or --watch (see HELP)."""
    import dataclasses

    from wadi_cli.backbones import get_backbone
    from wadi_cli.errors import BadInputError
    from wadi_cli.evaluation import protocol
    from wadi_cli.evaluation.evaluate import evaluate_folder, make_reference
    from wadi_cli.evaluation.parallel import processes
    from wadi_cli.evaluation.report import progress_bars
    from wadi_cli.evaluation.run import EvalOptions
    from wadi_cli.machine import resolve_device

    name = get_backbone(
        _watched_backbone(flags.watch) or sampling.backbone
    ).name  # unknown: registry's message
    flags = dataclasses.replace(flags, protocol_name=protocol.protocol_name_for(flags.protocol_name, name))
    tiny = name == "tiny" and flags.images is None
    default = "accuracy,fd" if tiny else ",".join(protocol.PROTOCOL_METRICS)
    options = EvalOptions(
        metrics=protocol.parse_metrics(flags.metrics or default, tiny=tiny),
        inception_weights=_str(flags.inception_weights),
        clip_model=flags.clip_model,
        clip_weights=_str(flags.clip_weights),
        workers=flags.workers,
        protocol=protocol.get_protocol(flags.protocol_name).name,
    )
    if flags.images is None and flags.save_ref is None:  # scoring alone keeps torch's thread count
        use_backbone_cpu_threads(name, sampling.device)
    if flags.dry_run:
        _dry_run(sampling, flags, name, tiny, options)
        return
    procs = processes(resolve_device(sampling.device))
    bars = progress_bars(err_console, enabled=procs.is_main)
    given = _downstream_flag(sampling)
    if given and (flags.images is not None or flags.save_ref is not None):
        raise BadInputError(f"{given} applies to generated images, not to --images or --save-ref")
    if flags.save_ref is not None:
        if flags.ref is None:
            raise BadInputError("--save-ref FILE needs --ref DIR (the folder of real images)")
        summary = make_reference(flags.ref, flags.save_ref, options, procs, bars)
        if summary is not None:
            _print(summary, flags.json_out, f"saved {summary['num_images']} reference images' statistics")
        return
    texts = _captions(sampling, flags, tiny)
    if flags.images is not None:
        result = evaluate_folder(
            flags.images, options, procs, captions=texts, num_images=sampling.num_images, ref=flags.ref,
            out=flags.out, progress=bars,
        )  # fmt: skip
    elif flags.watch is not None:
        _watch(sampling, flags, name, texts, options, procs, bars)
        return
    else:
        result = _evaluate_model(sampling, flags, name, texts, options, procs, bars)
    if result is not None:
        _show(result, flags.json_out)


def _dry_run(sampling: SamplingOptions, flags: EvalFlags, name: str, tiny: bool, options: Any) -> None:
    """--dry-run: the plan and the time estimate (wadi_cli.evaluation.estimate)."""
    from wadi_cli.evaluation.estimate import describe, estimate, to_json
    from wadi_cli.evaluation.folders import list_images
    from wadi_cli.machine import resolve_device

    metrics = options.metrics
    if flags.save_ref is not None:
        generate, score, metrics = 0, 0, ("fid", "kid", "pr")
    elif flags.images is not None:
        score = len(list_images(flags.images, "--images", options.rules.image_order))
        generate, score = 0, min(score, sampling.num_images or score)
    else:
        generate = score = len(_captions(sampling, flags, tiny) or [])
    plan = estimate(generate=generate, score=score, ref=flags.ref, metrics=metrics, backbone=name,
                    device=resolve_device(sampling.device), protocol_name=options.protocol)  # fmt: skip
    typer.echo(to_json(plan) if flags.json_out else describe(plan))


def _watched_backbone(run: Path | None) -> str | None:
    """The backbone of a ``--watch`` run (from its config.json), checked to be a run."""
    if run is None:
        return None
    from wadi_cli.evaluation.watch import check_run

    with contextlib.suppress(OSError, ValueError, AttributeError):
        return json.loads((check_run(run) / "config.json").read_text()).get("backbone")
    return None


def _captions(sampling: SamplingOptions, flags: EvalFlags, tiny: bool) -> list[str] | None:
    """--captions (first -n), or for tiny the prompts drawn with --seed."""
    from wadi_cli.errors import BadInputError
    from wadi_cli.evaluation import protocol
    from wadi_cli.evaluation.captions import read_captions, select_captions

    if flags.captions is not None:
        style = protocol.get_protocol(flags.protocol_name).captions
        return select_captions(
            read_captions(flags.captions, flags.caption_column, style),
            sampling.num_images,
            str(flags.captions),
        )
    if flags.images is not None:
        return None
    if not tiny:
        raise BadInputError("--captions FILE is required: one image is generated per caption")
    from wadi_cli.tiny.data import prompt_for, sample_attributes

    n = TINY_NUM_IMAGES if sampling.num_images is None else sampling.num_images
    return [prompt_for(x) for x in sample_attributes(n, sampling.seed)]


def _downstream_flag(sampling: SamplingOptions) -> str | None:
    """The first downstream flag given (--init-image, --controlnet, --height, --width)."""
    given = {"--init-image": sampling.init_image, "--controlnet": sampling.controlnet,
             "--height": sampling.height, "--width": sampling.width}  # fmt: skip
    return next((flag for flag, value in given.items() if value is not None), None)


def _request(
    sampling: SamplingOptions, flags: EvalFlags, name: str, texts: list[str], weights: str | None, out: Path
) -> Any:
    from wadi_cli.backbones import get_backbone
    from wadi_cli.evaluation.evaluate import ModelRequest
    from wadi_cli.sample.run import input_images

    init, control = input_images(sampling, get_backbone(name).family, len(texts))
    return ModelRequest(
        backbone=name, out=out, captions=texts, weights=weights, model=sampling.model,
        teacher=sampling.teacher, steps=sampling.steps, cfg=sampling.cfg, alpha_bar_T=sampling.alpha_bar_T,
        seed=sampling.seed,
        batch_size=_batch_size(sampling, name), dtype=sampling.dtype, real_seed=flags.real_seed,
        classifier=_str(flags.classifier), base=sampling.base,
        init_files=init, strength=sampling.strength, controlnet=sampling.controlnet,
        control_scale=sampling.control_scale, control_files=control, height=sampling.height,
        width=sampling.width,
    )  # fmt: skip


def _evaluate_model(
    sampling: SamplingOptions,
    flags: EvalFlags,
    name: str,
    texts: list[str],
    options: Any,
    procs: Any,
    bars: Any,
) -> Any:
    import dataclasses

    from wadi_cli.errors import BadInputError
    from wadi_cli.evaluation.evaluate import evaluate_model

    if flags.out is None:
        raise BadInputError("--out EVAL is required: the generated images and manifest.json go there")
    with weights_for_sampling(sampling.weights, sampling.teacher) as (run_weights, label):
        request = dataclasses.replace(
            _request(sampling, flags, name, texts, run_weights, flags.out), weights_label=label
        )
        return evaluate_model(request, options, procs, ref=flags.ref, progress=bars)


def _watch(
    sampling: SamplingOptions,
    flags: EvalFlags,
    name: str,
    texts: list[str],
    options: Any,
    procs: Any,
    bars: Any,
) -> None:
    from wadi_cli.evaluation.evaluate import evaluate_model
    from wadi_cli.evaluation.run import Scorer
    from wadi_cli.evaluation.watch import check_run, watch, watch_request

    run = check_run(flags.watch)
    template = _request(sampling, flags, name, texts, None, run)
    scorer = Scorer.load(options, procs, bars)

    def one(weights: tuple[str, str], out: Path, config: dict[str, Any]) -> Any:
        request = watch_request(template, weights, out, config)
        return evaluate_model(request, options, procs, ref=flags.ref, scorer=scorer, progress=bars)

    def row(r: dict[str, Any]) -> None:
        shown = ", ".join(f"{k} {v:.4g}" for k, v in r.items() if k != "step")
        console.print(f"step {r['step']}: {shown}", highlight=False)

    rows = watch(run, one, procs, poll_s=flags.poll, on_row=row)
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
