#!/usr/bin/env bash
# A sysroot for running aarch64 binaries under qemu-user as on a Raspberry Pi 4: Debian's
# cross libraries (/usr/aarch64-linux-gnu) plus the /proc/cpuinfo of a 4-core Cortex-A72.
# qemu 7 passes the host's x86 /proc/cpuinfo through to the guest, and ONNX Runtime's CPU
# detection (pytorch/cpuinfo) crashes on it; qemu opens a path under -L before the host's.
# tract does not need it (it reads the CPU's features from auxv). Prints the sysroot's path.
#
#   QEMU_CPU=cortex-a72 qemu-aarch64 -L "$(scripts/qemu-sysroot.sh)" BINARY ...
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
CROSS=/usr/aarch64-linux-gnu
DEST="$ROOT/.cache/qemu-sysroot-aarch64"
[[ -d "$CROSS/lib" ]] || { echo "error: $CROSS/lib missing (apt-get install gcc-aarch64-linux-gnu)" >&2; exit 1; }
mkdir -p "$DEST/proc"
ln -sfn "$CROSS/lib" "$DEST/lib"
for cpu in 0 1 2 3; do
  printf 'processor\t: %s\nBogoMIPS\t: 108.00\nFeatures\t: fp asimd evtstrm crc32 cpuid\nCPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x0\nCPU part\t: 0xd08\nCPU revision\t: 3\n\n' "$cpu"
done > "$DEST/proc/cpuinfo"
echo "$DEST"
