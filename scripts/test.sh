#!/usr/bin/env bash
# The test command: fetch the pinned ONNX Runtime library and the peer tests' Python packages
# once (PyPI), then run every test.
#   scripts/test.sh [extra cargo test args]
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
export ORT_DYLIB_PATH="${ORT_DYLIB_PATH:-$(scripts/fetch-onnxruntime.sh)}"
export MEKD_PEER_PYTHON="${MEKD_PEER_PYTHON:-$(scripts/peer-venv.sh)}"
export MEKD_REQUIRE_PEERS=1
cargo test --workspace "$@"
