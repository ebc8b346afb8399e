"""Denoiser wrappers: same numbers as calling the diffusers models directly, PixArt's

8-channel output and attention mask, v-prediction conversion on a planted model."""

from __future__ import annotations

import math

import _helpers_sample
import pytest
import torch
from torch import nn

from wadi_cli.diffusion import DiTDenoiser, TextCondition, UNetDenoiser, wrap_denoiser
from wadi_cli.errors import BadInputError


@pytest.fixture(scope="module")
def tiny_components():
    return _helpers_sample.tiny_components()


def _pixart(use_additional_conditions: bool = False):
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(0)
    model = PixArtTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=12,  # inner dim 24: divisible by 3 for the additional conditions
        in_channels=4,
        out_channels=8,
        num_layers=1,
        norm_num_groups=4,
        cross_attention_dim=24,
        sample_size=8,
        patch_size=2,
        caption_channels=12,
        use_additional_conditions=use_additional_conditions,
    )
    return model.eval()


def _cond(b=2, length=6, dim=12, seed=1, masked=True):
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(b, length, dim, generator=g)
    mask = torch.zeros(b, length, dtype=torch.long)
    mask[:, :3] = 1
    return TextCondition(emb, mask if masked else None)


@torch.no_grad()
def test_dit_wrapper_takes_first_four_channels_and_mask():
    model = _pixart()
    den = wrap_denoiser(model)
    assert isinstance(den, DiTDenoiser)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    cond = _cond()
    t = torch.tensor([999, 10])
    got = den(x, t, cond)
    full = model(
        x,
        encoder_hidden_states=cond.embeds,
        timestep=t,
        added_cond_kwargs={"resolution": None, "aspect_ratio": None},
        encoder_attention_mask=cond.mask,
    ).sample
    assert full.shape[1] == 8 and got.shape == x.shape
    torch.testing.assert_close(got, full[:, :4])
    # the mask is used: tokens behind it do not matter, visible tokens do
    hidden = cond.embeds.clone()
    hidden[:, 3:] = 100.0
    torch.testing.assert_close(den(x, t, TextCondition(hidden, cond.mask)), got)
    visible = cond.embeds.clone()
    visible[:, 0] += 1.0
    assert not torch.allclose(den(x, t, TextCondition(visible, cond.mask)), got)


@torch.no_grad()
def test_dit_additional_conditions_from_latent_size():
    model = _pixart(use_additional_conditions=True)
    den = DiTDenoiser(model, vae_scale_factor=8)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    cond = _cond()
    res = torch.tensor([[64.0, 64.0]] * 2)
    ar = torch.tensor([[1.0]] * 2)
    ref = model(
        x,
        encoder_hidden_states=cond.embeds,
        timestep=torch.tensor([5, 5]),
        added_cond_kwargs={"resolution": res, "aspect_ratio": ar},
        encoder_attention_mask=cond.mask,
    ).sample[:, :4]
    torch.testing.assert_close(den(x, 5, cond), ref)


@torch.no_grad()
def test_unet_wrapper_matches_direct_call(tiny_components):
    unet = tiny_components["unet"]
    den = wrap_denoiser(unet)
    assert isinstance(den, UNetDenoiser) and den.family == "unet"
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 4, 8, 8, generator=g)
    emb = torch.randn(2, 16, unet.config.cross_attention_dim, generator=g)
    ref = unet(x, torch.tensor([999, 999]), encoder_hidden_states=emb).sample
    torch.testing.assert_close(den(x, 999, TextCondition(emb)), ref)


class _PlantedV(nn.Module):
    """A "network" that returns the exact v-target for a planted (x0, ε) pair."""

    dtype = torch.float64

    def __init__(self, x0, eps, alphas_cumprod):
        super().__init__()
        self.x0, self.eps, self.ac = x0, eps, alphas_cumprod

    def forward(self, x, t, encoder_hidden_states=None, return_dict=False):
        ab = self.ac[t.long()].reshape(-1, 1, 1, 1)
        return (ab.sqrt() * self.eps - (1 - ab).sqrt() * self.x0,)


def test_eps_converts_v_prediction_with_the_schedule():
    g = torch.Generator().manual_seed(5)
    x0 = torch.randn(2, 4, 3, 3, generator=g, dtype=torch.float64)
    eps = torch.randn(2, 4, 3, 3, generator=g, dtype=torch.float64)
    ac = torch.linspace(0.999, 0.01, 1000, dtype=torch.float64)
    t = torch.tensor([700, 20])
    ab = ac[t].reshape(-1, 1, 1, 1)
    x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * eps
    den = wrap_denoiser(_PlantedV(x0, eps, ac), "v_prediction", ac, family="unet")
    cond = TextCondition(torch.zeros(2, 1, 1, dtype=torch.float64))
    torch.testing.assert_close(den.eps(x_t, t, cond), eps, rtol=0, atol=1e-12)
    assert math.isclose(
        float(den(x_t, t, cond)[0, 0, 0, 0]), float((ab.sqrt() * eps - (1 - ab).sqrt() * x0)[0, 0, 0, 0])
    )


def test_v_prediction_without_schedule_refused():
    den = wrap_denoiser(_PlantedV(0, 0, None), "v_prediction", None, family="unet")
    with pytest.raises(BadInputError, match="alphas_cumprod"):
        den.eps(torch.zeros(1, 4, 2, 2, dtype=torch.float64), 5, TextCondition(torch.zeros(1, 1, 1)))


def test_unknown_family_refused():
    with pytest.raises(BadInputError, match="family"):
        wrap_denoiser(nn.Linear(2, 2))
