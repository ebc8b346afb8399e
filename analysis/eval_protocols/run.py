"""How much each choice of ``wadi eval --protocol`` moves the numbers, on stand-ins:

1. crop rounding (floor vs torchvision's half-to-even): how many of 600 COCO-like mixed
   sizes crop differently, and the FID change with a random stand-in feature network;
2. CLIP input (image as generated vs the 256-px square, and GigaGAN's tensor round trip):
   mean absolute difference of CLIP's 224-px input tensors (ViT-B-32 / ViT-g-14 preprocessing);
3. CLIP text: token ids of "A photo depicts " + caption, joined vs spliced, on a caption file
   (DMD2's captions_coco14_test.txt, 30,000 lines; not shipped with wadi: pass its path),
   and the effect of its trailing spaces.

    /work/venv-eval/bin/python analysis/eval_protocols/run.py --captions captions_coco14_test.txt

Writes results/effects.json next to this file. Needs the eval extra (open_clip, clean-fid).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from wadi_cli.evaluation import clip_text, protocol, scores
from wadi_cli.evaluation.captions import read_captions
from wadi_cli.machine import machine_info

HERE = Path(__file__).resolve().parent


def coco_like_sizes(n: int, seed: int) -> list[tuple[int, int]]:
    """(w, h): the long side 640 (COCO's usual), the short side drawn from 300-639."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        short = int(rng.integers(300, 640))
        out.append((640, short) if rng.random() < 0.65 else (short, 640))
    return out


def smooth_image(w: int, h: int, rng: np.random.Generator) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.zeros((h, w, 3), np.float32)
    for c in range(3):
        fx, fy, ph = rng.uniform(0.005, 0.08), rng.uniform(0.005, 0.08), rng.uniform(0, 6.3)
        img[..., c] = 128 + 90 * np.sin(fx * xx + fy * yy + ph)
    edge = int(rng.integers(0, w))
    img[:, edge : edge + 3] = 255  # a thin line: a 1-px shift shows
    return np.clip(img + rng.normal(0, 6, img.shape), 0, 255).astype(np.uint8)


class _Net(torch.nn.Module):
    def __init__(self, dim: int = 64) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 16, kernel_size=7, stride=4)
        self.pool = torch.nn.AdaptiveAvgPool2d(4)
        self.fc = torch.nn.Linear(16 * 16, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(torch.tanh(self.conv((x - 128) / 128))).flatten(1))


def crop_effect(n: int) -> dict:
    from cleanfid.resize import build_resizer

    resize = build_resizer("clean")
    net = _Net().eval()
    sizes_gen, sizes_ref = coco_like_sizes(n, 1), coco_like_sizes(n, 2)
    differ = sum((max(w, h) - min(w, h)) % 4 == 3 for w, h in sizes_gen)
    feats: dict[str, list[np.ndarray]] = {}
    for tag, sizes, seed in (("gen", sizes_gen, 10), ("ref", sizes_ref, 20)):
        rng = np.random.default_rng(seed)
        images = [smooth_image(w, h, rng) for w, h in sizes]
        for rounding in protocol.CROP_ROUNDINGS:
            batch = np.stack([resize(protocol.protocol_image(im, 256, rounding)) for im in images])
            with torch.no_grad():
                out = net(torch.from_numpy(batch).permute(0, 3, 1, 2).float()).numpy().astype(np.float64)
            feats[f"{tag}-{rounding}"] = out
    fid = {}
    for rounding in protocol.CROP_ROUNDINGS:
        g, r = feats[f"gen-{rounding}"], feats[f"ref-{rounding}"]
        fid[rounding] = scores.fid(*scores.statistics(g), *scores.statistics(r))
    return {
        "images": n,
        "crops_that_differ": int(differ),
        "fid_floor": fid["floor"],
        "fid_half_even": fid["half-even"],
        "fid_delta": fid["half-even"] - fid["floor"],
        "note": "random 64-d stand-in feature network, smooth synthetic images with a thin line; "
        "the count is exact, the FID change only shows the order of magnitude",
    }


def clip_input_effect(n: int) -> dict:
    import open_clip

    out = {}
    rng = np.random.default_rng(3)
    for label, sizes in (
        ("512x512 (SD1.5 output)", [(512, 512)] * n),
        ("COCO-like mixed", coco_like_sizes(n, 4)),
    ):
        images = [Image.fromarray(smooth_image(w, h, rng)) for w, h in sizes]
        row = {}
        for model in ("ViT-B-32", "ViT-g-14"):
            cfg = open_clip.get_model_config(model)["vision_cfg"]
            pre = open_clip.image_transform(cfg["image_size"], is_train=False)
            base = torch.stack([pre(im) for im in images])
            for name in ("dmd2", "gigagan"):
                p = protocol.get_protocol(name)
                other = torch.stack([pre(protocol.clip_input(im, p)) for im in images])
                row[f"{model} {name} vs as-generated"] = float((other - base).abs().mean())
        out[label] = row
    levels = np.arange(256, dtype=np.uint8)
    out["gigagan_round_trip_levels_lowered"] = int((protocol.tensor_round_trip(levels) != levels).sum())
    out["note"] = "mean |difference| of CLIP's normalised 224-px input tensors (CLIP mean/std units)"
    return out


def token_effect(path: Path | None) -> dict:
    from open_clip.tokenizer import SimpleTokenizer

    tok = SimpleTokenizer()
    if path is None:
        return {"skipped": "no --captions file given"}
    as_is = read_captions(path, style="lines")
    normalised = read_captions(path)
    prefix = protocol.CLIP_PREFIX
    joined = torch.cat(
        [clip_text.joined(tok, as_is[i : i + 2000], prefix) for i in range(0, len(as_is), 2000)]
    )
    spliced = torch.cat(
        [clip_text.spliced(tok, as_is[i : i + 2000], prefix) for i in range(0, len(as_is), 2000)]
    )
    stripped = torch.cat([clip_text.spliced(tok, [c.strip() for c in as_is[i : i + 2000]], prefix)
                          for i in range(0, len(as_is), 2000)])  # fmt: skip
    lengths = [len(tok.encode(c)) for c in as_is]
    long = [f"{c} " + " ".join(["and a small dog"] * 20) for c in as_is[:2000]]
    long_diff = int(
        (clip_text.joined(tok, long, prefix) != clip_text.spliced(tok, long, prefix)).any(1).sum()
    )
    return {
        "file": path.name,
        "captions": len(as_is),
        "with_trailing_space": sum(c != c.rstrip() for c in as_is),
        "differ_from_wadis_normalised_reader": sum(a != b for a, b in zip(as_is, normalised, strict=False)),
        "wadi_reader_count": len(normalised),
        "longest_caption_tokens": max(lengths),
        "captions_over_73_tokens": sum(n > 73 for n in lengths),
        "rows_joined_vs_spliced_differ": int((joined != spliced).any(1).sum()),
        "rows_trailing_space_stripped_differ": int((stripped != spliced).any(1).sum()),
        "synthetic_long_captions": len(long),
        "synthetic_long_rows_differ": long_diff,
        "tokenizer": "open_clip.tokenizer.SimpleTokenizer (OpenAI's BPE vocabulary and cleaning)",
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--captions", type=Path, default=None)
    ap.add_argument("-n", type=int, default=600)
    args = ap.parse_args()
    result = {
        "question": "how much each --protocol choice moves the numbers (stand-ins)",
        "command": "python analysis/eval_protocols/run.py --captions captions_coco14_test.txt -n 600",
        "crop": crop_effect(args.n),
        "clip_input": clip_input_effect(64),
        "tokens": token_effect(args.captions),
        "machine": machine_info(),
        "date": dt.date.today().isoformat(),
    }
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "effects.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
