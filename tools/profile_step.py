"""Where one compiled step of a zoo net spends its time, by kind of work, from a JAX profiler
trace (docs/performance.md, section 32).

Usage::

    python tools/profile_step.py nin_imagenet --batch 16           # the train step
    python tools/profile_step.py nin_cifar10 --batch 64 --mode infer
    python tools/profile_step.py nin_cifar10 --quick                # CI: batch 2, one step

The step is built as tools/bench.py builds nincc's (the fast lowerings, the same weights and
inputs, nincc's XLA flags, freed memory kept), timed untraced, then traced for ``--steps``
steps. Each traced operation is charged
to a kind: oneDNN convolutions, products, pooling and LRN (the custom calls, named by their
targets in the compiled program), or XLA's own loops. It prints the traced time per step of
each kind and the largest operations. The step's untraced time is shown beside their sum; the
difference is dispatch, the runtime's own work and tracing's cost.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402  (tools/bench.py, beside this script: the cases and nincc's steps)

KINDS = (
    ("oneDNN convolution", ("nincc_onednn_fwd_", "nincc_onednn_bwd_")),
    ("oneDNN product", ("nincc_onednn_matmul_",)),
    ("oneDNN pooling", ("nincc_onednn_maxpool", "nincc_onednn_avg")),
    ("oneDNN LRN", ("nincc_onednn_lrn",)),
)
_XLA_OP = re.compile(r"[a-z][a-z0-9_\-]*(\.\d+)?")  # an HLO instruction's name: fusion.3, copy


def custom_call_targets(hlo: str) -> dict[str, str]:
    """Each custom call's instruction name in the compiled program → its target."""
    pattern = r"%(\S+) = [^\n]*?custom-call\([^\n]*?custom_call_target=\"([^\"]+)\""
    return {m.group(1): m.group(2) for m in re.finditer(pattern, hlo)}


def kind_of(name: str, targets: dict[str, str]) -> str | None:
    """The kind of work a traced event is, or None for the runtime's own events."""
    target = targets.get(name)
    if target is not None:
        for kind, prefixes in KINDS:
            if target.startswith(prefixes):
                return kind
        return "other custom calls"
    return "XLA loops" if _XLA_OP.fullmatch(name) else None


def trace_events(directory: Path) -> list[dict]:
    files = sorted(directory.glob("**/*.trace.json.gz"))
    if not files:
        raise SystemExit(f"profile_step: the profiler wrote no trace under {directory}")
    with gzip.open(files[-1]) as f:
        return [e for e in json.load(f)["traceEvents"] if e.get("ph") == "X"]


def build(net: str, batch: int, mode: str):
    """(step function, compiled program text) of nincc's fast step for one case."""
    import jax

    spec = bench.NETS[net]
    graph, params, inputs = bench.load_case(spec, batch, mode)
    if mode == "infer":
        runner = bench.NinccInfer(graph, params, inputs, "fast")
        return runner.step, runner.compiled.as_text()
    runner = bench.NinccTrain(graph, params, inputs, "fast")
    keys = jax.random.split(jax.random.PRNGKey(0), 1)
    with bench.kernels("fast"):
        lowered = runner.trainer._step.lower(runner.params, runner.opt, tuple(runner.feeds), keys)
    return runner.step, lowered.compile().as_text()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("net", choices=sorted(bench.NETS))
    ap.add_argument("--batch", type=int, help="default: the net's first benchmark batch")
    ap.add_argument("--mode", choices=("train", "infer"), default="train")
    ap.add_argument("--steps", type=int, default=5, help="traced steps")
    ap.add_argument("--top", type=int, default=15, help="largest operations listed")
    ap.add_argument("--quick", action="store_true", help="CI: batch 2, one traced step")
    args = ap.parse_args(argv)
    if args.quick:
        args.batch, args.steps = 2, 1
    batch = args.batch or bench.NETS[args.net].batches[0]
    from nincc import xla_flags
    from nincc.malloc import describe, reexec_retaining

    xla_flags.apply()
    reexec_retaining()  # freed memory kept, as the nincc command and tools/bench.py run
    import jax

    step, hlo = build(args.net, batch, args.mode)
    targets = custom_call_targets(hlo)
    for _ in range(3):
        jax.block_until_ready(step())
    times = []
    for _ in range(max(args.steps, 3)):
        t = time.perf_counter()
        jax.block_until_ready(step())
        times.append(time.perf_counter() - t)
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d):
            for _ in range(args.steps):
                jax.block_until_ready(step())
        events = trace_events(Path(d))

    per_kind: dict[str, float] = collections.defaultdict(float)
    per_op: dict[tuple[str, str], float] = collections.defaultdict(float)
    calls: collections.Counter = collections.Counter()
    for e in events:
        kind = kind_of(e["name"], targets)
        if kind is None:
            continue
        ms = e["dur"] / 1e3 / args.steps
        per_kind[kind] += ms
        op = (kind, targets.get(e["name"], e["name"]))
        per_op[op] += ms
        calls[op] += 1
    total = sum(per_kind.values())
    print(f"{args.net} b{batch} {args.mode}: step {statistics.median(times) * 1e3:.1f} ms "
          f"(median of {len(times)}, untraced); traced per step {total:.1f} ms in operations; "
          f"malloc: {describe()}")
    for kind, ms in sorted(per_kind.items(), key=lambda kv: -kv[1]):
        print(f"  {kind:22} {ms:8.2f} ms  {100 * ms / total:5.1f} %")
    print(f"largest {args.top} operations (ms per step; calls of one target add up):")
    for op, ms in sorted(per_op.items(), key=lambda kv: -kv[1])[: args.top]:
        kind, name = op
        print(f"  {ms:8.2f}  x{calls[op] // args.steps:<2d} {kind:22} {name[:90]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
