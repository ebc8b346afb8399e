"""What did the published SDXL one-step distillers change in SDXL's weights: norms or directions?

For every student of ``analysis_pairs.sdxl`` in ``wadi_cli/configs/hub_files.json`` (SDXL-Turbo,
SDXL-Lightning's 1-step U-Net, DMD2-SDXL, Hyper-SDXL's 1-step U-Net) that is present here, this
runs ``wadi analyze`` (the library call) against SDXL base and groups its per-layer rows by
block (down / mid / up) and part (attentions / resnets / other). It writes:

- ``OUT/results.json``: per student, its file, the overall and per-group aggregates;
- ``OUT/table.md``: mean relative norm change, mean direction change and their ratio per group;
- ``OUT/norm_vs_direction.png``: the paper's Fig. 1 for SDXL distillers (per layer: norm
  change against direction change, one colour per student; per group: the two means).

Students that are not here are skipped with a line saying what is missing and how to fetch it.
A ``.bin`` release (DMD2's) is a pickle: it is never opened; the line says how to make the
safetensors copy the study reads. Run:

    python analysis/sdxl_distillers/run.py --weights-dir ~/sdxl-students --device cuda

``--teacher`` defaults to the hub id (read from the Hugging Face cache, offline);
``--weights-dir`` holds downloaded files under their hub names and diffusers repos as folders
named after the repo (``sdxl-turbo/unet/``). Without them, the Hugging Face cache is looked up.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
GROUPS = [(b, p) for b in ("down", "mid", "up") for p in ("attentions", "resnets", "other")]
#: the ``wadi analyze --filter`` that selects each block (and block x part): the same groups
FILTERS = {
    "down": r"^down_blocks\.",
    "mid": r"^mid_block\.",
    "up": r"^up_blocks\.",
    "attentions": r"\.attentions\.",
    "resnets": r"\.resnets\.",
}


def group_of(name: str) -> tuple[str, str] | None:
    """(block, part) of a diffusers U-Net tensor name; None outside the three block stacks."""
    head = name.split(".", 1)[0]
    block = {"down_blocks": "down", "mid_block": "mid", "up_blocks": "up"}.get(head)
    if block is None:
        return None
    part = "attentions" if ".attentions." in name else "resnets" if ".resnets." in name else "other"
    return block, part


def _cached_file(repo: str, filename: str) -> Path | None:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - a dependency of diffusers
        return None
    found = try_to_load_from_cache(repo, filename)
    return Path(found) if isinstance(found, str) else None


def locate(student: dict[str, Any], weights_dir: Path | None) -> tuple[str | None, str]:
    """(path or hub id to analyze, None when absent; the line that says what was found or
    what is missing)."""
    repo, name = student["repo"], student["name"]
    file, converted = student.get("file"), student.get("converted")
    if file is None:  # a diffusers repository: its unet/ folder
        folder = weights_dir / repo.split("/")[1] if weights_dir else None
        if folder is not None and (folder / "unet").is_dir():
            return str(folder), f"{name}: {folder}/unet"
        if _cached_file(repo, "unet/config.json") is not None:
            return repo, f"{name}: {repo} (Hugging Face cache)"
        return None, f"{name}: missing {repo} unet/; fetch it with: hf download {repo} --include 'unet/*'"
    wanted = converted or file
    candidates = [weights_dir / wanted] if weights_dir else []
    path = next((p for p in candidates if p.is_file()), None) or _cached_file(repo, wanted)
    if path is not None:
        return str(path), f"{name}: {path}"
    if converted:
        return None, (
            f"{name}: missing {converted}; {repo} publishes {file}, a pickle, which this study never "
            f"opens. Make the safetensors copy yourself, with torch's weights-only loader: "
            f'python -c "import torch; from safetensors.torch import save_file; '
            f"save_file(torch.load('{file}', weights_only=True), '{converted}')\""
        )
    return None, f"{name}: missing {file}; fetch it with: hf download {repo} {file}"


def grouped(layers: list[Any]) -> dict[str, dict[str, Any]]:
    """``{"down/attentions": aggregate, …}`` over the layers of each group (empty groups left out)."""
    from wadi_cli.analysis.report import aggregate

    out: dict[str, dict[str, Any]] = {}
    for block, part in GROUPS:
        members = [x for x in layers if group_of(x.layer) == (block, part)]
        if members:
            out[f"{block}/{part}"] = aggregate(members)
    return out


def analyze_pair(teacher: str, student: str, device: str) -> dict[str, Any]:
    from wadi_cli.analysis import AnalyzeOptions, analyze_checkpoints
    from wadi_cli.analysis.report import aggregate, jsonable

    result = analyze_checkpoints(teacher, student, AnalyzeOptions(device=device))
    points = [(x.layer, x.norm_rel_change_mean, x.direction_change_mean) for x in result.layers]
    return jsonable(
        {
            "teacher": result.teacher,
            "student": result.student,
            "overall": aggregate(result.layers),
            "groups": grouped(result.layers),
            "layers": [{"layer": n, "norm": a, "direction": b} for n, a, b in points],
            "seconds": round(result.seconds, 1),
        }
    )


def _cell(x: Any, spec: str) -> str:
    return "-" if x is None or x != x else format(x, spec)


def table(results: dict[str, dict[str, Any]]) -> str:
    """The norm-vs-direction table (markdown): one row per student and group."""
    lines = [
        "| student | group | layers | norm change (mean) | direction change (mean) | direction / norm |",
        "|---|---|---|---|---|---|",
    ]
    for name, res in results.items():
        for group, agg in [("all", res["overall"]), *res["groups"].items()]:
            lines.append(
                f"| {name} | {group} | {agg['layers']} | {_cell(agg['norm_rel_change_mean'], '.4g')} | "
                f"{_cell(agg['direction_change_mean'], '.4g')} | "
                f"{_cell(agg['direction_to_norm_ratio_mean'], '.3g')} |"
            )
    return "\n".join(lines) + "\n"


def figure(results: dict[str, dict[str, Any]], path: Path) -> None:
    """Per layer: norm change (x) against direction change (y), log-log, one colour per
    student, with y = x; per group: the two means side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 5))
    floor = 1e-12
    for name, res in results.items():
        xs = [max(p["norm"], floor) for p in res["layers"]]
        ys = [max(p["direction"], floor) for p in res["layers"]]
        left.scatter(xs, ys, s=6, alpha=0.6, label=name)
    lo, hi = left.get_xlim()
    left.plot([lo, hi], [lo, hi], "k--", lw=0.8, label="direction = norm")
    left.set(xscale="log", yscale="log", xlabel="relative norm change (per layer, mean over rows)")
    left.set(ylabel="direction change ‖d_S − d_T‖ (per layer, mean over rows)")
    left.legend(fontsize=8)
    groups = [g for g in (f"{b}/{p}" for b, p in GROUPS) if any(g in r["groups"] for r in results.values())]
    width = 0.8 / max(1, 2 * len(results))
    for i, (name, res) in enumerate(results.items()):
        norms = [res["groups"].get(g, {}).get("norm_rel_change_mean") or floor for g in groups]
        dirs = [res["groups"].get(g, {}).get("direction_change_mean") or floor for g in groups]
        at = [k + (2 * i) * width for k in range(len(groups))]
        right.bar(at, norms, width, label=f"{name}: norm", hatch="//")
        right.bar([a + width for a in at], dirs, width, label=f"{name}: direction")
    right.set_xticks([k + 0.4 for k in range(len(groups))], groups, rotation=45, ha="right", fontsize=8)
    right.set(yscale="log", ylabel="mean change over the group's layers")
    right.legend(fontsize=7, ncol=2)
    fig.suptitle("SDXL base → one-step students: what changed, norm or direction")
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    from wadi_cli.io import write_text_atomic
    from wadi_cli.io.hub_files import analysis_pairs

    pairs = analysis_pairs("sdxl")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", default=pairs["teacher"], help="SDXL base: hub id, folder or U-Net file")
    parser.add_argument("--weights-dir", type=Path, help="where the students' files / repo folders are")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--only", nargs="*", help="student names to run (default: every present one)")
    args = parser.parse_args(argv)
    wanted = [s for s in pairs["students"] if not args.only or s["name"] in args.only]
    results: dict[str, dict[str, Any]] = {}
    for student in wanted:
        where, line = locate(student, args.weights_dir)
        print(line if where is not None else f"skipped {line}", flush=True)
        if where is None:
            continue
        res = analyze_pair(args.teacher, where, args.device)
        results[student["name"]] = {**res, "repo": student["repo"], "file": student.get("file"),
                                    "method": student["method"]}  # fmt: skip
        agg = res["overall"]
        print(f"  {agg['layers']} layers: norm {agg['norm_rel_change_mean']:.4g}, direction "
              f"{agg['direction_change_mean']:.4g}", flush=True)  # fmt: skip
    if not results:
        print("no student present: nothing written", file=sys.stderr)
        return 1
    args.out.mkdir(parents=True, exist_ok=True)
    doc = {"teacher": args.teacher, "filters": FILTERS, "students": results}
    write_text_atomic(args.out / "results.json", json.dumps(doc, indent=1) + "\n")
    write_text_atomic(args.out / "table.md", table(results))
    figure(results, args.out / "norm_vs_direction.png")
    print(f"wrote {args.out}/results.json, table.md, norm_vs_direction.png", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
