#!/usr/bin/env bash
# The test command: fetch the pinned ONNX Runtime library once (PyPI), then run every test.
#   scripts/test.sh [extra cargo test args]
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
export ORT_DYLIB_PATH="${ORT_DYLIB_PATH:-$(scripts/fetch-onnxruntime.sh)}"
cargo test --workspace "$@"
