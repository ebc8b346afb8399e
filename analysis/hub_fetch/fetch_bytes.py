"""Bytes each command fetches from the hub, before and after "fetch only what is used".

Question: how much does `wadi sample / distill / export / analyze` download for each
backbone, now that hub resolution asks only for the files a command needs, in the
precision it runs in? Compared with the patterns wadi used before
(``*.json``, ``*.safetensors``, ``*.txt``, ``*.model`` over the whole repository).

No network: the hub is replaced by the recorded real file lists of
``wadi_cli/configs/hub_files.json``; "after" runs wadi's real resolution code
(``resolve_pipeline_source``) against a stand-in hub that records which files it is
asked for. PixArt sizes are the hub's rounded displays; the authors' release files
(gudaochangsheng/WaDi) have unknown sizes and are left out of both columns.

    python analysis/hub_fetch/fetch_bytes.py      # writes analysis/hub_fetch/results/
"""

from __future__ import annotations

import fnmatch
import json
import platform
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from unittest import mock

import huggingface_hub

from wadi_cli.backbones import get_backbone
from wadi_cli.io import hub
from wadi_cli.io.hub_files import recorded_repos
from wadi_cli.pipeline import resolve_pipeline_source

OUT = Path(__file__).resolve().parent / "results"
OLD_PATTERNS = ("*.json", "*.safetensors", "*.txt", "*.model")
PIX512 = "PixArt-alpha/PixArt-XL-2-512x512"

#: (backbone, command, dtype on a GPU, resolve_pipeline_source kwargs, what the old code fetched:
#: "repo" = the old patterns over the whole repository, None = hub ids were not accepted)
FP16, NO_DENOISER = {"variant": "fp16"}, {"denoiser_weights": False}
DENOISER_ONLY = {"with_components": False}
SCENARIOS = [
    ("sd15", "sample (release weights)", "fp16", {**FP16, **NO_DENOISER}, "repo"),
    ("sd15", "sample --teacher / an adapter; distill", "fp16", FP16, "repo"),
    ("sd15", "distill on CPU", "fp32", {}, "repo"),
    ("sd15", "export --format merged", "fp16", {**FP16, **DENOISER_ONLY}, "repo"),
    ("sd15", "export --format diffusers / single-file", "fp16", FP16, "repo"),
    ("sd15", "analyze / swap / merge with the hub id", "fp16", {**FP16, **DENOISER_ONLY}, None),
    ("sd21", "sample (release weights)", "fp16", {**FP16, **NO_DENOISER}, "repo"),
    ("sd21", "sample --teacher / an adapter; distill", "fp16", FP16, "repo"),
    ("sd21", "export --format merged", "fp16", {**FP16, **DENOISER_ONLY}, "repo"),
    ("sd21", "analyze / swap / merge with the hub id", "fp16", {**FP16, **DENOISER_ONLY}, None),
    ("pixart", "sample (release weights)", "bf16", NO_DENOISER, "pixart"),
    ("pixart", "sample --teacher / an adapter; distill", "bf16", {}, "pixart"),
    ("pixart", "sample --teacher / an adapter; distill", "fp16", FP16, "pixart"),
    ("pixart", "export --format merged", "bf16", DENOISER_ONLY, "pixart"),
    ("sdxl", "sample an adapter / --teacher; distill", "fp16", FP16, "repo"),
    ("sdxl", "sample merged weights / an export", "fp16", {**FP16, **NO_DENOISER}, "repo"),
    ("sdxl", "distill in bf16 (fp32 files)", "bf16", {}, "repo"),
    ("sdxl", "export --format merged", "fp16", {**FP16, **DENOISER_ONLY}, "repo"),
]
PIXART_NOTE = (
    "PixArt before: the default repo (2.44 GB, transformer only) could not run at all; the column is what "
    "the old patterns took from the complete 512 pipeline passed with --model"
)


SDXL_NOTE = (
    "SDXL before: wadi had no SDXL; the column is what the old patterns would take from its repository "
    "(with the 6.9 GB single files). In fp16 the VAE comes from madebyollin/sdxl-vae-fp16-fix, whose "
    "size is not recorded (unknown, counted 0; the SDXL VAE in fp32 is 0.33 GB)"
)


def _size(repo: str, files: set[str]) -> int:
    sizes = recorded_repos()[repo]["files"]
    return sum(int(sizes[f] or 0) for f in files)


def before(backbone: str, old: str | None) -> int | None:
    """Bytes the old patterns matched (None: the old code took no hub id here)."""
    if old is None:
        return None
    repo = PIX512 if old == "pixart" else get_backbone(backbone).hub_id
    files = recorded_repos()[repo]["files"]
    chosen = {f for f in files if any(fnmatch.fnmatch(f, p) for p in OLD_PATTERNS)}
    return _size(repo, chosen)


def after(backbone: str, kwargs: dict) -> tuple[int, dict[str, list[str]]]:
    """Bytes wadi's resolution asks for now, per repository."""
    requested: dict[str, set[str]] = {}

    class Api:
        def list_repo_files(self, repo_id: str, revision: str | None = None) -> list[str]:
            return list(recorded_repos()[repo_id]["files"])

    with tempfile.TemporaryDirectory() as tmp:

        def download(repo_id: str, allow_patterns: list[str] | None = None, **_: object) -> str:
            requested.setdefault(repo_id, set()).update(allow_patterns or [])
            root = Path(tmp) / repo_id.replace("/", "--")
            for rel in allow_patterns or []:
                (root / rel).parent.mkdir(parents=True, exist_ok=True)
                (root / rel).touch()
            return str(root)

        with (
            mock.patch.object(hub, "_local_only", lambda: False),
            mock.patch.object(huggingface_hub, "HfApi", Api),
            mock.patch.object(huggingface_hub, "snapshot_download", download),
        ):
            resolve_pipeline_source(get_backbone(backbone), **kwargs)
    total = sum(_size(repo, files) for repo, files in requested.items())
    return total, {repo: sorted(files) for repo, files in requested.items()}


def main() -> None:
    rows = []
    for backbone, command, dtype, kwargs, old in SCENARIOS:
        a, files = after(backbone, kwargs)
        rows.append(
            {
                "backbone": backbone,
                "command": command,
                "dtype": dtype,
                "before_bytes": before(backbone, old),
                "after_bytes": a,
                "files": files,
            }
        )
    meta = {
        "question": "bytes fetched from the hub per command and backbone, "
        "before/after fetching only what is used",
        "command": "python analysis/hub_fetch/fetch_bytes.py",
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),  # noqa: UP017
        "machine": f"{platform.system()} {platform.machine()}, Python {sys.version.split()[0]} "
        "(no network used)",
        "sources": {repo: info["source"] for repo, info in recorded_repos().items()},
    }
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "fetch_bytes.json").write_text(json.dumps({**meta, "rows": rows}, indent=2) + "\n")
    lines = [
        "# Bytes fetched from the hub per command, before and after",
        "",
        f"`{meta['command']}` ({meta['date']}; {meta['machine']}).",
        "Sizes from the recorded real file lists (`wadi_cli/configs/hub_files.json`: SD from",
        "Git LFS pointers, exact; PixArt as the hub displays them). The authors' release file",
        "that `sample` adds (one U-Net/transformer) is not counted: its size is unknown.",
        "",
        "| backbone | command | dtype | before (GB) | after (GB) | before / after |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        b, a = r["before_bytes"], r["after_bytes"]
        was = "— (no hub ids)" if b is None else f"{b / 1e9:.2f}"
        ratio = "" if b is None else f"{b / a:.1f}×"
        lines.append(f"| {r['backbone']} | {r['command']} | {r['dtype']} | {was} | {a / 1e9:.2f} | {ratio} |")
    lines += ["", PIXART_NOTE + ".", "", SDXL_NOTE + "."]
    (OUT / "fetch_bytes.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
