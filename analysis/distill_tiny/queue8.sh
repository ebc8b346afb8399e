#!/usr/bin/env bash
# Eighth: what limits fd at ~17? teacher CFG 2 / 4 (fake CFG 1), and a faster fake score (3e-3); 300 steps.
cd /work/main
R=./analysis/distill_tiny/run_one.sh
C="--lr 1e-2 --fake-guidance 1 --max-steps 300 --checkpoint-every 300 --validate-every 0 --ema-decay 0"
$R lr1e2_g2_fg1_f1e3_300 $C --guidance 2 --fake-lr 1e-3
$R lr1e2_g3_fg1_f3e3_300 $C --guidance 3 --fake-lr 3e-3
$R lr1e2_g4_fg1_f1e3_300 $C --guidance 4 --fake-lr 1e-3
