#!/usr/bin/env bash
# Usage: eval_ckpts.sh RUN_NAME — score every kept checkpoint's student (n=500, seed 0) on one core.
set -u
run=/tmp/distill_tiny/$1
here=$(cd "$(dirname "$0")" && pwd)
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
for ck in "$run"/checkpoints/step-*; do
  ev=$(taskset -c 1 wadi eval -b tiny --weights "$ck/student.safetensors" -n 500 --seed 0 --json 2>/dev/null)
  python -c "import json,sys; e=json.loads(sys.argv[2]); print(json.dumps({'run': sys.argv[1], 'checkpoint': sys.argv[3], 'accuracy': e['accuracy'], 'fd': e['fd']}))" "$1" "$ev" "$(basename "$ck")" | tee -a "$here/checkpoints.jsonl"
done
