#!/usr/bin/env python
"""Build a Datum database (LMDB or LevelDB) from images, as Caffe's convert_imageset does.

The input is an image folder with one subfolder per class (classes numbered in sorted name order)
or a list file of `path label` lines (paths relative to --root, default the list's folder).
Records are keyed `%08d_<path>`; raw records hold B, G, R planes (or grey), --encoded records the
image file itself. The database is written to a temporary sibling and renamed when complete.
"""

from __future__ import annotations

import argparse
import os
import sys

from nincc.data.convert import convert_imageset, run_tool
from nincc.data.images import image_files_by_class, read_list_file
from nincc.errors import DataError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="make_lmdb.py", description=__doc__.splitlines()[0])
    p.add_argument("input", help="image folder (one subfolder per class) or list file")
    p.add_argument("output", help="database to create (a directory)")
    p.add_argument("--root", default=None, help="folder the list file's paths are relative to")
    p.add_argument("--backend", default="lmdb", choices=["lmdb", "leveldb"])
    p.add_argument("--resize-height", type=int, default=0, help="resize to this height")
    p.add_argument("--resize-width", type=int, default=0, help="resize to this width")
    p.add_argument("--gray", action="store_true", help="store one grey channel")
    p.add_argument("--shuffle", action="store_true", help="shuffle the images (seeded)")
    p.add_argument("--seed", type=int, default=0, help="shuffle seed (default 0)")
    p.add_argument("--encoded", action="store_true", help="store encoded images")
    p.add_argument("--encode-type", default="", help="format of encoded images (png, jpg)")
    p.add_argument("--check-size", action="store_true", help="require one size for all images")
    p.add_argument("--skip-bad", action="store_true", help="skip unreadable images with a warning")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> None:
        if os.path.isdir(args.input):
            items, classes = image_files_by_class(args.input)
            root = args.input
            if not items:
                raise DataError(f"'{args.input}' has no images in class subfolders")
            for i, c in enumerate(classes):
                print(f"class {i}: {c}")
        elif os.path.isfile(args.input):
            items = read_list_file(args.input, "make_lmdb")
            root = args.root if args.root is not None else os.path.dirname(args.input)
        else:
            raise DataError(f"input '{args.input}' not found")
        n = convert_imageset(
            items,
            root,
            args.output,
            backend=args.backend,
            is_color=not args.gray,
            height=args.resize_height,
            width=args.resize_width,
            encoded=args.encoded,
            encode_type=args.encode_type,
            shuffle=args.shuffle,
            seed=args.seed,
            check_size=args.check_size,
            skip_bad=args.skip_bad,
            overwrite=args.overwrite,
        )
        print(f"wrote {n} records to {args.output}")

    return run_tool("make_lmdb.py", body)


if __name__ == "__main__":
    sys.exit(main())
