"""Regenerate nincc/caffe_pb2.py from proto/caffe.proto with grpc_tools' bundled protoc.

    python tools/gen_proto.py           # rewrite nincc/caffe_pb2.py
    python tools/gen_proto.py --check   # exit 1 if the committed module is stale

The generated module embeds a gencode version check; pyproject.toml's protobuf lower bound must
be at least the version that check names (printed by --check).
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO = ROOT / "proto" / "caffe.proto"
OUTPUT = ROOT / "nincc" / "caffe_pb2.py"


def generate() -> str:
    """Run protoc on proto/caffe.proto and return the generated Python source."""
    try:
        from grpc_tools import protoc
    except ImportError:  # pragma: no cover - depends on the environment
        sys.exit("gen_proto: grpcio-tools is required (pip install grpcio-tools)")
    with tempfile.TemporaryDirectory() as out:
        status = protoc.main(["protoc", f"-I{PROTO.parent}", f"--python_out={out}", str(PROTO)])
        if status != 0:
            sys.exit(f"gen_proto: protoc failed on {PROTO} (exit {status})")
        return (Path(out) / "caffe_pb2.py").read_text()


def gencode_version(source: str) -> str | None:
    """The protobuf runtime version the generated code demands, e.g. '6.31.1'."""
    match = re.search(
        r"ValidateProtobufRuntimeVersion\(\s*_runtime_version\.Domain\.PUBLIC,\s*"
        r"(\d+),\s*(\d+),\s*(\d+),",
        source,
    )
    return ".".join(match.groups()) if match else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only compare, do not write")
    args = parser.parse_args(argv)
    source = generate()
    if args.check:
        current = OUTPUT.read_text() if OUTPUT.exists() else ""
        if current != source:
            print(f"{OUTPUT.relative_to(ROOT)} is stale: run python tools/gen_proto.py")
            return 1
        print(f"{OUTPUT.relative_to(ROOT)} is current (gencode {gencode_version(source)})")
        return 0
    OUTPUT.write_text(source)
    print(f"wrote {OUTPUT.relative_to(ROOT)} (gencode {gencode_version(source)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
