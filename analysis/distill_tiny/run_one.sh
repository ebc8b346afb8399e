#!/usr/bin/env bash
# Usage: run_one.sh NAME [wadi distill flags...]
# One distillation run on ONE core + n=500 eval; appends a JSON line to results.jsonl.
set -u
name=$1; shift
out=/tmp/distill_tiny/$name
rm -rf "$out"
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
here=$(cd "$(dirname "$0")" && pwd)
t0=$(date +%s.%N)
taskset -c 1 wadi distill -b tiny --out "$out" "$@" > "$out.log" 2>&1
rc=$?
t1=$(date +%s.%N)
ev=$(taskset -c 1 wadi eval -b tiny --weights "$out" -n 500 --seed 0 --json 2>>"$out.log")
python - "$name" "$rc" "$t0" "$t1" "$ev" "$*" >> "$here/results.jsonl" <<'PY'
import json, sys
name, rc, t0, t1, ev, flags = sys.argv[1:]
try:
    e = json.loads(ev)
except Exception:
    e = {"raw": ev}
print(json.dumps({"name": name, "flags": flags, "rc": int(rc), "train_s": round(float(t1) - float(t0), 1),
                  "accuracy": e.get("accuracy"), "fd": e.get("fd"), "eval": e}))
PY
tail -1 "$here/results.jsonl"
