#!/usr/bin/env bash
# Sixth: long runs (800 steps, checkpoints every 200 kept) at student lr 1e-2, fake lr 1e-3,
# teacher CFG 3 with fake CFG 1 (then 3), so 200/400/600/800-step points come from one run.
cd /work/main
C="--max-steps 800 --checkpoint-every 200 --keep-last 4 --validate-every 0 --ema-decay 0"
./analysis/distill_tiny/run_one.sh lr1e2_g3_fg1_f1e3_800 --lr 1e-2 --guidance 3 --fake-guidance 1 --fake-lr 1e-3 $C
./analysis/distill_tiny/eval_ckpts.sh lr1e2_g3_fg1_f1e3_800
