"""The fixed architecture of the embedded tiny text-to-image model.

A complete latent diffusion pipeline in diffusers' Stable Diffusion layout, scaled down
so that it trains and distils on two CPU cores:

- VAE: ``AutoencoderKL``, RGB 32x32 -> 4x8x8 latents (x4 downsampling);
- text encoder: ``CLIPTextModel`` (hidden 64, 2 layers, 4 heads) and a ``CLIPTokenizer``
  built from a generated vocabulary in which every prompt word is one token;
- U-Net: ``UNet2DConditionModel`` with cross-attention down/mid/up blocks and linear
  ``proj_in``/``proj_out`` (SD2.1 style); every Linear has an even ``in_features`` so
  LoRaD can pair its columns;
- scheduler: ``DDPMScheduler`` with Stable Diffusion's training schedule.

:func:`build_tiny_components` gives randomly initialised components (for tests and for
training from scratch); :func:`save_tiny_pipeline` writes them as a diffusers
``StableDiffusionPipeline`` folder; the trained model ships in :data:`TINY_PIPELINE_DIR`.
"""

from __future__ import annotations

import itertools
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from wadi_cli.errors import CheckpointError
from wadi_cli.io import atomic_output_dir

#: Folder of the shipped, trained pipeline (diffusers ``StableDiffusionPipeline`` layout).
TINY_ASSETS_DIR: Path = Path(__file__).resolve().parent.parent / "assets" / "tiny"
TINY_PIPELINE_DIR: Path = TINY_ASSETS_DIR / "pipeline"
#: Shipped attribute classifier (used by the accuracy and Fréchet-distance metrics).
TINY_CLASSIFIER_PATH: Path = TINY_ASSETS_DIR / "classifier.safetensors"
#: Shipped one-step student of the shipped pipeline: a LoRaD adapter trained by the tiny
#: recipe (``wadi distill -b tiny`` defaults, seed 0), with its provenance in the file's
#: metadata; the default weights of ``wadi sample -b tiny`` / ``wadi eval -b tiny``.
#: How it was made: ``analysis/tiny_student/``.
TINY_STUDENT_PATH: Path = TINY_ASSETS_DIR / "student.safetensors"
#: Shipped ControlNet of the shipped teacher (diffusers ``ControlNetModel`` folder): its
#: control image is the shape's silhouette, white on black (``wadi sample -b tiny
#: --controlnet tiny``). How it was made and what it does: ``analysis/tiny_controlnet/``.
TINY_CONTROLNET_DIR: Path = TINY_ASSETS_DIR / "controlnet"

IMAGE_SIZE = 32
LATENT_SIZE = 8
LATENT_CHANNELS = 4
TEXT_HIDDEN = 64
MAX_TOKENS = 16

#: Every word a prompt can contain (each becomes exactly one token).
PROMPT_WORDS: tuple[str, ...] = (
    "a",
    "at",
    "the",
    "red",
    "green",
    "blue",
    "yellow",
    "circle",
    "square",
    "triangle",
    "top",
    "bottom",
    "left",
    "right",
)

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"

UNET_CONFIG: dict[str, Any] = {
    "sample_size": LATENT_SIZE,
    "in_channels": LATENT_CHANNELS,
    "out_channels": LATENT_CHANNELS,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "block_out_channels": (32, 64),
    "layers_per_block": 1,
    "cross_attention_dim": TEXT_HIDDEN,
    "attention_head_dim": 2,  # diffusers' legacy name: the number of heads
    "norm_num_groups": 8,
    "use_linear_projection": True,
}

VAE_CONFIG: dict[str, Any] = {
    "sample_size": IMAGE_SIZE,
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 3,
    "up_block_types": ("UpDecoderBlock2D",) * 3,
    "block_out_channels": (16, 32, 64),
    "layers_per_block": 1,
    "latent_channels": LATENT_CHANNELS,
    "norm_num_groups": 16,
    "scaling_factor": 1.0,  # set from data by the training script (≈ 1 / std of latents)
}

TEXT_ENCODER_CONFIG: dict[str, Any] = {
    "hidden_size": TEXT_HIDDEN,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": MAX_TOKENS,
    "hidden_act": "quick_gelu",
    "projection_dim": TEXT_HIDDEN,
}

SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "prediction_type": "epsilon",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
}


def _bpe(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Plain byte-pair encoding: repeatedly merge the adjacent pair of lowest rank."""
    while len(symbols) > 1:
        pairs = [(ranks.get((a, b), len(ranks)), i) for i, (a, b) in enumerate(itertools.pairwise(symbols))]
        rank, i = min(pairs)
        if rank == len(ranks):
            break
        symbols = symbols[:i] + [symbols[i] + symbols[i + 1]] + symbols[i + 2 :]
    return symbols


def tokenizer_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Byte-pair vocabulary in which every word of :data:`PROMPT_WORDS` is one token.

    The vocabulary holds the CLIP special tokens, the letters a-z (alone and with the
    end-of-word marker ``</w>``) and the intermediate symbols of each word. Merges are
    added word by word: run BPE with the merges so far, and while the word is not one
    symbol, append a merge of its first two symbols. Appended merges rank last, so they
    never change how earlier words are encoded.
    """
    vocab: dict[str, int] = {}

    def add(tok: str) -> None:
        if tok not in vocab:
            vocab[tok] = len(vocab)

    add(BOS_TOKEN)
    add(EOS_TOKEN)
    for c in "abcdefghijklmnopqrstuvwxyz":
        add(c)
        add(c + "</w>")
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in PROMPT_WORDS:
        while len(symbols := _bpe([*word[:-1], word[-1] + "</w>"], ranks)) > 1:
            pair = (symbols[0], symbols[1])
            ranks[pair] = len(merges)
            merges.append(pair)
            add(pair[0] + pair[1])
    return vocab, merges


def write_vocab_files(folder: str | os.PathLike[str]) -> None:
    """Write the classic CLIP ``vocab.json`` and ``merges.txt`` of the tiny tokenizer."""
    vocab, merges = tokenizer_vocab_and_merges()
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, indent=0)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))


def build_tokenizer():
    """A ``CLIPTokenizer`` over :func:`tokenizer_vocab_and_merges`, written to and read
    back from ``vocab.json``/``merges.txt`` (the standard CLIP files), padded to
    :data:`MAX_TOKENS` like Stable Diffusion's."""
    from transformers import CLIPTokenizer  # start-up time: the constants here are read without it

    with tempfile.TemporaryDirectory() as tmp:
        write_vocab_files(tmp)
        tok = CLIPTokenizer(
            vocab=os.path.join(tmp, "vocab.json"),
            merges=os.path.join(tmp, "merges.txt"),
            model_max_length=MAX_TOKENS,
        )
    return tok


def build_tiny_components(seed: int = 0, scaling_factor: float = 1.0) -> dict[str, Any]:
    """Randomly initialised ``unet``, ``vae``, ``text_encoder``, ``tokenizer``, ``scheduler``
    of the fixed tiny spec (deterministic given ``seed``)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = build_tokenizer()
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**UNET_CONFIG)
    vae = AutoencoderKL(**{**VAE_CONFIG, "scaling_factor": float(scaling_factor)})
    text_cfg = CLIPTextConfig(
        vocab_size=len(tokenizer.get_vocab()),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **TEXT_ENCODER_CONFIG,
    )
    text_encoder = CLIPTextModel(text_cfg)
    # from_config keeps set_alpha_to_one (a DDIM/PNDM key SD ships) in the saved config
    scheduler = DDPMScheduler.from_config(SCHEDULER_CONFIG)
    for m in (unet, vae, text_encoder):
        m.eval()
    return {
        "unet": unet,
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "scheduler": scheduler,
    }


def make_pipeline(components: dict[str, Any]):
    """Assemble a ``StableDiffusionPipeline`` (no safety checker) from the components."""
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(
        vae=components["vae"],
        text_encoder=components["text_encoder"],
        tokenizer=components["tokenizer"],
        unet=components["unet"],
        scheduler=components["scheduler"],
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def save_tiny_pipeline(components: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write ``components`` as a diffusers ``StableDiffusionPipeline`` folder (weights as
    .safetensors), atomically: the folder appears complete or not at all."""

    pipe = make_pipeline(components)
    with atomic_output_dir(path) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        # also the classic CLIP files, so older transformers (slow tokenizer) load it too
        write_vocab_files(Path(tmp) / "tokenizer")
    return Path(path)


def tiny_pipeline_available(path: str | os.PathLike[str] | None = None) -> bool:
    """True when the trained tiny pipeline folder (default: the shipped one) is complete."""
    root = Path(path) if path is not None else TINY_PIPELINE_DIR
    needed = [
        "model_index.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "vae/config.json",
        "vae/diffusion_pytorch_model.safetensors",
        "text_encoder/config.json",
        "text_encoder/model.safetensors",
        "scheduler/scheduler_config.json",
    ]
    return all((root / n).is_file() for n in needed) and (root / "tokenizer").is_dir()


def load_tiny_pipeline(path: str | os.PathLike[str] | None = None):
    """Load the tiny pipeline (default: shipped) offline with diffusers; weights stay on CPU."""
    from diffusers import StableDiffusionPipeline

    root = Path(path) if path is not None else TINY_PIPELINE_DIR
    if not tiny_pipeline_available(root):
        raise CheckpointError(f"{root}: tiny pipeline folder is missing or incomplete")
    return StableDiffusionPipeline.from_pretrained(str(root), safety_checker=None, local_files_only=True)
