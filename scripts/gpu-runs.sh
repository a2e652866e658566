#!/bin/bash
# The H200 runs of results/ (issue 5/7), as driven through the device tool: the binary
# (cargo build -p mekd-trainer --features wgpu; strip; xz) and MNIST travel in .device/, the
# Vulkan loader packages in .gl/ (see the device tool README). Verbs: phaseA (teacher + bench +
# launch), phaseB SECONDS (wait, collect to $OUT), phaseC SECONDS (unpack a teacher, launch, wait);
# full SECONDS (the issue's schedule with the committed teacher: launch, wait, collect), then
# phaseB SECONDS in a call chained right after it (the machine stays warm for 30 s only);
# verify SECONDS (self-test and step benchmark on GPU 0, then the MEKD runs of `full` on GPUs
# 1-3 if the self-test passed; wait, collect); single SECONDS (the same on a one-GPU machine, MEKD
# soft and hard only), then resumeB SECONDS in each chained call: it also returns unfinished runs
# whole, so that a later machine can continue them with `distill ... --resume`: copy those
# *.resume.tar.gz files to .device/resume/ and call resume_pair SECONDS (then resumeB SECONDS).
# profile: the step benchmark, then with cubecl's per-kernel and autotune logs, then tuned extensively.
# probe: the self-test, then the step benchmark twice on one tuning cache.
# repeat N: the step benchmark N times on one tuning cache (the spread on one machine).
# graphs SECONDS: the self-test, then the step benchmark with --graphs up to four times.
# commands: the training commands on the embedded MNIST slice, op by op and with CUDA graphs.
# cuda_soft SECONDS (issue 21): MEKD soft on the issue's schedule on burn-cuda, alone on GPU 0.
# Backend: DEV=cuda for a `--features cuda` build (no Vulkan loaders needed), wgpu by default.
# Data: DATA=DIR when MNIST travels apart from the binary (the carry limit): a first call carries
# it and copies it to /tmp (carried folders do not outlive their call, /tmp does while the
# machine stays warm), the next carries .device and runs with DATA=/tmp/mnist.
# usage: bash scripts/gpu-runs.sh VERB [ARGS]
set -u
cd "$(dirname "$0")/.."  # repository root
export ORT_DYLIB_PATH=/tmp/libonnxruntime.so
M=${M:-/tmp/mekd}  # M=/tmp/mekd-vk keeps a second build apart from a running one
D=${D:-.device}  # the carried folder with mekd.xz and libonnxruntime.so.xz (D=.device-vk: the `vulkan` build)
DEV=${DEV:-wgpu}  # the --device backend: wgpu or cuda
DATA=${DATA:-.device/mnist}
setup() {
  # /tmp can outlive a lease: unpack again whenever the carried binary changed.
  # A call that carries only data (the carry limit) keeps the binary unpacked by an earlier one.
  if [ -f $D/mekd.xz ] && { [ ! -x $M ] || [ "$(cat $M.sum 2>/dev/null)" != "$(cksum < $D/mekd.xz)" ]; }; then
    if [ "$DEV" = wgpu ]; then for f in .gl/*.deb; do dpkg -x $f /; done; ldconfig; fi
    xz -dc $D/mekd.xz > $M; chmod +x $M; cksum < $D/mekd.xz > $M.sum
    [ -f $D/libonnxruntime.so.xz ] && xz -dc $D/libonnxruntime.so.xz > /tmp/libonnxruntime.so
  fi
  if [ "$DEV" = wgpu ] && ! ldconfig -p | grep -q libvulkan; then echo "no libvulkan"; fi
  [ -f /usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json ] && export VK_DRIVER_FILES=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
  mkdir -p runs/gpu
}
teacher() {  # GPU $1
  CUBECL_ENVIRONMENT=teacher setsid nohup $M teacher train --arch resnet32 --data $DATA --epochs 15 \
    --milestones 8,12 --device $DEV:$1 --out runs/gpu/teacher > runs/gpu/teacher.log 2>&1 < /dev/null &
}
TEACHER=${TEACHER:-runs/gpu/teacher}
distill() {  # NAME GPU ARGS...
  local name=$1 gpu=$2; shift 2
  CUBECL_ENVIRONMENT=$name setsid nohup $M distill --teacher-run $TEACHER --data $DATA \
    --edge-fraction 0.1 --student resnet8 --epochs 30 --milestones 10,20 --device $DEV:$gpu --out runs/gpu/$name "$@" >> runs/gpu/$name.log 2>&1 < /dev/null &
}
json_off() {  # bench-train's stderr rows (the "  part:" ones too) without its JSON on stdout
  grep -v '^\s*[][{}"]'
}
bench() {  # GPU NAME
  CUBECL_ENVIRONMENT=bench $M bench-train --device $DEV:$1 --http --warmup 20 --steps 50 --out $OUT/$2.json 2>&1 | json_off
}
chain() {  # run distill specs one after another in the background: "name gpu args;name gpu args"
  setsid nohup bash -c "$1" > /dev/null 2>&1 < /dev/null &
}
launch_short() {
  S="--gan-epochs 20 --steps 100"
  distill mekd-soft 0 $S --response soft --im-weight class-index
  distill mekd-hard 1 $S --response hard --im-weight class-index
  distill kd-soft 2 $S --method kd --response soft
  distill kd-hard 2 $S --method kd --response hard
  distill mekd-soft-10k 3 $S --response soft --gan-queries 4000 --budget 6000 --max-queries 10000
  distill mekd-hard-10k 3 $S --response hard --budget 10000 --max-queries 10000
}
F="--gan-epochs 40 --steps 500"  # the issue's schedule: GAN 40 epochs, 30 x 500 steps
B="--im-weight class-index --gan-queries 4000 --budget 6000 --max-queries 10000"  # 10k budget
launch_mekd_full() {  # MEKD soft and hard on GPUs 1 and 2, the soft 10k run on GPU 3
  TEACHER=results/mnist-resnet32-resnet8-h200-short/teacher
  distill mekd-soft 1 $F --response soft --im-weight class-index
  distill mekd-hard 2 $F --response hard --im-weight class-index
  distill mekd-soft-10k 3 $F --response soft $B
}
full() {  # everything of results/mnist-resnet32-resnet8-h200
  launch_mekd_full
  distill kd-soft 3 $F --method kd --response soft
  distill kd-hard 3 $F --method kd --response hard
  bench 0 bench
  distill mekd-hard-10k 0 $F --response hard $B
  distill kd-soft-10k 0 $F --method kd --response soft --budget 10000 --max-queries 10000
  phaseB $1
}
self_test() {  # [--verbose]: the GPU's numbers against flex, printed and kept in $OUT/self-test.txt;
  # the exit status is the self-test's
  CUBECL_ENVIRONMENT=bench $M self-test --device $DEV:0 "$@" > $OUT/self-test.txt 2>&1
  local ok=$?
  cat $OUT/self-test.txt
  return $ok
}
verify() {
  if self_test --verbose; then
    launch_mekd_full
    distill mekd-hard-10k 3 $F --response hard $B
    echo launched
  fi
  bench 0 bench
  phaseB $1
}
single() {  # one GPU: self-test, step benchmark, then MEKD soft + hard side by side; wait, collect
  self_test --verbose
  local ok=$?
  bench 0 bench
  if [ "$ok" = 0 ]; then
    mekd_pair
    echo launched
  fi
  resumeB $1
}
mekd_pair() {  # MEKD soft and hard side by side (ARGS: e.g. --resume); PAIR_GPUS="0 1" on a 2-GPU machine
  TEACHER=results/mnist-resnet32-resnet8-h200-short/teacher
  local gpus=(${PAIR_GPUS:-0 0})
  distill mekd-soft ${gpus[0]} $F --response soft --im-weight class-index "$@"
  distill mekd-hard ${gpus[1]} $F --response hard --im-weight class-index "$@"
}
resume_pair() {  # SECONDS: continue the runs that resumeB returned (copied to .device/resume/)
  for f in .device/resume/*.resume.tar.gz; do tar xzf $f -C runs/gpu; done
  mekd_pair --resume
  resumeB $1
}
cuda_soft() {  # SECONDS: launch MEKD soft on the issue's schedule, wait, collect (resumeB)
  TEACHER=results/mnist-resnet32-resnet8-h200-short/teacher
  distill mekd-soft 0 $F --response soft --im-weight class-index
  resumeB $1
}
profile() {  # why a step costs what it does: the step benchmark as `bench` tunes it (repo root, the
  # same persistent tuning), then again with cubecl's per-kernel log and autotune log (a cubecl.toml
  # in the repo root, removed after), then with a fresh, extensive autotune level; the self-test
  # first (a new build, e.g. D=.device-vk, must compute the right numbers before its times count)
  self_test | tail -3
  bench 0 bench
  printf '[profiling.logger]\nlevel = "medium"\nfile = "/tmp/prof/kernels.log"\n[autotune.logger]\nlevel = "full"\nfile = "/tmp/prof/autotune.log"\n' > cubecl.toml
  mkdir -p /tmp/prof && CUBECL_ENVIRONMENT=bench $M bench-train --device $DEV:0 --warmup 5 --steps 5 2>&1 | json_off
  rm cubecl.toml
  for f in kernels autotune; do gzip -c /tmp/prof/$f.log > $OUT/$f.log.gz; done
  CUBECL_AUTOTUNE_LEVEL=extensive CUBECL_ENVIRONMENT=extensive $M bench-train --device $DEV:0 --warmup 10 --steps 20 --out $OUT/bench-extensive.json 2>&1 | json_off
  tar czf $OUT/tuning.tar.gz target/environment  # the tuning choices, by key (shapes), of both
}
probe() {  # the self-test (with its full-size generator check on a GPU), then the step benchmark
  # twice on one tuning cache (the second warm), to compare the loss's parts in isolation
  self_test
  for n in 1 2; do
    CUBECL_ENVIRONMENT=bench $M bench-train --device $DEV:0 --warmup 20 --steps 50 --out $OUT/bench-$n.json 2>&1 | json_off
  done
}
repeat() {  # N: the step benchmark N times on one tuning cache (the first one tunes it), for the
  # spread of the steps on one machine; stops starting new ones after 430 s of the call
  for n in $(seq 1 ${1:-4}); do
    [ $SECONDS -lt 430 ] || break
    CUBECL_ENVIRONMENT=bench $M bench-train --device $DEV:0 --warmup 10 --steps 30 --out $OUT/bench-repeat-$n.json 2>&1 | json_off
  done
}
graphs() {  # SECONDS (issue 21, session 20): the self-test (with its graph-step checks), then the
  # step benchmark with --graphs (each step also recorded as a CUDA graph and replayed) up to four
  # times on one tuning cache (the first tunes it); stops starting new ones after SECONDS
  self_test | tail -5
  for n in 1 2 3 4; do
    [ $SECONDS -lt ${1:-400} ] || break
    CUBECL_ENVIRONMENT=bench $M bench-train --device $DEV:0 --graphs --warmup 20 --steps 50 --out $OUT/bench-graphs-$n.json 2>&1 | json_off
  done
}
commands() {  # [MODES] (issue 21, session 21) the training commands on the embedded MNIST slice, op
  # by op (mode ops: MEKD_NO_GRAPHS=1) and replaying CUDA graphs (mode graphs), in the order given
  # (default: ops graphs), on one tuning cache (the first run tunes it): ResNet32 teacher, then
  # MEKD (GAN on the whole slice, ResNet8 student); run files to $OUT
  local S=data/mnist-slice
  for mode in ${1:-ops graphs}; do
    local no=""; [ $mode = ops ] && no=1
    MEKD_NO_GRAPHS=$no CUBECL_ENVIRONMENT=bench $M teacher train --arch resnet32 --data $S --epochs 4 \
      --device $DEV:0 --out runs/gpu/teacher-$mode > $OUT/teacher-$mode.log 2>&1
    MEKD_NO_GRAPHS=$no CUBECL_ENVIRONMENT=bench $M distill --teacher-run runs/gpu/teacher-$mode --data $S \
      --edge-fraction 1 --student resnet8 --gan-epochs 4 --epochs 3 --steps 100 --device $DEV:0 \
      --out runs/gpu/mekd-$mode > $OUT/mekd-$mode.log 2>&1
    for run in teacher-$mode mekd-$mode; do
      mkdir -p $OUT/$run; cp runs/gpu/$run/*.json runs/gpu/$run/*.jsonl $OUT/$run/ 2>/dev/null
    done
  done
}
resumeB() {  # like phaseB, and also return each unfinished run whole (checkpoints, generator), to resume
  phaseB $1
  for d in $(ls -d runs/gpu/*/ 2>/dev/null); do n=$(basename $d)
    [ -f $d/summary.json ] || tar czf $OUT/$n.resume.tar.gz --exclude=samples -C runs/gpu $n $n.log
  done
}
phaseA() {
  teacher 0
  CUBECL_ENVIRONMENT=bench $M bench-train --device $DEV:1 --warmup 20 --steps 50 --out $OUT/bench-breakdown.json 2>&1 | json_off
  while [ ! -f runs/gpu/teacher/summary.json ] && [ $SECONDS -lt 560 ]; do sleep 3; done
  tail -3 runs/gpu/teacher.log
  if [ -f runs/gpu/teacher/summary.json ]; then
    launch_short && echo launched
    tar czf $OUT/teacher.tar.gz -C runs/gpu teacher/config.json teacher/summary.json teacher/metrics.jsonl teacher/teacher.onnx teacher/checkpoints teacher.log
  fi
}
phaseC() {
  mkdir -p runs/gpu && tar xzf .device/teacher.tar.gz -C runs/gpu
  launch_short
  phaseB $1
}
phaseB() {  # collect at $1 seconds at the latest
  while pgrep -f "/tmp/mekd" > /dev/null && [ $SECONDS -lt $1 ]; do sleep 5; done
  status; collect
}
launch() {
  distill mekd-soft 0 --response soft
  distill mekd-soft-10k 0 --response soft --im-weight max-response --gan-queries 4000 --budget 6000 --max-queries 10000
  distill mekd-hard 1 --response hard
  distill mekd-hard-10k 1 --response hard --im-weight max-response --budget 10000 --max-queries 10000
  distill kd-soft 2 --method kd --response soft
  distill kd-hard 2 --method kd --response hard --budget 10000 --max-queries 10000
  distill kn-soft 3 --method kn --response soft
  distill dkd-soft 3 --method dkd --response soft
  distill ml-soft 3 --method ml --response soft
  distill scratch 3 --method scratch
}
phase1() {
  teacher 1
  nvidia-smi -L
  bench 0 bench-cold; bench 0 bench-warm
  while [ ! -f runs/gpu/teacher/summary.json ] && [ $SECONDS -lt 530 ]; do sleep 5; done
  tail -3 runs/gpu/teacher.log
  [ -f runs/gpu/teacher/summary.json ] && launch && echo launched
}
status() {
  for f in runs/gpu/*.log; do echo "== $f"; grep -v '^\s*$' $f | tail -2; done
}
wait_all() {  # seconds
  while pgrep -f "/tmp/mekd" > /dev/null && [ $SECONDS -lt $1 ]; do sleep 10; done
  status
}
collect() {
  mkdir -p /tmp/res
  for d in $(ls -d runs/gpu/*/ 2>/dev/null); do n=$(basename $d); mkdir -p /tmp/res/$n
    (cd $d && cp -r $(ls | grep -v -e checkpoints -e transfer.pool -e samples) /tmp/res/$n/ 2>/dev/null)
    [ -d $d/samples ] && mkdir -p /tmp/res/$n/samples && cp $(ls -v $d/samples/*.png | tail -1) /tmp/res/$n/samples/
  done
  cp runs/gpu/*.log /tmp/res/ 2>/dev/null
  tar czf $OUT/results.tar.gz -C /tmp/res .
}
setup; "$@"
