"""The zero-shot COCO protocol of the one-step distillation papers (GigaGAN's evaluation, as
used by DMD2, SiD-LSG, SwiftBrush v2 and WaDi's Table 1), as data and one image transform;
the named variants of it (:data:`PROTOCOLS`: ``wadi``, ``dmd2``, ``dmd2-sdxl``, ``gigagan``) fix
every choice that changes a number (``docs/evaluation-protocols.md``).

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
from dataclasses import asdict, dataclass, replace

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


#: How the offset of the centered square is rounded when the long edge minus the short
#: edge is odd: ``floor`` (wadi's first protocol) or ``half-even`` (torchvision's
#: ``center_crop``: Python's ``round`` of half the difference, which DMD2 and GigaGAN use).
CROP_ROUNDINGS: tuple[str, ...] = ("floor", "half-even")


def crop_offset(difference: int, rounding: str = "floor") -> int:
    """Offset of a centered window along an edge ``difference`` pixels longer than it."""
    if rounding == "floor":
        return difference // 2
    if rounding == "half-even":
        return int(round(difference / 2.0))
    raise ValueError(f"unknown crop rounding {rounding!r}; choose from {', '.join(CROP_ROUNDINGS)}")


def crop_description(rounding: str) -> str:
    """The crop as recorded in reference files (``floor`` keeps wadi's first text, so
    reference files made before protocols existed still load)."""
    base = "center square on the long edge"
    return base if rounding == "floor" else f"{base}, offset rounded half-to-even (torchvision)"


def center_crop_square(image: Image.Image, rounding: str = "floor") -> Image.Image:
    """The largest centered square: ``side = min(w, h)``, offset along the long edge by
    :func:`crop_offset` (the short edge is kept whole)."""
    w, h = image.size
    side = min(w, h)
    left, top = crop_offset(w - side, rounding), crop_offset(h - side, rounding)
    return image.crop((left, top, left + side, top + side))


def protocol_image(
    image: Image.Image | np.ndarray, resolution: int = RESOLUTION, rounding: str = "floor"
) -> np.ndarray:
    """The protocol's transform: RGB, center crop on the long edge, PIL LANCZOS to
    ``resolution`` x ``resolution``. Returns an (R, R, 3) uint8 array."""
    img = Image.fromarray(np.asarray(image, dtype=np.uint8)) if isinstance(image, np.ndarray) else image
    square = center_crop_square(to_rgb(img), rounding)
    return np.asarray(square.resize((resolution, resolution), Image.Resampling.LANCZOS), dtype=np.uint8)


#: GigaGAN's and DMD2's real set: every image of COCO's val2014 folder.
VAL2014_IMAGES = 40504
#: DMD2's SDXL real set and caption count (its ``coco10k`` subset of val2014).
COCO10K_IMAGES = 10000
#: Ways to bring an image to CLIP's own preprocessing (see :func:`clip_input`).
CLIP_INPUTS: tuple[str, ...] = ("as-generated", "square-256", "square-256-tensor")
#: Ways to tokenize ``prefix + caption`` (see :mod:`wadi_cli.evaluation.clip_text`).
TOKENIZATIONS: tuple[str, ...] = ("joined", "spliced")


@dataclass(frozen=True)
class Protocol:
    """One named evaluation protocol: every choice that changes a number, fixed together
    (``wadi eval --protocol NAME``). See ``docs/evaluation-protocols.md`` for each choice's
    measured effect."""

    name: str
    #: the papers whose numbers this protocol reproduces
    papers: str
    #: crop offset rounding (:data:`CROP_ROUNDINGS`), for Inception and CLIP inputs alike
    crop: str
    #: what CLIP's preprocessing receives (:data:`CLIP_INPUTS`)
    clip_input: str
    #: how the CLIP text is tokenized (:data:`TOKENIZATIONS`)
    tokenization: str
    #: OpenCLIP model and pretrained tag of the CLIP score
    clip_model: str
    clip_pretrained: str
    #: ``normalised`` (wadi's caption readers) or ``lines`` (a .txt line is one caption, as is)
    captions: str
    #: ``path`` (sorted relative paths) or ``natural`` (GigaGAN's natural sort: 2.png < 10.png)
    image_order: str
    #: the real set the protocol's numbers were computed against, and its size (None: any)
    reference: str
    reference_images: int | None
    #: ``per-image`` (image i: own generator seeded seed + i) or ``per-batch`` (DMD2: batch k
    #: of ``seed_batch`` images drawn at once from a generator seeded seed + k)
    seeding: str
    seed_batch: int = 10
    #: the side of the images the papers generated before the 256-px square (None: any;
    #: ``dmd2-sdxl``: 1024, so its numbers are "1024 → 256")
    generated_size: int | None = None

    @property
    def crop_description(self) -> str:
        return crop_description(self.crop)

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


_DMD2 = Protocol(
    name="dmd2",
    papers="DMD2 (main/coco_eval, main/test_folder_sd.py); the closest published code to WaDi's Table 1",
    crop="half-even",
    clip_input="square-256",
    tokenization="spliced",
    clip_model=CLIP_MODEL,
    clip_pretrained=CLIP_PRETRAINED,
    captions="lines",
    image_order="path",
    reference="the whole COCO val2014 folder",
    reference_images=VAL2014_IMAGES,
    seeding="per-batch",
    seed_batch=10,
)

#: DMD2's SDXL evaluation: DMD2's rules with 1024-px images, noise per batch of 4 and COCO-10k.
_DMD2_SDXL = replace(
    _DMD2,
    name="dmd2-sdxl",
    papers="DMD2's SDXL evaluation (main/sdxl/test_folder_sdxl.py: --image_resolution 1024, "
    "--eval_res 256, --eval_batch_size 4, noise of batch i from manual_seed(i); "
    "experiments/sdxl/README.md: the coco10k subset, --total_eval_samples 10000; "
    "main/coco_eval/coco_evaluator.py: center crop, PIL LANCZOS)",
    reference="DMD2's COCO-10k: 10,000 COCO val2014 images and their captions",
    reference_images=COCO10K_IMAGES,
    seed_batch=4,
    generated_size=1024,
)

PROTOCOLS: dict[str, Protocol] = {
    "wadi": Protocol(
        name="wadi",
        papers="wadi's own runs before --protocol existed",
        crop="floor",
        clip_input="as-generated",
        tokenization="joined",
        clip_model=CLIP_MODEL,
        clip_pretrained=CLIP_PRETRAINED,
        captions="normalised",
        image_order="path",
        reference="any folder or --save-ref file",
        reference_images=None,
        seeding="per-image",
    ),
    "dmd2": _DMD2,
    "dmd2-sdxl": _DMD2_SDXL,
    "gigagan": Protocol(
        name="gigagan",
        papers="GigaGAN (evaluation/evaluation.py, default --clip_model4eval ViT-B/32)",
        crop="half-even",
        clip_input="square-256-tensor",
        tokenization="spliced",
        clip_model="ViT-B-32",
        clip_pretrained="openai",
        captions="lines",
        image_order="natural",
        reference="the whole COCO val2014 folder",
        reference_images=VAL2014_IMAGES,
        seeding="per-image",
    ),
}
DEFAULT_PROTOCOL = "wadi"
#: Backbones whose papers use another protocol than :data:`DEFAULT_PROTOCOL` (``--protocol``
#: left out): SDXL's one-step papers report 1024-px images scored as 256-px squares on COCO-10k.
BACKBONE_PROTOCOLS: dict[str, str] = {"sdxl": "dmd2-sdxl"}


def protocol_name_for(name: str | None, backbone: str | None) -> str:
    """``--protocol NAME`` as given, else the backbone's (:data:`BACKBONE_PROTOCOLS`), else
    :data:`DEFAULT_PROTOCOL`."""
    if name is not None:
        return name
    return BACKBONE_PROTOCOLS.get((backbone or "").strip().lower(), DEFAULT_PROTOCOL)


def size_note(rules: Protocol, sizes: Iterable[tuple[int, int]], resolution: int = RESOLUTION) -> str | None:
    """A warning when the scored images were not generated at ``rules.generated_size``
    (``sizes``: (width, height) of the images; None when they all match or any size goes)."""
    want = rules.generated_size
    other = sorted({s for s in sizes if s != (want, want)})
    if want is None or not other:
        return None
    shown = ", ".join(f"{w}x{h}" for w, h in other[:3]) + (", …" if len(other) > 3 else "")
    return (
        f"--protocol {rules.name} scores images generated at {want}x{want} (then {resolution}x{resolution}); "
        f"these include {shown}, so the numbers are not the papers'"
    )


def get_protocol(name: str | Protocol | None) -> Protocol:
    """The named protocol (``None``: :data:`DEFAULT_PROTOCOL`); unknown names are refused."""
    if isinstance(name, Protocol):
        return name
    key = (name or DEFAULT_PROTOCOL).strip().lower()
    if key not in PROTOCOLS:
        raise BadInputError(f"--protocol {name}: unknown; choose from {', '.join(PROTOCOLS)}")
    return PROTOCOLS[key]


def tensor_round_trip(square: np.ndarray) -> np.ndarray:
    """GigaGAN's detour of a uint8 image through its data loader before CLIP: ``/ 255``,
    normalised to [-1, 1] with mean = std = 0.5, back with ``(x + 1) * 127.5`` and cast to
    uint8 (truncation), all in float32: 63 of the 256 levels come back one lower."""
    x = square.astype(np.float32) / np.float32(255)
    x = (x - np.float32(0.5)) / np.float32(0.5)
    return np.clip((x + np.float32(1.0)) * np.float32(127.5), 0, 255).astype(np.uint8)


def clip_input(image: Image.Image, proto: Protocol, resolution: int = RESOLUTION) -> Image.Image:
    """The image handed to CLIP's own preprocessing under ``proto``: as generated (RGB), or
    the protocol's 256-px square (DMD2), or that square after GigaGAN's tensor round trip."""
    rgb = to_rgb(image)
    if proto.clip_input == "as-generated":
        return rgb
    square = protocol_image(rgb, resolution, proto.crop)
    if proto.clip_input == "square-256-tensor":
        square = tensor_round_trip(square)
    return Image.fromarray(square)


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
