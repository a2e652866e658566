#!/usr/bin/env bash
# Make (once) the Python environment of the peer tests (tests/tests/peers.rs): KServe's model
# server and NVIDIA's tritonclient, pinned, from PyPI, in .cache/peer-venv/. Prints its python.
#
#   scripts/peer-venv.sh
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
VENV="$ROOT/.cache/peer-venv"
PINS="kserve==0.21.0 tritonclient[http]==2.73.0 onnxruntime==1.31.1 numpy==2.4.6"
if [[ ! -f "$VENV/PINS" || "$(cat "$VENV/PINS")" != "$PINS" ]]; then
  rm -rf "$VENV"
  "${PYTHON:-python3}" -m venv "$VENV" >&2
  # shellcheck disable=SC2086
  "$VENV/bin/pip" install --quiet --only-binary=:all: $PINS >&2
  echo "$PINS" > "$VENV/PINS"
fi
echo "$VENV/bin/python"
