#!/usr/bin/env python3
"""Write the embedded MNIST slice (data/mnist-slice/) from the full MNIST IDX files.

Takes the first 10,000 training and the first 2,000 test images (and labels) of the official
MNIST files, unchanged, and writes them as gzip IDX files with a fixed gzip timestamp so the
output is byte-reproducible.

    python3 scripts/make-embedded-mnist.py ../shared/data/mnist data/mnist-slice
"""
import gzip
import struct
import sys
from pathlib import Path

TRAIN, TEST = 10_000, 2_000


def read_idx(path: Path) -> tuple[list[int], bytes]:
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    rank = raw[3]
    dims = list(struct.unpack(f">{rank}I", raw[4 : 4 + 4 * rank]))
    return dims, raw[4 + 4 * rank :]


def write_idx(path: Path, dims: list[int], body: bytes) -> None:
    header = bytes([0, 0, 8, len(dims)]) + struct.pack(f">{len(dims)}I", *dims)
    with open(path, "wb") as f:
        with gzip.GzipFile(filename="", mode="wb", fileobj=f, mtime=0, compresslevel=9) as gz:
            gz.write(header + body)


def main() -> None:
    src, dst = Path(sys.argv[1]), Path(sys.argv[2])
    dst.mkdir(parents=True, exist_ok=True)
    for split, prefix, n in [("train", "train", TRAIN), ("test", "t10k", TEST)]:
        dims, body = read_idx(src / f"{prefix}-images-idx3-ubyte.gz")
        size = dims[1] * dims[2]
        write_idx(dst / f"{split}-images-idx3-ubyte.gz", [n, dims[1], dims[2]], body[: n * size])
        _, labels = read_idx(src / f"{prefix}-labels-idx1-ubyte.gz")
        write_idx(dst / f"{split}-labels-idx1-ubyte.gz", [n], labels[:n])


if __name__ == "__main__":
    main()
