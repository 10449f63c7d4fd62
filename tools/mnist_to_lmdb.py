#!/usr/bin/env python
"""Convert MNIST's IDX files to train/test Datum databases, as Caffe's convert_mnist_data does.

The input folder holds train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte
and t10k-labels-idx1-ubyte (each optionally .gz). Writes <out>/mnist_train_<backend> and
<out>/mnist_test_<backend>: 1 x 28 x 28 uint8 records keyed %08d in file order.
"""

from __future__ import annotations

import argparse
import os
import sys

from nincc.data.convert import run_tool, write_array_db
from nincc.data.datasets import read_mnist


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mnist_to_lmdb.py", description=__doc__.splitlines()[0])
    p.add_argument("input", help="folder with the four MNIST IDX files")
    p.add_argument("output", help="folder for the databases (created if missing)")
    p.add_argument("--backend", default="lmdb", choices=["lmdb", "leveldb"])
    p.add_argument("--overwrite", action="store_true", help="replace existing databases")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> None:
        data = read_mnist(args.input)
        for split in ("train", "test"):
            x, y = data[split]
            path = os.path.join(args.output, f"mnist_{split}_{args.backend}")
            write_array_db(path, x, y, args.backend, 8, args.overwrite)
            print(f"wrote {len(x)} records to {path}")

    return run_tool("mnist_to_lmdb.py", body)


if __name__ == "__main__":
    sys.exit(main())
