"""Time the zoo's convolution kernels one layer at a time: nincc's oneDNN custom call against
PyTorch's conv2d, and every implementation oneDNN offers per direction
(docs/performance.md, section 32).

Usage::

    python tools/bench_kernels.py                 # nincc against PyTorch (if installed), per layer
    python tools/bench_kernels.py --impls         # each oneDNN implementation, per direction
    python tools/bench_kernels.py --quick         # CI: first layer at batch 2, 2 rounds

The first mode times, alternating round by round in one process, each layer's forward (with
bias) and its forward + backward (all three gradients) both ways: nincc's convolution
(nincc.onednn.conv, NHWC activations, Caffe's weights) in a jitted function, and PyTorch's
Conv2d in channels_last with 2 threads. It prints medians in ms and GFLOP/s. The second
creates every implementation oneDNN lists for each direction and times each alone on the same
buffers. Reference kernels are listed but not timed: they take seconds. oneDNN's default is
the first. Both modes need oneDNN (the ``onednn`` extra); the first also uses PyTorch (the
``bench`` extra) where it is installed.
"""

from __future__ import annotations

import argparse
import ctypes as C
import math
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import nincc.xla_flags

nincc.xla_flags.apply()

sys.path.insert(0, str(Path(__file__).resolve().parent))
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from bench import interleaved_times  # noqa: E402  (tools/bench.py, beside this script)

from nincc import onednn  # noqa: E402

# (name, batch, square input size, in channels, out channels, kernel), stride 1, "same" pad
SHAPES = [
    ("nin_imagenet conv2", 16, 27, 96, 256, 5),
    ("nin_imagenet conv3", 16, 13, 256, 384, 3),
    ("nin_imagenet conv4-1024", 16, 6, 384, 1024, 3),
    ("nin_imagenet cccp3", 16, 27, 256, 256, 1),
    ("nin_cifar10 conv2", 64, 16, 96, 192, 5),
    ("nin_cifar10 conv3", 64, 8, 192, 192, 3),
    ("nin_cifar10 cccp3", 64, 16, 192, 192, 1),
    ("nin_cifar10 cccp1", 64, 32, 192, 160, 1),
]
DIRECTIONS = ("forward", "backward_data", "backward_weights")


def gflop(batch: int, size: int, c: int, o: int, k: int) -> float:
    """Multiply-adds ×2 of one direction of the layer, in GFLOP."""
    return 2 * batch * size * size * o * c * k * k / 1e9


def nincc_calls(batch: int, size: int, c: int, o: int, k: int) -> dict[str, Callable]:
    """Forward, and forward + all three gradients, of nincc's oneDNN convolution."""
    p = k // 2
    pads = ((p, p), (p, p))
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((batch, size, size, c), np.float32))
    w = jnp.asarray(rng.standard_normal((o, c, k, k), np.float32) * 0.05)
    b = jnp.zeros((o,), jnp.float32)

    def conv(x, w, b):
        return onednn.conv(x, w, b, (1, 1), pads)

    fwd = jax.jit(conv)
    grads = jax.jit(jax.grad(lambda x, w, b: 0.5 * jnp.sum(conv(x, w, b) ** 2), (0, 1, 2)))
    return {
        "forward": lambda: jax.block_until_ready(fwd(x, w, b)),
        "forward+backward": lambda: jax.block_until_ready(grads(x, w, b)),
    }


def torch_calls(batch: int, size: int, c: int, o: int, k: int) -> dict[str, Callable] | None:
    """The same two with PyTorch's Conv2d in channels_last (None without PyTorch)."""
    try:
        import torch
    except ImportError:
        return None
    torch.set_num_threads(2)
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(c, o, k, padding=k // 2).to(memory_format=torch.channels_last)
    x = torch.randn(batch, c, size, size).to(memory_format=torch.channels_last)
    x.requires_grad_(True)

    def forward() -> None:
        with torch.no_grad():
            conv(x)

    def both() -> None:
        y = conv(x)
        y.backward(y)

    return {"forward": forward, "forward+backward": both}


def compare(shapes: list[tuple], rounds: int) -> None:
    """nincc against PyTorch per layer, rounds alternating."""
    print(f"{'layer':28} {'batch':>5}  {'pass':17} {'nincc ms':>9} {'torch ms':>9} "
          f"{'nincc GF/s':>10} {'torch GF/s':>10}")
    for name, batch, size, c, o, k in shapes:
        ours = nincc_calls(batch, size, c, o, k)
        theirs = torch_calls(batch, size, c, o, k)
        for what, fn in ours.items():
            cands = {"nincc": fn}
            if theirs is not None:
                cands["torch"] = theirs[what]
            for f in cands.values():  # warm-up
                f()
            times = interleaved_times(cands, rounds)
            ms = {key: statistics.median(v) * 1e3 for key, v in times.items()}
            flops = gflop(batch, size, c, o, k) * (1 if what == "forward" else 3)
            tm = ms.get("torch")
            print(f"{name:28} {batch:5d}  {what:17} {ms['nincc']:9.2f} "
                  f"{tm if tm is not None else float('nan'):9.2f} "
                  f"{flops / ms['nincc'] * 1e3:10.0f} "
                  f"{flops / tm * 1e3 if tm else float('nan'):10.0f}", flush=True)


def _buffer(nbytes: int) -> np.ndarray:
    return np.zeros(max(nbytes, 4) // 4 + 16, np.float32)


_RUNS = {
    "forward": onednn._run_forward,
    "backward_data": onednn._run_backward_data,
    "backward_weights": onednn._run_backward_weights,
}


def _candidates(
    spec: onednn.ConvSpec, direction: str, ins: list[np.ndarray]
) -> list[tuple[str, Callable[[], None] | None]]:
    """(name, call) of every implementation oneDNN lists for one direction, its default
    first; call is None for a reference kernel. Each keeps a copy of the descriptor at its
    implementation: the run functions read layouts from it, and iterating moves the original."""
    out: list[tuple[str, Callable[[], None] | None]] = []
    lib = onednn._lib()
    pd, query, writes = onednn.ConvPrimitives(spec).descriptor(direction)
    while True:
        own = onednn._vp()  # a copy fixed at this implementation; pd moves on
        onednn._check(lib.dnnl_primitive_desc_clone(C.byref(own), pd), "descriptor copy")
        p = onednn.ConvPrimitives(spec)
        prim = p._primitive(own, query, to_user=writes)
        if lib.dnnl_primitive_desc_next_impl(pd) != 0:
            pd = None
        seen = sum(1 for impl, _ in out if impl.split(" #")[0] == prim.impl)
        label = prim.impl + (f" #{seen + 1}" if seen else "")  # oneDNN may list a name twice
        if prim.impl.startswith("ref"):
            out.append((label, None))
            if pd is None:
                return out
            continue
        p.__dict__[direction] = prim  # the run functions read this direction's primitive
        if direction == "forward":
            size = spec.n * spec.o * math.prod(spec.out_hw)
        elif direction == "backward_data":
            size = spec.n * spec.c * spec.h * spec.w
        else:
            size = math.prod((spec.o, spec.c // spec.group, *spec.kernel))
        keep = [_buffer(size * 4)]
        if direction == "backward_weights" and spec.bias:
            keep.append(_buffer(spec.o * 4))
        keep.append(_buffer(prim.scratchpad_bytes))
        if prim.reorder is not None:
            keep.append(_buffer(onednn._md_size(prim.w_md)))

        def call(run=_RUNS[direction], p=p, ins=ins, keep=keep) -> None:
            run(p, [a.ctypes.data for a in ins], [a.ctypes.data for a in keep])

        out.append((label, call))
        if pd is None:
            return out


def implementations(shapes: list[tuple], rounds: int) -> None:
    """Every implementation oneDNN offers for each direction of each layer, timed on the same
    buffers, rounds alternating between them."""
    for name, batch, size, c, o, k in shapes:
        spec = onednn.spec_of((batch, size, size, c), (o, c, k, k), True, (1, 1),
                              ((k // 2, k // 2), (k // 2, k // 2)))
        rng = np.random.default_rng(0)
        x = rng.standard_normal(batch * size * size * c).astype(np.float32)
        dy = rng.standard_normal(batch * size * size * o).astype(np.float32)
        w = rng.standard_normal(o * c * k * k).astype(np.float32)
        ins = {
            "forward": [x, w, np.zeros(o, np.float32)],
            "backward_data": [dy, w],
            "backward_weights": [x, dy],
        }
        flops = gflop(batch, size, c, o, k)
        for direction in DIRECTIONS:
            found = _candidates(spec, direction, ins[direction])
            timed = {impl: call for impl, call in found if call is not None}
            for call in timed.values():  # warm-up
                call()
                call()
            times = interleaved_times(timed, rounds)
            cells = []
            for impl, _ in found:
                if impl not in times:
                    cells.append(f"{impl} (not timed)")
                    continue
                ms = statistics.median(times[impl]) * 1e3
                cells.append(f"{impl} {ms:.2f} ms ({flops / ms * 1e3:.0f} GF/s)")
            print(f"{name} b{batch} {direction}: " + "; ".join(cells), flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--impls", action="store_true",
                    help="time every implementation oneDNN offers, per direction")
    ap.add_argument("--rounds", type=int, default=15, help="timed rounds (the median is shown)")
    ap.add_argument("--layers", nargs="+", metavar="TEXT",
                    help="only the layers whose name contains one of these")
    ap.add_argument("--quick", action="store_true",
                    help="CI: the first layer at batch 2, 2 rounds")
    args = ap.parse_args(argv)
    if not onednn.enabled():
        ap.error("oneDNN is not available (pip install -e '.[onednn]'), or NINCC_ONEDNN=0")
    shapes = [s for s in SHAPES if not args.layers or any(t in s[0] for t in args.layers)]
    if not shapes:
        ap.error(f"no layer matches {args.layers}; the layers: {', '.join(s[0] for s in SHAPES)}")
    if args.quick:
        name, _, size, c, o, k = SHAPES[0]
        shapes, args.rounds = [(name, 2, size, c, o, k)], 2
    (implementations if args.impls else compare)(shapes, args.rounds)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
