#!/usr/bin/env bash
# Fetch the pinned ONNX Runtime shared library from the PyPI `onnxruntime` wheel into
# .cache/onnxruntime/ (once). The `ort` crate loads it at run time (feature `load-dynamic`);
# mekd finds it there by itself, or through ORT_DYLIB_PATH.
#
#   scripts/fetch-onnxruntime.sh            # this machine's library; prints its path
#   scripts/fetch-onnxruntime.sh manylinux_2_28_aarch64
#                                           # another platform's (a board's: 64-bit Raspberry Pi
#                                           # OS, JetPack 5+), into .cache/onnxruntime/PLATFORM/
set -euo pipefail
VERSION="${ORT_PYPI_VERSION:-1.31.1}"
PLATFORM="${1:-}"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DEST="$ROOT/.cache/onnxruntime${PLATFORM:+/$PLATFORM}"
LIB="$(ls "$DEST"/libonnxruntime.so.* 2>/dev/null | head -n1 || true)"
if [[ -n "$LIB" && -f "$DEST/VERSION" && "$(cat "$DEST/VERSION")" == "$VERSION" ]]; then
  echo "$LIB"
  exit 0
fi
mkdir -p "$DEST/wheel"
PYTHON="${PYTHON:-python3}"
"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: ${PLATFORM:+--platform "$PLATFORM"} \
  -d "$DEST/wheel" "onnxruntime==$VERSION" >&2
WHEEL="$(ls "$DEST"/wheel/onnxruntime-"$VERSION"-*.whl | head -n1)"
"$PYTHON" - "$WHEEL" "$DEST" <<'PY'
import sys, zipfile, os, shutil
wheel, dest = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as z:
    names = [n for n in z.namelist() if os.path.basename(n).startswith("libonnxruntime.so")]
    if not names:
        sys.exit(f"{wheel} holds no libonnxruntime.so")
    for n in names:
        with z.open(n) as src, open(os.path.join(dest, os.path.basename(n)), "wb") as out:
            shutil.copyfileobj(src, out)
PY
rm -rf "$DEST/wheel"
echo "$VERSION" > "$DEST/VERSION"
ls "$DEST"/libonnxruntime.so.* | head -n1
