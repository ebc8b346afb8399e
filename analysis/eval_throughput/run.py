"""How long `wadi eval` takes on CPU for the tiny backbone, per 1,000 images: generation,
Inception features (a full-size Inception-v3 with random weights: the real network's
compute, not its numbers), and the FID matrix square root at 2048 dimensions.

    OMP_NUM_THREADS=2 .venv-eval/bin/python analysis/eval_throughput/run.py -n 1000

Writes results/throughput.json next to this file. Needs the eval extra (torchvision, clean-fid).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torchvision

HERE = Path(__file__).resolve().parent


class _Net(torch.nn.Module):
    """clean-fid's TorchScript layout: a ``layers`` module giving (B, 2048, 1, 1)."""

    def __init__(self) -> None:
        super().__init__()
        m = torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=False)
        names = [
            "Conv2d_1a_3x3",
            "Conv2d_2a_3x3",
            "Conv2d_2b_3x3",
            "maxpool1",
            "Conv2d_3b_1x1",
            "Conv2d_4a_3x3",
            "maxpool2",
            "Mixed_5b",
            "Mixed_5c",
            "Mixed_5d",
            "Mixed_6a",
            "Mixed_6b",
            "Mixed_6c",
            "Mixed_6d",
            "Mixed_6e",
            "Mixed_7a",
            "Mixed_7b",
            "Mixed_7c",
            "avgpool",
        ]
        self.layers = torch.nn.Sequential(*(getattr(m, n) for n in names))

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        return self.layers((x - 128) / 128).reshape(x.shape[0], -1)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("-n", type=int, default=1000)
    args = parser.parse_args()
    from wadi_cli.machine import machine_info

    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "inception-random.pt"
        torch.manual_seed(0)
        torch.jit.script(_Net().eval()).save(str(weights))
        out = Path(tmp) / "eval"
        cmd = [sys.executable, "-m", "wadi_cli", "eval", "-b", "tiny", "-n", str(args.n), "--seed", "0",
               "--metrics", "accuracy,fd,fid,kid,pr", "--inception-weights", str(weights), "--device", "cpu",
               "--out", str(out), "--json"]  # fmt: skip
        load_at_start = os.getloadavg()[0]
        start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
        wall = time.perf_counter() - start
        result = json.loads(proc.stdout)
    timing = result["timing"]
    gen_rate, feat_rate = timing["generation_images_per_s"], timing["feature_images_per_s"]
    # start-up and FID's matrix square root: the part of the wall time that does not grow with N
    fixed = wall - args.n / gen_rate - timing["featured"] / feat_rate
    record = {
        "question": "wall time of wadi eval per 1,000 images on CPU, tiny backbone",
        "command": "OMP_NUM_THREADS=2 .venv-eval/bin/python analysis/eval_throughput/run.py -n "
        + str(args.n),
        "num_images": args.n,
        "generation_images_per_s": timing["generation_images_per_s"],
        "feature_images_per_s": timing["feature_images_per_s"],
        "feature_images": timing["featured"],
        "wall_s": round(wall, 1),
        "fixed_s": round(fixed, 1),
        "wall_s_per_1000_images": round(1000 / gen_rate + 2000 / feat_rate + fixed, 1),
        "note": "features = generated + rendered reference images (2N); the rest of the wall time "
        "(fixed_s) is start-up and the 2048-d matrix square root of FID (scipy.linalg.sqrtm), which "
        "does not scale with N; per 1,000 images = 1000 / generation rate + 2000 / feature rate + fixed_s",
        "metrics_random_inception": result["metrics"],
        "metrics_note": "timing run only: a random-weight Inception gives near-constant features, so its "
        "FID/KID/precision/recall say nothing about quality (the planted-truth tests check the metrics)",
        "machine": machine_info(),
        "threads": os.environ.get("OMP_NUM_THREADS"),
        "loadavg_at_start": round(load_at_start, 2),
        "date": time.strftime("%Y-%m-%d"),
    }
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "throughput.json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
