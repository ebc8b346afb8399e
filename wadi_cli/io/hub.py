"""Hugging Face hub access, with every failure turned into one actionable HubError line.

``resolve_model`` returns a local path: the given path if it exists, else a snapshot
from the hub cache or the hub (respecting ``HF_HUB_OFFLINE``). Only safetensors and
small text files are fetched by default; pickle formats are never downloaded.
"""

from __future__ import annotations

import functools
import os
import re
import socket
from pathlib import Path

from wadi_cli.errors import CheckpointError, HubError

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_OFFLINE_ERRORS = ("LocalEntryNotFoundError", "IncompleteSnapshotError", "OfflineModeIsEnabled")
DEFAULT_PATTERNS = ("*.json", "*.safetensors", "*.txt", "*.model")  # configs, weights, tokenizers


def hub_offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` is set to a true value (read at call time)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


@functools.lru_cache(maxsize=1)
def hub_reachable(timeout: float = 3.0) -> bool:
    """One quick TCP connection to the hub's endpoint (cached per process).

    Without it, an offline machine spends ~25 s in huggingface_hub's retries (and prints
    each one) before the same error; with it, wadi goes straight to the local cache.
    """
    from urllib.parse import urlparse

    try:
        from huggingface_hub import constants

        endpoint = urlparse(constants.ENDPOINT)
        host, port = endpoint.hostname, endpoint.port or (443 if endpoint.scheme == "https" else 80)
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except (OSError, ValueError, ImportError):
        return False


def _local_only() -> bool:
    """Use only the local hub cache: offline mode, or a hub that does not answer."""
    return hub_offline() or not hub_reachable()


def looks_like_repo_id(text: str) -> bool:
    """``org/name`` or ``name``: no path separators beyond one slash, no leading dot or tilde."""
    return bool(_REPO_ID.match(text)) and ".." not in text and not text.endswith(".")


def _explain(exc: BaseException, repo_id: str, what: str) -> HubError:
    """One line: which repo/file is missing, why, and how to pass a local copy instead."""
    kind = type(exc).__name__
    if kind == "GatedRepoError":
        why = "the repo is gated: accept its licence on the hub and log in (hf auth login)"
    elif kind == "RepositoryNotFoundError":
        why = "no such repo on the hub (or it is private: log in)"
    elif kind in ("RevisionNotFoundError",):
        why = "no such revision"
    elif kind in ("RemoteEntryNotFoundError", "EntryNotFoundError"):
        why = "the repo has no such file"
    elif kind in _OFFLINE_ERRORS or _local_only():
        why = "not in the local cache and the hub is unreachable (offline or HF_HUB_OFFLINE=1)"
    else:
        why = f"the hub is unreachable or refused the request ({kind})"
    return HubError(
        f"cannot get {what} of {repo_id!r}: {why}; download it elsewhere and pass the local "
        "folder or file instead, e.g. --model PATH"
    )


def resolve_model(
    path_or_id: str | os.PathLike[str],
    subfolder: str | None = None,
    *,
    allow_patterns: list[str] | None = None,
    revision: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> Path:
    """A local folder or file for ``path_or_id``: the path itself, or a hub snapshot.

    With ``subfolder`` the returned path is ``<root>/<subfolder>`` (and only that
    subfolder plus ``model_index.json`` is fetched). Raises :class:`CheckpointError` for
    a missing local path that cannot be a repo id, :class:`HubError` when the hub fails.
    """
    local = Path(path_or_id).expanduser()
    if local.exists():
        if subfolder and (local / subfolder).exists():
            return local / subfolder
        return local
    text = str(path_or_id)
    if not looks_like_repo_id(text):
        raise CheckpointError(f"{local}: no such file or directory")
    if allow_patterns is None:
        allow_patterns = list(DEFAULT_PATTERNS)
        if subfolder:
            allow_patterns = [f"{subfolder}/{p}" for p in allow_patterns] + ["model_index.json"]
    from huggingface_hub import snapshot_download

    what = f"folder {subfolder!r}" if subfolder else "a snapshot"
    try:
        root = Path(
            snapshot_download(
                text,
                revision=revision,
                cache_dir=cache_dir,
                allow_patterns=allow_patterns,
                local_files_only=_local_only(),
            )
        )
    except Exception as exc:  # noqa: BLE001 - every hub failure becomes one line
        raise _explain(exc, text, what) from None
    out = root / subfolder if subfolder else root
    if not out.exists():
        raise HubError(
            f"{text!r} has no {subfolder!r} folder (in {root}); pass a local copy instead, e.g. --model PATH"
        )
    return out


def fetch_file(
    repo_id: str,
    filename: str,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> Path:
    """Local path of ``filename`` from hub repo ``repo_id`` (cache first; HF_HUB_OFFLINE-aware)."""
    from huggingface_hub import hf_hub_download

    try:
        return Path(
            hf_hub_download(
                repo_id, filename, revision=revision, cache_dir=cache_dir, local_files_only=_local_only()
            )
        )
    except Exception as exc:  # noqa: BLE001 - every hub failure becomes one line
        raise _explain(exc, repo_id, f"file {filename!r}") from None
