"""Textual-inversion files: the format diffusers' ``load_textual_inversion`` reads (tested
with diffusers itself on the tiny pipeline), the single-tensor layout AUTOMATIC1111 and
ComfyUI read, atomic writes, and one-line refusals of files wadi does not read."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from wadi_cli.errors import BadInputError
from wadi_cli.io.embeddings import EMBEDDING_FILE, EMBEDDING_KIND, load_embedding, save_embedding


def test_round_trip_single_key_and_metadata(tmp_path):
    vec = torch.randn(64)
    path = save_embedding(tmp_path / "r.safetensors", "<R>", vec, {"backbone": "tiny"}, {"step": "7"})
    with safe_open(str(path), framework="pt") as f:
        # one key, the token, a (1, D) float32 tensor: what diffusers (single key), A1111
        # ("diffuser concepts": one tensor, (D,) or (n, D)) and ComfyUI (last dim = width) read
        assert list(f.keys()) == ["<R>"] and f.get_tensor("<R>").shape == (1, 64)
        meta = f.metadata()
    assert meta["adapter"] == EMBEDDING_KIND and meta["step"] == "7" and meta["token"] == "<R>"
    token, got, _ = load_embedding(path)
    assert token == "<R>" and torch.equal(got, vec.reshape(1, -1))
    assert list(tmp_path.iterdir()) == [path]  # nothing beside it (atomic write leaves no temp)
    (tmp_path / "run").mkdir()
    save_embedding(tmp_path / "run" / EMBEDDING_FILE, "<S>", vec)
    assert load_embedding(tmp_path / "run")[0] == "<S>"  # a run folder names its file


def test_kohya_style_key_takes_the_file_name(tmp_path):
    save_file({"emb_params": torch.randn(1, 8)}, str(tmp_path / "mystyle.safetensors"))
    assert load_embedding(tmp_path / "mystyle.safetensors")[0] == "mystyle"


@pytest.mark.parametrize(
    "make, words",
    [
        (lambda p: save_file({"a": torch.zeros(4), "b": torch.zeros(4)}, str(p)), "holds 2 tensors"),
        (lambda p: save_file({"clip_l": torch.zeros(768), "clip_g": torch.zeros(1280)}, str(p)), "SDXL"),
        (lambda p: save_file({"<R>": torch.zeros(2, 3, 4)}, str(p)), "expected (D,) or (n, D)"),
        (lambda p: p.write_bytes(b"not safetensors at all"), "not a safetensors file"),
        (lambda p: None, "no such"),
    ],
)
def test_refusals_are_one_line(tmp_path, make, words):
    path = tmp_path / "e.safetensors"
    make(path)
    with pytest.raises(BadInputError, match="--embedding") as err:
        load_embedding(path)
    assert words in str(err.value) and "\n" not in str(err.value)


def test_pickles_are_never_loaded(tmp_path):
    path = tmp_path / "e.pt"
    path.write_bytes(b"\x80\x04 pretend pickle")
    with pytest.raises(BadInputError, match="pickle files are never loaded"):
        load_embedding(path)
    with pytest.raises(BadInputError, match="without learned_embeds"):
        load_embedding(tmp_path)


def test_diffusers_load_textual_inversion_reads_the_file(tmp_path):
    """diffusers' own loader takes the file into a StableDiffusionPipeline (the shipped tiny
    model), and the row it adds is the saved vector."""
    from diffusers import StableDiffusionPipeline

    from wadi_cli.tiny.arch import TINY_PIPELINE_DIR

    pipe = StableDiffusionPipeline.from_pretrained(str(TINY_PIPELINE_DIR), safety_checker=None)
    vec = torch.randn(pipe.text_encoder.config.hidden_size)
    save_embedding(tmp_path / EMBEDDING_FILE, "<R>", vec)
    pipe.load_textual_inversion(str(tmp_path))  # the folder: diffusers finds its default name
    token_id = pipe.tokenizer.convert_tokens_to_ids("<R>")
    assert token_id == len(pipe.tokenizer) - 1
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight[token_id], vec)
