"""``wadi eval --protocol dmd2|gigagan`` equals independent re-statements of DMD2's and
GigaGAN's FID and CLIP score (written from their description; torchvision's own
``center_crop`` / transforms and OpenCLIP's copy of OpenAI's tokenizer stand in for their
libraries) on mixed-size RGB and RGBA images, with random stand-in networks; plus the
eval-extra side of the error checks. Run with ``pytest -m eval`` in the eval venv."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from _helpers_eval import FEATURE_DIM, clip_folder, inception_file, random_images, write_images
from PIL import Image
from typer.testing import CliRunner

from wadi_cli.cli.main import app

pytestmark = pytest.mark.eval
pytest.importorskip("cleanfid")
pytest.importorskip("open_clip")
pytest.importorskip("torchvision")

PREFIX = "A photo depicts "
EOT = 49407
LONG = " ".join(f"word{i} and a very long description of a scene" for i in range(12))


def run(*args: str):
    return CliRunner().invoke(app, ["eval", *args])


def _mixed(folder, seed: int, sizes) -> list:
    """PNG images of the given (w, h) sizes, every other one RGBA (random alpha)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i, (w, h) in enumerate(sizes):
        base = random_images(1, seed * 1000 + i, size=(h, w), shift=float(rng.uniform(0, 60)))[0]
        if i % 2:
            alpha = rng.integers(0, 256, size=(h, w, 1), dtype=np.uint8)
            image = Image.fromarray(np.concatenate([base, alpha], axis=2), "RGBA")
        else:
            image = Image.fromarray(base)
        paths.append(folder / f"{i:03d}.png")
        image.save(paths[-1])
    return paths


SIZES_FAKE = [(43, 32), (32, 43), (40, 40), (51, 40), (35, 32), (64, 61), (47, 36), (36, 47)] * 3
SIZES_REAL = [(59, 40), (40, 43), (48, 48), (63, 56), (39, 36), (55, 40)] * 4


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("protocols")
    fake = _mixed(root / "fake", 1, SIZES_FAKE)
    _mixed(root / "real", 2, SIZES_REAL)
    captions = [f"a picture number {i} of a red object  " for i in range(len(fake))]
    captions[3] = LONG  # over 77 tokens: truncation
    captions[5] = LONG[: len(LONG) // 3]
    (root / "captions.txt").write_text("\n".join(captions) + "\n")
    return {
        "root": root,
        "fake": root / "fake",
        "real": root / "real",
        "fake_paths": fake,
        "captions": captions,
        "captions_file": root / "captions.txt",
        "inception": inception_file(root),
        "clip": clip_folder(root / "clip"),
    }


# ---- re-statements ------------------------------------------------------------------------------------
def square_256(image: Image.Image) -> Image.Image:
    """Both codes: torchvision's center_crop to the short side, then PIL LANCZOS to 256."""
    from torchvision.transforms import functional as tf

    return tf.center_crop(image, min(image.size)).resize((256, 256), Image.LANCZOS)


def dmd2_fid_transform(array: np.ndarray) -> np.ndarray:
    return np.array(square_256(Image.fromarray(array)))


def gigagan_clip_image(image: Image.Image) -> Image.Image:
    """GigaGAN's data loader (crop, Resize(256, LANCZOS), ToTensor, Normalize(.5, .5)) and its
    tensor-to-PIL conversion back."""
    from torchvision import transforms as T
    from torchvision.transforms import functional as tf

    pipeline = T.Compose(
        [
            lambda im: tf.center_crop(im, min(im.size)),
            T.Resize(256, interpolation=T.InterpolationMode.LANCZOS),
            T.ToTensor(),
            T.Normalize([0.5, 0.5, 0.5], [0.5, 0.5, 0.5]),
        ]
    )
    x = pipeline(image)
    return Image.fromarray(((x + 1.0) * 127.5).clamp(0.0, 255.0).to(torch.uint8).permute(1, 2, 0).numpy())


def spliced_tokens(captions) -> torch.Tensor:
    """OpenAI's tokenizer (OpenCLIP's SimpleTokenizer) with truncation; the 3 tokens after the
    start token of the prefix go in after each caption's start token; cut to 77; a non-zero
    last place becomes the end token 49407."""
    from open_clip.tokenizer import SimpleTokenizer

    tok = SimpleTokenizer()
    tokens = tok(list(captions))
    pre = tok([PREFIX])[:, 1:4].expand(len(tokens), -1)
    rows = torch.cat([tokens[:, :1], pre, tokens[:, 1:]], dim=1)[:, :77]
    last = rows[:, 76:77].clone()
    last[last > 0] = EOT
    return torch.cat([rows[:, :76], last], dim=1)


def clip_score_restated(files, image_rule) -> float:
    import open_clip

    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{files['clip']}")
    model.eval()
    with torch.no_grad():
        images = torch.stack(
            [preprocess(image_rule(Image.open(p).convert("RGB"))) for p in files["fake_paths"]]
        )
        a = model.encode_image(images).double()
        b = model.encode_text(spliced_tokens(files["captions"])).double()
    return float(torch.nn.functional.cosine_similarity(a, b, dim=1).mean())


# ---- point 1: FID ------------------------------------------------------------------------------------
def test_dmd2_and_gigagan_fid_equal_clean_fid_with_their_crop(files):
    from cleanfid import fid as cleanfid

    net = torch.jit.load(str(files["inception"])).eval()

    def features(x: torch.Tensor) -> torch.Tensor:
        return net.layers((x - 128) / 128).reshape(len(x), -1)

    expected = cleanfid.compute_fid(
        str(files["real"]), str(files["fake"]), mode="clean", custom_feat_extractor=features,
        custom_image_tranform=dmd2_fid_transform, num_workers=0, batch_size=5, device=torch.device("cpu"),
        verbose=False, use_dataparallel=False,
    )  # fmt: skip
    got = {}
    for name in ("dmd2", "gigagan", "wadi"):
        r = run("--images", str(files["fake"]), "--ref", str(files["real"]), "--metrics", "fid",
                "--protocol", name, "--inception-weights", str(files["inception"]), "--json")  # fmt: skip
        assert r.exit_code == 0, r.stderr
        got[name] = json.loads(r.stdout)["metrics"]["fid"]
    print(f"FID re-statement {expected:.7f}; wadi --protocol dmd2 {got['dmd2']:.7f}, wadi {got['wadi']:.7f}")
    assert got["dmd2"] == pytest.approx(float(expected), rel=1e-6)
    assert got["gigagan"] == got["dmd2"]
    assert abs(got["wadi"] - got["dmd2"]) > 1e-6 * abs(got["dmd2"])  # the floor crop moves it


# ---- points 2 and 3: CLIP score ---------------------------------------------------------------------------
@pytest.mark.parametrize(("name", "image_rule"), [("dmd2", square_256), ("gigagan", gigagan_clip_image)])
def test_clip_score_equals_the_restatement(files, name, image_rule):
    r = run("--images", str(files["fake"]), "--captions", str(files["captions_file"]), "--metrics", "clip",
            "--protocol", name, "--clip-weights", str(files["clip"]), "--json")  # fmt: skip
    assert r.exit_code == 0, r.stderr
    result = json.loads(r.stdout)
    expected = clip_score_restated(files, image_rule)
    as_is = clip_score_restated(files, lambda im: im)
    print(
        f"{name}: CLIP wadi {result['metrics']['clip']:.7f}, re-statement {expected:.7f}, "
        f"image as is {as_is:.7f}"
    )
    assert result["metrics"]["clip"] == pytest.approx(expected, abs=1e-6)
    assert abs(expected - as_is) > 1e-5  # the 256-px square changes the number
    assert result["protocol"]["name"] == name and "spliced" in result["how"]["clip"]["text"]


def test_spliced_token_ids_equal_the_restatement_and_joined_ids(files):
    from wadi_cli.evaluation import clip_text
    from wadi_cli.evaluation.features import ClipFeatures

    clip = ClipFeatures("ViT-B-32", str(files["clip"]), torch.device("cpu"), "dmd2")
    captions = files["captions"] + ["", "A", LONG + " x", "Café  crème \t brûlée &amp; more "]
    ids = clip.tokens(captions, PREFIX)
    assert torch.equal(ids, spliced_tokens(captions))
    joined = clip_text.joined(clip.tokenizer, captions, PREFIX)
    differ = int((joined != ids).any(dim=1).sum())
    print(f"rows whose ids differ, joined vs spliced: {differ} of {len(captions)}")
    assert differ == 0


# ---- point 4: the CLIP model is named and recorded -------------------------------------------------
def test_each_protocol_names_its_clip_model(files, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hf"))
    for name, model in (("gigagan", "ViT-B-32 openai"), ("dmd2", "ViT-g-14 laion2b_s12b_b42k")):
        r = run("--images", str(files["fake"]), "--captions", str(files["captions_file"]),
                "--metrics", "clip", "--protocol", name)  # fmt: skip
        assert r.exit_code == 2 and f"({model} is not in the Hugging Face cache)" in r.stderr, r.stderr
    r = run("--images", str(files["fake"]), "--captions", str(files["captions_file"]), "--metrics", "clip",
            "--protocol", "gigagan", "--clip-weights", str(files["clip"]), "--json")  # fmt: skip
    result = json.loads(r.stdout)
    assert (result["protocol"]["clip_model"], result["protocol"]["clip_pretrained"]) == ("ViT-B-32", "openai")
    assert result["how"]["clip"]["feature_extractor"] == f"local-dir:{files['clip']}"


# ---- point 7: errors and speed ---------------------------------------------------------------------
def test_a_wrong_size_reference_is_refused_before_any_feature(files, tmp_path, monkeypatch):
    import wadi_cli.evaluation.run as run_module

    npz = tmp_path / "ref.npz"
    r = run(
        "--ref", str(files["real"]), "--save-ref", str(npz), "--inception-weights", str(files["inception"])
    )
    assert r.exit_code == 0, r.stderr
    with np.load(npz) as data:
        arrays = dict(data)
    feats = arrays["features"][:, :8]
    arrays.update(mu=feats.mean(0), sigma=np.cov(feats, rowvar=False), features=feats)
    np.savez(tmp_path / "small.npz", **arrays)
    calls = []
    real_extract = run_module.extract
    monkeypatch.setattr(run_module, "extract", lambda *a, **k: calls.append(1) or real_extract(*a, **k))
    r = run("--images", str(files["fake"]), "--ref", str(tmp_path / "small.npz"), "--metrics", "fid",
            "--inception-weights", str(files["inception"]))  # fmt: skip
    assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert f"holds 8-dimensional features but the feature extractor gives {FEATURE_DIM}" in r.stderr
    assert calls == []  # refused before any image was read
    (tmp_path / "ref.json").write_text(json.dumps({"mu": [0.0]}))
    r = run("--images", str(files["fake"]), "--ref", str(tmp_path / "ref.json"), "--metrics", "fid",
            "--inception-weights", str(files["inception"]))  # fmt: skip
    assert r.exit_code == 2 and "it is JSON text, not a .npz" in r.stderr and "pickled" not in r.stderr


def test_a_singular_fid_is_said_once_in_words(files):
    few = files["root"] / "few"
    write_images(few, random_images(9, 4, size=(40, 40)))
    r = run("--images", str(few), "--ref", str(files["real"]), "--metrics", "fid",
            "--inception-weights", str(files["inception"]))  # fmt: skip
    assert r.exit_code == 0, r.stderr
    assert r.stderr.count("covariance matrices are singular") == 1, r.stderr
    assert "Matrix is singular" not in r.stderr and "singular product" not in r.stdout
    ok = run("--images", str(files["real"]), "--ref", str(files["real"]), "--metrics", "fid",
             "--inception-weights", str(files["inception"]))  # fmt: skip
    assert "singular" not in ok.stderr  # 24 images > 16 dimensions


def test_dry_run_times_the_inception_on_this_machine(files):
    r = run(
        "--images", str(files["fake"]), "--ref", str(files["real"]), "--metrics", "fid", "--dry-run", "--json"
    )
    assert r.exit_code == 0, r.stderr
    plan = json.loads(r.stdout)
    assert (
        plan["inception_images"] == len(SIZES_FAKE) + len(SIZES_REAL) and plan["inception_images_per_s"] > 0
    )
    assert plan["estimate_s"] == pytest.approx(plan["inception_s"] + plan["fixed_s"], abs=0.11)
