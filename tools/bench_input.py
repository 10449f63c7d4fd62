"""Does data input keep up with training? The train loop fed from an LMDB against synthetic input.

Builds an LMDB of random records shaped like the net's data (float32 Datums, as the GCN + ZCA
CIFAR-10 database holds, or uint8 with ``--uint8``), then runs ``nincc.loop.Solver`` on the same
net twice, once reading that LMDB through the data layer (Caffe's transformer, the prefetch
thread) and once with ``synthetic`` inputs, alternating rounds of ``--iters`` iterations. Prints
the median time per iteration of each and their ratio, and how fast the data source alone reads
batches (no training).

    python tools/bench_input.py                              # NIN CIFAR-10, batch 64
    python tools/bench_input.py --batch 128 --rounds 5 --iters 10
    python tools/bench_input.py --quick                      # a few seconds: CI
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent


def make_solver_param(
    net: str, source: str, batch: int, crop: int | None, mean_file: str
) -> object:
    """The zoo net's solver with the train Data layer pointed at ``source`` (and at
    ``mean_file`` if it subtracts one) and no tests, displays or snapshots (nothing but the
    iterations is timed)."""
    from nincc import caffe_pb2, load_net_param

    net_param = load_net_param(str(REPO / net))
    for layer in net_param.layer:
        if layer.type == "Data":
            layer.data_param.source = source
            layer.data_param.batch_size = batch
            layer.data_param.backend = caffe_pb2.DataParameter.LMDB
            if crop:
                layer.transform_param.crop_size = crop
            if layer.transform_param.mean_file:
                layer.transform_param.mean_file = mean_file
    sp = caffe_pb2.SolverParameter()
    sp.net_param.CopyFrom(net_param)
    sp.base_lr, sp.momentum, sp.lr_policy = 0.001, 0.9, "fixed"
    sp.max_iter, sp.display, sp.random_seed = 10**9, 0, 1
    return sp


def write_lmdb(path: str, n: int, shape: tuple[int, ...], uint8: bool) -> None:
    from nincc.data.convert import write_array_db

    rng = np.random.default_rng(0)
    if uint8:
        x = rng.integers(0, 256, (n, *shape), dtype=np.uint8)
    else:
        x = rng.standard_normal((n, *shape)).astype(np.float32)
    write_array_db(path, x, rng.integers(0, 10, n), "LMDB")


def time_rounds(solvers: dict[str, object], rounds: int, iters: int) -> dict[str, list[float]]:
    """Seconds per iteration of each solver, one sample per round, the solvers interleaved."""
    out: dict[str, list[float]] = {k: [] for k in solvers}
    for _ in range(rounds):
        for name, solver in solvers.items():
            t = time.perf_counter()
            solver.step(iters)
            out[name].append((time.perf_counter() - t) / iters)
    return out


def source_rate(solver, batches: int) -> float:
    """Batches per second the train feeder delivers on its own."""
    feeder = solver.feeder
    feeder.next(0)
    t = time.perf_counter()
    for i in range(batches):
        feeder.next(i + 1)
    return batches / (time.perf_counter() - t)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--net", default="zoo/nin_cifar10.prototxt", help="train/val net")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--shape", default="3,32,32", help="record shape C,H,W")
    ap.add_argument("--crop", type=int, help="transform_param crop_size (with --shape larger)")
    ap.add_argument("--uint8", action="store_true", help="uint8 records instead of float32")
    ap.add_argument("--records", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--iters", type=int, default=5, help="iterations per timed round")
    ap.add_argument("--quick", action="store_true", help="batch 4, 2 rounds of 2: CI")
    ap.add_argument("--json", help="write the results here too")
    args = ap.parse_args(argv)
    if args.quick:
        args.batch, args.rounds, args.iters, args.records = 4, 2, 2, 64

    import jax

    import nincc  # noqa: F401 - applies nincc's XLA flags before the first computation
    from nincc.data.convert import write_mean
    from nincc.loop import Solver

    shape = tuple(int(s) for s in args.shape.split(","))
    with tempfile.TemporaryDirectory() as tmp:
        db = str(Path(tmp) / "train_lmdb")
        write_lmdb(db, args.records, shape, args.uint8)
        mean = str(Path(tmp) / "mean.binaryproto")
        write_mean(np.full((1, *shape), 100.0, np.float32), mean)
        sp = make_solver_param(args.net, db, args.batch, args.crop, mean)
        solvers = {
            "lmdb": Solver(sp, synthetic=False, seed=1),
            "synthetic": Solver(sp, synthetic=True, seed=1),
        }
        try:
            for s in solvers.values():
                s.step(2)  # compile and warm up
            per_iter = time_rounds(solvers, args.rounds, args.iters)
            rate = source_rate(solvers["lmdb"], max(4, args.rounds * args.iters))
        finally:
            for s in solvers.values():
                s.close()
    med = {k: statistics.median(v) for k, v in per_iter.items()}
    result = {
        "net": args.net,
        "batch": args.batch,
        "record": list(shape),
        "dtype": "uint8" if args.uint8 else "float32",
        "device": str(jax.devices()[0]),
        "ms_per_iter": {k: 1000 * v for k, v in med.items()},
        "images_per_s": {k: args.batch / v for k, v in med.items()},
        "lmdb_over_synthetic": med["lmdb"] / med["synthetic"],
        "source_batches_per_s": rate,
        "source_images_per_s": rate * args.batch,
        "samples_ms": {k: [1000 * x for x in v] for k, v in per_iter.items()},
    }
    print(f"{args.net}  batch {args.batch}  records {result['dtype']} {list(shape)}")
    for k in ("lmdb", "synthetic"):
        print(f"  {k:9s} {1000 * med[k]:8.1f} ms/iter  {args.batch / med[k]:8.1f} images/s")
    print(f"  lmdb / synthetic time per iteration: {result['lmdb_over_synthetic']:.3f}")
    print(f"  the LMDB source alone: {rate * args.batch:.0f} images/s")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
