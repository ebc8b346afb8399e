#!/usr/bin/env bash
# First sweep: defaults, then no-EMA and learning-rate / guidance directions (200-400 steps).
cd /work/main
R=./analysis/distill_tiny/run_one.sh
V="--validate-every 0"
$R default_400                                  # the shipped defaults, as issue #4 runs them
$R noema_400 --ema-decay 0 $V
$R lr1e3_noema_200 --ema-decay 0 --lr 1e-3 --max-steps 200 $V
$R lr1e3_g3_noema_200 --ema-decay 0 --lr 1e-3 --guidance 3 --fake-guidance 3 --max-steps 200 $V
$R lr1e3_g3_f1e3_noema_200 --ema-decay 0 --lr 1e-3 --guidance 3 --fake-guidance 3 --fake-lr 1e-3 --max-steps 200 $V
