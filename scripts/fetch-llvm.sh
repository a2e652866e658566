#!/usr/bin/env bash
# Install the static LLVM that burn's CUDA backend links (the trainer's `cuda` feature:
# cubecl-cuda -> cubecl-llvm) from PyPI, where its build script looks for it, so that
# `cargo build --features cuda` downloads nothing.
#
# cubecl-llvm's build dependency tracel-llvm-bundler would download an LLVM archive from GitHub
# unless `$XDG_DATA_HOME/tracel/tracel-llvm-VERSION/.tracel-llvm-installed` exists (without
# XDG_DATA_HOME: ~/.local/share). This script installs the pinned PyPI wheels
# mlc-llvm-static and mlc-llvm-static-extra-targets (static LLVM 23.1 libraries, headers and an
# llvm-config; the second adds the NVPTX target; about 92 MB) into .cache/llvm/ (once), links
# that folder where the bundler looks, and writes the marker. Prints the linked folder.
#
#   scripts/fetch-llvm.sh
set -euo pipefail
VERSION="23.1.1.post0"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DEST="$ROOT/.cache/llvm"
PYTHON="${PYTHON:-python3}"
# The folder name the bundler of Cargo.lock expects: tracel-llvm-<its version>.
BUNDLER="$(grep -A1 '^name = "tracel-llvm-bundler"$' "$ROOT/Cargo.lock" | sed -n 's/^version = "\(.*\)"$/\1/p')"
if [[ -z "$BUNDLER" ]]; then
  echo "error: Cargo.lock holds no tracel-llvm-bundler (is the cuda feature gone?)" >&2
  exit 1
fi
if [[ ! -x "$DEST/mlc_llvm_static/static/bin/llvm-config" || "$(cat "$DEST/VERSION" 2>/dev/null)" != "$VERSION" ]]; then
  rm -rf "$DEST"
  "$PYTHON" -m pip install --quiet --no-deps --only-binary=:all: --target "$DEST" \
    "mlc-llvm-static==$VERSION" "mlc-llvm-static-extra-targets==$VERSION" >&2
  echo "$VERSION" > "$DEST/VERSION"
fi
PREFIX="$DEST/mlc_llvm_static/static"
if ! "$PREFIX/bin/llvm-config" --targets-built | grep -qw NVPTX; then
  echo "error: $PREFIX lacks the NVPTX target (mlc-llvm-static-extra-targets)" >&2
  exit 1
fi
LINK="${XDG_DATA_HOME:-$HOME/.local/share}/tracel/tracel-llvm-$BUNDLER"
mkdir -p "$(dirname "$LINK")"
if [[ -d "$LINK" && ! -L "$LINK" ]]; then
  echo "$LINK is a real folder (an LLVM the bundler installed itself?): left as it is" >&2
else
  # Only what is missing: the build scripts rerun (and burn-cuda rebuilds) when the marker's
  # modification time changes.
  [[ "$(readlink "$LINK" 2>/dev/null)" == "$PREFIX" ]] || ln -sfn "$PREFIX" "$LINK"
  [[ -e "$LINK/.tracel-llvm-installed" ]] || touch "$LINK/.tracel-llvm-installed"
fi
echo "$LINK"
