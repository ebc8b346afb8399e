"""New tokens in a frozen CLIP text encoder (:mod:`wadi_cli.diffusion.tokens`), checked against
diffusers' ``load_textual_inversion`` (which resizes the embedding table instead) as the
independent reference: the same prompt must encode to the same hidden states."""

from __future__ import annotations

import pytest
import torch

from wadi_cli.diffusion.tokens import TokenEmbedding, add_tokens, read_embedding_files, token_is_known
from wadi_cli.errors import BadInputError, MismatchError
from wadi_cli.io.embeddings import save_embedding

pytestmark = pytest.mark.usefixtures("one_thread")


def _pipe():
    from diffusers import StableDiffusionPipeline

    from wadi_cli.tiny.arch import TINY_PIPELINE_DIR

    return StableDiffusionPipeline.from_pretrained(str(TINY_PIPELINE_DIR), safety_checker=None)


def _encode(pipe, prompt):
    ids = pipe.tokenizer([prompt], padding="max_length", max_length=16, truncation=True, return_tensors="pt")
    with torch.no_grad():
        return ids.input_ids, pipe.text_encoder(ids.input_ids)[0]


def test_two_learned_tokens_encode_as_diffusers_loads_them(tmp_path):
    ref, ours = _pipe(), _pipe()
    vecs = {"<R>": torch.randn(64) * 0.3, "<S>": torch.randn(64) * 0.3}
    for token, vec in vecs.items():
        save_embedding(tmp_path / f"{token[1]}.safetensors", token, vec)
        ref.load_textual_inversion(str(tmp_path / f"{token[1]}.safetensors"))
    add_tokens(ours.tokenizer, ours.text_encoder, {"<R>": vecs["<R>"]})
    add_tokens(ours.tokenizer, ours.text_encoder, {"<S>": vecs["<S>"]})  # a second file extends
    for prompt in ("a red circle <R>", "a <S> blue<R>square", "a green triangle at the top left"):
        ids_ref, h_ref = _encode(ref, prompt)
        ids, h = _encode(ours, prompt)
        assert torch.equal(ids, ids_ref)
        torch.testing.assert_close(h, h_ref, rtol=0, atol=1e-6)
    assert ours.text_encoder.get_input_embeddings().base.weight.shape[0] == 100  # base table untouched


def test_only_the_learned_row_gets_a_gradient():
    pipe = _pipe()
    base = pipe.text_encoder.get_input_embeddings()
    pipe.text_encoder.requires_grad_(False)
    param = torch.nn.Parameter(torch.randn(1, 64))
    module = add_tokens(pipe.tokenizer, pipe.text_encoder, {"<R>": param})
    assert isinstance(module, TokenEmbedding) and module.base is base
    ids, _ = _encode(pipe, "a red circle <R>")
    pipe.text_encoder(ids)[0].sum().backward()
    assert param.grad is not None and float(param.grad.abs().sum()) > 0 and base.weight.grad is None


def test_known_tokens_and_other_widths_are_refused_before_any_change(tmp_path):
    pipe = _pipe()
    n = len(pipe.tokenizer)
    for token in ("red", "circle", "<|endoftext|>"):
        assert token_is_known(pipe.tokenizer, token)
        with pytest.raises(BadInputError, match="already in the tokenizer's vocabulary"):
            add_tokens(pipe.tokenizer, pipe.text_encoder, {token: torch.zeros(64)})
    assert not token_is_known(pipe.tokenizer, "<R>")
    with pytest.raises(MismatchError, match="768 wide; this text encoder's tokens are 64 wide"):
        add_tokens(pipe.tokenizer, pipe.text_encoder, {"<R>": torch.zeros(768)})
    with pytest.raises(BadInputError, match="without spaces"):
        add_tokens(pipe.tokenizer, pipe.text_encoder, {"<R S>": torch.zeros(64)})
    assert len(pipe.tokenizer) == n and not isinstance(
        pipe.text_encoder.get_input_embeddings(), TokenEmbedding
    )
    save_embedding(tmp_path / "a.safetensors", "<R>", torch.zeros(64))
    with pytest.raises(BadInputError, match="given twice"):
        read_embedding_files([tmp_path / "a.safetensors"] * 2, "tiny")
    with pytest.raises(BadInputError, match="not supported for pixart"):
        read_embedding_files([tmp_path / "a.safetensors"], "pixart")
