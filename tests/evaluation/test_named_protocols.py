"""``wadi eval --protocol dmd2|gigagan|wadi`` against independent re-statements of the two
reference codes' rules (written from their description: DMD2's ``main/coco_eval`` and
``main/test_folder_sd.py``, GigaGAN's ``evaluation/``), on mixed-size and RGBA images; the
parts that need no eval extra: crop, CLIP input, caption lines, image order, DMD2's noise,
reference-file checks, thread count and ``--dry-run``."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from _helpers_sample import tiny_pipeline_dir
from PIL import Image
from typer.testing import CliRunner

from wadi_cli.cli.main import app
from wadi_cli.errors import BadInputError, MismatchError
from wadi_cli.evaluation import protocol
from wadi_cli.evaluation.captions import read_captions
from wadi_cli.evaluation.folders import list_images


def run(*args: str):
    return CliRunner().invoke(app, ["eval", *args])


# ---- re-statements (written from the rules, not from wadi's code) --------------------------
def torchvision_offset(difference: int) -> int:
    """torchvision's center_crop: half the difference, a .5 rounded to the even neighbour."""
    half, odd = divmod(difference, 2)
    if not odd:
        return half
    return half + 1 if half % 2 == 1 else half


def reference_square(arr: np.ndarray, size: int = 256) -> np.ndarray:
    """RGB (alpha dropped), torchvision-centered square of the short side, PIL LANCZOS."""
    rgb = arr[..., :3] if arr.ndim == 3 else np.repeat(arr[..., None], 3, axis=2)
    h, w = rgb.shape[:2]
    side = min(h, w)
    top, left = torchvision_offset(h - side), torchvision_offset(w - side)
    crop = np.ascontiguousarray(rgb[top : top + side, left : left + side])
    return np.asarray(Image.fromarray(crop).resize((size, size), Image.Resampling.LANCZOS))


def gigagan_round_trip(square: np.ndarray) -> np.ndarray:
    """GigaGAN's loader and back, in torch float32: /255, (x - .5) / .5, (x + 1) * 127.5, uint8."""
    x = torch.from_numpy(np.array(square)).float().div(255)
    x = (x - torch.tensor(0.5)) / torch.tensor(0.5)
    return ((x + 1.0) * 127.5).clamp(0, 255).to(torch.uint8).numpy()


def mixed_sizes(n: int, seed: int) -> list[tuple[int, int]]:
    """COCO-like (w, h): one side 640 or near it, the other drawn from 300-640."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        long, short = int(rng.integers(600, 641)), int(rng.integers(300, 600))
        out.append((long, short) if rng.random() < 0.6 else (short, long))
    return out


# ---- point 1: crop offset ------------------------------------------------------------------------
def test_half_even_offset_is_torchvision_rounding_and_floor_differs_exactly_at_3_mod_4():
    sizes = mixed_sizes(600, 0)
    differ = 0
    for w, h in sizes:
        d = max(w, h) - min(w, h)
        assert protocol.crop_offset(d, "half-even") == torchvision_offset(d)
        assert protocol.crop_offset(d, "floor") == d // 2
        differ += protocol.crop_offset(d, "half-even") != protocol.crop_offset(d, "floor")
    assert differ == sum((max(w, h) - min(w, h)) % 4 == 3 for w, h in sizes) > 0
    print(f"crop offsets that differ by 1 px: {differ} of {len(sizes)}")
    assert torchvision_offset(3) == 2 and torchvision_offset(5) == 2 and torchvision_offset(7) == 4
    with pytest.raises(ValueError, match="unknown crop rounding"):
        protocol.crop_offset(3, "ceil")


@pytest.mark.parametrize(("w", "h"), [(643, 480), (480, 643), (640, 425), (301, 300), (256, 256), (99, 120)])
@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L"])
def test_dmd2_square_equals_the_restatement_on_mixed_sizes_and_modes(w, h, mode):
    rng = np.random.default_rng(w * 7 + h)
    channels = {"RGB": 3, "RGBA": 4, "L": None}[mode]
    shape = (h, w) if channels is None else (h, w, channels)
    arr = rng.integers(0, 256, size=shape, dtype=np.uint8)
    image = Image.fromarray(arr, mode)
    expected = reference_square(arr)
    got = protocol.protocol_image(protocol.to_rgb(image), 256, protocol.get_protocol("dmd2").crop)
    np.testing.assert_array_equal(got, expected)
    floor = protocol.protocol_image(protocol.to_rgb(image), 256, "floor")
    assert np.array_equal(floor, expected) == ((max(w, h) - min(w, h)) % 4 != 3)


# ---- point 2: CLIP input ---------------------------------------------------------------------------
@pytest.mark.parametrize(("w", "h"), [(643, 480), (512, 512), (320, 427)])
def test_clip_input_of_each_protocol(w, h):
    arr = np.random.default_rng(w + h).integers(0, 256, size=(h, w, 4), dtype=np.uint8)
    image = Image.fromarray(arr, "RGBA")
    as_is = protocol.clip_input(image, protocol.get_protocol("wadi"))
    np.testing.assert_array_equal(np.asarray(as_is), arr[..., :3])
    dmd2 = np.asarray(protocol.clip_input(image, protocol.get_protocol("dmd2")))
    np.testing.assert_array_equal(dmd2, reference_square(arr))
    gigagan = np.asarray(protocol.clip_input(image, protocol.get_protocol("gigagan")))
    np.testing.assert_array_equal(gigagan, gigagan_round_trip(reference_square(arr)))


def test_gigagan_round_trip_lowers_63_levels_by_one():
    levels = np.arange(256, dtype=np.uint8)
    back = protocol.tensor_round_trip(levels)
    np.testing.assert_array_equal(back, gigagan_round_trip(levels))
    assert int((back != levels).sum()) == 63 and set((levels.astype(int) - back)[back != levels]) == {1}


# ---- point 5: captions, image order, reference size ------------------------------------------------
def test_protocol_caption_lines_are_kept_as_they_stand(tmp_path):
    lines = ["A cat on a mat. ", "#1 best  pizza", "", "   ", "Two dogs\tplaying  "]
    (tmp_path / "c.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert read_captions(tmp_path / "c.txt", style="lines") == [
        "A cat on a mat. ",
        "#1 best  pizza",
        "Two dogs\tplaying  ",
    ]
    normalised = read_captions(tmp_path / "c.txt")
    assert normalised[0] == "A cat on a mat." and "#1 best  pizza" not in normalised  # wadi's own reader
    (tmp_path / "e.txt").write_text("\n \n")
    with pytest.raises(BadInputError, match="holds no captions"):
        read_captions(tmp_path / "e.txt", style="lines")


def test_cli_dmd2_reads_the_caption_file_as_is(tmp_path):
    captions = [f"caption {i} with a trailing space " for i in range(5)] + ["# not a comment"]
    (tmp_path / "c.txt").write_text("\n".join(captions) + "\n")
    out = tmp_path / "e"
    r = run("-b", "tiny", "--model", str(tiny_pipeline_dir()), "--captions", str(tmp_path / "c.txt"),
            "--metrics", "accuracy,fd", "--protocol", "dmd2", "--out", str(out), "--json")  # fmt: skip
    # the tiny classifier refuses non-tiny prompts at the end; the manifest holds the captions read
    assert r.exit_code == 2 and "tiny prompts" in r.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert [e["caption"] for e in manifest["images"]] == captions


def test_gigagan_lists_images_in_natural_order(tmp_path):
    for name in ["10.png", "2.png", "1.png", "B3.png", "b20.png"]:
        Image.new("RGB", (4, 4)).save(tmp_path / name)
    natural = [
        p.name for p in list_images(tmp_path, "--images", protocol.get_protocol("gigagan").image_order)
    ]
    assert natural == ["1.png", "2.png", "10.png", "B3.png", "b20.png"]
    assert [p.name for p in list_images(tmp_path, "--images")] == [
        "1.png",
        "10.png",
        "2.png",
        "B3.png",
        "b20.png",
    ]


def test_protocols_name_their_choices():
    dmd2, giga, wadi = (protocol.get_protocol(n) for n in ("dmd2", "gigagan", "wadi"))
    assert (dmd2.clip_model, dmd2.clip_pretrained) == ("ViT-g-14", "laion2b_s12b_b42k")
    assert (giga.clip_model, giga.clip_pretrained) == ("ViT-B-32", "openai")
    assert dmd2.reference_images == giga.reference_images == 40504 and wadi.reference_images is None
    assert (dmd2.seeding, dmd2.seed_batch, giga.seeding) == ("per-batch", 10, "per-image")
    assert protocol.get_protocol(None) is wadi and protocol.get_protocol(" DMD2 ") is dmd2
    with pytest.raises(BadInputError, match="choose from wadi, dmd2, dmd2-sdxl, gigagan"):
        protocol.get_protocol("sid")
    r = run("--images", ".", "--protocol", "sid")
    assert (
        r.exit_code == 2 and "--protocol sid: unknown" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    )


# ---- point 6: DMD2's noise, per batch of 10 -----------------------------------------------------------
def dmd2_noise(n: int, shape: tuple[int, ...], batch: int = 10) -> torch.Tensor:
    """DMD2: batch k (of up to 10 captions, in file order) takes randn of (its size, *shape)
    from a fresh CPU generator seeded k."""
    rows = []
    for k, start in enumerate(range(0, n, batch)):
        size = min(batch, n - start)
        rows.append(torch.randn((size, *shape), generator=torch.Generator().manual_seed(k)))
    return torch.cat(rows)


def test_dmd2_seeding_makes_the_images_of_dmd2s_noise(tmp_path):
    from wadi_cli.pipeline import (
        SampleConfig,
        decode,
        get_backbone_spec,
        images_from_noise,
        initial_noise,
        load_pipeline,
        one_step_latents,
    )

    base = str(tiny_pipeline_dir())
    out = tmp_path / "e"
    args = ["-b", "tiny", "--model", base, "-n", "23", "--batch-size", "4", "--metrics", "accuracy,fd",
            "--out", str(out), "--json", "--device", "cpu"]  # fmt: skip
    r = run(*args, "--protocol", "dmd2")
    assert r.exit_code == 0, r.stderr
    result = json.loads(r.stdout)
    assert result["protocol"]["name"] == "dmd2" and result["seeding"] == "dmd2: per batch of 10"
    manifest = json.loads((out / "manifest.json").read_text())
    assert [(e["seed"], e["row"]) for e in manifest["images"]][9:12] == [(0, 9), (1, 0), (1, 1)]
    got = np.stack([np.asarray(Image.open(out / e["file"])) for e in manifest["images"]])

    spec = get_backbone_spec("tiny")
    pipe = load_pipeline(spec, model=base, weights=None, teacher=False, device=torch.device("cpu"),
                         dtype=torch.float32)  # fmt: skip
    cfg = SampleConfig(seed=0, batch_size=23).resolved(spec, None)
    z = dmd2_noise(23, tuple(pipe.latent_shape))
    manifest_captions = [e["caption"] for e in manifest["images"]]
    parts = []
    with torch.no_grad():  # DMD2 runs the batches of 10 it seeds
        for s in range(0, 23, 10):
            cond = pipe.prompt_encoder(manifest_captions[s : s + 10])
            parts.append(
                decode(pipe.vae, one_step_latents(pipe, cond, z[s : s + 10], float(cfg.alpha_bar_T)))
            )
    expected = np.concatenate(parts)
    np.testing.assert_array_equal(got, expected)

    # the same path with per-image noise is wadi's generate(): the helper did not drift from it
    from wadi_cli.pipeline import generate

    per_image = generate(pipe, manifest_captions[:6], SampleConfig(seed=4, batch_size=6)).images
    again = images_from_noise(
        pipe, manifest_captions[:6], cfg, initial_noise(range(4, 10), pipe.latent_shape)
    )
    np.testing.assert_array_equal(per_image, again)

    wadi = tmp_path / "w"
    r = run(*[a if a != str(out) else str(wadi) for a in args])
    assert r.exit_code == 0, r.stderr
    wadi_images = np.stack([np.asarray(Image.open(wadi / e["file"])) for e in manifest["images"]])
    same = [i for i in range(23) if np.array_equal(wadi_images[i], got[i])]
    assert same == [0]  # only image 0 shares its noise (the first row of generator 0)


# ---- point 7: reference files, threads, dry run ---------------------------------------------------------
def test_a_json_or_npy_ref_is_named_for_what_it_is(tmp_path):
    from wadi_cli.evaluation.reference import load_reference

    settings = protocol.FeatureSettings()
    (tmp_path / "r.json").write_text('{"mu": [1, 2]}')
    with pytest.raises(BadInputError, match="it is JSON text, not a .npz"):
        load_reference(tmp_path / "r.json", settings)
    np.save(tmp_path / "r.npy", np.zeros(3))
    with pytest.raises(BadInputError, match="single .npy array"):
        load_reference(tmp_path / "r.npy", settings)


def test_a_reference_of_another_feature_size_is_refused_by_its_shapes(tmp_path):
    from wadi_cli.evaluation.reference import Reference, load_reference, save_reference

    feats = np.random.default_rng(0).normal(size=(12, 8))
    settings = protocol.FeatureSettings(extractor_sha256="abc")
    save_reference(Reference.from_features(feats, settings, "x", {}), tmp_path / "r.npz")
    assert load_reference(tmp_path / "r.npz", settings, dim=8).num_images == 12
    with pytest.raises(
        MismatchError, match="holds 8-dimensional features but the feature extractor gives 2048"
    ):
        load_reference(tmp_path / "r.npz", settings, dim=2048)
    with np.load(tmp_path / "r.npz") as data:
        arrays = dict(data)
    arrays["sigma"] = arrays["sigma"][:4, :4]
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(BadInputError, match="inconsistent arrays"):
        load_reference(tmp_path / "bad.npz", settings)


def test_scoring_alone_keeps_torchs_thread_count(tmp_path, monkeypatch):
    import wadi_cli.cli.eval as cli_eval

    calls = []
    monkeypatch.setattr(cli_eval, "use_backbone_cpu_threads", lambda b, d: calls.append(b))
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    run("--images", str(tmp_path), "--ref", str(tmp_path), "--metrics", "fid")
    run("--ref", str(tmp_path), "--save-ref", str(tmp_path / "r.npz"))
    assert calls == []  # before: the default backbone (tiny, one thread) was applied to both
    run("-b", "tiny", "--model", str(tiny_pipeline_dir()), "-n", "2", "--metrics", "accuracy,fd",
        "--out", str(tmp_path / "o"))  # fmt: skip
    assert calls == ["tiny"]


def test_dry_run_plans_without_writing_and_names_the_machine(tmp_path):
    from wadi_cli.machine import cpu_model

    out = tmp_path / "e"
    r = run("-b", "tiny", "-n", "40", "--metrics", "accuracy,fd", "--out", str(out), "--dry-run", "--json")
    assert r.exit_code == 0, r.stderr
    plan = json.loads(r.stdout)
    assert plan["images_to_generate"] == 40 and plan["inception_images"] == 0
    assert cpu_model() in plan["machine"] and "Xeon" in plan["fixed_s_measured_on"]
    assert plan["estimate_s"] == pytest.approx(plan["fixed_s"] + plan["generation_s"], abs=0.11)
    assert not out.exists()
    for i in range(3):
        Image.new("RGB", (8, 8)).save(tmp_path / f"{i}.png")
    r = run("--images", str(tmp_path), "--ref", str(tmp_path), "--metrics", "fid,kid", "--dry-run")
    assert r.exit_code == 0, r.stderr
    assert "score 3" in r.stdout and "folder of 3 images" in r.stdout and "estimate: ~" in r.stdout


# ---- dmd2-sdxl: 1024-px images scored as 256-px squares, COCO-10k ---------------------------------------
def lanczos_matrix(n_in: int, n_out: int, lobes: int = 3) -> np.ndarray:
    """Pillow's antialiased Lanczos-3 as a float64 matrix, written from its description
    (Resample.c): the kernel sinc(x)·sinc(x/3) on |x| < 3 is stretched by the downscale factor,
    output pixel o is centred at (o + 0.5)·scale, the taps of each output are normalised."""
    scale = n_in / n_out
    stretch = max(scale, 1.0)
    m = np.zeros((n_out, n_in))
    for o in range(n_out):
        center = (o + 0.5) * scale
        lo, hi = max(int(center - lobes * stretch + 0.5), 0), min(int(center + lobes * stretch + 0.5), n_in)
        x = (np.arange(lo, hi) + 0.5 - center) / stretch
        w = np.sinc(x) * np.sinc(x / lobes) * (np.abs(x) < lobes)
        m[o, lo:hi] = w / w.sum()
    return m


def lanczos_reference(square: np.ndarray, size: int) -> np.ndarray:
    """Horizontal pass, rounded to uint8 (as Pillow keeps it), then the vertical pass."""
    h, w, _ = square.shape
    across = np.einsum("ow,hwc->hoc", lanczos_matrix(w, size), square.astype(float))
    across = np.clip(np.round(across), 0, 255)
    down = np.einsum("oh,hwc->owc", lanczos_matrix(h, size), across)
    return np.clip(np.round(down), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("w,h", [(1024, 1024), (1152, 896)])
def test_dmd2_sdxl_scores_1024_px_images_as_256_px_lanczos_squares(w, h):
    """DMD2's coco_evaluator: center crop on the long edge (torchvision), PIL LANCZOS to
    --eval_res 256; the resize equals a float64 Lanczos-3 written from Pillow's rules to one
    level (Pillow's fixed-point weights), where a bicubic resize is off by far more."""
    rules = protocol.get_protocol("dmd2-sdxl")
    assert (rules.generated_size, rules.reference_images, rules.seed_batch) == (1024, 10000, 4)
    rng = np.random.default_rng(w + h)
    yy, xx = np.mgrid[0:h, 0:w]
    smooth = 127 + 100 * np.sin(xx / 37.0)[..., None] * np.cos(yy / 53.0)[..., None]
    image = np.clip(smooth + rng.normal(0, 40, (h, w, 3)), 0, 255).astype(np.uint8)
    got = protocol.protocol_image(image, protocol.RESOLUTION, rules.crop)
    side = min(w, h)
    left, top = torchvision_offset(w - side), torchvision_offset(h - side)
    want = lanczos_reference(image[top : top + side, left : left + side], 256)
    diff = np.abs(got.astype(int) - want.astype(int))
    assert got.shape == (256, 256, 3) and diff.max() <= 1 and (diff > 0).mean() < 1e-3
    bicubic = Image.fromarray(image[top : top + side, left : left + side]).resize((256, 256), Image.BICUBIC)
    assert np.abs(np.asarray(bicubic, dtype=int) - want.astype(int)).max() > 5


def test_sdxl_defaults_to_dmd2_sdxl_and_an_explicit_protocol_wins():
    assert protocol.protocol_name_for(None, "sdxl") == "dmd2-sdxl"
    assert protocol.protocol_name_for(None, "SD15") == protocol.protocol_name_for(None, None) == "wadi"
    assert protocol.protocol_name_for("dmd2", "sdxl") == "dmd2"
    rules = protocol.get_protocol("dmd2-sdxl")
    assert protocol.size_note(rules, [(1024, 1024)] * 3) is None
    assert protocol.size_note(protocol.get_protocol("wadi"), [(16, 16)]) is None
    note = protocol.size_note(rules, [(1024, 1024), (16, 16), (512, 768)])
    assert "generated at 1024x1024" in note and "16x16, 512x768" in note and "not the papers'" in note


def test_sdxl_dry_run_names_the_protocol_and_the_caption_count(tmp_path):
    captions = tmp_path / "coco10k.txt"
    captions.write_text("".join(f"caption {i}  \n" for i in range(12)))
    r = run("-b", "sdxl", "--captions", str(captions), "-n", "10", "--dry-run", "--json", "--device", "cpu")
    assert r.exit_code == 0, r.stderr
    plan = json.loads(r.stdout)
    assert plan["protocol"] == "dmd2-sdxl" and plan["images_to_generate"] == 10, plan
    r = run("-b", "sdxl", "--captions", str(captions), "--protocol", "wadi", "--dry-run", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["protocol"] == "wadi"
    assert not list(tmp_path.glob("*/"))
