"""The parts of ``wadi eval``'s protocol that need no eval extra: the crop/resize transform
against a hand-made crop, caption readers, the resumable folder (truncated PNGs are
regenerated, nothing counted twice), the watcher on a fabricated run, and bad input."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from _helpers_sample import tiny_pipeline_dir
from PIL import Image
from typer.testing import CliRunner

from wadi_cli.cli.main import app
from wadi_cli.errors import BadInputError
from wadi_cli.evaluation import protocol
from wadi_cli.evaluation.captions import coco_captions, read_captions, select_captions
from wadi_cli.evaluation.folders import build_manifest, check_resumable, missing_chunks, write_manifest


def run(*args: str):
    return CliRunner().invoke(app, ["eval", *args])


def one_line_error(r, needle: str, code: int = 2) -> None:
    assert r.exit_code == code, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], lines


# ---- the transform -----------------------------------------------------------------------
@pytest.mark.parametrize(("w", "h"), [(300, 200), (120, 333), (257, 256), (64, 64)])
def test_crop_resize_is_center_crop_on_the_long_edge_then_lanczos(w, h):
    rng = np.random.default_rng(w * h)
    arr = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    side = min(w, h)
    top, left = (h - side) // 2, (w - side) // 2
    crop = arr[top : top + side, left : left + side]  # by hand, in numpy
    expected = np.asarray(Image.fromarray(crop).resize((256, 256), Image.Resampling.LANCZOS))
    np.testing.assert_array_equal(protocol.protocol_image(arr), expected)
    np.testing.assert_array_equal(protocol.protocol_image(Image.fromarray(arr)), expected)


def test_crop_keeps_the_middle_of_a_crafted_image():
    arr = np.zeros((100, 300, 3), np.uint8)
    arr[:, 100:200] = 255  # white middle third, black sides: the crop is all white
    assert protocol.protocol_image(arr).min() == 255
    tall = np.zeros((300, 100, 3), np.uint8)
    tall[100:200] = [10, 200, 30]
    assert (protocol.protocol_image(tall) == [10, 200, 30]).all()


@pytest.mark.parametrize("mode", ["L", "RGBA", "CMYK", "P", "I;16"])
def test_every_mode_becomes_rgb(mode):
    img = Image.new(mode, (40, 30))
    out = protocol.protocol_image(protocol.to_rgb(img))
    assert out.shape == (256, 256, 3) and out.dtype == np.uint8


def test_parse_metrics():
    assert protocol.parse_metrics("clip, FID", tiny=False) == ("fid", "clip")
    assert protocol.parse_metrics("fd,accuracy,pr", tiny=True) == ("pr", "accuracy", "fd")
    with pytest.raises(BadInputError, match="unknown is"):
        protocol.parse_metrics("fid,is", tiny=False)
    with pytest.raises(BadInputError, match="only for --backbone tiny"):
        protocol.parse_metrics("fd", tiny=False)


# ---- captions ------------------------------------------------------------------------------
def test_caption_formats(tmp_path):
    import pandas as pd

    (tmp_path / "c.txt").write_text("# comment\na cat\n\n  a   dog \n")
    (tmp_path / "c.csv").write_text("uid,caption\n1,a cat\n2,a dog\n")
    (tmp_path / "c.jsonl").write_text('{"prompt": "a cat"}\n{"prompt": "a dog"}\n')
    pd.DataFrame({"caption": ["a cat", "a dog"]}).to_parquet(tmp_path / "c.parquet")
    coco = {
        "images": [{"id": 7, "file_name": "b.jpg"}, {"id": 3, "file_name": "a.jpg"}],
        "annotations": [
            {"image_id": 7, "id": 20, "caption": "a dog"},
            {"image_id": 3, "id": 11, "caption": "second for 3"},
            {"image_id": 3, "id": 10, "caption": "a cat"},
        ],
    }
    (tmp_path / "c.json").write_text(json.dumps(coco))
    for name in ("c.txt", "c.csv", "c.jsonl", "c.parquet", "c.json"):
        assert read_captions(tmp_path / name) == ["a cat", "a dog"], name
    assert coco_captions(tmp_path / "c.json") == [(3, "a.jpg", "a cat"), (7, "b.jpg", "a dog")]


def test_captions_are_never_repeated():
    assert select_captions(["a", "b", "c"], 2, "f") == ["a", "b"]
    with pytest.raises(BadInputError, match="holds only 3 captions"):
        select_captions(["a", "b", "c"], 4, "f")


@pytest.mark.parametrize(
    ("name", "text", "needle"),
    [
        ("empty.txt", "\n  \n", "holds no prompts"),
        ("nocol.csv", "uid,text\n1,a cat\n", "no column 'caption'"),
        ("bad.json", '{"images": []}', "not a COCO caption file"),
        ("c.xml", "<a/>", "unsupported type"),
    ],
)
def test_bad_caption_files(tmp_path, name, text, needle):
    (tmp_path / name).write_text(text)
    r = run("-b", "sd15", "--captions", str(tmp_path / name), "--out", str(tmp_path / "e"))
    one_line_error(r, needle)
    assert not (tmp_path / "e").exists()


def test_more_images_than_captions_is_refused(tmp_path):
    (tmp_path / "c.txt").write_text("a cat\na dog\n")
    r = run("-b", "sd15", "--captions", str(tmp_path / "c.txt"), "-n", "3", "--out", str(tmp_path / "e"))
    one_line_error(r, "never repeated")


# ---- the resumable folder -----------------------------------------------------------------------
def test_manifest_mismatch_names_the_difference(tmp_path):
    out = tmp_path / "e"
    m = build_manifest({"seed": 0, "backbone": "tiny"}, ["a", "b"], 0)
    assert check_resumable(out, m) is None
    write_manifest(out, m)
    assert (
        check_resumable(out, build_manifest({"seed": 0, "backbone": "tiny"}, ["a", "b", "c"], 0)) is not None
    )
    with pytest.raises(BadInputError, match="seed: 0 there vs 1 now"):
        check_resumable(out, build_manifest({"seed": 1, "backbone": "tiny"}, ["a", "b"], 1))
    with pytest.raises(BadInputError, match="caption 1: 'b' there vs 'x' now"):
        check_resumable(out, build_manifest({"seed": 0, "backbone": "tiny"}, ["a", "x"], 0))


def test_missing_chunks_finds_absent_and_truncated_images(tmp_path):
    out = tmp_path / "e"
    m = build_manifest({}, [f"c{i}" for i in range(7)], 0)
    write_manifest(out, m)
    img = np.zeros((8, 8, 3), np.uint8)
    for e in m.entries:
        Image.fromarray(img).save(out / e["file"])
    assert missing_chunks(out, m, 3) == []
    data = (out / m.entries[4]["file"]).read_bytes()
    (out / m.entries[4]["file"]).write_bytes(data[: len(data) // 2])  # killed mid-write
    os.remove(out / m.entries[6]["file"])
    assert missing_chunks(out, m, 3) == [(3, 6), (6, 7)]


@pytest.fixture(scope="module")
def base_dir():
    return str(tiny_pipeline_dir())


@pytest.fixture(scope="module")
def classifier_file(tmp_path_factory):
    import torch

    from wadi_cli.io import save_safetensors
    from wadi_cli.tiny.classifier import TinyClassifier

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("clf") / "classifier.safetensors"
    save_safetensors(TinyClassifier().state_dict(), path)
    return path


def _tiny(base_dir, classifier_file, out, *extra):
    return run(
        "-b", "tiny", "--model", base_dir, "--classifier", str(classifier_file), "-n", "10", "--seed", "3",
        "--batch-size", "4", "--metrics", "accuracy,fd", "--out", str(out), "--json", *extra,
    )  # fmt: skip


def test_resume_regenerates_only_what_is_missing_and_matches_one_run(base_dir, classifier_file, tmp_path):
    one = _tiny(base_dir, classifier_file, tmp_path / "one")
    assert one.exit_code == 0, one.stderr
    first = json.loads(one.stdout)
    # the same numbers as the classifier-only tiny eval (which has no --out EVAL folder)
    legacy = run("-b", "tiny", "--model", base_dir, "--classifier", str(classifier_file), "-n", "10",
                 "--seed", "3", "--batch-size", "4", "--json")  # fmt: skip
    assert json.loads(legacy.stdout)["fd"] == first["metrics"]["fd"]
    out = tmp_path / "killed"
    assert _tiny(base_dir, classifier_file, out).exit_code == 0
    files = sorted((out / "images").glob("*.png"))
    assert len(files) == 10
    kept = {f.name: f.stat().st_mtime_ns for f in files}
    data = files[5].read_bytes()
    files[5].write_bytes(data[:100])  # truncated by a kill
    os.remove(files[9])
    (out / "metrics.json").unlink()
    again = _tiny(base_dir, classifier_file, out)
    assert again.exit_code == 0, again.stderr
    second = json.loads(again.stdout)
    assert second["metrics"] == first["metrics"] and second["num_images"] == 10
    assert second["timing"]["generated"] == 4 + 2  # chunk [4, 8) and chunk [8, 10), nothing else
    for f in sorted((out / "images").glob("*.png")):
        assert f.read_bytes() == (tmp_path / "one" / "images" / f.name).read_bytes()
        if f.name in {"000000.png", "000003.png"}:
            assert f.stat().st_mtime_ns == kept[f.name]  # untouched
    other = _tiny(base_dir, classifier_file, out, "--alpha-bar-t", "0.01")
    one_line_error(other, "other settings (alpha_bar_T")


def test_an_eval_of_a_lora_run_folder_resumes(base_dir, classifier_file, tmp_path):
    """``-w RUN`` of a LoRA run samples a temporary merge of its student; the manifest
    records the checkpoint's student file instead, so the same command resumes."""
    run_dir = tmp_path / "run"
    r = CliRunner().invoke(
        app,
        ["distill", "--model", base_dir, "--out", str(run_dir), "--max-steps", "1", "--batch-size", "1",
         "--regression-weight", "0", "--validate-every", "0", "--device", "cpu", "--adapter", "lora"],
    )  # fmt: skip
    assert r.exit_code == 0, r.stderr
    out = tmp_path / "eval"
    first = _tiny(base_dir, classifier_file, out, "-w", str(run_dir))
    assert first.exit_code == 0, first.stderr
    recorded = json.loads((out / "manifest.json").read_text())["settings"]["weights"]
    assert recorded == str(run_dir / "checkpoints" / "step-00000001" / "student.safetensors")
    (out / "metrics.json").unlink()
    again = _tiny(base_dir, classifier_file, out, "-w", str(run_dir))
    assert again.exit_code == 0, again.stderr
    assert json.loads(again.stdout)["timing"]["generated"] == 0


def test_the_tiny_classifier_eval_is_not_split_over_processes(tmp_path):
    r = run("-b", "tiny", "--num-processes", "2", "--out", str(tmp_path / "e"))
    one_line_error(r, "the tiny classifier's accuracy and fd run in one process")
    assert not (tmp_path / "e").exists()


def test_ref_folder_without_images_is_refused(tmp_path):
    (tmp_path / "ref").mkdir()
    (tmp_path / "c.txt").write_text("a cat\n")
    r = run("-b", "sd15", "--captions", str(tmp_path / "c.txt"), "--ref", str(tmp_path / "ref"),
            "--out", str(tmp_path / "e"))  # fmt: skip
    one_line_error(r, "holds no images")
    assert not (tmp_path / "e").exists()


def test_every_process_loads_the_reference_once_per_session(tmp_path, monkeypatch):
    """``--watch`` keeps one scorer for every checkpoint. A process other than the main
    one holds no reference (it only helps compute the features, a collective), yet it
    must not compute them again at the next checkpoint while the main process moves on."""
    from wadi_cli.evaluation.evaluate import _reference
    from wadi_cli.evaluation.parallel import Processes
    from wadi_cli.evaluation.run import EvalOptions, Scorer

    real = tmp_path / "real"
    real.mkdir()
    Image.new("RGB", (8, 8)).save(real / "0.png")
    calls = []
    monkeypatch.setattr(Scorer, "features", lambda self, files, clip, label: calls.append(label))
    procs = Processes(rank=1, world=2)
    scorer = Scorer(EvalOptions(metrics=("fid",)), procs)
    for _ in range(3):  # three checkpoints
        _reference(scorer, str(real), None, procs)
    assert calls == ["reference features"] and scorer.reference is None


def test_clip_text_features_are_encoded_once_per_session(monkeypatch):
    """``--watch`` scores every checkpoint with the same captions: encoded once; other
    captions are encoded afresh, and every score pairs image i with caption i."""
    from wadi_cli.evaluation.parallel import Processes
    from wadi_cli.evaluation.run import EvalOptions, Scorer

    rng = np.random.default_rng(0)
    table = {c: rng.normal(size=4) for c in ("a", "b", "c", "d")}
    encoded = []

    class Clip:
        description = "fake"

        def texts(self, batch, prefix):
            encoded.extend(batch)
            return np.stack([table[c] for c in batch])

    images = {}
    monkeypatch.setattr(Scorer, "features", lambda self, files, clip, label: {"clip": images["now"]})
    monkeypatch.setattr(Scorer, "how", lambda self, n: {})
    scorer = Scorer(EvalOptions(metrics=("clip",)), Processes(), clip=Clip())
    for captions in (["a", "b", "c"], ["a", "b", "c"], ["d", "a"]):
        images["now"] = np.stack([table[c] for c in captions]) * 2.0  # cosine 1 with its own caption
        metrics, _ = scorer.score([f"{i}.png" for i in range(len(captions))], captions)
        assert metrics["clip"] == pytest.approx(1.0)
    assert encoded == ["a", "b", "c", "d", "a"]


def test_missing_extra_or_weights_is_one_line(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "cleanfid" else real(name)
    )
    (tmp_path / "img").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "img" / "a.png")
    r = run("--images", str(tmp_path / "img"), "--ref", str(tmp_path / "img"), "--metrics", "fid")
    one_line_error(r, 'pip install "wadi-cli[eval]"')


def test_watch_refuses_a_folder_that_is_not_a_run(tmp_path):
    (tmp_path / "notarun").mkdir()
    one_line_error(run("--watch", str(tmp_path / "notarun")), "not a wadi distill run")
    one_line_error(run("--watch", str(tmp_path / "absent")), "no such folder")


@pytest.fixture(scope="module")
def tiny_run(base_dir, tmp_path_factory):
    """A finished 2-step ``wadi distill`` run of the random tiny pipeline, both checkpoints kept."""
    run_dir = tmp_path_factory.mktemp("run") / "run"
    r = CliRunner().invoke(
        app,
        ["distill", "--model", base_dir, "--out", str(run_dir), "--max-steps", "2", "--checkpoint-every", "1",
         "--keep-last", "5", "--batch-size", "1", "--regression-weight", "0", "--validate-every", "0",
         "--device", "cpu", "--alpha-bar-t", "0.01"],
    )  # fmt: skip
    assert r.exit_code == 0, r.stderr
    return run_dir


def test_watch_scores_every_checkpoint_and_exits_when_the_run_is_finished(
    tiny_run, base_dir, classifier_file, tmp_path
):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run, run_dir)
    # a checkpoint being written: a hidden temporary folder, never read
    (run_dir / "checkpoints" / ".step-00000003.abc.tmp").mkdir()
    r = run("--watch", str(run_dir), "--classifier", str(classifier_file), "-n", "6", "--batch-size", "3",
            "--metrics", "accuracy,fd", "--poll", "0.1")  # fmt: skip
    assert r.exit_code == 0, r.stderr
    lines = (run_dir / "eval.csv").read_text().splitlines()
    assert lines[0] == "step,accuracy,fd" and [ln.split(",")[0] for ln in lines[1:]] == ["1", "2"]
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    for step in ("step-00000001", "step-00000002"):
        record = json.loads((run_dir / "eval" / step / "metrics.json").read_text())
        assert record["weights"].endswith(f"{step}/student.safetensors") and record["num_images"] == 6
        assert record["alpha_bar_T"] == 0.01  # what the run trained with, recorded in its student
    # the row equals a direct evaluation of the same checkpoint's student
    student = run_dir / "checkpoints" / "step-00000002" / "student.safetensors"
    direct = run("-b", "tiny", "--model", base_dir, "--classifier", str(classifier_file), "-n", "6",
                 "--batch-size", "3", "-w", str(student), "--json")  # fmt: skip
    assert json.loads(direct.stdout)["fd"] == pytest.approx(float(lines[2].split(",")[2]), rel=1e-12)
    again = run(
        "--watch", str(run_dir), "--classifier", str(classifier_file), "-n", "6", "--metrics", "accuracy,fd"
    )
    assert again.exit_code == 0 and len((run_dir / "eval.csv").read_text().splitlines()) == 3  # nothing twice


def test_watch_waits_while_the_run_is_going(tiny_run, classifier_file, tmp_path):
    import shutil
    import time

    from wadi_cli.evaluation.watch import run_finished

    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run, run_dir)
    assert run_finished(run_dir)
    state = run_dir / "checkpoints" / "step-00000002" / "state.json"
    data = json.loads(state.read_text())
    data["config"]["max_steps"] = 10
    state.write_text(json.dumps(data))
    time.sleep(0.01)
    (run_dir / "config.json").touch()  # a resumed run started after the last stop
    assert not run_finished(run_dir)
    (run_dir / "ranks.json").touch()  # ... and stopped again
    assert run_finished(run_dir)


def test_images_default_to_the_four_protocol_metrics(tmp_path):
    import importlib.util

    if importlib.util.find_spec("cleanfid") is not None:
        pytest.skip("the eval extra is installed; this checks the message without it")
    (tmp_path / "img").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "img" / "a.png")
    r = run("--images", str(tmp_path / "img"), "--ref", str(tmp_path / "img"))
    one_line_error(r, "--metrics fid,kid,clip,pr needs the eval extra")


def test_eval_uses_the_alpha_bar_T_recorded_in_the_weights(tiny_run, base_dir, classifier_file, tmp_path):
    """A run trained with ᾱ_T = 0.01 is scored with 0.01, not the registry's 0.0047; an explicit
    --alpha-bar-t wins, with a warning naming both values."""
    r = _tiny(base_dir, classifier_file, tmp_path / "recorded", "-w", str(tiny_run))
    assert r.exit_code == 0, r.stderr
    assert json.loads((tmp_path / "recorded" / "metrics.json").read_text())["alpha_bar_T"] == 0.01
    r = _tiny(base_dir, classifier_file, tmp_path / "asked", "-w", str(tiny_run), "--alpha-bar-t", "0.02")
    assert r.exit_code == 0, r.stderr
    assert json.loads((tmp_path / "asked" / "metrics.json").read_text())["alpha_bar_T"] == 0.02
    assert "0.02" in r.stderr and "0.01" in r.stderr and "warning" in r.stderr
