"""``wadi merge BASE LORA``: a plain LoRA (kohya or PEFT names) added to a checkpoint.

References: numpy's float64 SVD of the student's change (what ``--format lora`` must have
kept), diffusers' own ``load_lora_weights`` + ``fuse_lora``, and a planted conv LoRA with an
alpha that is not its rank.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _helpers_cli import wadi
from _helpers_sample import one_torch_thread, tiny_pipeline_dir
from safetensors.torch import save_file

from wadi_cli.distill import distill
from wadi_cli.distill.config import resolve_config
from wadi_cli.io import load_state_dict


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    pipe = tiny_pipeline_dir()
    run = tmp_path_factory.mktemp("merge-lora") / "run"
    cfg = resolve_config(
        overrides=dict(model=str(pipe), batch_size=2, max_steps=2, device="cpu", lr=1e-2, ema_decay=0.0)
        | {"regression_weight": 0.0, "validate_every": 0}
    )
    with one_torch_thread():
        distill(cfg, run)
    return run, pipe


def _low_rank(delta: torch.Tensor, rank: int) -> torch.Tensor:
    mat = delta.double().reshape(delta.shape[0], -1).numpy()
    u, s, vh = np.linalg.svd(mat, full_matrices=False)
    return torch.from_numpy((u[:, :rank] * s[:rank]) @ vh[:rank]).reshape(delta.shape)


@pytest.mark.parametrize("keys", ["kohya", "diffusers"])
def test_merged_lora_is_base_plus_truncated_change_and_equals_diffusers_fuse(run_dir, tmp_path, keys):
    from diffusers import StableDiffusionPipeline

    run, pipe = run_dir
    lora, merged, student = (
        tmp_path / "lora.safetensors",
        tmp_path / "m.safetensors",
        tmp_path / "s.safetensors",
    )
    wadi("export", run, "-f", "lora", "--lora-rank", "3", "--lora-keys", keys, "-o", lora)
    wadi("export", run, "-f", "merged", "-o", student)
    r = wadi("merge", pipe / "unet", lora, "--out", merged, "--json")
    assert '"role": "lora"' in r.stdout
    base = {k: v.double() for k, v in load_state_dict(pipe / "unet").items()}
    ours, full = load_state_dict(merged), load_state_dict(student)
    assert set(ours) == set(base)
    changed = 0
    for k, w in base.items():
        delta = full[k].double() - w
        if not delta.any() or not k.endswith(".weight") or delta.ndim not in (2, 4):
            assert torch.equal(ours[k].double(), w), k
            continue
        changed += 1
        torch.testing.assert_close(ours[k].double(), w + _low_rank(delta, 3), rtol=0, atol=2e-6)
    assert changed > 10
    dpipe = StableDiffusionPipeline.from_pretrained(str(pipe), safety_checker=None, local_files_only=True)
    dpipe.load_lora_weights(str(lora.parent), weight_name=lora.name)
    dpipe.fuse_lora()
    dpipe.unload_lora_weights()
    for k, v in dpipe.unet.state_dict().items():
        torch.testing.assert_close(ours[k], v, rtol=0, atol=2e-6)


def test_planted_conv_lora_with_alpha_not_its_rank(tmp_path):
    pipe = tiny_pipeline_dir()
    base = load_state_dict(pipe / "unet")
    conv = next(k for k, v in base.items() if v.ndim == 4 and v.shape[2] == 3)
    lin = next(k for k, v in base.items() if v.ndim == 2 and "attn1.to_q" in k)
    g = torch.Generator().manual_seed(5)
    out, cin = base[conv].shape[:2]
    down = torch.randn(3, cin, 3, 3, generator=g)
    up = torch.randn(out, 3, 1, 1, generator=g)
    ldown = torch.randn(2, base[lin].shape[1], generator=g)
    lup = torch.randn(base[lin].shape[0], 2, generator=g)
    stem = "lora_unet_" + conv[: -len(".weight")].replace(".", "_")
    lstem = "lora_unet_" + lin[: -len(".weight")].replace(".", "_")
    lora = {
        f"{stem}.lora_down.weight": down,
        f"{stem}.lora_up.weight": up,
        f"{stem}.alpha": torch.tensor(2.0),
        f"{lstem}.lora_down.weight": ldown,
        f"{lstem}.lora_up.weight": lup,  # no alpha: scale 1
    }
    path, merged = tmp_path / "planted.safetensors", tmp_path / "m.safetensors"
    save_file(lora, str(path))
    wadi("merge", pipe / "unet", path, "--out", merged)
    got = load_state_dict(merged)
    ref = base[conv].double().numpy() + (2 / 3) * np.einsum(
        "or,rikl->oikl", up.double().numpy()[:, :, 0, 0], down.double().numpy()
    )
    np.testing.assert_allclose(got[conv].double().numpy(), ref, rtol=0, atol=1e-6)
    ref_lin = base[lin].double().numpy() + lup.double().numpy() @ ldown.double().numpy()
    np.testing.assert_allclose(got[lin].double().numpy(), ref_lin, rtol=0, atol=1e-6)
    others = [k for k in base if k not in (conv, lin)]
    assert all(torch.equal(got[k], base[k]) for k in others)


def test_lora_that_matches_nothing_or_does_not_fit_is_refused(tmp_path):
    pipe = tiny_pipeline_dir()
    base = load_state_dict(pipe / "unet")
    lin = next(k for k, v in base.items() if v.ndim == 2 and "attn1.to_q" in k)
    stem = "lora_unet_" + lin[: -len(".weight")].replace(".", "_")
    o, i = base[lin].shape
    out = tmp_path / "m.safetensors"
    cases = {
        "te": (
            {"lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.ones(2, 4)}
            | {"lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.ones(4, 2)},
            "lora_te_text_model_encoder_layers_0_mlp_fc1",
        ),
        "shape": (
            {f"{stem}.lora_down.weight": torch.ones(2, i + 1), f"{stem}.lora_up.weight": torch.ones(o, 2)},
            "changes a",
        ),
    }
    for name, (tensors, words) in cases.items():
        path = tmp_path / f"{name}.safetensors"
        save_file(tensors, str(path))
        r = wadi("merge", pipe / "unet", path, "--out", out, code=2)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and words in lines[0], r.stderr
        assert not out.exists()
