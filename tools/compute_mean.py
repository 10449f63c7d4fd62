#!/usr/bin/env python
"""Compute the per-pixel mean of a Datum database, as Caffe's compute_image_mean does.

Writes a 1 x C x H x W BlobProto (legacy dims) usable as transform_param mean_file, and prints
the per-channel means (for mean_value). The output is written to a temporary file and renamed.
"""

from __future__ import annotations

import argparse
import sys

from nincc.data.convert import compute_mean, run_tool, write_mean


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="compute_mean.py", description=__doc__.splitlines()[0])
    p.add_argument("input", help="the database (LMDB or LevelDB directory)")
    p.add_argument("output", nargs="?", help="mean file to write (binaryproto)")
    p.add_argument("--backend", default="lmdb", choices=["lmdb", "leveldb"])
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> None:
        mean, count = compute_mean(args.input, args.backend)
        print(f"processed {count} records")
        if args.output:
            write_mean(mean, args.output)
            print(f"wrote {args.output} ({'x'.join(map(str, mean.shape))})")
        for c, v in enumerate(mean[0].reshape(mean.shape[1], -1).mean(axis=1)):
            print(f"mean_value channel [{c}]: {v:.6g}")

    return run_tool("compute_mean.py", body)


if __name__ == "__main__":
    sys.exit(main())
