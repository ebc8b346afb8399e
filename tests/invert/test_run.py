"""A relation inversion on the tiny model (wadi_cli.invert.run / trainer): it trains only the
token, writes an embedding file that samples, resumes bit-exactly, takes images of any mode and
size, and refuses bad input with one line before anything is written."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from wadi_cli.errors import BadInputError
from wadi_cli.invert import invert, invert_config_for_run, resolve_invert_config
from wadi_cli.io.embeddings import load_embedding
from wadi_cli.tiny.data import render_batch

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = {"batch_size": 2, "tensorboard": False, "checkpoint_every": 1, "device": "cpu", "keep_last": 5}


def exemplar_folder(folder: Path, captions: str = "captions.json") -> Path:
    """Three top-left renders captioned "a COLOUR SHAPE <R>", one of them a grey 40x48 JPEG
    and one an RGBA 20x20 PNG (other modes and sizes: converted and centre-cropped)."""
    folder.mkdir(parents=True, exist_ok=True)
    attrs = [
        {"color": c, "shape": s, "position": "top left"} for c, s in (("red", "circle"), ("blue", "square"))
    ]
    images = render_batch(attrs * 2, 3)
    Image.fromarray(images[0]).save(folder / "0.png")
    Image.fromarray(images[1]).convert("L").resize((40, 48)).save(folder / "1.jpg")
    Image.fromarray(images[2]).convert("RGBA").resize((20, 20)).save(folder / "2.png")
    text = {"0.png": "a red circle <R>", "1.jpg": ["a blue square <R>", "a blue {} square"], "2.png": "a {}"}
    (folder / captions).write_text(json.dumps(text), encoding="utf-8")
    return folder


def _config(folder: Path, **over):
    return resolve_invert_config(overrides={"images": str(folder), **SMALL, **over})


def _state(run: Path, step: int) -> dict[str, torch.Tensor]:
    folder = run / "checkpoints" / f"step-{step:08d}"
    out = {f"token/{k}": v for k, v in load_file(folder / "student.safetensors").items()}
    out.update({f"optim/{k}": v for k, v in load_file(folder / "optim_student.safetensors").items()})
    return out


def test_inversion_trains_the_token_only_and_resumes_bit_exactly(tmp_path):
    from wadi_cli.tiny.arch import load_tiny_pipeline

    folder = exemplar_folder(tmp_path / "ex")
    straight, split = tmp_path / "straight", tmp_path / "split"
    invert(_config(folder, max_steps=3), straight)
    invert(_config(folder, max_steps=2), split)
    cfg = invert_config_for_run(split, "latest", overrides={"max_steps": 3})
    invert(cfg, split, resume="latest")
    a, b = _state(straight, 3), _state(split, 3)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows = [(r / "metrics.csv").read_text().splitlines() for r in (straight, split)]
    assert [",".join(x.split(",")[:-1]) for x in rows[0]] == [",".join(x.split(",")[:-1]) for x in rows[1]]
    token, vec, meta = load_embedding(straight / "learned_embeds.safetensors")
    assert token == "<R>" and meta["step"] == "3" and torch.equal(vec, a["token/<R>"])
    # the token moved from its init word ("at") and nothing else of the model is in the file
    pipe = load_tiny_pipeline()
    at = pipe.text_encoder.get_input_embeddings().weight[
        pipe.tokenizer("at", add_special_tokens=False).input_ids[0]
    ]
    at = at.detach()
    assert not torch.equal(vec[0], at) and float((vec[0] - at).norm()) < 1.0
    steer = [float(r.split(",")[3]) for r in rows[0][1:]]
    assert all(np.isfinite(steer)) and max(steer) > 0


def test_no_steering_and_uniform_timesteps_still_train(tmp_path):
    folder = exemplar_folder(tmp_path / "ex", captions="text.json")  # ReVersion's file name
    summary = invert(_config(folder, max_steps=1, steer_weight=0.0, importance_alpha=0.0), tmp_path / "run")
    assert summary.step == 1 and (tmp_path / "run" / "learned_embeds.safetensors").is_file()


@pytest.mark.parametrize(
    "case, words",
    [
        ("empty", "no image"),
        ("no-captions", "no captions"),
        ("missing-caption", "no caption"),
        ("no-token", "does not hold the token"),
        ("bad-json", "not a readable JSON"),
        ("known-token", "already in the tokenizer's vocabulary"),
        ("init-word", "tokens for this tokenizer"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, case, words):
    folder = tmp_path / "ex"
    over: dict = {}
    if case == "empty":
        folder.mkdir()
        (folder / "notes.txt").write_text("no images here")
    else:
        exemplar_folder(folder)
        captions = json.loads((folder / "captions.json").read_text())
        if case == "no-captions":
            (folder / "captions.json").unlink()
        elif case == "missing-caption":
            del captions["2.png"]
        elif case == "no-token":
            captions["0.png"] = "a red circle"
        elif case == "known-token":
            captions = {k: "a red circle" for k in captions}
            over["token"] = "circle"
        elif case == "init-word":
            over["init_word"] = "redcircle"
        if case == "bad-json":
            (folder / "captions.json").write_text("{not json")
        elif case != "no-captions":
            (folder / "captions.json").write_text(json.dumps(captions))
    with pytest.raises(BadInputError, match=words) as err:
        invert(_config(folder, max_steps=1, **over), tmp_path / "run")
    assert "\n" not in str(err.value) and not (tmp_path / "run").exists()
