"""A DreamBooth fine-tune on the tiny model (wadi_cli.finetune.run / trainer): it trains,
resumes bit-exactly, generates and caches its class images once, and takes images of any
mode and size."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from wadi_cli.finetune import finetune, finetune_config_for_run, resolve_finetune_config
from wadi_cli.tiny.data import render_batch

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT = "a blue sks triangle at the bottom right"
CLASS_PROMPT = "a blue triangle at the bottom right"
SMALL = {
    "batch_size": 1,
    "tensorboard": False,
    "checkpoint_every": 1,
    "device": "cpu",
    "validate_every": 0,
    "keep_last": 5,
}


def instance_folder(folder: Path) -> Path:
    """Four renders of the tiny renderer's blue triangle, one of them as a grey 40x48 JPEG
    (another mode and size: converted and centre-cropped, not refused)."""
    folder.mkdir(parents=True, exist_ok=True)
    images = render_batch([{"shape": "triangle", "color": "blue", "position": "bottom right"}] * 4, 7)
    for i, image in enumerate(images[:3]):
        Image.fromarray(image).save(folder / f"{i}.png")
    Image.fromarray(images[3]).convert("L").resize((40, 48)).save(folder / "odd.jpg")
    return folder


def _config(inst: Path, **over):
    return resolve_finetune_config(
        overrides={"instance_images": str(inst), "instance_prompt": PROMPT, **SMALL, **over}
    )


def _state(run: Path, step: int) -> dict[str, torch.Tensor]:
    folder = run / "checkpoints" / f"step-{step:08d}"
    out = {f"student/{k}": v for k, v in load_file(folder / "student.safetensors").items()}
    out.update({f"optim/{k}": v for k, v in load_file(folder / "optim_student.safetensors").items()})
    return out


def _losses(run: Path) -> list[str]:
    rows = (run / "metrics.csv").read_text().strip().splitlines()
    return [",".join(row.split(",")[:-1]) for row in rows]  # every column but the wall time


@pytest.fixture(scope="module")
def inst(tmp_path_factory):
    return instance_folder(tmp_path_factory.mktemp("ft") / "instance")


def test_three_steps_equal_two_then_one(tmp_path, inst):
    # validation (teacher samples) every 2 steps in one run only: it must not change training
    whole = finetune(_config(inst, max_steps=3, validate_every=2), tmp_path / "whole")
    assert (whole.start_step, whole.step, whole.prompts) == (0, 3, 4)
    assert [p.name for p in (tmp_path / "whole" / "validation").glob("*.png")] == ["step-00000002.png"]
    finetune(_config(inst, max_steps=2), tmp_path / "split")
    cfg = finetune_config_for_run(tmp_path / "split", "latest", None, {"max_steps": 3})
    resumed = finetune(cfg, tmp_path / "split", resume="latest")
    assert (resumed.start_step, resumed.step) == (2, 3)
    a, b = _state(tmp_path / "whole", 3), _state(tmp_path / "split", 3)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _losses(tmp_path / "whole") == _losses(tmp_path / "split")
    first = _state(tmp_path / "whole", 1)  # the adapter trains: step 3 differs from step 1
    assert not all(torch.equal(a[k], first[k]) for k in a if k.startswith("student/"))


def test_prior_preservation_generates_the_class_images_once(tmp_path, inst, monkeypatch):
    import wadi_cli.finetune.run as ft_run

    run = tmp_path / "run"
    cfg = _config(inst, max_steps=1, class_prompt=CLASS_PROMPT, num_class_images=2)
    finetune(cfg, run)
    pngs = sorted((run / "class_images").glob("*.png"))
    assert [p.name for p in pngs] == ["00000.png", "00001.png"]
    first = [np.asarray(Image.open(p)) for p in pngs]
    # the teacher's images of the class prompt, image i from seed 0 + i (as `wadi sample --teacher`)
    from wadi_cli.pipeline import load_pipeline
    from wadi_cli.pipeline.generation import generate
    from wadi_cli.pipeline.settings import SampleConfig

    pipe = load_pipeline("tiny", teacher=True)
    ref = generate(pipe, [CLASS_PROMPT] * 2, SampleConfig(teacher=True, seed=0, batch_size=2)).images
    assert np.abs(ref.astype(int) - np.stack(first).astype(int)).max() <= 1

    def boom(*args, **kwargs):
        raise AssertionError("class images generated again")

    monkeypatch.setattr(ft_run, "generate_class_images", boom)
    cfg2 = finetune_config_for_run(run, "latest", None, {"max_steps": 2})
    assert finetune(cfg2, run, resume="latest").step == 2
    again = [np.asarray(Image.open(p)) for p in sorted((run / "class_images").glob("*.png"))]
    assert all(np.array_equal(x, y) for x, y in zip(again, first, strict=True))
    rows = (run / "metrics.csv").read_text().strip().splitlines()
    header = rows[0].split(",")
    prior = [float(r.split(",")[header.index("loss_prior")]) for r in rows[1:]]
    assert len(prior) == 2 and all(np.isfinite(prior))
