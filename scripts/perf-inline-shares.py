#!/usr/bin/env python3
"""Share of a compiled kernel's perf samples per inlined function.

`perf annotate` attributes samples to instructions; in a kernel whose helpers are all inlined
(`#[inline(always)]`), the function an instruction came from is only in the debug line tables.
This maps each sampled address through `addr2line -i` and counts it under the outermost frame
whose function name is one of NAMES (else "other").

    perf annotate --stdio -s SYMBOL > ann.txt
    python3 scripts/perf-inline-shares.py ann.txt BINARY pad,transform,accumulate

BINARY needs line tables (the dev profile has them: `debug = "line-tables-only"`).
"""

import re
import subprocess
import sys
from collections import defaultdict


def main() -> None:
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    annotate, binary, names = sys.argv[1], sys.argv[2], set(sys.argv[3].split(","))
    samples = []
    with open(annotate) as f:
        for line in f:
            m = re.match(r"\s+([0-9.]+)\s+:\s+([0-9a-f]+):", line)
            if m and float(m.group(1)) > 0:
                samples.append((float(m.group(1)), int(m.group(2), 16)))
    if not samples:
        sys.exit(f"{annotate}: no sampled instructions (is it `perf annotate --stdio` output?)")
    lines = subprocess.run(
        ["addr2line", "-a", "-f", "-i", "-C", "-e", binary] + [hex(a) for _, a in samples],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split("\n")
    # Per address: its frames, innermost first, as (function, file:line) pairs.
    frames, current, i = {}, None, 0
    while i < len(lines):
        if lines[i].startswith("0x"):
            current = int(lines[i], 16)
            frames[current] = []
            i += 1
        elif lines[i] and i + 1 < len(lines):
            frames[current].append((lines[i], lines[i + 1]))
            i += 2
        else:
            i += 1
    shares = defaultdict(float)
    for percent, address in samples:
        label = "other"
        for function, _ in reversed(frames.get(address, [])):
            name = re.sub(r"<.*", "", function).split("::")[-1]
            if name in names:
                label = name
                break
        shares[label] += percent
    for label, percent in sorted(shares.items(), key=lambda item: -item[1]):
        print(f"{percent:6.2f} {label}")


if __name__ == "__main__":
    main()
