"""The zero-shot COCO protocol of the one-step distillation papers (GigaGAN's evaluation, as
used by DMD2, SiD-LSG, SwiftBrush v2 and WaDi's Table 1), as data and one image transform.

- FID / KID / precision-recall: every real and generated image is converted to RGB
  (``PIL.Image.convert``), center-cropped to a square on its long edge, resized to
  256x256 with PIL LANCZOS; clean-fid then applies its "clean" resize (PIL bicubic on
  float32 channels) to 299x299 and takes Inception-v3 pool features (2048-d).
- CLIP score: OpenCLIP ViT-g-14 (``laion2b_s12b_b42k``), text ``"A photo depicts " +
  caption``, the mean cosine similarity between image and text embeddings (0-1 scale).
- precision / recall: Kynkäänniemi et al. (2019), k = 3, on the same Inception features.

Every default of the protocol lives here; nothing in this module needs the eval extra.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image

from wadi_cli.errors import BadInputError

#: Side of the square that every image is brought to before clean-fid (GigaGAN's protocol).
RESOLUTION = 256
#: clean-fid's mode: its own antialiased resize to the Inception input.
FID_MODE = "clean"
#: The Inception file clean-fid loads (a TorchScript archive, StyleGAN2-ADA's metrics net),
#: where clean-fid caches it on Linux/macOS, and where to download it.
INCEPTION_FILE = "inception-2015-12-05.pt"
INCEPTION_CACHE_DIR = "/tmp"
INCEPTION_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/" + INCEPTION_FILE
#: OpenCLIP model and weights of the CLIP score, and the text prefix.
CLIP_MODEL = "ViT-g-14"
CLIP_PRETRAINED = "laion2b_s12b_b42k"
CLIP_PREFIX = "A photo depicts "
#: Kynkäänniemi et al.'s neighbourhood size for precision / recall.
PR_NEIGHBORHOOD = 3
#: KID (clean-fid's ``kernel_distance``): subsets, subset size, and the seed that makes it
#: repeatable (clean-fid draws the subsets from numpy's global RNG).
KID_SUBSETS = 100
KID_SUBSET_SIZE = 1000
KID_SEED = 0

#: Metrics of the protocol (``--metrics``) and those of the tiny backbone's classifier.
PROTOCOL_METRICS: tuple[str, ...] = ("fid", "kid", "clip", "pr")
TINY_METRICS: tuple[str, ...] = ("accuracy", "fd")
#: Metrics that need reference statistics (Inception features of real images).
REFERENCE_METRICS: tuple[str, ...] = ("fid", "kid", "pr")


def parse_metrics(text: str | Iterable[str], tiny: bool) -> tuple[str, ...]:
    """``"fid,clip"`` → ``("fid", "clip")`` in protocol order; unknown names are refused,
    and ``accuracy``/``fd`` only exist for the tiny backbone."""
    names = [t.strip().lower() for t in (text.split(",") if isinstance(text, str) else text)]
    names = [n for n in names if n]
    known = PROTOCOL_METRICS + TINY_METRICS
    bad = [n for n in names if n not in known]
    if bad:
        raise BadInputError(f"--metrics: unknown {', '.join(bad)}; choose from {', '.join(known)}")
    if not tiny and any(n in TINY_METRICS for n in names):
        raise BadInputError("--metrics: accuracy and fd exist only for --backbone tiny (its classifier)")
    if not names:
        raise BadInputError(f"--metrics: name at least one of {', '.join(known)}")
    return tuple(n for n in known if n in names)


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode (L, LA, P, RGBA, CMYK, I;16, …) as RGB, the way clean-fid reads files
    (``Image.convert("RGB")``: an alpha channel is dropped, CMYK converted)."""
    return image if image.mode == "RGB" else image.convert("RGB")


def center_crop_square(image: Image.Image) -> Image.Image:
    """The largest centered square: ``side = min(w, h)``, offset ``(w - side) // 2`` along
    the long edge (the short edge is kept whole)."""
    w, h = image.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    return image.crop((left, top, left + side, top + side))


def protocol_image(image: Image.Image | np.ndarray, resolution: int = RESOLUTION) -> np.ndarray:
    """The protocol's transform: RGB, center crop on the long edge, PIL LANCZOS to
    ``resolution`` x ``resolution``. Returns an (R, R, 3) uint8 array."""
    img = Image.fromarray(np.asarray(image, dtype=np.uint8)) if isinstance(image, np.ndarray) else image
    square = center_crop_square(to_rgb(img))
    return np.asarray(square.resize((resolution, resolution), Image.Resampling.LANCZOS), dtype=np.uint8)


@dataclass(frozen=True)
class FeatureSettings:
    """Everything that changes the Inception features of an image: recorded in reference
    files, and compared before a reference is used (:meth:`differences`)."""

    resolution: int = RESOLUTION
    crop: str = "center square on the long edge"
    resize_filter: str = "PIL LANCZOS"
    fid_mode: str = FID_MODE
    feature_extractor: str = "inception-v3 pool3 (clean-fid torchscript)"
    extractor_sha256: str = ""

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    def differences(self, other: dict[str, object]) -> list[str]:
        """``["resolution: file 512 vs now 256", …]`` for every setting that differs."""
        mine = self.to_dict()
        return [
            f"{k}: file {other.get(k)!r} vs now {v!r}" for k, v in mine.items() if str(other.get(k)) != str(v)
        ]
