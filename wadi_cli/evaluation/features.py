"""Feature extractors of the protocol, from the community libraries (the eval extra):

- Inception-v3 pool features as clean-fid computes them in "clean" mode: clean-fid loads
  its TorchScript network (:class:`cleanfid.inception_torchscript.InceptionV3W`) and
  resizes with its own ``build_resizer("clean")``; the input is the protocol's 256-px
  square (:func:`wadi_cli.evaluation.protocol.protocol_image`);
- OpenCLIP image and text embeddings (``open_clip.create_model_and_transforms``), with
  OpenCLIP's own image preprocessing applied to the image the protocol gives it
  (:func:`wadi_cli.evaluation.protocol.clip_input`) and the text tokenized by the
  protocol's rule (:mod:`wadi_cli.evaluation.clip_text`).

Weights are never downloaded here: ``--inception-weights`` / ``--clip-weights`` take local
files, and the libraries' own caches are used when they hold the files. A missing file
is reported in one line naming the flag that takes it. The libraries are optional (the
eval extra), so they are imported inside the functions that use them.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import tempfile
import warnings
from collections.abc import Callable, Iterator, Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np
import torch

from wadi_cli.errors import BadInputError, CheckpointError
from wadi_cli.evaluation import clip_text, protocol
from wadi_cli.evaluation.folders import read_image

EXTRA = 'pip install "wadi-cli[eval]"'
#: Python modules each metric needs (all from the eval extra).
_MODULES: dict[str, tuple[str, ...]] = {
    "fid": ("torchvision", "cleanfid"),
    "kid": ("torchvision", "cleanfid"),
    "pr": ("torchvision", "cleanfid", "torch_fidelity"),
    "clip": ("torchvision", "open_clip"),
}


def require_extra(metrics: Sequence[str]) -> None:
    """Refuse, in one line naming the extra, when a library that ``metrics`` need is missing."""
    needed = sorted({m for name in metrics for m in _MODULES.get(name, ())})
    missing = [m for m in needed if importlib.util.find_spec(m) is None]
    if missing:
        raise BadInputError(
            f"--metrics {','.join(metrics)} needs the eval extra "
            f"({', '.join(missing)} not installed): {EXTRA}"
        )


def library_version(dist: str) -> str:
    """Installed version of a distribution, or ``"?"``."""
    try:
        return version(dist)
    except PackageNotFoundError:
        return "?"


def sha256_file(path: Path, block: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(block):
            h.update(chunk)
    return h.hexdigest()


# ---- Inception (clean-fid) ------------------------------------------------------------
def resolve_inception_weights(weights: str | os.PathLike[str] | None) -> Path:
    """``--inception-weights`` if given, else clean-fid's cache file; refused in one line
    when absent."""
    if weights is not None:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise CheckpointError(f"--inception-weights {path}: no such file")
        return path
    path = Path(protocol.INCEPTION_CACHE_DIR) / protocol.INCEPTION_FILE
    if not path.is_file():
        raise CheckpointError(
            f"Inception weights missing ({path}, clean-fid's cache): download {protocol.INCEPTION_URL} "
            "and pass it with --inception-weights FILE"
        )
    return path


@contextlib.contextmanager
def _as_cleanfid_folder(path: Path) -> Iterator[Path]:
    """A folder holding the file under the name clean-fid loads (a symlink when needed)."""
    if path.name == protocol.INCEPTION_FILE:
        yield path.parent
        return
    with tempfile.TemporaryDirectory(prefix="wadi-inception-") as tmp:
        os.symlink(path.resolve(), Path(tmp) / protocol.INCEPTION_FILE)
        yield Path(tmp)


class InceptionFeatures:
    """clean-fid's Inception in clean mode on the protocol's 256-px squares.

    ``(x - 128) / 128`` then the network's feature layers, as clean-fid's
    ``InceptionV3W.forward``; the features are flattened per image (2048-d for the real
    network; test networks may be smaller).
    """

    def __init__(self, weights: str | os.PathLike[str] | None, device: torch.device) -> None:
        from cleanfid.inception_torchscript import InceptionV3W
        from cleanfid.resize import build_resizer

        self.path = resolve_inception_weights(weights)
        self.sha256 = sha256_file(self.path)
        try:
            with _as_cleanfid_folder(self.path) as folder, warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load's deprecation note
                net = InceptionV3W(str(folder), download=False, resize_inside=False)
        except (RuntimeError, ValueError, OSError, AttributeError) as exc:
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CheckpointError(
                f"--inception-weights {self.path}: not clean-fid's TorchScript Inception ({msg})"
            ) from None
        self.net = net.to(device).eval()
        self.device = device
        self.resize = build_resizer(protocol.FID_MODE)
        self._dim: int | None = None

    def settings(
        self, resolution: int = protocol.RESOLUTION, rounding: str = "floor"
    ) -> protocol.FeatureSettings:
        crop = protocol.crop_description(rounding)
        return protocol.FeatureSettings(resolution=resolution, crop=crop, extractor_sha256=self.sha256)

    @property
    def dim(self) -> int:
        """Length of one feature vector (one forward pass of a blank image, computed once)."""
        if self._dim is None:
            blank = torch.zeros(1, 3, 299, 299)
            self._dim = int(self(blank).shape[1])
        return self._dim

    def prepare(self, square: np.ndarray) -> torch.Tensor:
        """clean-fid's clean resize of one (R, R, 3) uint8 square → (3, 299, 299) float in [0, 255]."""
        return torch.from_numpy(np.ascontiguousarray(self.resize(square))).permute(2, 0, 1)

    @torch.no_grad()
    def __call__(self, batch: torch.Tensor) -> np.ndarray:
        x = (batch.to(self.device, torch.float32) - 128) / 128
        return self.net.layers(x).reshape(len(batch), -1).float().cpu().numpy()


# ---- OpenCLIP -------------------------------------------------------------------------
def resolve_clip(
    model: str, weights: str | os.PathLike[str] | None, pretrained: str = protocol.CLIP_PRETRAINED
) -> tuple[str, str | None, str]:
    """``(model_name, pretrained, description)`` for ``open_clip.create_model_and_transforms``:

    - a folder with ``open_clip_config.json``: OpenCLIP's ``local-dir:`` form (config and
      weights from the folder);
    - a file: the weights of ``model`` (``.safetensors``, or ``.bin``/``.pt`` read by
      OpenCLIP with ``weights_only=True``);
    - nothing: the protocol's weights from the Hugging Face cache, when they are there.
    """
    if weights is not None:
        path = Path(weights).expanduser()
        if path.is_dir():
            if not (path / "open_clip_config.json").is_file():
                raise CheckpointError(f"--clip-weights {path}: a folder needs open_clip_config.json")
            if not any(path.glob(pattern) for pattern in ("*.safetensors", "*.bin", "*.pth")):
                raise CheckpointError(f"--clip-weights {path}: no weights file (.safetensors, .bin, .pth)")
            return f"local-dir:{path}", None, f"local-dir:{path}"
        if not path.is_file():
            raise CheckpointError(f"--clip-weights {path}: no such file")
        return model, str(path), f"{model} ({path.name})"
    import open_clip

    cfg = open_clip.get_pretrained_cfg(model, pretrained) or {}
    repo = str(cfg.get("hf_hub", "")).strip("/")
    found = None
    if repo:
        from huggingface_hub import try_to_load_from_cache

        for name in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"):
            hit = try_to_load_from_cache(repo, name)
            if isinstance(hit, str):
                found = hit
                break
    if found is None:
        where = f"https://huggingface.co/{repo}/resolve/main/open_clip_pytorch_model.bin" if repo else "them"
        raise CheckpointError(
            f"CLIP weights missing ({model} {pretrained} is not in the Hugging Face cache): "
            f"download {where} and pass it with --clip-weights FILE"
        )
    return model, found, f"{model} {pretrained}"


class ClipFeatures:
    """OpenCLIP image / text embeddings, L2-normalised, under a protocol's CLIP rules
    (image input, tokenization; the model and its weights are the caller's)."""

    def __init__(
        self,
        model: str,
        weights: str | os.PathLike[str] | None,
        device: torch.device,
        proto: protocol.Protocol | None = None,
    ) -> None:
        import open_clip

        self.protocol = protocol.get_protocol(proto)
        name, pretrained, self.description = resolve_clip(model, weights, self.protocol.clip_pretrained)
        try:
            net, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=pretrained)
            self.tokenizer = open_clip.get_tokenizer(name)
        except (RuntimeError, ValueError, OSError, KeyError) as exc:
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CheckpointError(f"--clip-weights: cannot load {self.description} ({msg})") from None
        self.net = net.to(device).eval()
        self.model_preprocess: Callable[[Any], torch.Tensor] = preprocess
        self.device = device

    def preprocess(self, image: Any) -> torch.Tensor:
        """The protocol's CLIP input (:func:`~wadi_cli.evaluation.protocol.clip_input`), then
        the model's own preprocessing."""
        return self.model_preprocess(protocol.clip_input(image, self.protocol))

    @torch.no_grad()
    def images(self, batch: torch.Tensor) -> np.ndarray:
        emb = self.net.encode_image(batch.to(self.device)).float()
        return torch.nn.functional.normalize(emb, dim=-1).cpu().numpy()

    def tokens(self, texts: Sequence[str], prefix: str = protocol.CLIP_PREFIX) -> torch.Tensor:
        """Token ids of ``prefix`` + each text by the protocol's rule."""
        return clip_text.tokenize(self.tokenizer, texts, prefix, self.protocol.tokenization)

    @torch.no_grad()
    def texts(self, texts: Sequence[str], prefix: str = protocol.CLIP_PREFIX) -> np.ndarray:
        emb = self.net.encode_text(self.tokens(texts, prefix).to(self.device)).float()
        return torch.nn.functional.normalize(emb, dim=-1).cpu().numpy()


# ---- one pass over the images ---------------------------------------------------------
class _Images(torch.utils.data.Dataset):
    """Decode each file once; give the Inception input and / or the CLIP input. Decoding
    errors travel as strings (a DataLoader worker cannot raise our one-line error)."""

    def __init__(
        self,
        files: Sequence[Path],
        inception: Callable[[np.ndarray], torch.Tensor] | None,
        clip: Callable[[Any], torch.Tensor] | None,
        resolution: int,
        rounding: str = "floor",
    ) -> None:
        self.files, self.inception, self.clip, self.resolution = list(files), inception, clip, resolution
        self.rounding = rounding

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item: dict[str, Any] = {"error": ""}
        try:
            image = protocol.to_rgb(read_image(self.files[i]))
        except BadInputError as exc:
            item["error"], image = str(exc), None
        if self.inception is not None:
            square = None if image is None else protocol.protocol_image(image, self.resolution, self.rounding)
            item["inception"] = self.inception(square) if square is not None else None
        if self.clip is not None:
            item["clip"] = self.clip(image) if image is not None else None
        return item


def _collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack the batch, or pass on the first decoding error."""
    errors = [it["error"] for it in items if it["error"]]
    if errors:
        return {"error": errors[0], "size": len(items)}
    keys = [k for k in ("inception", "clip") if k in items[0]]
    return {"error": "", "size": len(items), **{k: torch.stack([it[k] for it in items]) for k in keys}}


def extract(
    files: Sequence[Path],
    *,
    inception: InceptionFeatures | None,
    clip: ClipFeatures | None,
    batch_size: int,
    resolution: int = protocol.RESOLUTION,
    workers: int = 0,
    progress: Callable[[int], None] | None = None,
    rounding: str = "floor",
) -> dict[str, np.ndarray]:
    """Features of ``files`` in order: ``{"inception": (N, D), "clip": (N, E)}`` (those
    asked for). ``progress(k)`` is called after each batch with its size."""
    loader = torch.utils.data.DataLoader(
        _Images(
            files,
            inception.prepare if inception is not None else None,
            clip.preprocess if clip is not None else None,
            resolution,
            rounding,
        ),
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=_collate,
    )
    out: dict[str, list[np.ndarray]] = {"inception": [], "clip": []}
    for batch in loader:
        if batch["error"]:
            raise BadInputError(batch["error"])
        if inception is not None:
            out["inception"].append(inception(batch["inception"]))
        if clip is not None:
            out["clip"].append(clip.images(batch["clip"]))
        if progress is not None:
            progress(batch["size"])
    return {k: np.concatenate(v) for k, v in out.items() if v}
