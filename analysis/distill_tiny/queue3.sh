#!/usr/bin/env bash
# Third sweep (200 steps, fake lr 1e-3 unless said): fake lr, student lr, fake CFG, teacher CFG.
cd /work/main
R=./analysis/distill_tiny/run_one.sh
V="--validate-every 0 --ema-decay 0 --max-steps 200"
$R lr1e3_g3_f3e4_200 --lr 1e-3 --guidance 3 --fake-guidance 3 --fake-lr 3e-4 $V
$R lr3e3_g3_f1e3_200 --lr 3e-3 --guidance 3 --fake-guidance 3 --fake-lr 1e-3 $V
$R lr1e3_g3_fg1_f1e3_200 --lr 1e-3 --guidance 3 --fake-guidance 1 --fake-lr 1e-3 $V
$R lr1e3_g5_f1e3_200 --lr 1e-3 --guidance 5 --fake-guidance 5 --fake-lr 1e-3 $V
