"""Data-parallel train-step throughput on 1, 2 and 4 (virtual) devices, and the all-reduce size.

Usage::

    python tools/bench_parallel.py                          # nin_cifar10, batch 8 per device
    python tools/bench_parallel.py --net nin_imagenet --batch 2 --rounds 5
    python tools/bench_parallel.py --quick                  # CI: a tiny net, seconds
    python tools/bench_parallel.py --json out.json          # also write the results as JSON

On a CPU the devices are XLA's virtual host-platform devices (the script sets
``--xla_force_host_platform_device_count`` before JAX starts): they share the machine's cores,
so the numbers show the cost of the data-parallel step (shard_map, the all-reduce, replicated
updates), not a speed-up. Rows:

- ``plain``: nincc.train.Trainer, one device, batch B: the baseline;
- ``shard_map``: nincc.parallel.DataParallelTrainer on n devices, batch B per device (n*B
  images per step), what ``nincc train --devices n`` runs;
- ``gspmd`` (unless --no-gspmd): the plain step jitted with NamedSharding inputs (batch sharded,
  params replicated) over a net of batch n*B, XLA partitioning it: the alternative design.

Each candidate's step is compiled and run twice (warm-up), then timed ``--rounds`` times,
interleaved across candidates (each round in a new random order) so other load on the machine
falls on all alike; the table shows the median and the spread (25th..75th percentile).
FLOPs are nincc's count (nincc.report) of one forward, a train step counted as 3x. The
all-reduce moves the gradients: 4 bytes per learnable value (float32).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
MAX_DEVICES = 4
if __name__ == "__main__":  # before JAX starts its backend: XLA reads the flag once
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "")
        + f" --xla_force_host_platform_device_count={MAX_DEVICES}"
    ).strip()
    sys.path.insert(0, str(REPO))

NETS = {  # train/val prototxt, image shape
    "nin_cifar10": ("zoo/nin_cifar10.prototxt", (3, 32, 32)),
    "nin_imagenet": ("zoo/nin_imagenet.prototxt", (3, 224, 224)),
    "nin_zfnet": ("zoo/nin_zfnet.prototxt", (3, 224, 224)),
    "nin_digits": ("zoo/nin_digits.prototxt", (1, 8, 8)),
    "tiny": ("tiny", (1, 8, 8)),  # --quick: XLA compiles it in well under a second
}
TINY = """name: "tiny"
layer { name: "data" type: "Input" top: "data" top: "label"
  input_param { shape { dim: 1 dim: 1 dim: 8 dim: 8 } shape { dim: 1 } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
  convolution_param { num_output: 8 kernel_size: 3 weight_filler { type: "msra" } } }
layer { name: "relu" type: "ReLU" bottom: "conv" top: "conv" }
layer { name: "pool" type: "Pooling" bottom: "conv" top: "pool"
  pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "ip" type: "InnerProduct" bottom: "pool" top: "ip"
  inner_product_param { num_output: 10 weight_filler { type: "xavier" } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }
"""


@dataclass
class Row:
    """One candidate's result."""

    kind: str
    devices: int
    batch_per_device: int
    images_per_step: int
    step_ms: float
    images_per_s: float
    q25_ms: float = 0.0
    q75_ms: float = 0.0
    relative: float = 0.0  # images/s over the plain one-device step's


def _graph(net: str, batch: int) -> Any:
    import nincc

    path, image = NETS[net]
    source = TINY if net == "tiny" else REPO / path
    return nincc.load_graph(
        source, phase="TRAIN", input_shapes={"data": (batch, *image), "label": (batch,)}
    )


def _feeds(graph: Any, batch: int, iter_size: int, seed: int = 0) -> list[dict[str, Any]]:
    import numpy as np

    rng = np.random.default_rng(seed)
    shape = graph.value(graph.blob_values()["data"]).shape
    return [  # labels below 10: a valid class for every zoo net
        {"data": rng.standard_normal((batch, *shape[1:]), dtype=np.float32),
         "label": rng.integers(0, 10, batch).astype(np.float32)}
        for _ in range(iter_size)
    ]


class Candidate:
    """A step to time: ``run()`` does one iteration and waits for it."""

    def __init__(self, kind: str, devices: int, batch: int, net: str, cfg: Any):
        import jax
        import numpy as np

        import nincc
        from nincc.parallel import DataParallel
        from nincc.train import Trainer

        self.kind, self.devices, self.batch = kind, devices, batch
        self.images = devices * batch * cfg.iter_size
        if kind == "plain":
            compiled = nincc.compile(_graph(net, batch))
            self.trainer = Trainer(compiled, cfg)
            self.params = compiled.init(0)
            self.state = self.trainer.init(self.params)
            self.feeds = _feeds(compiled.graph, batch, cfg.iter_size)
            self._run = self._plain
        elif kind == "shard_map":
            compiled = nincc.compile(_graph(net, batch))
            dp = DataParallel(devices)
            self.trainer = dp.trainer(compiled, cfg)
            self.params = dp.replicate(compiled.init(0))
            self.state = self.trainer.init(self.params)
            self.feeds = _feeds(compiled.graph, devices * batch, cfg.iter_size)
            self._run = self._plain
        else:  # gspmd: XLA partitions the plain step of the combined batch
            from jax.sharding import NamedSharding
            from jax.sharding import PartitionSpec as P

            compiled = nincc.compile(_graph(net, devices * batch))
            dp = DataParallel(devices)
            self.trainer = Trainer(compiled, cfg)
            rep = NamedSharding(dp.mesh, P())
            rows = NamedSharding(dp.mesh, P(None, "data"))
            self.params = dp.replicate(compiled.init(0))
            self.state = self.trainer.init(self.params)
            self.state = jax.device_put(self.state, rep)
            feeds = _feeds(compiled.graph, devices * batch, cfg.iter_size)
            self.stacked = {
                k: jax.device_put(np.stack([f[k] for f in feeds]), rows) for k in feeds[0]
            }
            self.keys = jax.device_put(jax.random.split(jax.random.PRNGKey(0), cfg.iter_size), rep)
            self.step_fn = jax.jit(
                self.trainer._step_impl,
                in_shardings=(rep, rep, rows, rep),
                out_shardings=(rep, rep, rep, rep),
                donate_argnums=(0, 1),
            )
            self._run = self._gspmd

    def _plain(self) -> None:
        import jax

        self.params, self.state, _ = self.trainer.step(self.params, self.state, self.feeds)
        jax.block_until_ready(self.params)

    def _gspmd(self) -> None:
        import jax

        self.params, self.state, losses, _ = self.step_fn(
            self.params, self.state, self.stacked, self.keys
        )
        jax.block_until_ready(losses)

    def run(self) -> float:
        t0 = time.perf_counter()
        self._run()
        return time.perf_counter() - t0


def allreduce_ms(devices: int, values: int, rounds: int) -> float:
    """Median time of the step's all-reduce alone: a pmean of ``values`` float32 over the
    devices (XLA combines the step's per-blob all-reduces into one of this size)."""
    import jax
    import numpy as np
    from jax.sharding import PartitionSpec as P

    from nincc.parallel import AXIS, DataParallel

    dp = DataParallel(devices)
    fn = jax.jit(jax.shard_map(lambda x: jax.lax.pmean(x, AXIS), mesh=dp.mesh,
                               in_specs=P(AXIS), out_specs=P()))
    x = dp.rows(np.ones((devices, values), np.float32))
    jax.block_until_ready(fn(x))
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(x))
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def bench(net: str, batch: int, rounds: int, iter_size: int, gspmd: bool) -> dict[str, Any]:
    import jax
    import numpy as np

    from nincc.report import layer_rows
    from nincc.solver import SolverConfig

    cfg = SolverConfig(base_lr=0.01, momentum=0.9, weight_decay=5e-4, iter_size=iter_size)
    plan = [("plain", 1)] + [("shard_map", n) for n in (1, 2, 4)]
    if gspmd:
        plan += [("gspmd", n) for n in (2, 4)]
    cands = []
    for kind, n in plan:
        c = Candidate(kind, n, batch, net, cfg)
        c.run()
        c.run()  # compile, then one warm step
        cands.append(c)
    times: list[list[float]] = [[] for _ in cands]
    order = np.random.default_rng(0)
    for _ in range(rounds):  # every candidate once per round, in a fresh order each round
        for i in order.permutation(len(cands)):
            times[i].append(cands[i].run())
    rows = []
    for c, ts in zip(cands, times, strict=True):
        ms = 1000 * statistics.median(ts)
        q25, q75 = (1000 * float(np.percentile(ts, q)) for q in (25, 75))
        rows.append(Row(c.kind, c.devices, c.batch, c.images, ms, c.images / (ms / 1000),
                        q25, q75))
    base = rows[0].images_per_s
    for r in rows:
        r.relative = r.images_per_s / base
    graph = _graph(net, batch)
    params = sum(int(np.prod(s)) for v in graph.param_shapes().values() for s in v)
    fwd = sum(r.flops for r in layer_rows(graph))
    reduce_ms = {n: allreduce_ms(n, params, max(rounds, 10)) for n in (2, 4)}
    return {
        "net": net,
        "batch_per_device": batch,
        "iter_size": iter_size,
        "rounds": rounds,
        "params": params,
        "allreduce_bytes": 4 * params,
        "forward_flops_per_device": fwd,
        "step_flops_per_device": 3 * fwd * iter_size,
        "allreduce_ms": reduce_ms,
        "rows": [asdict(r) for r in rows if r.kind == "shard_map"],
        "all_rows": [asdict(r) for r in rows],
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "python": platform.python_version(),
            "jax": jax.__version__,
            "date": time.strftime("%Y-%m-%d"),
        },
    }


def table(res: dict[str, Any]) -> str:
    head = (f"{res['net']}, batch {res['batch_per_device']} per device, iter_size "
            f"{res['iter_size']}, median of {res['rounds']} steps; {res['machine']['cores']} "
            f"cores, jax {res['machine']['jax']}")
    lines = [head, f"{'step':<10} {'devices':>7} {'images':>7} {'step ms':>9} "
             f"{'25..75%':>15} {'images/s':>9} {'vs plain':>8}"]
    for r in res["all_rows"]:
        spread = f"{r['q25_ms']:.1f}..{r['q75_ms']:.1f}"
        lines.append(
            f"{r['kind']:<10} {r['devices']:>7} {r['images_per_step']:>7} {r['step_ms']:>9.2f} "
            f"{spread:>15} {r['images_per_s']:>9.1f} {r['relative']:>8.2f}"
        )
    mb = res["allreduce_bytes"] / 1e6
    lines.append(
        f"all-reduce per step: {res['allreduce_bytes']} bytes ({mb:.2f} MB, {res['params']} "
        f"float32 gradients); step compute per device: "
        f"{res['step_flops_per_device'] / 1e9:.2f} GFLOP"
    )
    lines.append("all-reduce alone (median ms): " + ", ".join(
        f"{n} devices {ms:.3f}" for n, ms in res["allreduce_ms"].items()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--net", default="nin_cifar10", choices=sorted(NETS))
    ap.add_argument("--batch", type=int, default=8, help="batch per device (default 8)")
    ap.add_argument("--rounds", type=int, default=10, help="timed steps per candidate")
    ap.add_argument("--iter-size", type=int, default=1)
    ap.add_argument("--no-gspmd", action="store_true", help="skip the GSPMD comparison")
    ap.add_argument("--quick", action="store_true",
                    help="the tiny net, batch 4, 3 rounds, no GSPMD rows: runs in seconds")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)
    if args.quick:
        args.net, args.batch, args.rounds, args.no_gspmd = "tiny", 4, 3, True
    res = bench(args.net, args.batch, args.rounds, args.iter_size, not args.no_gspmd)
    print(table(res))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
