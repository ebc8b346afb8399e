"""The whole ``wadi sample`` run as one library call: validate everything cheap first
(backbone, prompts, output folder, flags), then load, generate and write atomically."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from wadi_cli.errors import BadInputError
from wadi_cli.io.paths import input_path_problem
from wadi_cli.machine import resolve_device
from wadi_cli.sample.config import SampleConfig, alpha_bar_T_warning, read_prompts, resolve_dtype
from wadi_cli.sample.generate import generate
from wadi_cli.sample.loading import get_backbone_spec, load_pipeline
from wadi_cli.sample.output import check_output_dir, save_samples


def sample_to_folder(
    out: str | os.PathLike[str],
    prompts: Sequence[str] = (),
    *,
    prompts_file: str | os.PathLike[str] | None = None,
    backbone: str = "sd21",
    model: str | os.PathLike[str] | None = None,
    components: str | os.PathLike[str] | None = None,
    weights: str | os.PathLike[str] | None = None,
    config: SampleConfig | None = None,
    num_images: int = 1,
    device: str | None = None,
    dtype: str | None = None,
    compile: bool = False,
    grid_cols: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    on_loaded: Callable[[Any], None] | None = None,
    base: bool = False,
) -> dict[str, Any]:
    """Generate ``num_images`` images per prompt and write them to ``out`` (numbered PNGs,
    ``grid.png``, ``samples.json``). Returns a JSON-ready summary. Without ``weights`` the
    student is the backbone's default (:func:`~wadi_cli.sample.loading.default_weights`);
    ``base=True`` samples the undistilled base in one step instead.

    Bad input (unknown backbone, no prompts, unwritable ``out``, weights that do not fit)
    raises a :class:`~wadi_cli.errors.BadInputError` subclass before anything is written.
    """

    config = config or SampleConfig()
    spec = get_backbone_spec(backbone)
    all_prompts = read_prompts(prompts, prompts_file)
    if num_images < 1:
        raise BadInputError(f"--num-images must be at least 1, got {num_images}")
    out_path = check_output_dir(out)
    if weights is not None and input_path_problem(Path(weights).expanduser()):
        raise BadInputError(f"--weights {weights}: {input_path_problem(Path(weights).expanduser())}")
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev, spec.family)
    pipe = load_pipeline(
        spec,
        model=model,
        weights=weights,
        teacher=config.teacher,
        device=dev,
        dtype=torch_dtype,
        compile=compile,
        components=components,
        base=base,
    )
    if not config.teacher:
        warning = alpha_bar_T_warning(config.alpha_bar_T, pipe.weights_alpha_bar_T)
        if warning:
            pipe.warnings.append(warning)
    if on_loaded is not None:
        on_loaded(pipe)
    gen = generate(pipe, all_prompts, config, num_images, progress=progress)
    resolved = gen.config
    summary: dict[str, Any] = {
        "backbone": spec.name,
        "mode": "teacher" if resolved.teacher else "one-step",
        "model": pipe.model_source,
        "weights": pipe.weights,
        "weights_kind": pipe.weights_kind,
        "device": str(dev),
        "dtype": str(torch_dtype).replace("torch.", ""),
        "num_images": len(gen.prompts),
        "steps": resolved.steps if resolved.teacher else 1,
        "cfg": resolved.cfg if resolved.teacher else None,
        "alpha_bar_T": None if resolved.teacher else resolved.alpha_bar_T,
        "alpha_bar_T_recorded": pipe.weights_alpha_bar_T,
        "resolution": pipe.resolution,
        "prediction_type": pipe.denoiser.prediction_type,
        "seed": resolved.seed,
        "batch_size": resolved.batch_size,
        "seconds": round(gen.seconds, 3),
        "notes": pipe.notes,
        "warnings": pipe.warnings,
    }
    save_samples(out_path, gen.images, gen.prompts, gen.seeds, summary, grid_cols)
    summary["out"] = str(out_path)
    return summary
