#!/usr/bin/env bash
# How much the CPU training's results move with the seed (and, run on two machines, with the
# machine): runs one configuration over several seeds, in parallel jobs of THREADS threads each,
# keeps each run's small files (configs, metrics, summaries; no checkpoints, pools or models) and
# prints mean +- std (sample std, n-1) of the final accuracies.
#
#   scripts/seed-spread.sh KIND OUT SEED...
#     KIND  demo     `mekd demo` (the README's main job)
#           tiny     `mekd demo --tiny` (the end-to-end test's configuration)
#           teacher  the teacher test's `mekd teacher train` (trainer/tests/teacher_train.rs)
#     OUT   folder for the runs: OUT/seed-N/
#   env: MEKD (default target/debug/mekd), THREADS per job (default 2), JOBS in parallel
#        (default 1), DATA (default data/mnist-slice)
set -euo pipefail
kind=$1 out=$2
shift 2
MEKD=${MEKD:-target/debug/mekd} THREADS=${THREADS:-2} JOBS=${JOBS:-1} DATA=${DATA:-data/mnist-slice}
export MEKD THREADS DATA kind out
mkdir -p "$out"
source "$(dirname "$0")/lib.sh"
export -f keep_small

one() {
  local seed=$1 dir="$out/seed-$1"
  local work="$out/.work-$seed"
  case $kind in
    demo) set -- demo --seed "$seed" --data "$DATA" --out "$work" ;;
    tiny) set -- demo --tiny --seed "$seed" --data "$DATA" --out "$work" ;;
    teacher) set -- teacher train --arch lenet5 --epochs 3 --batch 64 --lr 0.05 --milestones 2 \
      --limit-train 3000 --limit-test 500 --seed "$seed" --data "$DATA" --out "$work" ;;
    *) echo "unknown KIND $kind (demo, tiny or teacher)" >&2; return 2 ;;
  esac
  local started=$(date +%s)
  RAYON_NUM_THREADS=$THREADS "$MEKD" "$@" >"$work.log" 2>&1 || { echo "seed $seed failed: $work.log" >&2; return 1; }
  echo "seed $seed: $(( $(date +%s) - started )) s"
  keep_small "$work" "$dir"
  mv "$work.log" "$dir/log.txt"
}
export -f one
printf '%s\n' "$@" | xargs -P "$JOBS" -I{} bash -c 'one {}'

python3 - "$kind" "$out" <<'EOF'
import json, statistics, sys, pathlib
kind, out = sys.argv[1], pathlib.Path(sys.argv[2])
rows = {}
for d in sorted(out.glob("seed-*"), key=lambda p: int(p.name[5:])):
    if kind == "teacher":
        last = [json.loads(l) for l in (d / "metrics.jsonl").read_text().splitlines()][-1]
        vals = {"teacher": last["test_acc"]}
    else:
        s = json.loads((d / "summary.json").read_text())
        vals = {k: s[k]["accuracy"] for k in ("teacher", "mekd", "kd")}
        vals["teacher - mekd"] = vals["teacher"] - vals["mekd"]
    for k, v in vals.items():
        rows.setdefault(k, []).append(v)
for k, v in rows.items():
    sd = statistics.stdev(v) if len(v) > 1 else float("nan")
    print(f"{k:>15}: mean {statistics.mean(v):6.2f} +- {sd:5.2f} (n={len(v)}; min {min(v):.2f}, max {max(v):.2f}): "
          + " ".join(f"{x:.2f}" for x in v))
EOF
