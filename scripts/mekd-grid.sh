#!/usr/bin/env bash
# A settings study for MEKD at the demo's scale on the CPU: a LeNet-5 teacher trained on DATA
# (5 epochs, seed 0), then for every CONFIG line and every SEED a LeNet-5-half student distilled
# from it in-process (soft answers, 10% of the training split as edge images, a budget of 50,000
# queries: 8,000 deprivatizing, a pool of 40,000). Each run's small files (config, metrics,
# summary; no checkpoints, pools or models) land in OUT/<config>-seed-N/, the teacher's in
# OUT/teacher/, and `mekd report` writes OUT/report/ (one row per configuration, mean +- std
# over the seeds, n).
#
#   scripts/mekd-grid.sh DATA OUT CONFIGS SEED...
#   CONFIGS: a file, one configuration per line: a name, then the `mekd distill` flags that
#            differ from the demo's (blank lines and lines starting with # are skipped), e.g.
#              demo
#              tau2        --tau 2
#              gan26-e32   --gan-epochs 26 --epochs 32 --milestones 24
#   env: MEKD (default target/debug/mekd), THREADS per job (default 1), JOBS in parallel
#        (default: one per configuration and seed), TEACHER_THREADS (default 4), TEACHER_EPOCHS
#        (default 5; fewer only for a quick try of the script)
#
# A configuration's flags (each `--flag value`) replace the demo's (`mekd demo`,
# trainer/src/demo.rs) of the same name: 52 GAN epochs, generator width 16, 8,000 deprivatization
# queries, the paper's IM weight, a pool of 40,000, 24 student epochs of 100 steps of 64, one
# decay at epoch 18, SGD lr 0.1.
set -euo pipefail
data=$1 out=$2 configs=$3
shift 3
MEKD=${MEKD:-target/debug/mekd} THREADS=${THREADS:-1} TEACHER_THREADS=${TEACHER_THREADS:-4}
source "$(dirname "$0")/lib.sh"
export -f keep_small distill_kept
mkdir -p "$out"
cp "$configs" "$out/configs.txt"
teacher="$out/.work-teacher"
if [[ ! -f "$out/teacher/summary.json" ]]; then
  RAYON_NUM_THREADS=$TEACHER_THREADS "$MEKD" teacher train --arch lenet5 --epochs "${TEACHER_EPOCHS:-5}" --data "$data" \
    --out "$teacher" >"$out/teacher.log" 2>&1
fi

demo="--method mekd --response soft --teacher-run $teacher --data $data --edge-fraction 0.1 --student lenet5-half
  --gan-epochs 52 --generator-width 16 --gan-queries 8000 --im-weight max-response --budget 40000
  --epochs 24 --steps 100 --batch 64 --milestones 18 --lr 0.1"

# with_overrides FLAGS...: the demo's flags, each replaced by FLAGS' value of the same name, then
# FLAGS' others (clap refuses a flag given twice).
with_overrides() {
  local -A over=()
  local -a order=() merged=()
  while (($#)); do
    [[ -v over[$1] ]] || order+=("$1")
    over[$1]=$2
    shift 2
  done
  # shellcheck disable=SC2086
  set -- $demo
  while (($#)); do
    if [[ -v over[$1] ]]; then merged+=("$1" "${over[$1]}"); unset "over[$1]"; else merged+=("$1" "$2"); fi
    shift 2
  done
  for flag in "${order[@]}"; do [[ -v over[$flag] ]] && merged+=("$flag" "${over[$flag]}"); done
  echo "${merged[@]}"
}
jobs=()
while read -r name flags; do
  [[ -z $name || $name == \#* ]] && continue
  # no trailing blank: xargs -L1 would join the next line to this one
  for seed in "$@"; do jobs+=("$seed $name${flags:+ $flags}"); done
done <"$configs"

one() {
  local seed=$1 name=$2
  shift 2
  local flags
  flags=$(with_overrides "$@")
  # shellcheck disable=SC2086
  distill_kept "$out" "$name-seed-$seed" $flags --seed "$seed"
}
export -f one with_overrides
export MEKD THREADS out demo
printf '%s\n' "${jobs[@]}" | xargs -P "${JOBS:-${#jobs[@]}}" -L1 bash -c 'one "$@"' _ || true
finish_table "$out" "$teacher"
