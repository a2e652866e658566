#!/usr/bin/env python3
"""Sum cubecl's per-kernel profile log (cubecl.toml: [profiling.logger] level = "medium") by
kernel family: total time, share, launches and mean time per launch. Each distinct kernel's
first launch is left out (it includes its compilation).

    python3 scripts/kernel-profile.py kernels.log[.gz] [--top N]
"""
import argparse
import collections
import gzip
import re

UNITS = (("ms", 1.0), ("µs", 1e-3), ("us", 1e-3), ("ns", 1e-6), ("s", 1e3))


def millis(text):
    text = text.strip()
    for unit, factor in UNITS:
        if text.endswith(unit):
            return float(text[: -len(unit)]) * factor
    raise ValueError(f"not a duration: {text!r}")


def family(parts):
    """The kernel's name without cubecl's hash suffix; generic kernels keep their first and last part."""
    last = re.sub(r"_[0-9a-f]{8}$", "", parts[-1])
    return last if len(parts) == 1 else f"{parts[0]}..{last}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("log")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    opener = gzip.open if args.log.endswith(".gz") else open
    seen, total, launches = set(), collections.Counter(), collections.Counter()
    with opener(args.log, "rt", encoding="utf-8") as lines:
        for line in lines:
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if len(cells) < 2:
                continue
            name = " | ".join(cells[1:])
            if name not in seen:
                seen.add(name)
                continue
            key = family(cells[1:])
            total[key] += millis(cells[0])
            launches[key] += 1
    whole = sum(total.values())
    print(f"{sum(launches.values())} launches, {whole:.1f} ms (first launch of each of {len(seen)} kernels left out)")
    for key, ms in total.most_common(args.top):
        n = launches[key]
        print(f"{ms:9.1f} ms {100 * ms / whole:5.1f}%  {n:6d} launches  {1000 * ms / n:7.1f} us each  {key[:100]}")


if __name__ == "__main__":
    main()
