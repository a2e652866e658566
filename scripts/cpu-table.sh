#!/usr/bin/env bash
# A results table at the demo's scale on the CPU: a LeNet-5 teacher trained on DATA, then
# LeNet-5-half students distilled from it (in-process teacher) holding 10% of the training split
# as edge images: MEKD soft, MEKD hard and KD soft over every SEED, and DKD, ML, KN and scratch
# once (the first seed). Each run's small files (config, metrics, summary; no checkpoints, pools
# or models) land in OUT/<method>-<response>-seed-N/, the teacher's in OUT/teacher/, and
# `mekd report` writes OUT/report/ (mean +- std over seeds, n).
#
#   scripts/cpu-table.sh DATA OUT SEED...
#   env: MEKD (default target/debug/mekd), THREADS per job (default 1), JOBS in parallel
#        (default 4), TEACHER_THREADS (default 4), GAN_EPOCHS (default 52, the demo's; with
#        6,000 edge images 9 epochs make about the demo's 832 generator steps); for a quick try:
#        TEACHER_EPOCHS (5), EPOCHS (24), STEPS (100), SMOKE=1 (score on 200 test images)
#
# The settings are the demo's (`mekd demo`, trainer/src/demo.rs): teacher 5 epochs; MEKD: 52 GAN
# epochs, generator width 16, 8,000 deprivatization queries, a pool of 40,000 synthetic images,
# 24 student epochs of 100 steps of 64, one decay at epoch 18; the baselines: 24 epochs of one
# pass over their transfer set at batch 64 (the reference's schedule), the same decay.
set -euo pipefail
data=$1 out=$2
shift 2
first_seed=$1
MEKD=${MEKD:-target/debug/mekd} THREADS=${THREADS:-1} JOBS=${JOBS:-4}
TEACHER_THREADS=${TEACHER_THREADS:-4} GAN_EPOCHS=${GAN_EPOCHS:-52}
TEACHER_EPOCHS=${TEACHER_EPOCHS:-5} EPOCHS=${EPOCHS:-24} STEPS=${STEPS:-100}
limit=""
[[ -n ${SMOKE:-} ]] && limit="--limit-test 200"
milestone=$(( (EPOCHS * 3 + 3) / 4 ))
source "$(dirname "$0")/lib.sh"
export -f keep_small distill_kept
mkdir -p "$out"
teacher="$out/.work-teacher"
if [[ ! -f "$out/teacher/summary.json" ]]; then
  RAYON_NUM_THREADS=$TEACHER_THREADS "$MEKD" teacher train --arch lenet5 --epochs "$TEACHER_EPOCHS" --data "$data" $limit \
    --out "$teacher" >"$out/teacher.log" 2>&1
fi

common="--teacher-run $teacher --data $data --edge-fraction 0.1 --student lenet5-half --epochs $EPOCHS --batch 64 --milestones $milestone $limit"
mekd_flags="--gan-epochs $GAN_EPOCHS --generator-width 16 --gan-queries 8000 --im-weight max-response --budget 40000 --steps $STEPS"
jobs=()
for seed in "$@"; do
  jobs+=("mekd soft $seed" "mekd hard $seed")
done
for seed in "$@"; do jobs+=("kd soft $seed"); done
for method in dkd ml kn scratch; do jobs+=("$method soft $first_seed"); done

one() {
  local method=$1 response=$2 seed=$3 extra=""
  [[ $method == mekd ]] && extra=$mekd_flags
  # shellcheck disable=SC2086
  distill_kept "$out" "$method-$response-seed-$seed" --method "$method" --response "$response" --seed "$seed" \
    $common $extra
}
export -f one
export MEKD THREADS out common mekd_flags
printf '%s\n' "${jobs[@]}" | xargs -P "$JOBS" -L1 bash -c 'one "$@"' _ || true
finish_table "$out" "$teacher"
