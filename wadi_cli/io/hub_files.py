"""Which files of a diffusers hub repository a command needs (pure functions, no network).

A diffusers repository holds far more than one pipeline needs: SD1.5's holds 26 GB of
which 2.2 GB (fp16) or 4.3 GB (fp32) make the pipeline; the rest are original single-file
checkpoints at the root, ``.bin`` copies, a non-EMA U-Net, the safety checker. A
:class:`FetchPlan` names the folders a command needs (their config files) and those whose
weights it needs; :func:`select_files` picks, from a repository's file list, those files
and, per weights folder, ONE safetensors set in the wanted precision: the ``fp16``
variant when it exists and fp16 is asked for, else the plain (fp32) files.

The same selection runs on the hub's file list (before downloading) and on a local
snapshot (offline, from the hub cache), so online and offline runs read the same files.
The real file lists of the repositories wadi uses are recorded in
``wadi_cli/configs/hub_files.json`` (:func:`recorded_repos`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import Any

#: Model weight file stems: diffusers models, then transformers models.
WEIGHT_STEMS: tuple[str, ...] = ("diffusion_pytorch_model", "model")
#: Files of a component folder that describe it (configs, tokenizer vocabularies).
CONFIG_SUFFIXES: tuple[str, ...] = (".json", ".txt", ".model")
#: Folders of a diffusers pipeline that wadi never loads (nor fetches, nor exports).
UNUSED_COMPONENTS: tuple[str, ...] = ("safety_checker", "feature_extractor", "image_encoder")


class MissingFiles(LookupError):
    """The file list lacks what a plan needs (``folder`` and what is missing)."""

    def __init__(self, folder: str, detail: str) -> None:
        super().__init__(f"{folder}/: {detail}")
        self.folder = folder
        self.detail = detail


@dataclass(frozen=True)
class FetchPlan:
    """What to take from one repository.

    Attributes:
        folders: component folders whose config files are needed (``unet``, ``vae``,
            ``tokenizer``, ``scheduler``, ...; ``""``: the root of a one-model repository,
            such as a ControlNet's).
        weights: the subset of ``folders`` whose weights are needed.
        variant: preferred weights variant (``"fp16"``) or ``None`` for the plain files.
        root: files at the repository root to take when present (``model_index.json``).
        require_weights: a weights folder without safetensors weights is an error
            (``False``: take the weights when there are some).
    """

    folders: tuple[str, ...]
    weights: tuple[str, ...] = ()
    variant: str | None = None
    root: tuple[str, ...] = ("model_index.json",)
    require_weights: bool = True

    def __post_init__(self) -> None:
        extra = set(self.weights) - set(self.folders)
        if extra:
            raise ValueError(f"weights folders {sorted(extra)} are not among the plan's folders")


def _is_weights_index(name: str) -> bool:
    return ".safetensors.index" in name or ".bin.index" in name


def folder_weights(names: Iterable[str], variant: str | None) -> tuple[list[str], str | None]:
    """The safetensors files holding ONE copy of a model folder's weights, and its variant.

    ``names`` are the file names in the folder. The preferred ``variant`` comes first,
    then the other (``fp16`` → plain; plain → ``fp16``): a single file
    ``{stem}[.variant].safetensors`` or a sharded ``{stem}.safetensors.index[.variant].json``
    with its shards ``{stem}[.variant]-NNNNN-of-NNNNN.safetensors``. Pickle formats
    (``.bin``) and other variants (``non_ema``) are never chosen. Returns ``([], None)``
    when the folder has no such weights.
    """
    have = set(names)
    order = [variant, None] if variant else [None, "fp16"]
    for v in order:
        tag = f".{v}" if v else ""
        for stem in WEIGHT_STEMS:
            single = f"{stem}{tag}.safetensors"
            if single in have:
                return [single], v
            index = f"{stem}.safetensors.index{tag}.json"
            if index in have:
                shard = re.compile(rf"{re.escape(stem + tag)}-\d+-of-\d+\.safetensors")
                return [index, *sorted(n for n in have if shard.fullmatch(n))], v
    return [], None


def split_folders(files: Iterable[str]) -> dict[str, list[str]]:
    """``{folder: [file names]}`` of a repository's file list (``""`` is the root)."""
    out: dict[str, list[str]] = {}
    for path in files:
        folder, _, name = str(path).replace("\\", "/").rpartition("/")
        out.setdefault(folder, []).append(name)
    return out


def select_files(files: Iterable[str], plan: FetchPlan) -> list[str]:
    """The files of ``files`` (paths relative to the repository root) that ``plan`` needs.

    Raises :class:`MissingFiles` when a planned folder is absent, or (with
    ``plan.require_weights``) when a weights folder holds no safetensors weights.
    """
    by_folder = split_folders(files)
    out = [name for name in plan.root if name in by_folder.get("", [])]
    for folder in plan.folders:
        names = by_folder.get(folder)
        if not names:
            raise MissingFiles(folder, "no such folder")
        at = f"{folder}/" if folder else ""  # "": the repository's root (a single-model repo)
        out += [f"{at}{n}" for n in names if n.endswith(CONFIG_SUFFIXES) and not _is_weights_index(n)]
        if folder in plan.weights:
            chosen, _ = folder_weights(names, plan.variant)
            if not chosen and plan.require_weights:
                other = sorted(n for n in names if not n.endswith(CONFIG_SUFFIXES))
                have = f"has only {', '.join(other[:4])}" if other else "has no weight files"
                raise MissingFiles(folder, f"no safetensors weights ({have})")
            out += [f"{at}{n}" for n in chosen]
    return sorted(set(out))


@lru_cache(maxsize=1)
def _hub_files() -> dict[str, Any]:
    return json.loads(resources.files("wadi_cli").joinpath("configs", "hub_files.json").read_text())


def recorded_repos() -> dict[str, dict[str, Any]]:
    """The recorded file lists of the hub repositories wadi uses: ``{repo: {"source",
    "exact", "files": {path: bytes or None}}}`` (``wadi_cli/configs/hub_files.json``)."""
    return _hub_files()["repos"]


def analysis_pairs(family: str) -> dict[str, Any]:
    """The teacher and the published one-step students of ``family`` that the weight studies
    compare: ``{"teacher": hub id, "students": [{"name", "repo", "file" (None: the repo's
    unet/ folder), "method", ["converted"]}]}`` (``analysis_pairs`` of ``hub_files.json``)."""
    pairs = _hub_files()["analysis_pairs"]
    if family not in pairs:
        names = ", ".join(k for k in pairs if k != "about")
        raise KeyError(f"no analysis pairs recorded for {family!r} (recorded: {names})")
    return pairs[family]


def _pattern_weights(folder: str, variant: str | None) -> list[str]:
    """Name patterns of one copy of a folder's safetensors weights, for each variant
    :func:`folder_weights` would try (the preferred one first)."""
    out = []
    at = f"{folder}/" if folder else ""
    for v in [variant, None] if variant else [None, "fp16"]:
        tag = f".{v}" if v else ""
        for stem in WEIGHT_STEMS:
            out += [f"{at}{stem}{tag}.safetensors", f"{at}{stem}.safetensors.index{tag}.json"]
            out.append(f"{at}{stem}{tag}-*-of-*.safetensors")
    return out


def include_patterns(repo: str, plan: FetchPlan) -> list[str]:
    """The ``--include`` patterns of ``hf download REPO`` that fetch what ``plan`` needs: the
    very files :func:`select_files` picks when the repository's file list is recorded
    (:func:`recorded_repos`), else name patterns (config files of the planned folders and,
    for weights folders, one copy of the weights of each variant :func:`folder_weights`
    would try)."""
    known = recorded_repos().get(repo)
    if known is not None:
        try:
            return select_files(known["files"], plan)
        except MissingFiles:
            pass  # the recorded list lacks a planned folder: fall back to patterns
    out = list(plan.root)
    for folder in plan.folders:
        out += [f"{folder}/*{suffix}" if folder else f"*{suffix}" for suffix in CONFIG_SUFFIXES]
        if folder in plan.weights:
            out += _pattern_weights(folder, plan.variant)
    return out


def download_command(repo: str, plan: FetchPlan) -> str:
    """``hf download REPO --include ...``: one shell command fetching only what ``plan`` needs."""
    import shlex

    patterns = " ".join(shlex.quote(p) for p in include_patterns(repo, plan))
    return f"hf download {shlex.quote(repo)} --include {patterns}"
