#!/usr/bin/env bash
# Second sweep (200 steps each): teacher-only guidance (fake CFG 1), higher guidance, higher lr.
cd /work/main
R=./analysis/distill_tiny/run_one.sh
V="--validate-every 0 --ema-decay 0 --max-steps 200"
$R lr1e3_g3_fg1_200 --lr 1e-3 --guidance 3 --fake-guidance 1 $V
$R lr1e3_g5_fg5_200 --lr 1e-3 --guidance 5 --fake-guidance 5 $V
$R lr3e3_g3_fg3_200 --lr 3e-3 --guidance 3 --fake-guidance 3 $V
