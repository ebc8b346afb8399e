"""--gradient-checkpointing really recomputes activations during backward, with the
network in eval() mode as the trainer keeps it (diffusers < 0.32 checkpointed only in
train() mode, so the flag did nothing there; the floor is now 0.32)."""

from __future__ import annotations

import pytest
import torch
from _helpers_sample import tiny_pipeline_dir

from wadi_cli.diffusion import TextCondition
from wadi_cli.distill import resolve_config
from wadi_cli.distill.trainer import Distiller


@pytest.mark.parametrize("checkpointing", [True, False])
def test_blocks_run_again_during_backward(checkpointing):
    from wadi_cli.pipeline import load_pipeline

    sampler = load_pipeline("tiny", model=tiny_pipeline_dir(), teacher=True)
    cfg = resolve_config(
        overrides={
            "backbone": "tiny",
            "gradient_checkpointing": checkpointing,
            "regression_weight": 0.0,
            "batch_size": 2,
            "device": "cpu",
            "text_cache": 0,
            "ema_decay": 0.0,
        }
    )
    distiller = Distiller(cfg, sampler, ["a red circle at the top left"])
    net = distiller.net
    assert not net.training  # the base stays in eval mode
    calls = {"forward": 0, "backward": 0}
    phase = {"now": "forward"}
    resnet = net.down_blocks[0].resnets[0]
    block = net.down_blocks[0].attentions[0].transformer_blocks[0]

    def count(module, args):
        calls[phase["now"]] += 1

    # pre-hooks: torch stops a recomputation as soon as it has every saved tensor it
    # needs, before the module returns, so post-hooks would miss it
    hooks = [resnet.register_forward_pre_hook(count), block.register_forward_pre_hook(count)]
    try:
        z = torch.randn(2, *sampler.latent_shape, generator=torch.Generator().manual_seed(0))
        cond = distiller.encode(["a red circle at the top left"] * 2)
        assert isinstance(cond, TextCondition)
        x0 = distiller._one_step_x0(z, cond)
        phase["now"] = "backward"
        distiller._backward("student", x0.square().mean())
    finally:
        for h in hooks:
            h.remove()
    assert calls["forward"] == 2
    assert calls["backward"] == (2 if checkpointing else 0)
    grads = [p.grad for p in distiller.params["student"]]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
