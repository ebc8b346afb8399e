"""Architecture of the tiny model: tokenizer, fixed spec, diffusers folder round trip."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from wadi_cli.tiny import arch
from wadi_cli.tiny.arch import (
    MAX_TOKENS,
    PROMPT_WORDS,
    TINY_PIPELINE_DIR,
    build_tiny_components,
    build_tokenizer,
    save_tiny_pipeline,
    tiny_pipeline_available,
)


@pytest.fixture(scope="module")
def components():
    return build_tiny_components(seed=0)


def test_every_prompt_word_is_one_token():
    tok = build_tokenizer()
    vocab = tok.get_vocab()
    for word in PROMPT_WORDS:
        ids = tok(word, add_special_tokens=False).input_ids
        assert ids == [vocab[word + "</w>"]], word
    ids = tok("a yellow triangle at the bottom right", padding="max_length", max_length=MAX_TOKENS).input_ids
    assert len(ids) == MAX_TOKENS
    assert ids[0] == tok.bos_token_id and ids[8] == tok.eos_token_id
    assert ids[9:] == [tok.pad_token_id] * (MAX_TOKENS - 9)
    assert tok.model_max_length == MAX_TOKENS


def test_spec(components):
    unet, vae, te, sched = (components[k] for k in ("unet", "vae", "text_encoder", "scheduler"))
    assert unet.config.sample_size == 8 and unet.config.in_channels == 4 and unet.config.out_channels == 4
    assert unet.config.cross_attention_dim == te.config.hidden_size == 64
    assert unet.config.use_linear_projection
    assert te.config.vocab_size == len(components["tokenizer"].get_vocab())
    assert te.config.max_position_embeddings == MAX_TOKENS
    assert vae.config.latent_channels == 4
    c = sched.config
    assert (c.num_train_timesteps, c.beta_schedule, c.beta_start, c.beta_end) == (
        1000,
        "scaled_linear",
        0.00085,
        0.012,
    )
    assert c.prediction_type == "epsilon" and not c.clip_sample and c.steps_offset == 1
    assert c.set_alpha_to_one is False
    # SD's scaled-linear schedule: ᾱ_999 ≈ 0.00466 (method.md §3)
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2
    np.testing.assert_allclose(sched.alphas_cumprod.double().numpy(), np.cumprod(1 - betas), rtol=1e-5)


def test_unet_linears_have_even_in_features_and_cross_attention(components):
    linears = {n: m for n, m in components["unet"].named_modules() if isinstance(m, torch.nn.Linear)}
    assert linears and all(m.in_features % 2 == 0 for m in linears.values())
    assert any(n.endswith("attn2.to_k") and m.in_features == 64 for n, m in linears.items())
    assert any(n.endswith("proj_in") for n in linears)


def test_shapes_end_to_end(components):
    with torch.no_grad():
        img = torch.zeros(2, 3, 32, 32)
        z = components["vae"].encode(img).latent_dist.mean
        assert z.shape == (2, 4, 8, 8)
        assert components["vae"].decode(z).sample.shape == (2, 3, 32, 32)
        ids = components["tokenizer"](
            ["a red circle at the top left", ""],
            padding="max_length",
            max_length=MAX_TOKENS,
            return_tensors="pt",
        ).input_ids
        emb = components["text_encoder"](ids)[0]
        assert emb.shape == (2, MAX_TOKENS, 64)
        assert components["unet"](z, torch.tensor([10, 999]), emb).sample.shape == (2, 4, 8, 8)


def test_build_is_deterministic():
    a = build_tiny_components(seed=3)["unet"].state_dict()
    b = build_tiny_components(seed=3)["unet"].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_save_and_load_offline(components, tmp_path):
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTokenizer

    out = save_tiny_pipeline(components, tmp_path / "pipe")
    assert tiny_pipeline_available(out)
    index = json.loads((out / "model_index.json").read_text())
    assert index["safety_checker"] == [None, None] and index["requires_safety_checker"] is False
    assert (out / "tokenizer" / "vocab.json").is_file() and (out / "tokenizer" / "merges.txt").is_file()
    assert not list(out.rglob("*.bin"))
    tok = CLIPTokenizer.from_pretrained(out / "tokenizer", local_files_only=True)
    assert tok("a red circle").input_ids == components["tokenizer"]("a red circle").input_ids
    pipe = StableDiffusionPipeline.from_pretrained(str(out), safety_checker=None, local_files_only=True)
    sd_saved, sd_orig = pipe.unet.state_dict(), components["unet"].state_dict()
    assert all(torch.equal(sd_saved[k], sd_orig[k]) for k in sd_orig)
    assert not tiny_pipeline_available(tmp_path / "nowhere")


@pytest.mark.skipif(not tiny_pipeline_available(), reason="trained tiny pipeline not shipped")
def test_shipped_pipeline_loads_and_generates():
    pipe = arch.load_tiny_pipeline()
    assert pipe.vae.config.scaling_factor != 1.0
    size = sum(f.stat().st_size for f in TINY_PIPELINE_DIR.rglob("*") if f.is_file())
    assert size < 20 * 2**20
    out = pipe(
        "a red circle at the top left",
        num_inference_steps=2,
        height=32,
        width=32,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    )
    assert out.images.shape == (1, 32, 32, 3)
