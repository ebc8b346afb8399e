"""open_checkpoint on diffusers model folders, variants, shards, and pipeline folders."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from wadi_cli.errors import CheckpointError
from wadi_cli.io import TensorSource, load_state_dict, open_checkpoint


def _sd(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "conv_in.weight": torch.randn(8, 4, 3, 3, generator=g),
        "conv_in.bias": torch.randn(8, generator=g),
        "down_blocks.0.attentions.0.proj_in.weight": torch.randn(8, 8, generator=g).half(),
        "time_embedding.linear_1.weight": torch.randn(16, 8, generator=g).bfloat16(),
    }


def _model_folder(folder, sd, name="diffusion_pytorch_model.safetensors"):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    save_file(sd, folder / name)
    return folder


def _same(src: TensorSource, sd: dict[str, torch.Tensor]) -> bool:
    return sorted(src.keys()) == sorted(sd) and all(torch.equal(src.get(k), v) for k, v in sd.items())


def test_model_folder(tmp_path):
    sd = _sd()
    folder = _model_folder(tmp_path / "unet", sd)
    with open_checkpoint(folder) as src:
        assert _same(src, sd)
        assert src.description.startswith("diffusers model folder")
        assert src.path == folder
        assert src.files() == [folder / "diffusion_pytorch_model.safetensors"]


def test_variant_preference_and_choice(tmp_path):
    full, half = _sd(0), _sd(1)
    folder = _model_folder(tmp_path / "m", half, "diffusion_pytorch_model.fp16.safetensors")
    with open_checkpoint(folder) as src:  # only the fp16 variant: it is used
        assert _same(src, half) and "fp16 variant" in src.description
    save_file(full, folder / "diffusion_pytorch_model.safetensors")
    with open_checkpoint(folder) as src:  # both: non-variant preferred
        assert _same(src, full) and "variant" not in src.description
    with open_checkpoint(folder, variant="fp16") as src:
        assert _same(src, half)
    with pytest.raises(CheckpointError, match="diffusion_pytorch_model.ema.safetensors"):
        open_checkpoint(folder, variant="ema")


def _sharded(folder, sd, index_name="diffusion_pytorch_model.safetensors.index.json"):
    folder.mkdir(parents=True, exist_ok=True)
    names = sorted(sd)
    shards = {"part-00001.safetensors": names[:2], "part-00002.safetensors": names[2:]}
    weight_map = {}
    for shard, keys in shards.items():
        save_file({k: sd[k] for k in keys}, folder / shard, metadata={"shard": shard})
        weight_map |= dict.fromkeys(keys, shard)
    (folder / index_name).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder / index_name


def test_sharded_folder_and_index_file(tmp_path):
    sd = _sd()
    index = _sharded(tmp_path / "unet", sd)
    with open_checkpoint(tmp_path / "unet") as src:
        assert _same(src, sd)
        assert "sharded: 2 files" in src.description
        assert len(src.files()) == 2
    assert all(torch.equal(load_state_dict(index)[k], v) for k, v in sd.items())


def test_sharded_index_errors(tmp_path):
    sd = _sd()
    index = _sharded(tmp_path / "a", sd)
    (tmp_path / "a" / "part-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="part-00002.safetensors.*missing"):
        open_checkpoint(index)
    index = _sharded(tmp_path / "b", sd)
    wm = json.loads(index.read_text())
    wm["weight_map"]["ghost.weight"] = "part-00001.safetensors"
    index.write_text(json.dumps(wm))
    with pytest.raises(CheckpointError, match="ghost.weight"):
        open_checkpoint(index)
    index.write_text("{not json")
    with pytest.raises(CheckpointError, match="not a valid sharded-checkpoint index"):
        open_checkpoint(index)


def _pipeline(root, components):
    root.mkdir(parents=True)
    (root / "model_index.json").write_text(json.dumps({c: ["diffusers", "X"] for c in components}))
    return root


def test_pipeline_picks_unet_then_transformer(tmp_path):
    sd_u, sd_v, sd_t = _sd(0), _sd(1), _sd(2)
    root = _pipeline(tmp_path / "pipe", ["unet", "vae"])
    _model_folder(root / "unet", sd_u)
    _sharded(root / "vae", sd_v)
    with open_checkpoint(root) as src:
        assert _same(src, sd_u)
        assert src.description.startswith("diffusers pipeline folder (unet)")
    with open_checkpoint(root, component="vae") as src:
        assert _same(src, sd_v)
        assert src.description.startswith("diffusers pipeline folder (vae, sharded: 2 files)")
    dit = _pipeline(tmp_path / "dit", ["transformer"])
    _model_folder(dit / "transformer", sd_t)
    with open_checkpoint(dit) as src:
        assert _same(src, sd_t) and "(transformer)" in src.description


def test_pipeline_errors(tmp_path):
    root = _pipeline(tmp_path / "pipe", ["vae"])
    _model_folder(root / "vae", _sd())
    with pytest.raises(CheckpointError, match=r"neither unet/ nor transformer/ \(has: vae\)"):
        open_checkpoint(root)
    with pytest.raises(CheckpointError, match="no 'text_encoder' folder"):
        open_checkpoint(root, component="text_encoder")
    with pytest.raises(CheckpointError, match="needs a pipeline folder"):
        open_checkpoint(root / "vae" / "diffusion_pytorch_model.safetensors", component="unet")


def test_single_loose_safetensors_in_folder(tmp_path):
    sd = _sd()
    (tmp_path / "release").mkdir()
    save_file(sd, tmp_path / "release" / "rotated_unet-sdv1-5.safetensors")
    with open_checkpoint(tmp_path / "release") as src:
        assert _same(src, sd)
    save_file(sd, tmp_path / "release" / "other.safetensors")
    with pytest.raises(CheckpointError, match="found other.safetensors, rotated_unet"):
        open_checkpoint(tmp_path / "release")


def test_legacy_constructor_and_mapping_api(tmp_path):
    sd = _sd()
    path = tmp_path / "a.safetensors"
    save_file(sd, path)
    src = TensorSource(path, dict.fromkeys(sd, path), "legacy")
    with src:
        assert len(src) == len(sd) and "conv_in.bias" in src and list(src) == src.keys()
        assert torch.equal(src["conv_in.bias"], sd["conv_in.bias"])
        assert dict(src.items()).keys() == sd.keys()
        assert src.numel("conv_in.weight") == 8 * 4 * 9
        assert src.original_name("conv_in.bias") == "conv_in.bias"
        with pytest.raises(KeyError, match="nope"):
            src.get("nope")
