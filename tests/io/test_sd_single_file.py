"""Original SD single files: lazy mapping to diffusers names, checked against an
independent hand-written inverse mapping (tests/_helpers_io.py)."""

from __future__ import annotations

import pytest
import torch
from _helpers_io import (
    LDM_PREFIX,
    TINY_UNET,
    diffusers_to_ldm,
    ldm_named,
    meta_unet_shapes,
    tiny_unet_state_dict,
)
from safetensors.torch import save_file

from wadi_cli.errors import CheckpointError
from wadi_cli.io import ldm_unet_table, open_checkpoint
from wadi_cli.io.sd_single_file import shipped_unet_config

EXTRAS = {  # stand-ins for the VAE and text encoder that share the file
    "first_stage_model.decoder.conv_in.weight": torch.randn(4, 4, 3, 3),
    "cond_stage_model.transformer.text_model.final_layer_norm.weight": torch.randn(32),
}


@pytest.fixture(scope="module")
def tiny_sd():
    return tiny_unet_state_dict()


def test_tiny_ldm_file_round_trips(tmp_path, tiny_sd):
    path = tmp_path / "tiny-original.safetensors"
    save_file(ldm_named(tiny_sd, TINY_UNET) | EXTRAS, path)
    with open_checkpoint(path, ldm_config=TINY_UNET) as src:
        assert sorted(src.keys()) == sorted(tiny_sd)
        for name, ref in tiny_sd.items():
            assert torch.equal(src.get(name), ref), name
            assert src.original_name(name) == LDM_PREFIX + diffusers_to_ldm(name, TINY_UNET)
        assert f"{len(tiny_sd)} U-Net tensors mapped to diffusers names" in src.description
        assert f"{len(EXTRAS)} non-U-Net tensors ignored" in src.description


def test_tiny_ldm_file_loads_strictly_into_the_model(tmp_path, tiny_sd):
    from diffusers import UNet2DConditionModel

    path = tmp_path / "tiny.safetensors"
    save_file(ldm_named(tiny_sd, TINY_UNET), path)
    model = UNet2DConditionModel(**TINY_UNET)
    with open_checkpoint(path, ldm_config=TINY_UNET) as src:
        model.load_state_dict(dict(src.items()), strict=True)
    assert torch.equal(model.conv_in.weight, tiny_sd["conv_in.weight"])


def test_tiny_ldm_ckpt_with_state_dict_and_ema(tmp_path, tiny_sd):
    raw = ldm_named(tiny_sd, TINY_UNET)
    ema = {"model_ema." + "".join(k.split(".")[1:]): v + 1 for k, v in raw.items()}
    path = tmp_path / "tiny.ckpt"
    torch.save({"state_dict": raw | ema, "global_step": 7}, path)
    with open_checkpoint(path, ldm_config=TINY_UNET) as src:
        assert all(torch.equal(src.get(k), v) for k, v in tiny_sd.items())
        assert f"{len(ema)} non-U-Net tensors ignored" in src.description
    with open_checkpoint(path, ldm_config=TINY_UNET, ema=True) as src:
        assert all(torch.equal(src.get(k), v + 1) for k, v in tiny_sd.items())
        assert "(EMA copy)" in src.description
    plain = tmp_path / "plain.safetensors"
    save_file(raw, plain)
    with pytest.raises(CheckpointError, match="no model_ema"):
        open_checkpoint(plain, ldm_config=TINY_UNET, ema=True)


def test_unmapped_unet_tensor_is_an_error(tmp_path, tiny_sd):
    path = tmp_path / "odd.safetensors"
    save_file(ldm_named(tiny_sd, TINY_UNET) | {LDM_PREFIX + "mystery.weight": torch.ones(2)}, path)
    with pytest.raises(CheckpointError, match=r"1 U-Net tensors have no diffusers name.*mystery"):
        open_checkpoint(path, ldm_config=TINY_UNET)


def test_wrong_config_is_an_error(tmp_path, tiny_sd):
    path = tmp_path / "tiny.safetensors"
    save_file(ldm_named(tiny_sd, TINY_UNET), path)
    with pytest.raises(CheckpointError) as info:
        open_checkpoint(path, ldm_config=TINY_UNET | {"layers_per_block": 2})
    assert str(path) in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize(("name", "kind", "label"), [("sd15", "v1", "SD v1"), ("sd21", "v2", "SD v2")])
def test_full_size_tables_detect_version_and_invert_exactly(name, kind, label):
    """The real SD1.5 / SD2.1 key structure (from the shipped configs, on the meta device)."""
    config = shipped_unet_config(name)
    shapes = meta_unet_shapes(config)
    assert len(shapes) == 686
    ldm_shapes = {LDM_PREFIX + diffusers_to_ldm(k, config): s for k, s in shapes.items()}
    ldm_shapes["first_stage_model.encoder.conv_in.weight"] = (128, 3, 3, 3)
    table = ldm_unet_table(ldm_shapes)  # no config: version inferred, shipped config used
    assert table.model_type == kind and table.label == label
    assert table.ignored == 1
    assert table.names == {k: LDM_PREFIX + diffusers_to_ldm(k, config) for k in shapes}


def test_unsupported_original_type_is_refused():
    shapes = {
        LDM_PREFIX + "input_blocks.0.0.weight": (320, 4, 3, 3),
        "conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias": (1280,),
    }
    with pytest.raises(CheckpointError, match="'xl_base' is not supported"):
        ldm_unet_table(shapes)
