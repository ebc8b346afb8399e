"""Reference statistics of real images (``--ref DIR|FILE``, ``--save-ref FILE``).

A reference file is a plain ``.npz`` (read with ``allow_pickle=False``):

- ``mu``, ``sigma``: mean and covariance of the Inception features (FID);
- ``features``: the features themselves (KID, precision/recall);
- ``settings``: JSON of :class:`~wadi_cli.evaluation.protocol.FeatureSettings` (resolution,
  crop, filter, clean-fid mode, Inception file's SHA-256) plus provenance (source folder,
  library versions). A file whose settings differ from the ones asked for is refused,
  naming each difference.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from wadi_cli.errors import BadInputError, MismatchError
from wadi_cli.evaluation import protocol
from wadi_cli.evaluation.scores import statistics
from wadi_cli.io import atomic_file, check_writable

REFERENCE_KEYS: tuple[str, ...] = ("mu", "sigma", "features", "settings")


@dataclass
class Reference:
    """Inception statistics and features of a set of real images."""

    mu: np.ndarray
    sigma: np.ndarray
    features: np.ndarray
    settings: dict[str, Any]
    source: str = ""
    provenance: dict[str, Any] = field(default_factory=dict)

    @property
    def num_images(self) -> int:
        return int(len(self.features))

    @classmethod
    def from_features(
        cls, features: np.ndarray, settings: protocol.FeatureSettings, source: str, provenance: dict[str, Any]
    ) -> Reference:

        mu, sigma = statistics(features)
        return cls(mu, sigma, features, settings.to_dict(), source, dict(provenance))


def save_reference(ref: Reference, path: str | os.PathLike[str]) -> Path:
    """Write ``ref`` to ``path`` (``.npz``) atomically."""
    dest = check_writable(Path(path))
    meta = {**ref.settings, "num_images": ref.num_images, "source": ref.source, **ref.provenance}
    with atomic_file(dest) as tmp, tmp.open("wb") as fh:
        np.savez(
            fh,
            mu=ref.mu,
            sigma=ref.sigma,
            features=ref.features.astype(np.float32),
            settings=np.array(json.dumps(meta, sort_keys=True)),
        )
    return dest


def _not_an_npz(p: Path) -> str | None:
    """Why ``p`` is not a ``.npz`` (a zip archive), from its first bytes; ``None`` when it
    may be one."""
    try:
        with p.open("rb") as fh:
            head = fh.read(512)
    except OSError as exc:
        return f"cannot read it ({exc.strerror or exc})"
    if head.startswith(b"PK"):
        return None
    text = head.lstrip()
    if text[:1] in (b"{", b"["):
        return "it is JSON text, not a .npz"
    if head.startswith(b"\x93NUMPY"):
        return "it is a single .npy array, not a .npz with mu, sigma, features and settings"
    if not head:
        return "it is empty"
    return "it is not a .npz (zip) archive"


def check_shapes(ref: Reference, dim: int | None, where: str) -> None:
    """Refuse a reference whose arrays disagree with each other or with the feature
    extractor's ``dim`` (before any feature is computed)."""
    d = ref.mu.shape[0] if ref.mu.ndim == 1 else -1
    ok = (
        ref.mu.ndim == 1
        and ref.sigma.shape == (d, d)
        and ref.features.ndim == 2
        and ref.features.shape[1] == d
    )
    if not ok:
        raise BadInputError(
            f"{where}: inconsistent arrays (mu {ref.mu.shape}, sigma {ref.sigma.shape}, "
            f"features {ref.features.shape}); recompute it with --ref DIR --save-ref FILE"
        )
    if dim is not None and d != dim:
        raise MismatchError(
            f"{where} holds {d}-dimensional features but the feature extractor gives {dim}: "
            "it was made with another network; recompute it with --ref DIR --save-ref FILE"
        )


def load_reference(
    path: str | os.PathLike[str], expected: protocol.FeatureSettings, dim: int | None = None
) -> Reference:
    """Read a file of :func:`save_reference`; refuse it when its settings differ from
    ``expected`` (:class:`MismatchError` naming every difference) or when its features are
    not ``dim``-dimensional."""
    p = Path(path).expanduser()
    why = _not_an_npz(p)
    if why is not None:
        raise BadInputError(
            f"--ref {p}: {why}; give a folder of real images or a file made with --ref DIR --save-ref FILE"
        )
    try:
        with np.load(p, allow_pickle=False) as data:
            missing = [k for k in REFERENCE_KEYS if k not in data.files]
            if missing:
                raise BadInputError(
                    f"--ref {p}: not a wadi reference file (no {', '.join(missing)}); "
                    "make one with --ref DIR --save-ref FILE"
                )
            arrays = {k: data[k] for k in REFERENCE_KEYS}
    except BadInputError:
        raise
    except (OSError, ValueError, EOFError) as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise BadInputError(f"--ref {p}: cannot read it as a reference .npz ({msg})") from None
    try:
        meta = json.loads(str(arrays["settings"]))
    except json.JSONDecodeError:
        raise BadInputError(f"--ref {p}: its settings are not JSON") from None
    diffs = expected.differences(meta)
    if diffs:
        raise MismatchError(
            f"--ref {p} was computed with other settings ({'; '.join(diffs)}); "
            "recompute it with --ref DIR --save-ref FILE"
        )
    settings = {k: meta[k] for k in expected.to_dict()}
    extra = {k: v for k, v in meta.items() if k not in settings}
    ref = Reference(
        arrays["mu"], arrays["sigma"], arrays["features"], settings, str(extra.get("source", p)), extra
    )
    check_shapes(ref, dim, f"--ref {p}")
    return ref
