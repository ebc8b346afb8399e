"""The bad-input table: every case of the corpus in ``tests/_helpers_corpus.py`` (input x
command), run in-process like the test suite does, with its exit code and message.

    python analysis/bad_input/table.py            # writes results/cases.md and results/cases.json

The same cases are the parametrised test ``tests/system/test_bad_input_corpus.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1] / "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import _helpers_corpus as corpus  # noqa: E402
import _helpers_sample as helpers  # noqa: E402
import torch  # noqa: E402


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory(prefix="wadi-corpus-") as tmp:
        root = Path(tmp)
        built = corpus.build_corpus(root / "corpus", helpers.tiny_pipeline_dir())
        for i, case in enumerate(corpus.cases()):
            work = root / "work" / str(i)
            work.mkdir(parents=True)
            result = corpus.run_case(built, case, work)
            message = result.message.replace(str(root / "corpus"), "CORPUS").replace(str(work), "WORK")
            message = message.replace(str(built.pipe), "PIPELINE")
            rows.append(
                {
                    "command": case.command,
                    "slot": case.slot,
                    "input": case.kind,
                    "exit": result.exit_code,
                    "message": message if not case.accepted else "(accepted by design: rows counted)",
                    "passes": not result.problems(),
                    "problems": result.problems(),
                }
            )
    seconds = time.perf_counter() - t0
    meta = {
        "command": "python analysis/bad_input/table.py",
        "machine": f"{platform.node()}: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs "
        "(shared with other jobs), torch " + torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "cases": len(rows),
        "passing": sum(r["passes"] for r in rows),
        "seconds": round(seconds, 1),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "cases.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    lines = [
        "# Bad input x command: exit code and message",
        "",
        f"`{meta['command']}` on {meta['machine']}, {meta['date']}: {meta['cases']} cases, "
        f"{meta['passing']} pass, {meta['seconds']} s. CORPUS = the corpus folder, PIPELINE = the "
        "random tiny pipeline, WORK = the case's empty output folder.",
        "",
        "| command | slot | input | exit | message | passes |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        ok = "yes" if r["passes"] else "NO: " + "; ".join(r["problems"])
        cells = [r["command"], f"`{r['slot']}`", r["input"], str(r["exit"]), _cell(r["message"]), _cell(ok)]
        lines.append("| " + " | ".join(cells) + " |")
    (args.out / "cases.md").write_text("\n".join(lines) + "\n")
    print(json.dumps(meta))


if __name__ == "__main__":
    main()
