#!/usr/bin/env bash
# Seventh: capacity + EMA at the best lr/CFG: student rank 32, fake rank 16, EMA 0.99, 400 steps.
# run_one scores the EMA; eval_ckpts scores the raw student of each checkpoint.
cd /work/main
C="--lr 1e-2 --guidance 3 --fake-guidance 1 --fake-lr 1e-3 --max-steps 400 --checkpoint-every 200 --keep-last 4 --validate-every 0"
./analysis/distill_tiny/run_one.sh lr1e2_g3_fg1_f1e3_r32_fr16_ema99_400 $C --rank 32 --fake-rank 16 --ema-decay 0.99
./analysis/distill_tiny/eval_ckpts.sh lr1e2_g3_fg1_f1e3_r32_fr16_ema99_400
