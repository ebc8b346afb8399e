#!/usr/bin/env bash
# Fifth: the combination (lr 3e-3, teacher CFG 3, fake CFG 1, fake lr 1e-3) for 800 steps,
# checkpoints every 200 kept, so 200/400/600/800-step points come from one run.
cd /work/main
./analysis/distill_tiny/run_one.sh lr3e3_g3_fg1_f1e3_800 --lr 3e-3 --guidance 3 --fake-guidance 1 --fake-lr 1e-3 \
  --max-steps 800 --checkpoint-every 200 --keep-last 4 --validate-every 0 --ema-decay 0
./analysis/distill_tiny/eval_ckpts.sh lr3e3_g3_fg1_f1e3_800
