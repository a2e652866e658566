#!/usr/bin/env python3
"""Print cubecl's persisted autotune choices for convolutions and matmuls, per key (shapes):
the fastest candidate and each candidate's median time or error. Reads the SQLite cache that
burn-wgpu writes under target/environment/ (e.g. the tuning.tar.gz that `scripts/gpu-runs.sh
profile` returns). Needs `pip install cbor2`.

usage: python3 scripts/tuning-report.py target/environment/default.db [NAME-FILTER]
"""
import sqlite3
import sys

import cbor2


def nanos(duration):
    return duration["secs"] * 1e9 + duration["nanos"]


def main():
    db, wanted = sys.argv[1], (sys.argv[2] if len(sys.argv) > 2 else "conv")
    rows = sqlite3.connect(db).execute("select namespace, key, value from entries where namespace like 'autotune/%'")
    for namespace, key, value in rows:
        op = namespace.rsplit("/", 1)[-1]
        if wanted not in op:
            continue
        key, value = cbor2.loads(key)["key"], cbor2.loads(value)
        fields = next(iter(key.values())) if isinstance(key, dict) and len(key) == 1 else key
        shown = {k: v for k, v in fields.items() if k not in ("checksum",)} if isinstance(fields, dict) else fields
        print(f"{op} {shown}")
        for i, result in enumerate(value["results"]):
            outcome = result["outcome"]
            mark = "*" if i == value["fastest_index"] else " "
            if "Ok" in outcome:
                ok = outcome["Ok"]
                print(f"   {mark} {ok['name']:<40} median {nanos(ok['computation']['median']) / 1e6:9.3f} ms")
            else:
                err = next(iter(outcome["Err"].values())) if isinstance(outcome["Err"], dict) else outcome["Err"]
                name = err.get("name", "?") if isinstance(err, dict) else "?"
                why = (err.get("err", "") if isinstance(err, dict) else str(err)).split("\n")[0]
                print(f"     {name:<40} error: {why[:90]}")


if __name__ == "__main__":
    main()
