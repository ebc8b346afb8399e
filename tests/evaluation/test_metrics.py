"""Planted truths for ``wadi eval``'s metrics, with the eval extra (clean-fid, open_clip,
torch-fidelity, torchvision) and random-weight extractors saved as local files, so the
libraries' real loading code runs offline. Run with ``pytest -m eval`` in the eval venv."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from _helpers_eval import clip_folder, inception_file, random_images, write_images
from _helpers_sample import tiny_pipeline_dir
from typer.testing import CliRunner

from wadi_cli.cli.main import app

pytestmark = pytest.mark.eval
pytest.importorskip("cleanfid")
pytest.importorskip("open_clip")
pytest.importorskip("torch_fidelity")


def run(*args: str):
    return CliRunner().invoke(app, ["eval", *args])


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    return {
        "inception": inception_file(root),
        "inception2": inception_file(root, seed=1, name="other.pt"),
        "clip": clip_folder(root / "clip"),
        "real": root / "real",
        "fake": root / "fake",
        "root": root,
        "real_paths": write_images(root / "real", random_images(24, 0, size=(48, 64))),
        "fake_paths": write_images(root / "fake", random_images(20, 1, size=(40, 40), shift=40)),
    }


def score(files, images, *extra):
    r = run("--images", str(images), "--inception-weights", str(files["inception"]), "--json", *extra)
    assert r.exit_code == 0, r.stderr
    return json.loads(r.stdout)


# ---- FID ---------------------------------------------------------------------------------
def test_fid_of_a_folder_against_itself_is_zero(files):
    got = score(files, files["real"], "--ref", str(files["real"]), "--metrics", "fid,pr")
    print("FID(real, real) =", got["metrics"]["fid"])
    assert abs(got["metrics"]["fid"]) < 1e-6
    assert got["metrics"]["precision"] == 1.0 and got["metrics"]["recall"] == 1.0


def test_frechet_distance_equals_the_closed_form_of_two_gaussians():
    from wadi_cli.evaluation.scores import fid

    rng = np.random.default_rng(0)
    d = 6
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    s1 = np.diag(rng.uniform(0.5, 2.0, d))
    s2 = q @ np.diag(rng.uniform(0.5, 3.0, d)) @ q.T  # does not commute with s1
    m1, m2 = rng.normal(size=d), rng.normal(size=d)
    # closed form: ‖m1 − m2‖² + tr(s1) + tr(s2) − 2 tr((s1^½ s2 s1^½)^½), symmetric square roots by eigh
    r1 = np.diag(np.sqrt(np.diag(s1)))
    inner = np.linalg.eigvalsh(r1 @ s2 @ r1)
    expected = float(((m1 - m2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(inner).sum())
    print("FD closed form", expected, "clean-fid", fid(m1, s1, m2, s2))
    assert fid(m1, s1, m2, s2) == pytest.approx(expected, rel=1e-9)
    # diagonal case by hand: Σ (a + b − 2√(ab))
    a, b = np.array([1.0, 4.0]), np.array([9.0, 1.0])
    assert fid(np.zeros(2), np.diag(a), np.ones(2), np.diag(b)) == pytest.approx(
        2 + (1 + 9 - 6) + (4 + 1 - 4)
    )


def test_wadi_fid_equals_clean_fid_called_directly(files):
    from cleanfid import fid as cleanfid

    from wadi_cli.evaluation.protocol import protocol_image

    got = score(files, files["fake"], "--ref", str(files["real"]), "--metrics", "fid")["metrics"]["fid"]
    net = torch.jit.load(str(files["inception"])).eval()

    def features(x: torch.Tensor) -> torch.Tensor:  # clean-fid's InceptionV3W.forward, any width
        return net.layers((x - 128) / 128).reshape(len(x), -1)

    ref = cleanfid.compute_fid(
        str(files["fake"]), str(files["real"]), mode="clean", custom_feat_extractor=features,
        custom_image_tranform=protocol_image, num_workers=0, batch_size=7, device=torch.device("cpu"),
        verbose=False, use_dataparallel=False,
    )  # fmt: skip
    print("FID wadi", got, "clean-fid", ref)
    assert got > 0.05 and got == pytest.approx(float(ref), rel=1e-6)


def test_kid_equals_the_unbiased_mmd_when_subsets_are_the_whole_set(files):
    from wadi_cli.evaluation.scores import kid

    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(30, 5)), rng.normal(0.5, 1.0, size=(30, 5))

    def k(a, b):  # the cubic polynomial kernel of KID, (a·b / d + 1)³
        return (a @ b.T / a.shape[1] + 1) ** 3

    n = len(x)
    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    mmd = (kxx.sum() - np.trace(kxx)) / (n * (n - 1)) + (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
    mmd -= 2 * kxy.mean()
    print("KID", kid(x, y), "unbiased MMD²", mmd)
    assert kid(x, y) == pytest.approx(mmd, rel=1e-9)


# ---- precision / recall -------------------------------------------------------------------
def _pr_by_hand(gen: np.ndarray, ref: np.ndarray, k: int = 3) -> tuple[float, float]:
    """Kynkäänniemi et al. by brute force in float64."""

    def radii(x):
        d = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1))
        return np.sort(d, axis=1)[:, k]  # column 0 is the point itself

    def covered(points, centres):
        d = np.sqrt(((points[:, None] - centres[None]) ** 2).sum(-1))
        return (d <= radii(centres)[None]).any(1).mean()

    return float(covered(gen, ref)), float(covered(ref, gen))


def test_precision_recall_planted():
    from wadi_cli.evaluation.scores import precision_recall

    rng = np.random.default_rng(0)
    a = rng.normal(size=(40, 4))
    far = a + 100.0
    assert precision_recall(a, a.copy()) == (1.0, 1.0)
    assert precision_recall(far, a) == (0.0, 0.0)
    # the reference has two far-apart clusters; the generated set covers one of them
    b = rng.normal(size=(40, 4)) + 50.0
    reference = np.concatenate([a, b])
    generated = a + rng.normal(scale=0.01, size=a.shape)
    p, r = precision_recall(generated, reference)
    print("half coverage: precision", p, "recall", r)
    assert (p, r) == (1.0, 0.5)
    mixed = np.concatenate([generated[:20], rng.normal(size=(20, 4)) - 50.0])
    assert precision_recall(mixed, reference) == pytest.approx(_pr_by_hand(mixed, reference), abs=1e-6)
    assert precision_recall(mixed, reference)[0] == 0.5


# ---- CLIP score --------------------------------------------------------------------------------
def test_clip_score_equals_a_hand_computed_cosine_with_the_prefix(files, tmp_path):
    import open_clip
    from PIL import Image

    captions = [f"a photo number {i}" for i in range(len(files["fake_paths"]))]
    (tmp_path / "c.txt").write_text("\n".join(captions) + "\n")
    got = score(files, files["fake"], "--captions", str(tmp_path / "c.txt"), "--metrics", "clip",
                "--clip-weights", str(files["clip"]))["metrics"]["clip"]  # fmt: skip
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{files['clip']}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{files['clip']}")
    cosines, bare = [], []
    with torch.no_grad():
        for path, caption in zip(files["fake_paths"], captions, strict=True):
            img = model.encode_image(preprocess(Image.open(path).convert("RGB"))[None])[0]
            txt = model.encode_text(tokenizer(["A photo depicts " + caption]))[0]
            cosines.append(float(img @ txt / (img.norm() * txt.norm())))
            txt = model.encode_text(tokenizer([caption]))[0]
            bare.append(float(img @ txt / (img.norm() * txt.norm())))
    print("CLIP score wadi", got, "by hand", np.mean(cosines), "without the prefix", np.mean(bare))
    assert got == pytest.approx(float(np.mean(cosines)), abs=1e-6)
    assert abs(got - float(np.mean(bare))) > 1e-4  # the prefix is used


# ---- reference files ---------------------------------------------------------------------------
def test_saved_reference_gives_the_same_numbers_and_other_settings_are_refused(files, tmp_path):
    npz = tmp_path / "ref.npz"
    r = run(
        "--ref", str(files["real"]), "--save-ref", str(npz), "--inception-weights", str(files["inception"])
    )
    assert r.exit_code == 0, r.stderr
    by_dir = score(files, files["fake"], "--ref", str(files["real"]), "--metrics", "fid,kid,pr")["metrics"]
    by_file = score(files, files["fake"], "--ref", str(npz), "--metrics", "fid,kid,pr")["metrics"]
    assert by_file == by_dir
    other = run("--images", str(files["fake"]), "--ref", str(npz), "--metrics", "fid",
                "--inception-weights", str(files["inception2"]))  # fmt: skip
    assert other.exit_code == 2 and len(other.stderr.strip().splitlines()) == 1
    assert "extractor_sha256: file" in other.stderr and "other settings" in other.stderr


def test_missing_weights_name_the_flag(files, tmp_path):
    from wadi_cli.evaluation import protocol

    gone = tmp_path / "absent.pt"
    r = run(*_tiny_args(files, tmp_path / "e", ("--inception-weights", str(gone))))
    assert r.exit_code == 2 and f"--inception-weights {gone}: no such file" in r.stderr
    assert not (tmp_path / "e").exists()  # refused before anything was written

    if (protocol.INCEPTION_CACHE_DIR + "/" + protocol.INCEPTION_FILE) and os.path.exists(
        os.path.join(protocol.INCEPTION_CACHE_DIR, protocol.INCEPTION_FILE)
    ):
        pytest.skip("clean-fid's Inception cache file exists on this machine")
    r = run("--images", str(files["fake"]), "--ref", str(files["real"]), "--metrics", "fid")
    assert r.exit_code == 2 and "--inception-weights FILE" in r.stderr
    r = run(
        "--images", str(files["fake"]), "--metrics", "clip", "--captions", str(files["root"] / "none.txt")
    )
    assert r.exit_code == 2 and "no such file" in r.stderr
    (tmp_path / "c.txt").write_text("\n".join(["x"] * 20) + "\n")
    r = run("--images", str(files["fake"]), "--metrics", "clip", "--captions", str(tmp_path / "c.txt"))
    assert r.exit_code == 2 and "--clip-weights FILE" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_mixed_modes_are_scored_and_a_corrupt_image_is_refused(files, tmp_path):
    from PIL import Image

    mixed = tmp_path / "mixed"
    mixed.mkdir()
    arrays = random_images(6, 5, size=(30, 50))
    for i, (mode, a) in enumerate(zip(["L", "RGBA", "CMYK", "P", "RGB", "LA"], arrays, strict=True)):
        img = Image.fromarray(a).convert(mode)
        img.save(mixed / f"{i}.{'jpg' if mode == 'CMYK' else 'png'}")
    got = score(files, mixed, "--ref", str(files["real"]), "--metrics", "fid")
    assert np.isfinite(got["metrics"]["fid"]) and got["num_images"] == 6
    data = (mixed / "4.png").read_bytes()
    (mixed / "4.png").write_bytes(data[: len(data) // 2])
    r = run("--images", str(mixed), "--ref", str(files["real"]), "--metrics", "fid",
            "--inception-weights", str(files["inception"]), "--out", str(tmp_path / "o"))  # fmt: skip
    assert r.exit_code == 2 and "4.png: not a readable image" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "o").exists()


# ---- generation: resume and processes --------------------------------------------------------------
def _tiny_args(files, out, extra=()):
    return ["-b", "tiny", "--model", helpers_dir(), "-n", "12", "--seed", "5", "--batch-size", "4",
            "--metrics", "fid,kid,pr", "--inception-weights", str(files["inception"]), "--device", "cpu",
            "--out", str(out), "--json", *extra]  # fmt: skip


def helpers_dir() -> str:
    return str(tiny_pipeline_dir())


def test_kill_and_resume_gives_the_metrics_of_one_run(files, tmp_path):
    one = run(*_tiny_args(files, tmp_path / "one"))
    assert one.exit_code == 0, one.stderr
    first = json.loads(one.stdout)["metrics"]
    out = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "wadi_cli", "eval", *_tiny_args(files, out)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        import time

        deadline = time.time() + 120
        while time.time() < deadline and len(list((out / "images").glob("*.png"))) < 4:
            time.sleep(0.05)
    finally:
        proc.kill()
        proc.wait()
    assert not (out / "metrics.json").exists()  # killed before scoring
    again = run(*_tiny_args(files, out))
    assert again.exit_code == 0, again.stderr
    second = json.loads(again.stdout)
    print(
        "one run", first, "killed + resumed", second["metrics"], "regenerated", second["timing"]["generated"]
    )
    assert second["metrics"] == first and second["timing"]["generated"] < 12


def test_two_processes_give_the_images_and_metrics_of_one(files, tmp_path):
    one = run(*_tiny_args(files, tmp_path / "one"))
    assert one.exit_code == 0, one.stderr
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "wadi_cli",
        "eval",
        *_tiny_args(files, tmp_path / "two", ("--num-processes", "2")),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert two["metrics"] == json.loads(one.stdout)["metrics"]
    names = sorted(p.name for p in (tmp_path / "one" / "images").glob("*.png"))
    assert names == sorted(p.name for p in (tmp_path / "two" / "images").glob("*.png")) and len(names) == 12
    for name in names:
        assert (tmp_path / "one" / "images" / name).read_bytes() == (
            tmp_path / "two" / "images" / name
        ).read_bytes()
