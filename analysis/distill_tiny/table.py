"""Render results.jsonl (one line per run from run_one.sh) as results.csv and a Markdown table."""

import csv
import json
from pathlib import Path

here = Path(__file__).parent
rows = [json.loads(line) for line in (here / "results.jsonl").read_text().splitlines() if line.strip()]
keys = ["name", "flags", "train_s", "accuracy", "fd"]
with open(here / "results.csv", "w", newline="") as f:
    w = csv.DictWriter(f, keys)
    w.writeheader()
    for r in rows:
        w.writerow({k: r.get(k) for k in keys})
print("| run | flags (beyond `-b tiny --out RUN`) | train s (1 core) | accuracy | fd |")
print("|---|---|---|---|---|")
for r in rows:
    flags = r["flags"] or "(defaults)"
    print(f"| {r['name']} | `{flags}` | {r['train_s']} | {r.get('accuracy')} | {r.get('fd'):.2f} |")
