#!/usr/bin/env bash
# `mekd bench-train --device flex` against PyTorch on the CPU of this machine (issue 20): the
# same three training steps with the same shapes in PyTorch (`scripts/pytorch-steps.py`),
# alternated RUNS times with `mekd bench-train`, both on 2 threads, both 2 warm-up and 5
# measured steps; one JSON file per tool and run in OUT, then a table of the means and ratios.
#   scripts/bench-train-vs-pytorch.sh [RUNS (3)] [OUT (runs/bench-vs-pytorch)]
# Optional: it installs torch (pinned, from PyPI; about 3 GB with the CUDA libraries it needs
# even to import) into .cache/torch-venv once. MEKD names the binary to time (default: the dev
# build, built first).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
RUNS="${1:-3}"
OUT="${2:-runs/bench-vs-pytorch}"
TORCH_VERSION="2.15.0"
VENV=.cache/torch-venv
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet "torch==$TORCH_VERSION"
fi
if [[ -z "${MEKD:-}" ]]; then
  cargo build --quiet -p mekd-trainer
  MEKD=target/debug/mekd
fi
mkdir -p "$OUT"
for i in $(seq 1 "$RUNS"); do
  "$VENV/bin/python" scripts/pytorch-steps.py --threads 2 --warmup 2 --steps 5 --json "$OUT/pytorch-steps-$i.json" 2>/dev/null
  RAYON_NUM_THREADS=2 "$MEKD" bench-train --device flex --warmup 2 --steps 5 --out "$OUT/bench-train-$i.json" >/dev/null
done
python3 - "$OUT" "$RUNS" <<'PY'
import json, statistics, sys
out, runs = sys.argv[1], int(sys.argv[2])
def medians(prefix):
    rows = {}
    for i in range(1, runs + 1):
        for row in json.load(open(f"{out}/{prefix}-{i}.json")):
            rows.setdefault(row["step"], []).append(row["median_ms"])
    return rows
ours, torch = medians("bench-train"), medians("pytorch-steps")
spread = lambda v: f"{statistics.mean(v):,.0f} +- {statistics.stdev(v) if len(v) > 1 else 0:,.0f}"
print(f"| step | mekd bench-train, flex (ms) | PyTorch (ms) | flex / PyTorch |")
print("| --- | ---: | ---: | ---: |")
for step, theirs in torch.items():
    mine = ours[step]
    print(f"| {step} | {spread(mine)} | {spread(theirs)} | {statistics.mean(mine) / statistics.mean(theirs):.2f}x |")
PY
