#!/usr/bin/env python
"""Write scikit-learn's bundled handwritten digits as train/test Datum databases.

1797 grey 8x8 digits (shipped inside scikit-learn, no download), values 0..16 scaled to 0..255,
split by a seeded permutation (default 1497 train / 300 test, stored in permuted order since
Caffe's Data layer reads sequentially). --size enlarges each image by pixel replication to a
multiple of 8. Writes <out>/digits_train_<backend>, <out>/digits_test_<backend> (keys %08d)
and, with --mean, <out>/digits_mean.binaryproto of the training set.
"""

from __future__ import annotations

import argparse
import os
import sys

from nincc.data.convert import compute_mean, run_tool, write_array_db, write_mean
from nincc.data.datasets import read_digits


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="digits_to_lmdb.py", description=__doc__.splitlines()[0])
    p.add_argument("output", help="folder for the databases (created if missing)")
    p.add_argument("--size", type=int, default=8, help="image side, a multiple of 8 (default 8)")
    p.add_argument("--test-count", type=int, default=300, help="test images (default 300)")
    p.add_argument("--seed", type=int, default=0, help="split seed (default 0)")
    p.add_argument("--backend", default="lmdb", choices=["lmdb", "leveldb"])
    p.add_argument("--mean", action="store_true", help="also write digits_mean.binaryproto")
    p.add_argument("--overwrite", action="store_true", help="replace existing databases")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> None:
        data = read_digits(args.size, args.test_count, args.seed)
        for split in ("train", "test"):
            x, y = data[split]
            path = os.path.join(args.output, f"digits_{split}_{args.backend}")
            write_array_db(path, x, y, args.backend, 8, args.overwrite)
            print(f"wrote {len(x)} records ({'x'.join(map(str, x.shape[1:]))}) to {path}")
        if args.mean:
            train = os.path.join(args.output, f"digits_train_{args.backend}")
            mean, _ = compute_mean(train, args.backend)
            path = os.path.join(args.output, "digits_mean.binaryproto")
            write_mean(mean, path)
            print(f"wrote {path}")

    return run_tool("digits_to_lmdb.py", body)


if __name__ == "__main__":
    sys.exit(main())
