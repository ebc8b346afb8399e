"""Prompt encoding: CLIP (no mask to the denoiser) and T5 (mask to encoder and denoiser),

with exactly the same rule for prompts and for the empty prompt ∅."""

from __future__ import annotations

import _helpers_sample
import pytest
import torch

from wadi_cli.diffusion import PromptEncoder, TextCondition
from wadi_cli.errors import BadInputError


@pytest.fixture(scope="module")
def tiny_components():
    return _helpers_sample.tiny_components()


PROMPTS = ["a red circle at the top left", "a blue square"]


@pytest.fixture(scope="module")
def tokenizer():
    tiny = pytest.importorskip("wadi_cli.tiny", reason="wadi_cli.tiny is not there yet")
    return tiny.build_tokenizer()


@pytest.fixture(scope="module")
def t5(tokenizer):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    cfg = T5Config(
        vocab_size=len(tokenizer.get_vocab()), d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2
    )
    return T5EncoderModel(cfg).eval()


@torch.no_grad()
def test_clip_encoding_matches_reference(tiny_components):
    tok, te = tiny_components["tokenizer"], tiny_components["text_encoder"]
    enc = PromptEncoder(tok, te, "clip")
    cond = enc(PROMPTS)
    ids = tok(
        PROMPTS, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt"
    )
    ref = te(ids.input_ids)[0]
    assert cond.mask is None
    torch.testing.assert_close(cond.embeds, ref)
    # ∅ goes through the very same path
    empty = enc.empty(3)
    ref_empty = te(
        tok([""], padding="max_length", max_length=tok.model_max_length, return_tensors="pt").input_ids
    )[0]
    assert empty.embeds.shape[0] == 3 and empty.mask is None
    torch.testing.assert_close(empty.embeds, ref_empty.expand(3, -1, -1))


@torch.no_grad()
def test_t5_mask_used_for_prompts_and_empty(tokenizer, t5):
    enc = PromptEncoder(tokenizer, t5, "t5", max_length=12)
    cond = enc(PROMPTS)
    toks = tokenizer(PROMPTS, padding="max_length", max_length=12, truncation=True, return_tensors="pt")
    torch.testing.assert_close(cond.mask, toks.attention_mask)
    torch.testing.assert_close(cond.embeds, t5(toks.input_ids, attention_mask=toks.attention_mask)[0])
    unmasked = t5(toks.input_ids)[0]
    assert not torch.allclose(cond.embeds, unmasked)  # the mask matters, so the test can fail
    empty = enc.empty(2)
    etoks = tokenizer([""], padding="max_length", max_length=12, return_tensors="pt")
    assert empty.mask is not None and int(empty.mask[0].sum()) == int(etoks.attention_mask.sum()) < 12
    torch.testing.assert_close(
        empty.embeds[0], t5(etoks.input_ids, attention_mask=etoks.attention_mask)[0][0]
    )


def test_condition_cat_and_index():
    a = TextCondition(torch.zeros(2, 3, 4), torch.ones(2, 3, dtype=torch.long))
    b = TextCondition(torch.ones(1, 3, 4), torch.zeros(1, 3, dtype=torch.long))
    c = TextCondition.cat([a, b])
    assert len(c) == 3 and c.mask.tolist()[2] == [0, 0, 0]
    assert torch.equal(c.index([2]).embeds, b.embeds)
    with pytest.raises(ValueError):
        TextCondition.cat([a, TextCondition(torch.zeros(1, 3, 4))])


def test_condition_carries_sdxls_pooled_embedding():
    """cat / index / to / expand keep the pooled rows with their prompts; mixing pooled and
    unpooled conditions is refused."""
    a = TextCondition(torch.zeros(2, 3, 4), None, torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    b = TextCondition(torch.ones(1, 3, 4), None, torch.tensor([[5.0, 6.0]]))
    c = TextCondition.cat([a, b])
    assert c.pooled.tolist() == [[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]
    assert c.index([2, 0]).pooled.tolist() == [[5.0, 6.0], [1.0, 2.0]]
    assert c.to(dtype=torch.float64).pooled.dtype == torch.float64
    assert b.expand(3).pooled.tolist() == [[5.0, 6.0]] * 3
    with pytest.raises(ValueError, match="pooled"):
        TextCondition.cat([a, TextCondition(torch.zeros(1, 3, 4))])


def test_bad_inputs(tiny_components):
    with pytest.raises(BadInputError):
        PromptEncoder(tiny_components["tokenizer"], tiny_components["text_encoder"], "bert")
    enc = PromptEncoder(tiny_components["tokenizer"], tiny_components["text_encoder"], "clip")
    with pytest.raises(BadInputError):
        enc([])


def test_a_prompt_over_the_token_limit_warns_once_with_its_count_and_encodes_as_the_whole(tiny_components):
    """The encoder reads ``max_length`` tokens; a longer prompt says so once (with the count),
    and a huge one is cut before tokenizing without changing what the encoder gets (the
    reference: the tokenizer's own truncation of the whole text)."""
    import warnings

    from wadi_cli.errors import WadiWarning

    tok, te = tiny_components["tokenizer"], tiny_components["text_encoder"]
    enc = PromptEncoder(tok, te, "clip")
    words = "a red circle at the top left and a blue square "
    long, huge = words * 3, words * 20_000  # over the limit; ~1 MB
    n_long = len(tok(long, truncation=False)["input_ids"])
    assert n_long > enc.max_length
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        short = enc(["a red circle"])
        got = enc([long, huge])
        enc([long])
    said = [str(w.message) for w in caught if issubclass(w.category, WadiWarning)]
    assert said == [f"a prompt is {n_long} tokens; the text encoder reads only the first {enc.max_length} "
                    "(the rest is ignored)"]  # fmt: skip
    ids = tok([long, huge], padding="max_length", max_length=enc.max_length, truncation=True,
              return_tensors="pt").input_ids  # fmt: skip
    with torch.no_grad():
        want = te(ids)[0]
    assert torch.equal(got.embeds, want)
    assert short.embeds.shape[0] == 1
