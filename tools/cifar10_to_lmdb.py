#!/usr/bin/env python
"""Convert CIFAR-10 to train/test Datum databases, as Caffe's convert_cifar_data does.

The input is cifar-10-binary.tar.gz or cifar-10-python.tar.gz, or the folder extracted from
either. Writes <out>/cifar10_train_<backend> (50000 records, keys %05d, batches 1..5 in order)
and <out>/cifar10_test_<backend> (10000). Records hold R, G, B planes (Caffe's CIFAR example
keeps the dataset's channel order). --gcn-zca applies the NIN paper's preprocessing instead:
global contrast normalisation (scale 55) then ZCA whitening (bias 0.1) fitted on the training
set, stored as float_data records (use no mean or scale in transform_param then).
"""

from __future__ import annotations

import argparse
import os
import sys

from nincc.data.convert import compute_mean, run_tool, write_array_db, write_mean
from nincc.data.datasets import gcn_zca, read_cifar10


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cifar10_to_lmdb.py", description=__doc__.splitlines()[0])
    p.add_argument("input", help="CIFAR-10 .tar.gz (binary or python version) or its folder")
    p.add_argument("output", help="folder for the databases (created if missing)")
    p.add_argument("--backend", default="lmdb", choices=["lmdb", "leveldb"])
    p.add_argument("--gcn-zca", action="store_true", help="GCN + ZCA whitening (NIN paper)")
    p.add_argument("--gcn-scale", type=float, default=55.0, help="GCN scale (default 55)")
    p.add_argument("--zca-bias", type=float, default=0.1, help="ZCA eigenvalue bias (0.1)")
    p.add_argument("--mean", action="store_true", help="also write mean.binaryproto of train")
    p.add_argument("--overwrite", action="store_true", help="replace existing databases")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> None:
        data = read_cifar10(args.input)
        (xtr, ytr), (xte, yte) = data["train"], data["test"]
        print(f"read {len(xtr)} training and {len(xte)} test images")
        if args.gcn_zca:
            print("fitting GCN + ZCA on the training set")
            xtr, xte = gcn_zca(xtr, xte, args.gcn_scale, args.zca_bias)
        train = os.path.join(args.output, f"cifar10_train_{args.backend}")
        test = os.path.join(args.output, f"cifar10_test_{args.backend}")
        write_array_db(train, xtr, ytr, args.backend, 5, args.overwrite)
        write_array_db(test, xte, yte, args.backend, 5, args.overwrite)
        print(f"wrote {train} and {test}")
        if args.mean:
            mean, _ = compute_mean(train, args.backend)
            path = os.path.join(args.output, "mean.binaryproto")
            write_mean(mean, path)
            print(f"wrote {path}")

    return run_tool("cifar10_to_lmdb.py", body)


if __name__ == "__main__":
    sys.exit(main())
