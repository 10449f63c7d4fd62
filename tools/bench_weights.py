"""Measure reading a large .caffemodel: load time against merely reading its bytes, and peak memory.

Generates a VGG-16-sized caffemodel (about 550 MB, random weights) from the corpus prototxt in a
temporary directory, then times, each in a fresh process so peak RSS is its own:

* ``bytes``: reading the file's bytes (the floor any reader pays),
* ``load``: ``nincc.caffemodel.load_params`` (every blob as a float32 array),
* ``load+match``: ``load_params`` then ``match_weights`` against the net (what ``--weights`` does).

Generation, too, runs in its own process, so the measuring processes start small.

Peak memory is reported as the growth of peak RSS (VmHWM, reset just before the step) over the
process's RSS before the step, in
bytes and in multiples of the file's size, plus tracemalloc's peak (Python and NumPy
allocations only). The generated file is deleted afterwards.

    python tools/bench_weights.py [--net PROTOTXT] [--repeat N] [--keep DIR]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

DEFAULT_NET = Path(__file__).resolve().parents[2] / "shared" / "corpus" / "vgg16_deploy.prototxt"


def _rss_bytes() -> int:
    """Current resident set size of this process."""
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak() -> None:
    """Start this process's peak-RSS mark afresh (Linux: clear_refs 5 resets VmHWM)."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        pass


def _peak_rss_bytes() -> int:
    """Peak RSS of this process's memory map: VmHWM. (getrusage's ru_maxrss is not used where
    VmHWM exists: Linux carries it over from the forked parent's memory across exec.)"""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux


def generate(net_path: Path, out: Path, seed: int = 0) -> dict:
    """Write a caffemodel of the net with random weights, as Caffe's Net::ToProto would."""
    import numpy as np

    import nincc
    from nincc.caffemodel import write_caffemodel
    from nincc.netdef import full_blobs, net_to_proto

    net = nincc.load_net_param(net_path)
    graph = nincc.build_graph(net, phase="TEST", insert_splits=True)
    rng = np.random.default_rng(seed)
    params = {
        name: [(rng.standard_normal(shape, dtype=np.float32) * 0.01) for shape in shapes]
        for name, shapes in graph.param_shapes().items()
    }
    definitions, blobs = net_to_proto(net, graph), full_blobs(graph, params)
    _reset_peak()
    before = _rss_bytes()
    start = time.perf_counter()
    write_caffemodel(out, definitions, blobs)
    seconds = time.perf_counter() - start
    count = sum(a.size for blobs in params.values() for a in blobs)
    return {
        "write_s": seconds,
        "write_peak_rss_growth": _peak_rss_bytes() - before,
        "floats": int(count),
        "bytes": out.stat().st_size,
    }


def child(mode: str, path: Path, net_path: Path) -> dict:
    """One measurement in this (fresh) process."""
    if mode == "generate":
        return generate(net_path, path)
    import numpy as np

    import nincc
    from nincc.caffemodel import load_params, match_weights

    graph = nincc.load_graph(net_path, phase="TEST") if mode == "load+match" else None
    np.zeros(1)  # imports and first allocations happen before the baseline
    _reset_peak()
    before = _rss_bytes()
    tracemalloc.start()
    start = time.perf_counter()
    if mode == "bytes":
        data = path.read_bytes()
        held = len(data)
    else:
        params = load_params(path)
        if graph is not None:
            params, _ = match_weights(params, graph.weight_slots())
        held = sum(a.nbytes for blobs in params.values() for a in blobs if a is not None)
    seconds = time.perf_counter() - start
    _, traced_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {
        "mode": mode,
        "seconds": seconds,
        "held_bytes": held,
        "rss_before": before,
        "peak_rss_growth": _peak_rss_bytes() - before,
        "tracemalloc_peak": traced_peak,
    }


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import google.protobuf
    import numpy

    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "ram_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
        "python": platform.python_version(),
        "numpy": numpy.__version__,
        "protobuf": google.protobuf.__version__,
        "system": f"{platform.system()} {platform.release()}",
    }


def _run_child(mode: str, path: Path, net_path: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, str(path), "--net", str(net_path)]
    done = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--net", type=Path, default=DEFAULT_NET)
    ap.add_argument("--repeat", type=int, default=2, help="runs per mode (the fastest is kept)")
    ap.add_argument("--keep", type=Path, help="generate into this directory and keep the file")
    ap.add_argument("--child", nargs=2, metavar=("MODE", "FILE"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child[0], Path(args.child[1]), args.net)))
        return 0

    directory = args.keep or Path(tempfile.mkdtemp(prefix="nincc-bench-"))
    path = directory / "random_weights.caffemodel"
    try:
        info = {"machine": machine(), "net": str(args.net)}
        info["generate"] = _run_child("generate", path, args.net)
        size = info["generate"]["bytes"]
        results = {}
        for mode in ("bytes", "load", "load+match"):
            runs = [_run_child(mode, path, args.net) for _ in range(args.repeat)]
            results[mode] = min(runs, key=lambda r: r["seconds"])
            results[mode]["peak_rss_growth"] = max(r["peak_rss_growth"] for r in runs)
        info["results"] = results
    finally:
        if args.keep is None:
            shutil.rmtree(directory, ignore_errors=True)
    mb = 1e6
    print(json.dumps(info, indent=1))
    print(
        f"\nfile: {size / mb:.1f} MB ({info['generate']['floats']} floats), "
        f"written in {info['generate']['write_s']:.2f} s "
        f"(peak RSS +{info['generate']['write_peak_rss_growth'] / mb:.1f} MB over the weights)"
    )
    base = results["bytes"]["seconds"]
    for mode, r in results.items():
        print(
            f"{mode:<11} {r['seconds']:7.2f} s ({r['seconds'] / base:5.2f}x bytes)  "
            f"peak RSS +{r['peak_rss_growth'] / mb:7.1f} MB ({r['peak_rss_growth'] / size:4.2f}x "
            f"file)  tracemalloc peak {r['tracemalloc_peak'] / mb:7.1f} MB"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
