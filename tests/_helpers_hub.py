"""Miniature hub repositories, laid out file for file as the real ones (no network).

For every repository wadi reads (SD1.5, SD2.1-base, SD2.1 768 v-prediction, PixArt-α 256
(transformer only), PixArt-α 512 (the pipeline its VAE/T5/tokenizer/scheduler come from),
SDXL base 1.0 with its fp16-safe VAE, and the authors' release ``gudaochangsheng/WaDi``),
:func:`build_hub_cache` writes a local Hugging Face hub cache (``models--org--name/refs/main`` +
``snapshots/<commit>/...``) whose file NAMES are exactly those recorded in
``wadi_cli/configs/hub_files.json``. The model files are built from the real
diffusers/transformers classes with tiny configs and random weights (seconds on CPU):

- every safetensors copy a loader may legitimately pick (plain and ``fp16`` variants,
  sharded T5 with its index) is a real, loadable file; the ``fp16`` copies hold the
  same values in float16;
- every file wadi must never read (``.bin``/``.ckpt`` pickles, the original single-file
  checkpoints at the repo root, the non-EMA U-Net, the safety checker weights) is a
  DECOY: a few bytes that no loader can parse, so reading one fails the test.

The configs keep the real files' keys and classes (PNDM/DDIM/DPM-Solver schedulers,
``Transformer2DModel`` as PixArt's class name, SD2.1's ``v_prediction``), only the sizes
shrink. Latent sides: SD 8 (SD2.1 768: 12), PixArt-α 256: 8 (its 512 sibling: 16); the
VAE has two levels (2× upsampling), so images are 16 px (SD2.1 768: 24 px).
"""

from __future__ import annotations

import contextlib
import functools
import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from wadi_cli.backbones import TINY_PIPELINE_DIR
from wadi_cli.io.hub_files import recorded_repos

DECOY = b"decoy: wadi must never read this file\n"
COMMIT = "0000000000000000000000000000000000c0ffee"
SD15, SD21_BASE, SD21 = (
    "stable-diffusion-v1-5/stable-diffusion-v1-5",
    "stabilityai/stable-diffusion-2-1-base",
    "stabilityai/stable-diffusion-2-1",
)
SDXL, SDXL_VAE_FP16 = "stabilityai/stable-diffusion-xl-base-1.0", "madebyollin/sdxl-vae-fp16-fix"
PIXART_256, PIXART_512, RELEASE = (
    "PixArt-alpha/PixArt-XL-2-256x256",
    "PixArt-alpha/PixArt-XL-2-512x512",
    "gudaochangsheng/WaDi",
)
SD_SCHEDULE = {
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
}
TEXT_DIM = 32


def _json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


def _save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))


def _state(model: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Distinct, reproducible random values for every tensor (fp32)."""
    g = torch.Generator().manual_seed(seed)
    return {
        k: (torch.randn(v.shape, generator=g) * 0.05).to(v.dtype) if v.is_floating_point() else v.clone()
        for k, v in model.state_dict().items()
    }


# ---- model builders -----------------------------------------------------------------------
def unet_config(kind: str) -> dict[str, Any]:
    """Tiny U-Net configs with the real models' structural switches."""
    cfg: dict[str, Any] = {
        "sample_size": 8,
        "in_channels": 4,
        "out_channels": 4,
        "layers_per_block": 1,
        "block_out_channels": [32, 64],
        "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
        "cross_attention_dim": TEXT_DIM,
        "attention_head_dim": 8,
        "norm_num_groups": 32,
    }
    if kind in ("sd21-base", "sd21"):
        cfg.update(attention_head_dim=[2, 4], use_linear_projection=True)
    if kind == "sd21":
        cfg.update(sample_size=12, upcast_attention=True)
    return cfg


VAE_CONFIG = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 1,
    "block_out_channels": [32, 32],
    "norm_num_groups": 32,
    "sample_size": 16,
    "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
    "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"],
}


def clip_config(kind: str) -> dict[str, Any]:
    return {
        "vocab_size": 100,
        "hidden_size": TEXT_DIM,
        "intermediate_size": 37,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": 77,
        "projection_dim": TEXT_DIM,
        "hidden_act": "quick_gelu" if kind == "sd15" else "gelu",
        "bos_token_id": 0,
        "eos_token_id": 1,
        "pad_token_id": 1,
    }


def pixart_config(sample_size: int) -> dict[str, Any]:
    return {
        "num_attention_heads": 2,
        "attention_head_dim": 8,
        "in_channels": 4,
        "out_channels": 8,
        "num_layers": 2,
        "cross_attention_dim": 16,
        "caption_channels": TEXT_DIM,
        "sample_size": sample_size,
        "patch_size": 2,
        "activation_fn": "gelu-approximate",
        "num_embeds_ada_norm": 1000,
        "norm_type": "ada_norm_single",
        "norm_elementwise_affine": False,
        "norm_eps": 1e-6,
        "attention_bias": True,
    }


def t5_config(vocab_size: int) -> dict[str, Any]:
    return {
        "vocab_size": vocab_size,
        "d_model": TEXT_DIM,
        "d_kv": 8,
        "d_ff": 37,
        "num_layers": 2,
        "num_heads": 4,
        "relative_attention_num_buckets": 8,
        "feed_forward_proj": "gated-gelu",
        "is_encoder_decoder": False,
        "use_cache": False,
        "pad_token_id": 0,
        "eos_token_id": 1,
    }


def _model_folder(folder: Path, model: Any, seed: int, stem: str, variants: dict[str, str]) -> dict:
    """Write ``config.json`` and the weights of ``model`` (random values from ``seed``):
    ``variants`` maps a file-name tag ("", "fp16", "non_ema") to "real" or "decoy"."""
    state = _state(model, seed)
    folder.mkdir(parents=True, exist_ok=True)
    if hasattr(model, "save_config"):  # diffusers
        model.save_config(str(folder))
    else:  # transformers
        model.config.save_pretrained(str(folder))
    for tag, what in variants.items():
        name = f"{stem}{'.' + tag if tag else ''}.safetensors"
        if what == "decoy":
            (folder / name).write_bytes(DECOY)
        else:
            _save({k: v.half() if tag == "fp16" else v for k, v in state.items()}, folder / name)
    return state


def _sharded(folder: Path, state: dict[str, torch.Tensor], shards: int, tag: str = "") -> None:
    """transformers' sharded layout: ``model[.tag]-NNNNN-of-NNNNN.safetensors`` + the index."""
    keys = sorted(state)
    groups = [keys[i::shards] for i in range(shards)]
    weight_map, total = {}, 0
    for i, group in enumerate(groups, 1):
        name = f"model{'.' + tag if tag else ''}-{i:05d}-of-{shards:05d}.safetensors"
        tensors = {k: state[k].half() if tag == "fp16" else state[k] for k in group}
        _save(tensors, folder / name)
        weight_map.update({k: name for k in group})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
    index = f"model.safetensors.index{'.' + tag if tag else ''}.json"
    _json(folder / index, {"metadata": {"total_size": total}, "weight_map": weight_map})


def _clip_tokenizer(folder: Path) -> None:
    """SD's tokenizer files (merges.txt, special_tokens_map.json, tokenizer_config.json,
    vocab.json), from the tiny model's vocabulary."""
    folder.mkdir(parents=True, exist_ok=True)
    src = TINY_PIPELINE_DIR / "tokenizer"
    for name in ("merges.txt", "vocab.json"):
        shutil.copy(src / name, folder / name)
    special = {
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
    }
    _json(folder / "special_tokens_map.json", special)
    _json(
        folder / "tokenizer_config.json",
        {**special, "model_max_length": 77, "do_lower_case": True, "tokenizer_class": "CLIPTokenizer"},
    )


def _t5_tokenizer(folder: Path) -> int:
    """PixArt's tokenizer files (spiece.model, added_tokens.json, special_tokens_map.json,
    tokenizer_config.json; no tokenizer.json): a small sentencepiece unigram model trained
    here on a few words, plus T5's 100 extra ids. Returns the vocabulary size."""
    import sentencepiece as spm

    folder.mkdir(parents=True, exist_ok=True)
    words = [
        "a",
        "cat",
        "dog",
        "red",
        "blue",
        "green",
        "photo",
        "of",
        "the",
        "on",
        "at",
        "top",
        "left",
        "right",
        "bottom",
        "circle",
        "square",
        "triangle",
        "house",
        "man",
        "playing",
        "with",
        "his",
        "in",
        "front",
    ]
    corpus = folder.parent / "corpus.txt"
    corpus.write_text("\n".join(" ".join(words[i:] + words[:i]) for i in range(len(words))) * 5)
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(folder / "spiece"),
        vocab_size=48,
        model_type="unigram",
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        pad_piece="<pad>",
        eos_piece="</s>",
        unk_piece="<unk>",
        character_coverage=1.0,
        hard_vocab_limit=False,
        minloglevel=2,
        normalization_rule_name="identity",
    )
    corpus.unlink()
    (folder / "spiece.vocab").unlink()
    pieces = spm.SentencePieceProcessor(model_file=str(folder / "spiece.model")).get_piece_size()
    extra = [f"<extra_id_{i}>" for i in range(100)]
    special = {
        "additional_special_tokens": extra,
        "eos_token": "</s>",
        "pad_token": "<pad>",
        "unk_token": "<unk>",
    }
    _json(folder / "special_tokens_map.json", special)
    _json(folder / "added_tokens.json", {t: pieces + 99 - i for i, t in enumerate(extra)})
    _json(
        folder / "tokenizer_config.json",
        {
            **special,
            "extra_ids": 100,
            "model_max_length": 512,
            "legacy": True,
            "tokenizer_class": "T5Tokenizer",
        },
    )
    return pieces + 100


#: the miniature SDXL's two text encoders: hidden sizes that differ (the U-Net reads their
#: concatenation, 32 + 48 = 80) and the second's projection (its pooled ``text_embeds``)
SDXL_TEXT_DIMS, SDXL_POOLED_DIM, SDXL_TIME_DIM = (32, 48), 24, 8


def sdxl_unet_config() -> dict[str, Any]:
    """SDXL's structural switches, miniature: no attention in the first level, linear
    projections, more transformer layers deeper, ``text_time`` added conditions."""
    return {
        "sample_size": 8,
        "in_channels": 4,
        "out_channels": 4,
        "layers_per_block": 1,
        "block_out_channels": [32, 64],
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
        "transformer_layers_per_block": [1, 2],
        "cross_attention_dim": sum(SDXL_TEXT_DIMS),
        "attention_head_dim": [2, 4],
        "use_linear_projection": True,
        "norm_num_groups": 32,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": SDXL_TIME_DIM,
        "projection_class_embeddings_input_dim": 6 * SDXL_TIME_DIM + SDXL_POOLED_DIM,
    }


SDXL_VAE_CONFIG = {**VAE_CONFIG, "scaling_factor": 0.13025, "force_upcast": True}


def _sdxl_repo(snap: Path, seed: int) -> dict[str, torch.Tensor]:
    """The SDXL base pipeline: model_index.json as the hub's, both CLIPs (the second with
    its projection), both tokenizers (the second pads with another token, as the real
    ``tokenizer_2`` pads with "!"), Euler scheduler, fp32 + fp16 copies of every model."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    _json(
        snap / "model_index.json",
        {
            "_class_name": "StableDiffusionXLPipeline",
            "_diffusers_version": "0.19.0.dev0",
            "force_zeros_for_empty_prompt": True,
            "add_watermarker": None,
            "scheduler": ["diffusers", "EulerDiscreteScheduler"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "tokenizer_2": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
        },
    )
    _json(
        snap / "scheduler" / "scheduler_config.json",
        {
            "_class_name": "EulerDiscreteScheduler",
            **SD_SCHEDULE,
            "clip_sample": False,
            "interpolation_type": "linear",
            "prediction_type": "epsilon",
            "sample_max_value": 1.0,
            "set_alpha_to_one": False,
            "skip_prk_steps": True,
            "steps_offset": 1,
            "timestep_spacing": "leading",
            "trained_betas": None,
            "use_karras_sigmas": False,
        },
    )
    both = {"": "real", "fp16": "real"}
    torch.manual_seed(seed)
    state = _model_folder(
        snap / "unet", UNet2DConditionModel(**sdxl_unet_config()), seed, "diffusion_pytorch_model", both
    )
    _model_folder(snap / "vae", AutoencoderKL(**SDXL_VAE_CONFIG), seed + 1, "diffusion_pytorch_model", both)
    for i, (folder, cls) in enumerate((("text_encoder", CLIPTextModel), ("text_encoder_2", None))):
        cfg = {**clip_config("sdxl"), "hidden_size": SDXL_TEXT_DIMS[i]}
        if cls is None:
            cls = CLIPTextModelWithProjection
            cfg.update(projection_dim=SDXL_POOLED_DIM, num_hidden_layers=3)
        else:
            cfg["hidden_act"] = "quick_gelu"
        _model_folder(snap / folder, cls(CLIPTextConfig(**cfg)), seed + 2 + i, "model", both)
    _clip_tokenizer(snap / "tokenizer")
    _clip_tokenizer(snap / "tokenizer_2")
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        path = snap / "tokenizer_2" / name
        _json(path, {**json.loads(path.read_text()), "pad_token": "a"})
    return state


def _sdxl_vae_fp16(snap: Path, seed: int) -> None:
    """madebyollin/sdxl-vae-fp16-fix: one AutoencoderKL at the repository root (other values
    than the pipeline's own VAE, so a test can tell which one decoded)."""
    from diffusers import AutoencoderKL

    _model_folder(snap, AutoencoderKL(**SDXL_VAE_CONFIG), seed, "diffusion_pytorch_model", {"": "real"})


# ---- repositories ---------------------------------------------------------------------------
def _fill_decoys(snap: Path, repo: str) -> None:
    """Every recorded file not written yet: a decoy (README.md and the like get text)."""
    for rel in recorded_repos()[repo]["files"]:
        path = snap / rel
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(DECOY)


def _sd_repo(snap: Path, kind: str, seed: int) -> dict[str, torch.Tensor]:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    sd15 = kind == "sd15"
    index: dict[str, Any] = {
        "_class_name": "StableDiffusionPipeline",
        "feature_extractor": ["transformers", "CLIPImageProcessor"],
        "safety_checker": ["stable_diffusion", "StableDiffusionSafetyChecker"] if sd15 else [None, None],
        "scheduler": ["diffusers", "PNDMScheduler" if kind != "sd21" else "DDIMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    if not sd15:
        index["requires_safety_checker"] = False
    _json(snap / "model_index.json", index)
    sched = {
        "_class_name": index["scheduler"][1],
        **SD_SCHEDULE,
        "clip_sample": False,
        "set_alpha_to_one": False,
        "skip_prk_steps": True,
        "steps_offset": 1,
        "trained_betas": None,
    }
    if kind != "sd15":
        sched["prediction_type"] = "v_prediction" if kind == "sd21" else "epsilon"
    _json(snap / "scheduler" / "scheduler_config.json", sched)
    _json(
        snap / "feature_extractor" / "preprocessor_config.json",
        {
            "crop_size": 224,
            "do_center_crop": True,
            "do_normalize": True,
            "do_resize": True,
            "feature_extractor_type": "CLIPFeatureExtractor",
            "image_mean": [0.48145466, 0.4578275, 0.40821073],
            "image_std": [0.26862954, 0.26130258, 0.27577711],
            "resample": 3,
            "size": 224,
        },
    )
    variants = {"": "real", "fp16": "real"} if sd15 else {"": "real"}
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**unet_config(kind))
    state = _model_folder(
        snap / "unet",
        unet,
        seed,
        "diffusion_pytorch_model",
        {**variants, "non_ema": "decoy"} if sd15 else variants,
    )
    _model_folder(snap / "vae", AutoencoderKL(**VAE_CONFIG), seed + 1, "diffusion_pytorch_model", variants)
    te = CLIPTextModel(CLIPTextConfig(**clip_config(kind)))
    _model_folder(snap / "text_encoder", te, seed + 2, "model", variants)
    _clip_tokenizer(snap / "tokenizer")
    if sd15:
        _json(snap / "safety_checker" / "config.json", {"_note": "never loaded by wadi"})
    return state


def _pixart_transformer(folder: Path, sample_size: int, seed: int) -> dict[str, torch.Tensor]:
    """A PixArt transformer folder whose config is written as the hub's is: class name
    ``Transformer2DModel`` with its legacy keys."""
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(seed)
    model = PixArtTransformer2DModel(**pixart_config(sample_size))
    state = _model_folder(folder, model, seed, "diffusion_pytorch_model", {"": "real"})
    config = json.loads((folder / "config.json").read_text())
    config.update(
        _class_name="Transformer2DModel",
        double_self_attention=False,
        num_vector_embeds=None,
        only_cross_attention=False,
        use_linear_projection=False,
        upcast_attention=False,
        dropout=0.0,
        norm_num_groups=32,
    )
    config.pop("use_additional_conditions", None)
    _json(folder / "config.json", config)
    return state


def _pixart_512(snap: Path, seed: int) -> None:
    from diffusers import AutoencoderKL
    from transformers import T5Config, T5EncoderModel

    _json(
        snap / "model_index.json",
        {
            "_class_name": "PixArtAlphaPipeline",
            "scheduler": ["diffusers", "DPMSolverMultistepScheduler"],
            "text_encoder": ["transformers", "T5EncoderModel"],
            "tokenizer": ["transformers", "T5Tokenizer"],
            "transformer": ["diffusers", "Transformer2DModel"],
            "vae": ["diffusers", "AutoencoderKL"],
        },
    )
    _json(
        snap / "scheduler" / "scheduler_config.json",
        {
            "_class_name": "DPMSolverMultistepScheduler",
            "algorithm_type": "dpmsolver++",
            "beta_end": 0.02,
            "beta_schedule": "linear",
            "beta_start": 0.0001,
            "dynamic_thresholding_ratio": 0.995,
            "euler_at_final": False,
            "lambda_min_clipped": float("-inf"),
            "lower_order_final": True,
            "num_train_timesteps": 1000,
            "prediction_type": "epsilon",
            "sample_max_value": 1.0,
            "solver_order": 2,
            "solver_type": "midpoint",
            "steps_offset": 0,
            "thresholding": False,
            "timestep_spacing": "linspace",
            "trained_betas": None,
            "use_karras_sigmas": False,
            "use_lu_lambdas": False,
            "variance_type": None,
        },
    )
    _model_folder(
        snap / "vae",
        AutoencoderKL(**VAE_CONFIG),
        seed + 1,
        "diffusion_pytorch_model",
        {"": "real", "fp16": "real"},
    )
    vocab = _t5_tokenizer(snap / "tokenizer")
    torch.manual_seed(seed + 2)
    t5 = T5EncoderModel(T5Config(**t5_config(vocab)))
    t5.config.save_pretrained(str(snap / "text_encoder"))
    state = _state(t5, seed + 2)
    _sharded(snap / "text_encoder", state, 4)
    _sharded(snap / "text_encoder", state, 2, "fp16")
    _pixart_transformer(snap / "transformer", 16, seed + 3)


def _write_repo(cache: Path, repo: str, build: Any) -> Path:
    root = cache / f"models--{repo.replace('/', '--')}"
    snap = root / "snapshots" / COMMIT
    snap.mkdir(parents=True)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(COMMIT)
    build(snap)
    _fill_decoys(snap, repo)
    return snap


def released_state(base: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """A stand-in for the authors' merged one-step weights: the base state, perturbed."""
    g = torch.Generator().manual_seed(seed)
    return {
        k: v + 0.01 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
        for k, v in base.items()
    }


def build_hub_cache(cache: Path) -> dict[str, Path]:
    """Write every miniature repository into the hub cache folder ``cache``; returns
    ``{repo id: snapshot folder}``."""
    states: dict[str, dict[str, torch.Tensor]] = {}
    snaps = {
        SD15: _write_repo(cache, SD15, lambda s: states.__setitem__("sd15", _sd_repo(s, "sd15", 10))),
        SD21_BASE: _write_repo(
            cache, SD21_BASE, lambda s: states.__setitem__("sd21", _sd_repo(s, "sd21-base", 20))
        ),
        SD21: _write_repo(cache, SD21, lambda s: _sd_repo(s, "sd21", 30)),
        PIXART_256: _write_repo(
            cache,
            PIXART_256,
            lambda s: states.__setitem__("pixart", _pixart_transformer(s / "transformer", 8, 40)),
        ),
        PIXART_512: _write_repo(cache, PIXART_512, lambda s: _pixart_512(s, 50)),
        SDXL: _write_repo(cache, SDXL, lambda s: states.__setitem__("sdxl", _sdxl_repo(s, 70))),
        SDXL_VAE_FP16: _write_repo(cache, SDXL_VAE_FP16, lambda s: _sdxl_vae_fp16(s, 80)),
    }

    def release(snap: Path) -> None:
        for name, key in (
            ("rotated_unet-sdv1-5", "sd15"),
            ("rotated_unet-sdv2-1", "sd21"),
            ("rotated_transformer", "pixart"),
        ):
            _save(released_state(states[key], 60), snap / f"{name}.safetensors")

    snaps[RELEASE] = _write_repo(cache, RELEASE, release)
    return snaps


@functools.lru_cache(maxsize=1)
def shared_hub_cache() -> Path:
    """One miniature hub cache per test process (built on first use, a few seconds)."""
    import atexit

    root = Path(tempfile.mkdtemp(prefix="wadi-test-hub-"))
    atexit.register(shutil.rmtree, root, True)
    cache = root / "hub"
    build_hub_cache(cache)
    return cache


def use_hub_cache(monkeypatch: Any, cache: Path) -> None:
    """Point huggingface_hub (already imported) and any subprocess at ``cache``, offline."""
    import huggingface_hub.constants as constants

    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


@contextlib.contextmanager
def hub_cache_in_use() -> Iterator[Path]:
    """The shared miniature cache (:func:`shared_hub_cache`), offline and in use, with one
    intra-op thread: these models are far too small to gain from two, and on a busy 2-core
    machine two threads wait at every op's barrier (a 3-step distill took 17.6 s of CPU with
    2 threads, 6.8 s with 1). For a module-scoped ``hub_cache`` fixture."""
    import pytest
    from _helpers_sample import one_torch_thread

    with one_torch_thread(), pytest.MonkeyPatch.context() as mp:
        cache = shared_hub_cache()
        use_hub_cache(mp, cache)
        yield cache


def miniature_controlnet(unet, seed: int = 0):
    """``ControlNetModel.from_unet`` (conditioning embedding ×2, the miniature VAE's factor)
    with every all-zero tensor (the zero convolutions) drawn at random instead."""
    import torch
    from diffusers import ControlNetModel

    net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return net.eval().requires_grad_(False)
