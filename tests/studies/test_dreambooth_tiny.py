"""analysis/dreambooth_tiny/run.py: its scores against planted ground truth (renders of the
star, of other shapes, of other colours and positions; hand-computed distances and
intervals), and (slow) a reduced run that writes every results file."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
from _helpers_scripts import load_analysis_script

from wadi_cli.tiny.data import render_batch

study = load_analysis_script("dreambooth_tiny/run.py")


@pytest.fixture(scope="module")
def scorer():
    """The study's scorer with 16 reference renders per centroid instead of 64 (time)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(study, "REF_RENDERS", 16)
        yield study.Scorer(6)


def test_distances_against_loops():
    rng = np.random.default_rng(3)
    f, c, pool = rng.normal(size=(5, 7)), rng.normal(size=(5, 7)), rng.normal(size=(4, 7))
    by_loop = sum(math.sqrt(sum((f[i, j] - c[i, j]) ** 2 for j in range(7))) for i in range(5)) / 5
    assert study.centroid_distance(f, c) == pytest.approx(by_loop, rel=1e-12)
    nearest = [min(math.dist(f[i], pool[k]) for k in range(4)) for i in range(5)]
    assert study.nearest_distance(f, pool) == pytest.approx(sum(nearest) / 5, rel=1e-12)


def test_subject_fidelity_ranks_new_star_renders_first(scorer):
    """New renders of the star (other jitter), through the VAE as the references are, lie
    closer to the held-out star centroid than renders of any vocabulary shape at the same
    colour and position, and than a star of another colour."""
    n = 16
    rt = scorer.roundtrip
    star = scorer.subject(rt(render_batch([study.INSTANCE] * n, 999)), [study.INSTANCE] * n)
    for shape in ("circle", "square", "triangle"):
        other = rt(render_batch([{**study.INSTANCE, "shape": shape}] * n, 999))
        assert scorer.subject(other, [study.INSTANCE] * n) > 1.3 * star
    blue = rt(render_batch([{**study.INSTANCE, "color": "blue"}] * n, 999))
    assert scorer.subject(blue, [study.INSTANCE] * n) > 1.3 * star


def test_vae_roundtrip_is_the_decoded_mode():
    """The round trip equals decoding the VAE's posterior mode by hand (diffusers' own calls)."""
    import torch

    from wadi_cli.pipeline import load_pipeline

    pipe = load_pipeline("tiny", teacher=True)
    img = render_batch([study.INSTANCE] * 2, 5)
    x = torch.from_numpy(img).permute(0, 3, 1, 2).double().div(127.5).sub(1)
    vae = pipe.vae.double()
    with torch.no_grad():
        out = vae.decode(vae.encode(x).latent_dist.mode()).sample
    vae.float()
    expected = ((out.clamp(-1, 1) + 1) * 127.5).round().permute(0, 2, 3, 1).numpy()
    got = study.vae_roundtrip(img, pipe).astype(np.float64)
    assert np.abs(got - expected).max() <= 1.0


def test_copy_gap_finds_copies(scorer):
    """The instance images themselves (through the VAE) have a large positive gap (distance 0 to
    themselves); new renders of the star have a gap near 0 (much smaller than the copies')."""
    copies = scorer.copy_gap(scorer.roundtrip(scorer.instances))
    fresh = scorer.copy_gap(scorer.roundtrip(render_batch([study.INSTANCE] * 32, 4242)))
    assert copies > 2.0 and abs(fresh) < 0.3 * copies


def test_prompt_fidelity_and_drift_of_planted_images(scorer):
    """Renders that follow every novel prompt score 1 on colour and position; renders that
    ignore the prompt (always the instances' red top-left star) score 0 on both; in-vocabulary
    renders that are all circles score 1/3 on shape."""
    every = study.novel_attrs()
    assert len(every) == 15 and all((a["color"], a["position"]) != ("red", "top left") for a in every)
    # three prompts with a new colour and a new position each (time: one centroid per prompt)
    novel_at = [a for a in every if a["color"] != "red" and a["position"] != "top left"][::3] * 2
    vocab_at = [{**study.INSTANCE, "shape": s} for s in ("circle", "square", "triangle") for _ in range(2)]
    follows = scorer.score(novel=render_batch(novel_at, 5), novel_at=novel_at)
    assert follows["color_acc"] == 1.0 and follows["position_acc"] == 1.0
    ignores = scorer.score(novel=render_batch([study.INSTANCE] * len(novel_at), 5), novel_at=novel_at)
    assert ignores["color_acc"] == 0.0 and ignores["position_acc"] == 0.0
    circles = render_batch([{**a, "shape": "circle"} for a in vocab_at], 5)
    assert scorer.score(vocab=circles, vocab_at=vocab_at)["vocab_shape"] == pytest.approx(1 / 3)
    assert math.isnan(scorer.score()["subject"])


def test_summary_means_intervals_and_paired_differences():
    """Two seeds: LoRaD 1 and 3, LoRA 0 and 1 → means 2 and 0.5; pairwise differences 1 and 2
    (mean 1.5, sd √½); 95 % half-width t(0.975, 1)·sd/√2 with t = 12.7062."""
    rows = []
    for kind, values in (("lorad", (1.0, 3.0)), ("lora", (0.0, 1.0))):
        for seed, v in enumerate(values):
            rows.append({"part": "study", "kind": kind, "prior": "off", "seed": seed, "step": 50,
                         **dict.fromkeys(study.METRICS, v)})  # fmt: skip
    t = 12.7062047
    m, h = study.mean_ci([1.0, 3.0])
    assert m == 2.0 and h == pytest.approx(t * math.sqrt(2) / math.sqrt(2), rel=1e-6)
    table = study.summarize(rows)
    assert f"| off | 50 | lorad | 2 | 2.000 ± {t:.3f} |" in table
    assert f"| off | 50 | lora | 2 | 0.500 ± {t * math.sqrt(0.5) / math.sqrt(2):.3f} |" in table
    assert f"| off | 50 | 2 | 1.500 ± {t * math.sqrt(0.5) / math.sqrt(2):.3f} |" in table


def test_equal_parameters_by_rank():
    """LoRaD rank 16 and LoRA rank 12 on the tiny U-Net: the counts the study prints, from the
    layer shapes (LoRaD r·(m + n/2), LoRA r·(m + n) per adapted Linear)."""
    from wadi_cli.backbones import get_backbone
    from wadi_cli.tiny.arch import build_tiny_components

    unet = build_tiny_components()["unet"]
    targets = set(get_backbone("tiny").target_modules(unet, "student"))
    shapes = [m.weight.shape for n, m in unet.named_modules() if n in targets]
    lorad = sum(16 * (o + i // 2) for o, i in shapes)
    lora = sum(12 * (o + i) for o, i in shapes)
    assert lorad == 165_632 and lora == 163_200
    assert study.RANKS == {"lorad": 16, "lora": 12}


@pytest.mark.slow
def test_a_reduced_run_writes_every_results_file(tmp_path):
    argv = ["--out", str(tmp_path), "--seeds", "0", "--prior", "off", "--steps", "2", "--every", "1",
            "--instances", "2", "--n-subject", "2", "--n-prompt", "1", "--grid", "2"]  # fmt: skip
    assert study.main(argv) == 0
    rows = list(csv.DictReader((tmp_path / "results.csv").open()))
    assert [r["kind"] for r in rows if r["part"] == "reference"] == [
        "star renders", "star renders through the VAE (ceiling)", "instance images through the VAE",
        "circle renders through the VAE", "base model"]  # fmt: skip
    trained = [(r["kind"], r["step"]) for r in rows if r["part"] == "study"]
    assert trained == [("lorad", "1"), ("lorad", "2"), ("lora", "1"), ("lora", "2")]
    info = json.loads((tmp_path / "results.json").read_text())
    assert info["params"] == {"lorad": 165_632, "lora": 163_200}
    for name in ("results.md", "overfit.png", "samples.png"):
        assert (tmp_path / name).is_file()
    assert not (tmp_path / "_runs-study").exists()
