"""Train the embedded tiny text-to-image model and its attribute classifier (CPU, ~30 min).

Reproducible: every hyper-parameter is in ``HP`` below, every stage is seeded, data are
rendered procedurally by ``wadi_cli.tiny.data``. Stages (each skipped when its output
exists, unless ``--force``):

1. classifier on rendered images -> ``wadi_cli/assets/tiny/classifier.safetensors``;
2. VAE (reconstruction MSE + small KL), then ``scaling_factor = 1 / std(latents)``, and the
   latents of the training set are cached;
3. U-Net + text encoder jointly (ε-prediction MSE, 10 % prompt dropout to "" for
   classifier-free guidance, AdamW, EMA), then the pipeline is written to
   ``wadi_cli/assets/tiny/pipeline/``;
4. evaluation with a plain DDIM sampler (η = 0, CFG) at 1, 4 and 25 steps on random
   prompts, by ``wadi_cli.tiny.metrics.evaluate_images`` -> ``analysis/tiny_model/results/metrics.json``.

Usage:  python analysis/tiny_model/train.py [--stage all|classifier|vae|unet|eval] [--force]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from wadi_cli.io import provenance_metadata, save_safetensors
from wadi_cli.tiny import arch
from wadi_cli.tiny.classifier import TinyClassifier, attribute_matches, predict, to_model_input
from wadi_cli.tiny.data import ATTRIBUTES, attrs_to_indices, prompt_for, real_images, sample_attributes
from wadi_cli.tiny.metrics import evaluate_images

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"  # metrics, log and sample grids
HP = {
    "threads": 1,  # 2 intra-op threads stall badly when the 2 cores are shared (measured 4-6x slower)
    "train_images": 30000,
    "train_seed": 1000,
    "heldout_images": 2000,
    "heldout_seed": 9999,
    # blur augmentation: with prob. p_blur a Gaussian blur of sigma ~ U(blur_sigma), so that
    # shapes are judged by their form, not by edge sharpness (the VAE softens edges)
    "clf": {
        "seed": 0,
        "steps": 400,
        "batch": 128,
        "lr": 2e-3,
        "wd": 1e-4,
        "p_blur": 0.5,
        "blur_sigma": [0.3, 1.3],
    },
    # VAE in two phases: MSE from scratch, then a sharper fine-tune with an added L1 term
    "vae": [
        {"seed": 1, "steps": 350, "batch": 32, "lr": 2e-3, "kl_weight": 1e-6, "l1_weight": 0.0},
        {"seed": 3, "steps": 800, "batch": 32, "lr": 1e-3, "kl_weight": 1e-6, "l1_weight": 1.0},
    ],
    "vae_recon_check": 1000,
    # phase 3, after the U-Net: fine-tune the VAE decoder only on the cached latents (the
    # encoder, hence the latents the U-Net learned, stays fixed) for sharper corners
    "decoder": [
        {"seed": 4, "steps": 800, "batch": 32, "lr": 5e-4, "l1_weight": 1.0},
        {"seed": 6, "steps": 800, "batch": 32, "lr": 3e-4, "l1_weight": 1.0},
    ],
    # U-Net + text encoder in two phases; phase 2 starts from phase 1's EMA weights with a
    # fresh optimizer; phase 3 likewise from phase 2 (position is learned last: after phase 1
    # the 25-step position accuracy was 0.26, after 500 steps of phase 2 0.54)
    "unet": [
        {
            "name": "phase1",
            "seed": 2,
            "steps": 1600,
            "batch": 64,
            "lr": 1e-3,
            "wd": 1e-2,
            "warmup": 200,
            "p_uncond": 0.1,
            "ema": 0.999,
            "ckpt_every": 500,
            "quick_eval_every": 1000,
        },
        {
            "name": "phase2",
            "seed": 5,
            "steps": 1000,
            "batch": 64,
            "lr": 6e-4,
            "wd": 1e-2,
            "warmup": 50,
            "p_uncond": 0.1,
            "ema": 0.998,
            "ckpt_every": 250,
            "quick_eval_every": 500,
        },
        {
            "name": "phase3",
            "seed": 7,
            "steps": 1500,
            "batch": 64,
            "lr": 8e-4,
            "wd": 1e-2,
            "warmup": 50,
            "p_uncond": 0.1,
            "ema": 0.998,
            "ckpt_every": 250,
            "quick_eval_every": 750,
        },
    ],
    "eval": {"num_images": 500, "prompt_seed": 123, "noise_seed": 0, "real_seed": 456, "steps": [1, 4, 25]},
    "cfg_scales": [3.0, 5.0],
}


def log(msg: str, work: Path) -> None:
    msg = msg.replace(str(HERE.parents[1]) + os.sep, "")  # the repository's files relative to it
    line = f"[{time.strftime('%H:%M:%S')}] {msg}"
    print(line, flush=True)
    with open(work / "train_log.txt", "a") as f:
        f.write(line + "\n")


def lr_at(step: int, base: float, warmup: int, total: int) -> float:
    """Linear warm-up then cosine decay to 10 % of ``base``."""
    if step < warmup:
        return base * (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))


def dataset() -> tuple[np.ndarray, np.ndarray, list[dict[str, str]]]:
    images, attrs = real_images(HP["train_images"], HP["train_seed"])
    return images, attrs_to_indices(attrs), attrs


# ---------------------------------------------------------------- stage 1: classifier
def random_blur(x: torch.Tensor, p: float, sigma_range: list[float], g: torch.Generator) -> torch.Tensor:
    """Blur each image with probability ``p`` by a 5x5 Gaussian of random sigma (reflect padding)."""
    n = len(x)
    sigma = torch.empty(n).uniform_(*sigma_range, generator=g)
    on = torch.rand(n, generator=g) < p
    r = torch.arange(-2, 3, dtype=torch.float32)
    k1 = torch.exp(-(r[None, :] ** 2) / (2 * sigma[:, None] ** 2))
    k1 = k1 / k1.sum(dim=1, keepdim=True)
    k2 = k1[:, :, None] * k1[:, None, :]  # (n, 5, 5)
    xp = F.pad(x, (2, 2, 2, 2), mode="reflect")
    # grouped conv: every image and channel with its own kernel
    w = k2.repeat_interleave(3, dim=0)[:, None]
    y = F.conv2d(xp.reshape(1, n * 3, 36, 36), w, groups=n * 3).reshape(n, 3, 32, 32)
    return torch.where(on[:, None, None, None], y, x)


def train_classifier(images: np.ndarray, labels: np.ndarray, work: Path) -> TinyClassifier:
    c = HP["clf"]
    torch.manual_seed(c["seed"])
    model = TinyClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=c["lr"], weight_decay=c["wd"])
    x_all, y_all = to_model_input(images), torch.from_numpy(labels)
    g = torch.Generator().manual_seed(c["seed"])
    t0 = time.time()
    for step in range(c["steps"]):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, c["lr"], 50, c["steps"])
        idx = torch.randint(0, len(x_all), (c["batch"],), generator=g)
        logits = model(random_blur(x_all[idx], c["p_blur"], c["blur_sigma"], g))
        loss = sum(F.cross_entropy(logits[k], y_all[idx, j]) for j, k in enumerate(ATTRIBUTES))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == c["steps"] - 1:
            log(f"clf step {step} loss {loss.item():.4f} ({time.time() - t0:.0f}s)", work)
    return model.eval()


def classifier_heldout_accuracy(model: TinyClassifier) -> dict[str, float]:
    imgs, attrs = real_images(HP["heldout_images"], HP["heldout_seed"])
    match = attribute_matches(predict(imgs, model), attrs)
    out = {k: float(v.mean()) for k, v in match.items()}
    out["all"] = float(np.logical_and.reduce(list(match.values())).mean())
    return out


# ---------------------------------------------------------------- stage 2: VAE
def train_vae(vae, images: np.ndarray, work: Path, c: dict):
    """One VAE phase: ``mse + l1_weight·l1 + kl_weight·KL`` (KL summed per image)."""
    torch.manual_seed(c["seed"])
    vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=c["lr"], weight_decay=0.0)
    x_all = to_model_input(images)
    g = torch.Generator().manual_seed(c["seed"])
    t0 = time.time()
    for step in range(c["steps"]):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, c["lr"], 50, c["steps"])
        x = x_all[torch.randint(0, len(x_all), (c["batch"],), generator=g)]
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample(generator=g)).sample
        mse, l1 = F.mse_loss(rec, x), F.l1_loss(rec, x)
        kl = post.kl().mean()
        loss = mse + c["l1_weight"] * l1 + c["kl_weight"] * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        if step % 100 == 0 or step == c["steps"] - 1:
            msg = f"mse {mse.item():.5f} l1 {l1.item():.4f} kl {kl.item():.1f}"
            log(f"vae step {step} {msg} ({time.time() - t0:.0f}s)", work)
    return vae.eval()


@torch.no_grad()
def encode_all(vae, images: np.ndarray, batch: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of every image (unscaled latents)."""
    x_all = to_model_input(images)
    means, stds = [], []
    for i in range(0, len(x_all), batch):
        d = vae.encode(x_all[i : i + batch]).latent_dist
        means.append(d.mean)
        stds.append(d.std)
    return torch.cat(means), torch.cat(stds)


@torch.no_grad()
def decode_to_uint8(vae, latents_scaled: torch.Tensor, batch: int = 250) -> np.ndarray:
    out = []
    for i in range(0, len(latents_scaled), batch):
        img = vae.decode(latents_scaled[i : i + batch] / vae.config.scaling_factor).sample
        out.append(((img.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1))
    return torch.cat(out).numpy()


def finetune_decoder(vae, images: np.ndarray, lat_mean, lat_std, work: Path, c: dict):
    """Decoder-only fine-tune on cached posterior samples: ``mse + l1_weight·l1``."""
    torch.manual_seed(c["seed"])
    params = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    opt = torch.optim.AdamW(params, lr=c["lr"], weight_decay=0.0)
    x_all = to_model_input(images)
    g = torch.Generator().manual_seed(c["seed"])
    vae.train()
    t0 = time.time()
    for step in range(c["steps"]):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, c["lr"], 50, c["steps"])
        idx = torch.randint(0, len(x_all), (c["batch"],), generator=g)
        z = lat_mean[idx] + lat_std[idx] * torch.randn(lat_mean[idx].shape, generator=g)
        rec = vae.decode(z).sample
        mse, l1 = F.mse_loss(rec, x_all[idx]), F.l1_loss(rec, x_all[idx])
        loss = mse + c["l1_weight"] * l1
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 100 == 0 or step == c["steps"] - 1:
            log(
                f"decoder step {step} mse {mse.item():.5f} l1 {l1.item():.4f} ({time.time() - t0:.0f}s)", work
            )
    return vae.eval()


def recon_check(vae, work: Path, name: str) -> dict:
    """Classifier accuracy and MSE of reconstructions of held-out renders (bounds accuracy)."""
    from wadi_cli.tiny.classifier import load_classifier

    imgs, attrs = real_images(HP["vae_recon_check"], HP["heldout_seed"])
    mean, _ = encode_all(vae, imgs)
    rec = decode_to_uint8(vae, mean * vae.config.scaling_factor)
    match = attribute_matches(predict(rec, load_classifier()), attrs)
    res = {
        "scaling_factor": vae.config.scaling_factor,
        "recon_mse_uint8": float(((rec.astype(np.float64) - imgs) ** 2).mean()),
        "recon_classifier_accuracy": float(np.logical_and.reduce(list(match.values())).mean()),
        "recon_per_attribute_accuracy": {k: float(v.mean()) for k, v in match.items()},
    }
    save_grid(np.concatenate([imgs[:24], rec[:24]]), RESULTS / f"{name}_recon.png")
    log(f"{name}: {res}", work)
    return res


# ---------------------------------------------------------------- stage 3: U-Net + text encoder
def prompt_table(tokenizer) -> torch.Tensor:
    """Token ids ``(49, 16)``: the 48 prompts in ``attrs_to_indices`` order, then ""."""
    prompts = [
        prompt_for({"color": c, "shape": s, "position": p})
        for c in ATTRIBUTES["color"]
        for s in ATTRIBUTES["shape"]
        for p in ATTRIBUTES["position"]
    ]
    return tokenize(tokenizer, prompts + [""])


def tokenize(tokenizer, prompts: list[str]) -> torch.Tensor:
    return tokenizer(
        prompts,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids


def prompt_index(labels: np.ndarray) -> torch.Tensor:
    n_s, n_p = len(ATTRIBUTES["shape"]), len(ATTRIBUTES["position"])
    return torch.from_numpy(labels[:, 0] * n_s * n_p + labels[:, 1] * n_p + labels[:, 2])


def ema_update(ema_params: list[torch.Tensor], params: list[torch.Tensor], decay: float) -> None:
    with torch.no_grad():
        torch._foreach_lerp_(ema_params, params, 1.0 - decay)


def train_unet(comps: dict, lat_mean: torch.Tensor, lat_std: torch.Tensor, labels: np.ndarray, work: Path, c):
    """One U-Net + text-encoder phase (config ``c``); returns the EMA copies."""
    torch.manual_seed(c["seed"])
    unet, te, sched = comps["unet"], comps["text_encoder"], comps["scheduler"]
    sf = comps["vae"].config.scaling_factor
    table, pidx = prompt_table(comps["tokenizer"]), prompt_index(labels)
    alphas = sched.alphas_cumprod.float()
    params = list(unet.parameters()) + list(te.parameters())
    opt = torch.optim.AdamW(params, lr=c["lr"], weight_decay=c["wd"])
    ema = copy.deepcopy({"unet": unet, "text_encoder": te})
    ema_params = list(ema["unet"].parameters()) + list(ema["text_encoder"].parameters())
    g = torch.Generator().manual_seed(c["seed"])
    unet.train()
    te.train()
    t0, run_loss = time.time(), 0.0
    for step in range(c["steps"]):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, c["lr"], c["warmup"], c["steps"])
        idx = torch.randint(0, len(lat_mean), (c["batch"],), generator=g)
        x0 = (lat_mean[idx] + lat_std[idx] * torch.randn(lat_mean[idx].shape, generator=g)) * sf
        drop = torch.rand(c["batch"], generator=g) < c["p_uncond"]
        ids = table[torch.where(drop, torch.full_like(pidx[idx], len(table) - 1), pidx[idx])]
        t = torch.randint(0, len(alphas), (c["batch"],), generator=g)
        eps = torch.randn(x0.shape, generator=g)
        a = alphas[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
        pred = unet(xt, t, te(ids)[0]).sample
        loss = F.mse_loss(pred, eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema_update(ema_params, params, min(c["ema"], (1 + step) / (10 + step)))
        run_loss += loss.item()
        if (step + 1) % 100 == 0:
            log(f"unet step {step + 1} loss {run_loss / 100:.4f} ({time.time() - t0:.0f}s)", work)
            run_loss = 0.0
        if (step + 1) % c["ckpt_every"] == 0 or step == c["steps"] - 1:
            save_stage_ckpt(ema, work / f"unet_te_ema_{c['name']}.safetensors", step + 1)
        if (step + 1) % c["quick_eval_every"] == 0:
            quick = {**comps, "unet": ema["unet"].eval(), "text_encoder": ema["text_encoder"].eval()}
            r = evaluate_teacher(quick, steps=25, cfg=3.0, num_images=200)
            log(f"quick eval ({c['name']} step {step + 1}, EMA, 25 steps, cfg 3): {json.dumps(r)}", work)
            unet.train()
            te.train()
    return ema["unet"].eval(), ema["text_encoder"].eval()


def save_stage_ckpt(models: dict, path: Path, step: int) -> None:
    sd = {f"{name}.{k}": v.detach().clone() for name, m in models.items() for k, v in m.state_dict().items()}
    save_safetensors(sd, path, provenance_metadata({"step": step}))


# ---------------------------------------------------------------- stage 4: evaluation
def ddim_timesteps(steps: int, num_train: int = 1000) -> list[int]:
    """Trailing spacing: ``steps`` timesteps from ``num_train − 1`` down (1 step -> [999])."""
    return [int(round(num_train - i * num_train / steps)) - 1 for i in range(steps)]


@torch.no_grad()
def ddim_sample(
    comps: dict, prompts: list[str], steps: int, cfg: float, seed: int, batch: int = 250
) -> np.ndarray:
    """Deterministic DDIM (η = 0) with classifier-free guidance; the last step returns the
    predicted x0 (ᾱ_prev = 1). One noise generator per image (seed + index)."""
    unet, te, tok, vae = comps["unet"], comps["text_encoder"], comps["tokenizer"], comps["vae"]
    alphas = comps["scheduler"].alphas_cumprod.double()
    uncond = te(tokenize(tok, [""]))[0]
    ts = ddim_timesteps(steps)
    out = []
    for i in range(0, len(prompts), batch):
        chunk = prompts[i : i + batch]
        cond = te(tokenize(tok, chunk))[0]
        x = torch.stack(
            [
                torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(seed + i + j))
                for j in range(len(chunk))
            ]
        ).double()
        ctx = torch.cat([uncond.expand(len(chunk), -1, -1), cond])
        for k, t in enumerate(ts):
            e_u, e_c = (
                unet(torch.cat([x, x]).float(), torch.full((2 * len(chunk),), t), ctx)
                .sample.double()
                .chunk(2)
            )
            eps = e_u + cfg * (e_c - e_u)
            a_t = alphas[t]
            x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
            a_prev = alphas[ts[k + 1]] if k + 1 < len(ts) else torch.tensor(1.0, dtype=torch.float64)
            x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
        out.append(decode_to_uint8(vae, x.float()))
    return np.concatenate(out)


def evaluate_teacher(comps: dict, steps: int, cfg: float, num_images: int | None = None) -> dict:
    e = HP["eval"]
    n = num_images or e["num_images"]
    attrs = sample_attributes(n, e["prompt_seed"])
    imgs = ddim_sample(comps, [prompt_for(a) for a in attrs], steps, cfg, e["noise_seed"])
    r = evaluate_images(imgs, attrs, e["real_seed"], classifier=comps.get("classifier"))
    return {"steps": steps, "cfg": cfg, **r}


def save_grid(images: np.ndarray, path: Path, ncol: int = 12) -> None:
    import matplotlib.pyplot as plt

    n = len(images) // ncol * ncol
    g = images[:n].reshape(-1, ncol, 32, 32, 3).transpose(0, 2, 1, 3, 4).reshape(-1, ncol * 32, 3)
    plt.imsave(path, np.kron(g, np.ones((3, 3, 1), dtype=np.uint8)))


# ---------------------------------------------------------------- driver
def stage_classifier(images, labels, work: Path, force: bool) -> dict:
    from wadi_cli.tiny.classifier import load_classifier

    if force or not arch.TINY_CLASSIFIER_PATH.is_file():
        model = train_classifier(images, labels, work)
        sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
        save_safetensors(sd, arch.TINY_CLASSIFIER_PATH, provenance_metadata(HP["clf"]))
    acc = classifier_heldout_accuracy(load_classifier())
    log(f"classifier held-out accuracy ({HP['heldout_images']} renders): {acc}", work)
    return acc


def stage_vae(images, work: Path, force: bool) -> dict:
    from diffusers import AutoencoderKL

    prev = None
    for i, phase in enumerate(HP["vae"]):
        out = work / ("vae" if i == len(HP["vae"]) - 1 else f"vae_phase{i + 1}")
        if force or not (out / "config.json").is_file():
            if prev is None:
                vae = arch.build_tiny_components(seed=phase["seed"])["vae"]
            else:
                vae = AutoencoderKL.from_pretrained(prev)
            vae = train_vae(vae, images, work, phase)
            if i == len(HP["vae"]) - 1:
                mean, std = encode_all(vae, images)
                sf = float(1.0 / (mean + std * torch.randn_like(std)).std())
                vae.register_to_config(scaling_factor=sf)
                torch.save({"mean": mean, "std": std}, work / "latents.pt")
            vae.save_pretrained(out, safe_serialization=True)
        prev = out
    return recon_check(AutoencoderKL.from_pretrained(work / "vae").eval(), work, "vae")


def drop_source_paths(pipeline: Path) -> None:
    """Remove ``_name_or_path`` (the folder a component was loaded from on the training machine)
    from the saved configs: the shipped files hold no machine paths, and diffusers sets it on load."""
    from wadi_cli.io import write_text_atomic

    for cfg in sorted(Path(pipeline).glob("*/config.json")):
        data = json.loads(cfg.read_text())
        if data.pop("_name_or_path", None) is not None:
            write_text_atomic(cfg, json.dumps(data, indent=2, sort_keys=True) + "\n")


def stage_decoder(images, work: Path, force: bool) -> dict:
    """Fine-tune the shipped pipeline's VAE decoder (phase 3) and re-save the pipeline."""
    from diffusers import AutoencoderKL

    from wadi_cli.tiny.arch import load_tiny_pipeline

    prev = work / "vae"
    for i, c in enumerate(HP["decoder"]):
        out = work / f"vae_decoder_ft{i + 1}"
        if force or not (out / "config.json").is_file():
            lat = torch.load(work / "latents.pt", weights_only=True)
            vae = AutoencoderKL.from_pretrained(prev)
            finetune_decoder(vae, images, lat["mean"], lat["std"], work, c).save_pretrained(out)
        prev = out
    pipe = load_tiny_pipeline()
    comps = {k: getattr(pipe, k) for k in ("unet", "text_encoder", "tokenizer", "scheduler")}
    comps["vae"] = AutoencoderKL.from_pretrained(out).eval()
    arch.save_tiny_pipeline(comps, arch.TINY_PIPELINE_DIR)
    drop_source_paths(arch.TINY_PIPELINE_DIR)
    log(f"pipeline re-saved with the fine-tuned decoder to {arch.TINY_PIPELINE_DIR}", work)
    return recon_check(comps["vae"], work, "vae_decoder_ft")


def stage_unet(labels, work: Path, force: bool) -> None:
    from diffusers import AutoencoderKL
    from safetensors.torch import load_file

    comps = arch.build_tiny_components(seed=HP["unet"][0]["seed"])
    comps["vae"] = AutoencoderKL.from_pretrained(work / "vae").eval()
    lat = torch.load(work / "latents.pt", weights_only=True)
    for c in HP["unet"]:
        ckpt = work / f"unet_te_ema_{c['name']}.safetensors"
        done = ckpt.is_file() and json.loads(load_file_meta(ckpt)["wadi_config"])["step"] == c["steps"]
        if force or not done:
            unet, te = train_unet(comps, lat["mean"], lat["std"], labels, work, c)
        sd = load_file(str(ckpt))
        for name in ("unet", "text_encoder"):
            n = len(name) + 1
            comps[name].load_state_dict({k[n:]: v for k, v in sd.items() if k.startswith(name + ".")})
    arch.save_tiny_pipeline(comps, arch.TINY_PIPELINE_DIR)
    drop_source_paths(arch.TINY_PIPELINE_DIR)
    log(f"pipeline written to {arch.TINY_PIPELINE_DIR}", work)


def load_file_meta(path: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.metadata() or {}


def stage_eval(work: Path) -> dict:
    from wadi_cli.tiny.arch import load_tiny_pipeline

    pipe = load_tiny_pipeline()
    comps = {k: getattr(pipe, k) for k in ("unet", "vae", "text_encoder", "tokenizer", "scheduler")}
    results = []
    for cfg in HP["cfg_scales"]:
        for steps in HP["eval"]["steps"]:
            t0 = time.time()
            r = evaluate_teacher(comps, steps, cfg)
            r["seconds"] = round(time.time() - t0, 1)
            log(f"eval: {json.dumps(r)}", work)
            results.append(r)
    attrs = sample_attributes(48, 7)
    for steps in HP["eval"]["steps"]:
        imgs = ddim_sample(comps, [prompt_for(a) for a in attrs], steps, 3.0, 0)
        save_grid(imgs, RESULTS / f"samples_{steps}step_cfg3.png")
    return {"teacher": results}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stage", default="all", choices=["all", "classifier", "vae", "unet", "decoder", "eval"])
    ap.add_argument("--force", action="store_true", help="retrain stages whose outputs exist")
    ap.add_argument("--work", default="/tmp/wadi_tiny_work", help="folder for intermediate files")
    args = ap.parse_args()
    torch.set_num_threads(HP["threads"])
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    RESULTS.mkdir(exist_ok=True)
    metrics_path = RESULTS / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    metrics["hyperparameters"] = HP
    t0 = time.time()
    images, labels, _ = dataset()
    log(f"rendered {len(images)} training images ({time.time() - t0:.0f}s)", work)
    if args.stage in ("all", "classifier"):
        metrics["classifier_heldout_accuracy"] = stage_classifier(images, labels, work, args.force)
    if args.stage in ("all", "vae"):
        metrics["vae"] = stage_vae(images, work, args.force)
    if args.stage in ("all", "unet"):
        stage_unet(labels, work, args.force)
    if args.stage in ("all", "decoder"):
        metrics["vae_decoder_ft"] = stage_decoder(images, work, args.force)
    if args.stage in ("all", "eval"):
        metrics.update(stage_eval(work))
    metrics_path.write_text(json.dumps(metrics, indent=2) + "\n")
    (RESULTS / "train_log.txt").write_text((work / "train_log.txt").read_text())
    log(f"done in {time.time() - t0:.0f}s; metrics in {metrics_path}", work)


if __name__ == "__main__":
    main()
