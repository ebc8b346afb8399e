#!/usr/bin/env bash
# Fourth sweep: even higher student lr; then a longer run (checkpoints kept for step curves).
cd /work/main
R=./analysis/distill_tiny/run_one.sh
V="--validate-every 0 --ema-decay 0"
$R lr1e2_g3_f1e3_200 --lr 1e-2 --guidance 3 --fake-guidance 3 --fake-lr 1e-3 --max-steps 200 $V
$R lr3e3_g3_f1e3_800 --lr 3e-3 --guidance 3 --fake-guidance 3 --fake-lr 1e-3 --max-steps 800 --checkpoint-every 200 --keep-last 4 $V
