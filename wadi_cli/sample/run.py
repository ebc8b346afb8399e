"""The whole ``wadi sample`` run as one library call: validate everything cheap first
(backbone, prompts, output folder, flags), then load, generate and write atomically."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from wadi_cli.diffusion.tokens import read_embedding_files, use_embeddings
from wadi_cli.errors import BadInputError
from wadi_cli.io.paths import input_path_problem
from wadi_cli.io.prompts import read_prompt_file
from wadi_cli.machine import resolve_device
from wadi_cli.pipeline import (
    Generation,
    LoadedPipeline,
    SampleConfig,
    generate,
    get_backbone_spec,
    load_pipeline,
    resolve_dtype,
)
from wadi_cli.pipeline.control import add_controlnet
from wadi_cli.pipeline.defaults import STRENGTH
from wadi_cli.pipeline.images import image_files, paired_images
from wadi_cli.pipeline.options import SamplingOptions
from wadi_cli.sample.output import check_output_dir, save_samples


def read_prompts(
    prompts: Sequence[str] = (), prompts_file: str | os.PathLike[str] | None = None
) -> list[str]:
    """Prompts from the command line followed by those of ``prompts_file`` (``.txt``: one
    per line, ``#`` comment lines and blank lines skipped; also ``.jsonl``/``.csv``/
    ``.parquet`` with a ``prompt`` column, see :func:`wadi_cli.io.prompts.read_prompt_file`). Raises
    :class:`BadInputError` when the result is empty."""
    out = [str(p) for p in prompts]
    if prompts_file is not None:
        out.extend(read_prompt_file(prompts_file))
    if not out:
        where = f" ({prompts_file} holds none)" if prompts_file is not None else ""
        raise BadInputError(
            f"no prompts given{where}: pass PROMPT arguments, or a prompt file (one per line) "
            "with --prompts FILE"
        )
    return out


def sample_to_folder(
    out: str | os.PathLike[str],
    prompts: Sequence[str] = (),
    *,
    prompts_file: str | os.PathLike[str] | None = None,
    options: SamplingOptions | None = None,
    grid_cols: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    on_loaded: Callable[[LoadedPipeline], None] | None = None,
    embeddings: Sequence[str | os.PathLike[str]] = (),
) -> dict[str, Any]:
    """Generate ``options.num_images`` images per prompt (default 1) and write them to
    ``out`` (numbered PNGs, ``grid.png``, ``samples.json``). Returns a JSON-ready summary.
    Without ``options.weights`` the student is the backbone's default
    (:func:`~wadi_cli.pipeline.loading.default_weights`); ``options.base`` samples the
    undistilled base in one step instead.

    ``embeddings``: textual-inversion files whose tokens the prompts may use (read and checked
    before the model loads; a token the tokenizer knows or a vector of another width is
    refused once it has loaded, before anything is written).

    Bad input (unknown backbone, no prompts, unwritable ``out``, weights that do not fit)
    raises a :class:`~wadi_cli.errors.BadInputError` subclass before anything is written.
    """

    options = options or SamplingOptions()
    spec = get_backbone_spec(options.backbone)
    all_prompts = read_prompts(prompts, prompts_file)
    out_path = check_output_dir(out)
    problem = input_path_problem(Path(options.weights).expanduser()) if options.weights is not None else None
    if problem:
        raise BadInputError(f"--weights {options.weights}: {problem}")
    init_files, control_files = input_images(options, spec.family, len(all_prompts))
    tokens = read_embedding_files(embeddings, spec.name)
    dev = resolve_device(options.device)
    torch_dtype = resolve_dtype(options.dtype, dev, spec.family)
    pipe = load_pipeline(
        spec,
        model=options.model,
        weights=options.weights,
        teacher=options.teacher,
        device=dev,
        dtype=torch_dtype,
        compile=options.compile,
        components=options.components,
        base=options.base,
        alpha_bar_T=options.alpha_bar_T,
    )
    pipe = add_controlnet(pipe, options.controlnet, options.control_scale, torch_dtype)
    use_embeddings(pipe.prompt_encoder, tokens)
    if on_loaded is not None:
        on_loaded(pipe)
    config = options.sample_config()
    _, lat_h, lat_w = pipe.latent_shape_for(config.height, config.width)  # a bad size fails here
    height, width = lat_h * pipe.vae_scale, lat_w * pipe.vae_scale
    init = paired_images(init_files, height, width, "--init-image") if init_files else None
    control = paired_images(control_files, height, width, "--control-image") if control_files else None
    n = options.num_images or 1
    gen = generate(pipe, all_prompts, config, n, progress=progress, init_images=init, control_images=control)
    summary = run_summary(pipe, gen, (height, width), dev, torch_dtype)
    summary.update(downstream_record(gen.config, pipe, init_files is not None))
    if embeddings:
        summary["embeddings"] = {token: str(path) for token, path in zip(tokens, embeddings, strict=True)}
    if control_files:
        summary.update(controlnet=options.controlnet, control_scale=pipe.denoiser.scale)
    named = {"init_image": init_files, "control_image": control_files}
    per_image = [
        {key: str(files[k]) for key, files in named.items() if files}
        for k in range(len(all_prompts))
        for _ in range(n)
    ]
    save_samples(out_path, gen.images, gen.prompts, gen.seeds, summary, grid_cols, per_image)
    summary["out"] = str(out_path)
    return summary


def run_summary(
    pipe: LoadedPipeline, gen: Generation, size: tuple[int, int], dev: Any, dtype: Any
) -> dict[str, Any]:
    """The settings samples.json records of a run (``size``: the first stage's pixels)."""
    height, width = size
    resolved = gen.config
    return {
        "backbone": pipe.backbone.name,
        "mode": "teacher" if resolved.teacher else "one-step",
        "model": pipe.model_source,
        "model_file": pipe.model_file,
        "weights": pipe.weights,
        "weights_kind": pipe.weights_kind,
        "device": str(dev),
        "dtype": str(dtype).replace("torch.", ""),
        "num_images": len(gen.prompts),
        "steps": resolved.steps if resolved.teacher else 1,
        "cfg": resolved.cfg if resolved.teacher else None,
        "alpha_bar_T": None if resolved.teacher else resolved.alpha_bar_T,
        "alpha_bar_T_recorded": pipe.weights_alpha_bar_T,
        "resolution": pipe.resolution,
        "height": height * (resolved.upscale or 1),
        "width": width * (resolved.upscale or 1),
        "prediction_type": pipe.denoiser.prediction_type,
        "seed": resolved.seed,
        "batch_size": resolved.batch_size,
        "seconds": round(gen.seconds, 3),
        "notes": pipe.notes,
        "warnings": pipe.warnings,
    }


def input_images(
    options: SamplingOptions, family: str, count: int
) -> tuple[list[Path] | None, list[Path] | None]:
    """The ``--init-image`` and ``--control-image`` file of each of ``count`` prompts, checked
    before any model loads (and ``--controlnet`` refused for a DiT backbone)."""
    if options.controlnet is not None and family != "unet":
        raise BadInputError(
            f"--controlnet: not supported for {options.backbone} (a DiT); use sd15, sd21 or tiny"
        )
    init = image_files(options.init_image, count, "--init-image") if options.init_image else None
    control = image_files(options.control_image, count, "--control-image") if options.control_image else None
    return init, control


def downstream_record(config: SampleConfig, pipe: LoadedPipeline, init: bool) -> dict[str, Any]:
    """What samples.json records of image-to-image (strength, the timestep it starts at) and
    of the two-stage high-resolution run (factor, refining strength and timestep)."""
    from wadi_cli.diffusion import last_timestep
    from wadi_cli.pipeline.img2img import strength_timestep, teacher_start
    from wadi_cli.pipeline.teacher import teacher_scheduler

    def start(strength: float) -> int:
        if not config.teacher:
            return strength_timestep(strength, last_timestep(pipe.scheduler) + 1)
        scheduler = teacher_scheduler(pipe)
        scheduler.set_timesteps(int(config.steps))  # type: ignore[attr-defined, arg-type]
        return int(scheduler.timesteps[teacher_start(int(config.steps), strength)])  # type: ignore[attr-defined, arg-type]

    out: dict[str, Any] = {}
    if init:
        strength = config.strength or STRENGTH
        out.update(strength=strength, start_timestep=start(strength))
    if config.upscale:
        strength = float(config.refine_strength)  # type: ignore[arg-type]
        out.update(upscale=config.upscale, upscale_in="pixels (bicubic)", refine_strength=strength)
        out["refine_start_timestep"] = start(strength)
    return out
