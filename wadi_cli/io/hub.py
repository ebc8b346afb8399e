"""Hugging Face hub access, with every failure turned into one actionable HubError line.

:func:`resolve_repo` returns the local snapshot folder of a hub repository holding the
files a :class:`~wadi_cli.io.hub_files.FetchPlan` needs, and nothing else: online it
lists the repository, picks the files (:func:`~wadi_cli.io.hub_files.select_files`) and
downloads only those (files already in the hub cache, e.g. from an earlier diffusers
download, are reused); offline (``HF_HUB_OFFLINE=1`` or an unreachable hub) it runs the
same selection on the cached snapshot. :func:`resolve_model` does this for a local path
or a hub id; pickle formats are never downloaded.

``huggingface_hub`` is imported inside the functions that reach the hub: every command
imports :mod:`wadi_cli.io`, most never touch the hub (start-up time).
"""

from __future__ import annotations

import functools
import os
import re
import socket
from pathlib import Path
from urllib.parse import urlparse

from wadi_cli.errors import CheckpointError, HubError
from wadi_cli.io.hub_files import FetchPlan, MissingFiles, download_command, select_files
from wadi_cli.io.paths import input_path_problem

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_OFFLINE_ERRORS = ("LocalEntryNotFoundError", "IncompleteSnapshotError", "OfflineModeIsEnabled")


def hub_offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` is set to a true value (read at call time)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


@functools.lru_cache(maxsize=1)
def hub_reachable(timeout: float = 3.0) -> bool:
    """One quick TCP connection to the hub's endpoint (cached per process).

    Without it, an offline machine spends ~25 s in huggingface_hub's retries (and prints
    each one) before the same error; with it, wadi goes straight to the local cache.
    """
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
        "folder or file instead"
    )


def snapshot_files(root: str | os.PathLike[str]) -> list[str]:
    """Paths (relative, ``/``-separated) of the files under a local snapshot or folder."""
    base = Path(root)
    out = []
    for folder, _, names in os.walk(base, followlinks=True):
        rel = Path(folder).relative_to(base)
        if any(part.startswith(".") for part in rel.parts):
            continue
        out += [(rel / n).as_posix() for n in names if not n.startswith(".")]
    return sorted(out)


def _missing(exc: MissingFiles, repo_id: str, offline: bool) -> HubError:
    where = " in the local cache, and the hub is unreachable (offline or HF_HUB_OFFLINE=1)" if offline else ""
    if exc.detail == "no such folder":
        head = f"{repo_id!r} has no {exc.folder!r} folder{where}"
    else:
        head = f"cannot use the {exc.folder!r} folder of {repo_id!r}: {exc.detail}{where}"
    return HubError(f"{head}; pass a local copy instead")


def _folders_label(folders: tuple[str, ...]) -> str:
    if not folders:
        return "a snapshot"
    names = ", ".join(repr(f) for f in folders)
    return f"folder {names}" if len(folders) == 1 else f"folders {names}"


def resolve_repo(
    repo_id: str,
    plan: FetchPlan,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> Path:
    """The local snapshot folder of hub repo ``repo_id`` holding the files ``plan`` needs.

    Online, only those files are downloaded (cached ones are reused); offline, the cached
    snapshot must hold them. Every failure is one :class:`HubError` line.
    """
    from huggingface_hub import snapshot_download

    offline = _local_only()
    what = _folders_label(plan.folders)
    try:
        if offline:
            root = Path(
                snapshot_download(
                    repo_id,
                    revision=revision,
                    cache_dir=cache_dir,
                    allow_patterns=list(plan.root),
                    local_files_only=True,
                )
            )
            select_files(snapshot_files(root), plan)
            return root
        from huggingface_hub import HfApi

        files = HfApi().list_repo_files(repo_id, revision=revision)
        wanted = select_files(files, plan)
        return Path(snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, allow_patterns=wanted))
    except MissingFiles as exc:
        raise _with_command(_missing(exc, repo_id, offline), repo_id, plan) from None
    except Exception as exc:  # noqa: BLE001 - every hub failure becomes one line
        raise _with_command(_explain(exc, repo_id, what), repo_id, plan) from None


def _with_command(error: HubError, repo_id: str, plan: FetchPlan) -> HubError:
    """``error`` carrying (attribute ``command``) the ``hf download`` command that fetches
    exactly the plan's files where the hub is reachable."""
    error.command = download_command(repo_id, plan)  # type: ignore[attr-defined]
    return error


def denoiser_folder(files: list[str]) -> str | None:
    """``unet`` or ``transformer``: the denoiser folder of a repository's file list."""
    folders = {f.split("/", 1)[0] for f in files if "/" in f}
    return next((name for name in ("unet", "transformer") if name in folders), None)


def resolve_model(
    path_or_id: str | os.PathLike[str],
    subfolder: str | None = None,
    *,
    variant: str | None = None,
    revision: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> Path:
    """A local folder or file for ``path_or_id``: the path itself, or a hub snapshot.

    For a hub id, only ``subfolder`` (its configs and ONE copy of its safetensors
    weights, ``variant`` preferred) and ``model_index.json`` are fetched; without
    ``subfolder``, the denoiser folder (``unet``, else ``transformer``). The returned path is
    ``<snapshot>/<subfolder>`` when a subfolder is given. Raises
    :class:`CheckpointError` for a missing local path that cannot be a repo id,
    :class:`HubError` when the hub fails.
    """
    local = Path(path_or_id).expanduser()
    if local.exists():
        problem = input_path_problem(local)
        if problem:
            raise CheckpointError(f"{local}: {problem}")
        if subfolder and (local / subfolder).exists():
            return local / subfolder
        return local
    text = str(path_or_id)
    if not looks_like_repo_id(text):
        raise CheckpointError(f"{local}: {input_path_problem(local) or 'no such file or directory'}")
    folder = subfolder
    if folder is None:
        listing = repo_files(text, revision, cache_dir)
        folder = denoiser_folder(listing)
        if folder is None:
            raise HubError(f"{text!r} has neither unet/ nor transformer/; pass a local checkpoint instead")
    plan = FetchPlan(folders=(folder,), weights=(folder,), variant=variant, require_weights=False)
    root = resolve_repo(text, plan, revision=revision, cache_dir=cache_dir)
    return root / subfolder if subfolder else root


def repo_files(
    repo_id: str, revision: str | None = None, cache_dir: str | os.PathLike[str] | None = None
) -> list[str]:
    """The repository's file list: the hub's, or the cached snapshot's when offline."""
    from huggingface_hub import HfApi, snapshot_download

    try:
        if _local_only():
            root = snapshot_download(
                repo_id, revision=revision, cache_dir=cache_dir, allow_patterns=["model_index.json"],
                local_files_only=True,
            )  # fmt: skip
            return snapshot_files(root)
        return list(HfApi().list_repo_files(repo_id, revision=revision))
    except Exception as exc:  # noqa: BLE001 - every hub failure becomes one line
        raise _explain(exc, repo_id, "the file list") from None


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
