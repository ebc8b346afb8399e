#!/usr/bin/env bash
# Tenth: seed variance of the best settings (400 steps, --seed 1).
cd /work/main
./analysis/distill_tiny/run_one.sh best_seed1_400 --lr 1e-2 --guidance 3 --fake-guidance 1 --fake-lr 1e-3 \
  --max-steps 400 --checkpoint-every 400 --validate-every 0 --ema-decay 0 --seed 1
