"""Random-weight feature extractors saved in the formats the eval libraries load, so the
real loading code runs offline: clean-fid's TorchScript Inception (a module with a
``layers`` submodule, as ``InceptionV3W`` expects) and an OpenCLIP ``local-dir`` folder
(``open_clip_config.json`` + ``open_clip_model.safetensors``)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

FEATURE_DIM = 16  # small, so that FID's matrix square root is instant


class _Layers(nn.Module):
    """(B, 3, 299, 299) in [-1, 1] → (B, D, 1, 1), like Inception's pool3 output."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, kernel_size=13, stride=13)
        self.pool = nn.AdaptiveAvgPool2d(3)
        self.fc = nn.Linear(8 * 9, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.pool(torch.tanh(self.conv(x))).flatten(1)
        return self.fc(h)[:, :, None, None]


class _Net(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.layers = _Layers(dim)

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        return self.layers((x - 128) / 128).reshape(x.shape[0], -1)


def inception_file(
    folder: Path, dim: int = FEATURE_DIM, seed: int = 0, name: str = "inception-test.pt"
) -> Path:
    """A random TorchScript 'Inception' that clean-fid's ``InceptionV3W`` loads."""
    torch.manual_seed(seed)
    path = folder / name
    torch.jit.script(_Net(dim).eval()).save(str(path))
    return path


CLIP_CONFIG = {
    "model_cfg": {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    },
    "preprocess_cfg": {},
}


def clip_folder(folder: Path, seed: int = 0) -> Path:
    """A random tiny OpenCLIP model as a ``local-dir`` folder."""
    import open_clip
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "open_clip_config.json").write_text(json.dumps(CLIP_CONFIG))
    torch.manual_seed(seed)
    model = open_clip.CLIP(**CLIP_CONFIG["model_cfg"])
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()},
        str(folder / "open_clip_model.safetensors"),
    )
    return folder


def write_images(folder: Path, images: np.ndarray, start: int = 0) -> list[Path]:
    """Numbered PNGs of (N, H, W, 3) uint8 ``images``."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, img in enumerate(images, start):
        p = folder / f"{i:05d}.png"
        Image.fromarray(img).save(p)
        paths.append(p)
    return paths


def random_images(n: int, seed: int, size: tuple[int, int] = (48, 40), shift: float = 0.0) -> np.ndarray:
    """Smooth random colour images (uint8), brighter with ``shift``."""
    rng = np.random.default_rng(seed)
    h, w = size
    base = rng.uniform(0, 1, size=(n, 1, 1, 3)) * 160 + shift
    yy, xx = np.mgrid[0:h, 0:w]
    wave = 40 * np.sin(
        xx[None, :, :, None] * rng.uniform(0.1, 0.5, (n, 1, 1, 3)) + yy[None, :, :, None] * 0.2
    )
    return np.clip(base + wave + rng.normal(0, 8, (n, h, w, 3)), 0, 255).astype(np.uint8)
