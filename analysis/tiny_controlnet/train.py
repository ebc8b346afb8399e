"""Train the tiny ControlNet shipped in ``wadi_cli/assets/tiny/controlnet/`` (one CPU thread:
about 10 min of CPU, 42 min of wall time on a 2-core VM shared with other jobs): a diffusers
``ControlNetModel`` for the shipped tiny teacher whose control image is the shape's
silhouette (white on black, at the shape's exact position and size).

Model: the teacher U-Net's encoder copied (ControlNet's recipe), made smaller to ship in a few
hundred KB: the first level's down block without attention (``DownBlock2D``), the middle block
without attention (``UNetMidBlock2D``); the second level keeps its cross-attention (the prompt
still reaches the ControlNet). Every weight the copy shares with the U-Net starts from the
U-Net's; the condition embedding (3 → 8 → 16 → 32 channels, two stride-2 convolutions:
32 px → 8 latent px) and the zero convolutions are new (the latter zero, as in the paper).

Training: the teacher (U-Net, VAE, text encoder) frozen; ε-prediction MSE of the U-Net with
the ControlNet's residuals (wadi's own ``ControlledDenoiser``, the inference path), t uniform
in [0, 999], 20 % of the prompts replaced by "" (so the control alone steers, and for the
teacher's classifier-free guidance), AdamW, cosine decay. Data: ``render_with_masks`` of
``sample_attributes`` (images and their silhouettes from the same draw), latents the VAE
posterior's mean (as ``--init-image`` encodes). Weights are saved in float16 (the file is
half the size; the loader casts them to the pipeline's dtype).

    PYTHONPATH=. python3 analysis/tiny_controlnet/train.py          # writes the asset
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from wadi_cli.diffusion import TextCondition
from wadi_cli.io import atomic_output_dir
from wadi_cli.pipeline import load_pipeline
from wadi_cli.pipeline.control import ControlledDenoiser, control_tensor
from wadi_cli.pipeline.img2img import encode
from wadi_cli.tiny.arch import TINY_CONTROLNET_DIR
from wadi_cli.tiny.data import mask_images, prompt_for, render_with_masks, sample_attributes

HERE = Path(__file__).resolve().parent
HP = {
    "threads": 1,
    "train_images": 12000,
    "data_seed": 2100,
    "seed": 21,
    "steps": 1500,
    "batch": 48,
    "lr": 1e-3,
    "warmup": 50,
    "wd": 1e-2,
    "p_uncond": 0.2,
    "grad_clip": 1.0,
    "conditioning_embedding_out_channels": [8, 16, 32],
}


def build_controlnet(unet: torch.nn.Module) -> torch.nn.Module:
    """The ControlNet of the module docstring, with every weight it shares with ``unet``."""
    from diffusers import ControlNetModel

    c = unet.config  # type: ignore[attr-defined]
    torch.manual_seed(HP["seed"])
    net = ControlNetModel(
        in_channels=c.in_channels,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        mid_block_type="UNetMidBlock2D",
        block_out_channels=tuple(c.block_out_channels),
        layers_per_block=c.layers_per_block,
        cross_attention_dim=c.cross_attention_dim,
        attention_head_dim=c.attention_head_dim,
        norm_num_groups=c.norm_num_groups,
        use_linear_projection=c.use_linear_projection,
        flip_sin_to_cos=c.flip_sin_to_cos,
        freq_shift=c.freq_shift,
        conditioning_embedding_out_channels=tuple(HP["conditioning_embedding_out_channels"]),
    )
    own, theirs = net.state_dict(), unet.state_dict()
    shared = {k: v for k, v in theirs.items() if k in own and own[k].shape == v.shape}
    net.load_state_dict(shared, strict=False)
    return net


def lr_at(step: int) -> float:
    if step < HP["warmup"]:
        return HP["lr"] * (step + 1) / HP["warmup"]
    p = (step - HP["warmup"]) / max(1, HP["steps"] - HP["warmup"])
    return HP["lr"] * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * p)))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=TINY_CONTROLNET_DIR)
    ap.add_argument("--steps", type=int, default=HP["steps"])
    ap.add_argument("--checkpoints", type=Path, help="also save the weights every 500 steps to DIR/STEP")
    args = ap.parse_args(argv)
    HP["steps"] = args.steps
    torch.set_num_threads(HP["threads"])
    start = time.perf_counter()
    pipe = load_pipeline("tiny", teacher=True)
    attrs = sample_attributes(HP["train_images"], HP["data_seed"])
    images, masks = render_with_masks(attrs, HP["data_seed"])
    control = control_tensor(mask_images(masks))
    latents = torch.cat([encode(pipe.vae, images[i : i + 500]) for i in range(0, len(images), 500)])
    prompts = sorted({prompt_for(a) for a in attrs})
    with torch.no_grad():
        table = pipe.prompt_encoder([*prompts, ""]).embeds  # (P + 1, L, D); the last: ""
    prompt_idx = torch.tensor([prompts.index(prompt_for(a)) for a in attrs])
    print(f"data: {len(images)} images, {time.perf_counter() - start:.0f} s", flush=True)

    net = build_controlnet(pipe.denoiser.model).train()
    denoiser = ControlledDenoiser(pipe.denoiser, net, 1.0)  # type: ignore[arg-type]
    abar = pipe.denoiser.alphas_cumprod.float()
    opt = torch.optim.AdamW(net.parameters(), lr=HP["lr"], weight_decay=HP["wd"])
    g = torch.Generator().manual_seed(HP["seed"])
    log, t0 = [], time.perf_counter()
    for step in range(HP["steps"]):
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        idx = torch.randint(0, len(latents), (HP["batch"],), generator=g)
        t = torch.randint(0, len(abar), (HP["batch"],), generator=g)
        noise = torch.randn(latents[idx].shape, generator=g)
        a = abar[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * latents[idx] + (1 - a).sqrt() * noise
        uncond = torch.rand(HP["batch"], generator=g) < HP["p_uncond"]
        emb = table[torch.where(uncond, len(prompts), prompt_idx[idx])]
        denoiser.use(control[idx])
        loss = F.mse_loss(denoiser(x_t, t, TextCondition(embeds=emb)), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), HP["grad_clip"])
        opt.step()
        if step % 50 == 0 or step == HP["steps"] - 1:
            log.append({"step": step, "loss": round(loss.item(), 5), "s": round(time.perf_counter() - t0, 1)})
            print(log[-1], flush=True)
        if args.checkpoints is not None and step % 500 == 499:
            net.save_pretrained(str(args.checkpoints / str(step + 1)), safe_serialization=True)
    net = net.eval().to(torch.float16)
    with atomic_output_dir(args.out) as tmp:
        net.save_pretrained(str(tmp), safe_serialization=True)
        for f in tmp.iterdir():
            f.chmod(0o644)  # package data: readable by everyone
    params = sum(p.numel() for p in net.parameters())
    record = {"hp": HP, "parameters": params, "seconds": round(time.perf_counter() - start, 1), "log": log}
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "train.json").write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {args.out} ({params} parameters) in {record['seconds']} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
