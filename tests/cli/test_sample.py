"""``wadi sample`` through the CLI: outputs, the release format, and bad input (one red
line, exit 2 or 3, nothing written)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from _helpers_sample import tiny_pipeline_dir, tiny_sampler
from PIL import Image
from typer.testing import CliRunner

from wadi_cli.cli.main import app
from wadi_cli.io import save_safetensors

PROMPT = "a red circle at the top left"


@pytest.fixture(scope="module")
def base_dir():
    return str(tiny_pipeline_dir())


def run(*args: str):
    return CliRunner().invoke(app, ["sample", *args])


def _pngs(folder):
    return {p.name: np.asarray(Image.open(p)) for p in sorted(folder.glob("[0-9]*.png"))}


def _one_line_error(result, code):
    assert result.exit_code == code, (result.exit_code, result.output, result.stderr)
    lines = [ln for ln in result.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert "Traceback" not in result.output + result.stderr
    return lines[0]


def test_sample_writes_pngs_grid_and_json(base_dir, tmp_path):
    out = tmp_path / "out"
    prompts = tmp_path / "p.txt"
    prompts.write_text("a blue square at the bottom right\n\n", encoding="utf-8")
    r = run(
        PROMPT,
        "--prompts",
        str(prompts),
        "-b",
        "tiny",
        "--model",
        base_dir,
        "-n",
        "2",
        "--batch-size",
        "3",
        "--seed",
        "7",
        "-o",
        str(out),
        "--json",
    )
    assert r.exit_code == 0, r.output + r.stderr
    summary = json.loads(r.stdout)
    assert summary["num_images"] == 4 and summary["mode"] == "one-step" and summary["alpha_bar_T"] == 0.0047
    assert "no --weights" in r.stderr  # the note about sampling the base model
    pngs = _pngs(out)
    assert list(pngs) == ["0000.png", "0001.png", "0002.png", "0003.png"]
    assert all(a.shape == (32, 32, 3) for a in pngs.values())
    assert (out / "grid.png").is_file()
    record = json.loads((out / "samples.json").read_text())
    assert [im["seed"] for im in record["images"]] == [7, 8, 9, 10]
    assert [im["prompt"] for im in record["images"]][1:3] == [PROMPT, "a blue square at the bottom right"]
    # the same seed with another batch size gives the same images
    out2 = tmp_path / "out2"
    r2 = run(
        PROMPT,
        "--prompts",
        str(prompts),
        "-b",
        "tiny",
        "--model",
        base_dir,
        "-n",
        "2",
        "--batch-size",
        "1",
        "--seed",
        "7",
        "-o",
        str(out2),
    )
    assert r2.exit_code == 0, r2.stderr
    assert "wrote 4 images" in r2.stdout
    p2 = _pngs(out2)
    for k in pngs:  # equal up to the rounding of batched kernels (see pipeline/test_generation)
        diff = np.abs(pngs[k].astype(int) - p2[k].astype(int))
        assert diff.max() <= 1 and (diff == 0).mean() >= 0.999


def test_release_file_changes_the_output(base_dir, tmp_path):
    state = {k: v + 0.02 * torch.randn_like(v) for k, v in tiny_sampler().denoiser.model.state_dict().items()}
    release = save_safetensors(state, tmp_path / "rotated_unet-test.safetensors")
    a, b = tmp_path / "a", tmp_path / "b"
    assert run(PROMPT, "-b", "tiny", "--model", base_dir, "-o", str(a)).exit_code == 0
    r = run(PROMPT, "-b", "tiny", "--model", base_dir, "-w", str(release), "-o", str(b), "--json")
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["weights_kind"] == "merged"
    assert not np.array_equal(_pngs(a)["0000.png"], _pngs(b)["0000.png"])


def test_teacher_mode(base_dir, tmp_path):
    out = tmp_path / "t"
    r = run(
        PROMPT,
        "-b",
        "tiny",
        "--model",
        base_dir,
        "--teacher",
        "--steps",
        "2",
        "--cfg",
        "2",
        "-o",
        str(out),
        "--json",
    )
    assert r.exit_code == 0, r.stderr
    s = json.loads(r.stdout)
    assert (s["mode"], s["steps"], s["cfg"]) == ("teacher", 2, 2.0)
    assert (out / "0000.png").is_file()


def test_unknown_backbone(tmp_path):
    line = _one_line_error(run(PROMPT, "-b", "sd3", "-o", str(tmp_path / "o")), 2)
    assert "unknown backbone" in line and "sd21" in line
    assert not (tmp_path / "o").exists()


def test_weights_that_do_not_fit(base_dir, tmp_path):
    bad = save_safetensors(
        {"conv_in.weight": torch.zeros(2, 2), "foo.bar": torch.zeros(1)}, tmp_path / "bad.safetensors"
    )
    line = _one_line_error(
        run(PROMPT, "-b", "tiny", "--model", base_dir, "-w", str(bad), "-o", str(tmp_path / "o")), 2
    )
    assert "does not fit" in line and "foo.bar" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.safetensors"]  # nothing written, no temp left


def test_empty_prompt_file(base_dir, tmp_path):
    f = tmp_path / "empty.txt"
    f.write_text("\n\n", encoding="utf-8")
    line = _one_line_error(
        run("--prompts", str(f), "-b", "tiny", "--model", base_dir, "-o", str(tmp_path / "o")), 2
    )
    assert "no prompts" in line
    assert not (tmp_path / "o").exists()


def test_unwritable_out(base_dir, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    line = _one_line_error(run(PROMPT, "-b", "tiny", "--model", base_dir, "-o", str(blocker / "sub")), 2)
    assert "sub" in line
    assert blocker.read_text() == "x"


def test_flag_conflicts(base_dir, tmp_path):
    line = _one_line_error(
        run(PROMPT, "-b", "tiny", "--model", base_dir, "--steps", "3", "-o", str(tmp_path / "o")), 2
    )
    assert "--teacher" in line


def test_sd21_offline_says_what_to_download(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    line = _one_line_error(run(PROMPT, "-b", "sd21", "-o", str(tmp_path / "o")), 3)
    assert (
        "rotated_unet-sdv2-1.safetensors" in line and "gudaochangsheng/WaDi" in line and "--weights" in line
    )
    assert "stabilityai/stable-diffusion-2-1-base" in line and "--model" in line
    assert not (tmp_path / "o").exists()


def test_help_has_examples():
    r = CliRunner().invoke(app, ["sample", "--help"])
    assert r.exit_code == 0 and "Examples" in r.stdout and "wadi sample" in r.stdout


def test_one_image_is_said_in_the_singular(base_dir, tmp_path):
    r = run(PROMPT, "-b", "tiny", "--model", base_dir, "-n", "1", "-o", str(tmp_path / "one"))
    assert r.exit_code == 0, r.output + r.stderr
    assert "wrote 1 image " in r.stdout and "wrote 1 images" not in r.stdout


# ---- image-to-image and high resolution ---------------------------------------------------
def _init_folder(tmp_path, sizes):
    folder = tmp_path / "init"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate(sizes):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"{i:02d}.png")
    (folder / "notes.txt").write_text("not an image")
    return folder


def test_init_image_folder_pairs_with_prompts_and_is_recorded(base_dir, tmp_path):
    folder = _init_folder(tmp_path, [(40, 20), (32, 32)])
    out = tmp_path / "o"
    args = [PROMPT, "a blue square at the bottom right", "-b", "tiny", "--model", base_dir, "--base"]
    r = run(*args, "--init-image", str(folder), "--strength", "0.4", "-n", "2", "-o", str(out))
    assert r.exit_code == 0, r.output + r.stderr
    record = json.loads((out / "samples.json").read_text())
    assert record["strength"] == 0.4 and record["start_timestep"] == 400
    files = [im["init_image"] for im in record["images"]]
    assert files == [str(folder / "00.png")] * 2 + [str(folder / "01.png")] * 2
    # one file for every prompt: the same as the folder's first image for the first prompt
    one = tmp_path / "one"
    r = run(*args[:1], *args[2:], "--init-image", str(folder / "00.png"), "--strength", "0.4", "-o", str(one))
    assert r.exit_code == 0, r.output + r.stderr
    assert np.array_equal(_pngs(one)["0000.png"], _pngs(out)["0000.png"])


def test_init_image_bad_input_writes_nothing(base_dir, tmp_path):
    folder = _init_folder(tmp_path, [(32, 32)])
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG not really")
    base = [PROMPT, "-b", "tiny", "--model", base_dir, "--base", "-o", str(tmp_path / "o")]
    cases = [
        (["--init-image", str(broken)], 2, "cannot read it as an image"),
        (["--init-image", str(tmp_path / "missing.png")], 2, "no such file"),
        (["--init-image", str(folder), PROMPT], 2, "holds 1 images"),
        (["--init-image", str(folder), "--strength", "1.2"], 2, "--strength must lie in (0, 1]"),
        (["--strength", "0.5"], 2, "--strength applies to --init-image only"),
        (["--refine-strength", "0.5"], 2, "--refine-strength applies to --upscale only"),
        (["--upscale", "2", "--init-image", str(folder)], 2, "--upscale"),
    ]
    for extra, code, needle in cases:
        line = _one_line_error(run(*base, *extra), code)
        assert needle in line, (extra, line)
        assert not (tmp_path / "o").exists()
    # found once the denoiser is loaded (its config says what it takes), before anything is written
    r = run(PROMPT, "-b", "tiny", "--height", "36", "-o", str(tmp_path / "o"))
    line = _one_line_error(r, 2)
    assert "--height 36: the tiny denoiser takes multiples of 8 pixels" in line and "32 or 40" in line
    assert not (tmp_path / "o").exists()


def test_height_width_and_upscale_through_the_cli(base_dir, tmp_path):
    base = [PROMPT, "-b", "tiny", "--model", base_dir, "--base"]
    r = run(*base, "--height", "48", "--width", "24", "-o", str(tmp_path / "hw"))
    assert r.exit_code == 0, r.output + r.stderr
    assert _pngs(tmp_path / "hw")["0000.png"].shape == (48, 24, 3)
    r = run(*base, "--upscale", "2", "-o", str(tmp_path / "up"))
    assert r.exit_code == 0, r.output + r.stderr
    record = json.loads((tmp_path / "up" / "samples.json").read_text())
    assert _pngs(tmp_path / "up")["0000.png"].shape == (64, 64, 3)
    assert (record["upscale"], record["refine_strength"], record["refine_start_timestep"]) == (2, 0.3, 300)
    assert (record["height"], record["width"]) == (64, 64)


def test_the_readme_controlnet_command_runs_as_typed(tmp_path, monkeypatch):
    """``wadi sample "a red circle at the top left" -b tiny --controlnet tiny --control-image
    analysis/tiny_controlnet/mask.png`` from the repository root (here with -o)."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    monkeypatch.chdir(root)
    args = ["sample", "a red circle at the top left", "-b", "tiny", "--controlnet", "tiny"]
    args += ["--control-image", "analysis/tiny_controlnet/mask.png", "-o", str(tmp_path / "o")]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output + r.stderr
    record = json.loads((tmp_path / "o" / "samples.json").read_text())
    assert record["controlnet"] == "tiny" and record["control_scale"] == 1.0
    assert record["images"][0]["control_image"] == "analysis/tiny_controlnet/mask.png"
