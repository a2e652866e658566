#!/usr/bin/env bash
# KD's sensitivity to the learning rate at the demo's scale (one pass per epoch), this machine.
set -uo pipefail
cd "$(dirname "$0")/../.."
source scripts/lib.sh
M=target/debug/mekd; O=${1:-/tmp/lrs/out}; mkdir -p $O
RAYON_NUM_THREADS=2 $M teacher train --arch lenet5 --epochs 5 --data data/mnist-slice --out $O/.teacher > $O/teacher.log 2>&1
for lr in 0.1 0.05 0.01; do for seed in 0 1 2 3 4; do
  n=kd-lr$lr-seed-$seed
  RAYON_NUM_THREADS=2 $M distill --method kd --teacher-run $O/.teacher --data data/mnist-slice --edge-fraction 0.1 \
    --student lenet5-half --epochs 24 --batch 64 --milestones 18 --lr $lr --seed $seed --out $O/.w-$n > $O/$n.log 2>&1
  keep_small $O/.w-$n $O/$n; mv $O/$n.log $O/$n/log.txt
  echo "$n $(grep -o '"final_acc":[0-9.]*' $O/$n/summary.json)"
done; done
keep_small $O/.teacher $O/teacher; mv $O/teacher.log $O/teacher/log.txt
