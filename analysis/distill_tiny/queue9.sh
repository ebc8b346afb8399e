#!/usr/bin/env bash
# Ninth: less gradient noise — batch 32 at the best settings, 200 steps.
cd /work/main
./analysis/distill_tiny/run_one.sh lr1e2_g3_fg1_f1e3_bs32_200 --lr 1e-2 --guidance 3 --fake-guidance 1 --fake-lr 1e-3 \
  --batch-size 32 --max-steps 200 --checkpoint-every 200 --validate-every 0 --ema-decay 0
