"""Benchmark nincc against PyTorch on the zoo nets, in one run, on the same weights.

Usage::

    python tools/bench.py                        # every zoo net, inference and train step
    python tools/bench.py --nets nin_cifar10 --batches 64 --modes train
    python tools/bench.py --quick                # CI: smallest net, batch 2, 2 timed rounds
    python tools/bench.py --json out.json        # also write the results as JSON

For each (net, batch, mode) it builds nincc's compiled step and the PyTorch variants (eager
NCHW, channels_last, torch.compile) from the same Graph and the same weights, checks that they
agree with nincc's plain lowering (outputs or loss within 1e-4 of max|ref|, weight gradients
within --grad-tolerance), then times them interleaved: each round runs every candidate once, so
load from other processes falls on all of them alike. The table shows medians.

- infer: the deploy net (Input -> ... -> Softmax "prob"), a jitted function of the outputs only;
- train: the train/val net in phase TRAIN, its Data tops fed as inputs; forward + backward +
  Caffe's SGD update (momentum 0.9, base_lr 0.01) through nincc.train.Trainer; PyTorch runs the
  same net with torch.optim.SGD.

nincc runs with its fast lowerings (nincc.fast, "nincc") and with the layer table's
("nincc-plain"); XLA flags are nincc's (nincc.xla_flags) unless --no-xla-flags. GFLOP/s come from
nincc's own FLOP counts (nincc.report), a train step counted as 3x the forward; "% ceil" is
against the fp32 ceiling measured at the start: the best rate of an n x n x n product (NumPy's
BLAS, XLA's dot through YNNPACK and through Eigen, PyTorch's) and of a 3x3 convolution (XLA's,
PyTorch's oneDNN), since no one library reaches the machine's limit on every host. "peak MB" is
how far the resident set grows during one step above its size just before, measured in a child
process per candidate where large allocations go straight back to the system
(MALLOC_MMAP_THRESHOLD_), so both frameworks are measured alike;
"goal" is the issue's speed goal for a nincc row: met when it runs at 1.2x the best PyTorch
variant or at 85 % of the ceiling (the lower of the two bars), else the speed-up it still needs.
"XLA temp MB" is XLA's own memory analysis of nincc's executable. ``--malloc retain`` runs the
whole process (both frameworks) with the glibc tunables the ``nincc`` command sets for itself
(nincc.malloc); the header's "malloc" says which setting a run had. PyTorch is optional
(``pip install 'nincc[bench]'``); without it only nincc is timed.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
MMAP_THRESHOLD = "131072"
TORCH_VARIANTS = ("eager", "channels_last", "compile")


# ---------------------------------------------------------------- the nets


@dataclass(frozen=True)
class NetSpec:
    """A zoo net: its deploy and train/val files, the image shape and the batches to time."""

    name: str
    deploy: str
    train: str
    image: tuple[int, int, int]
    batches: tuple[int, ...]


NETS = {
    spec.name: spec
    for spec in (
        NetSpec(
            "nin_cifar10",
            "zoo/nin_cifar10_deploy.prototxt",
            "zoo/nin_cifar10.prototxt",
            (3, 32, 32),
            (64,),
        ),
        NetSpec(
            "nin_imagenet",
            "zoo/nin_imagenet_deploy.prototxt",
            "zoo/nin_imagenet.prototxt",
            (3, 224, 224),
            (16, 64),
        ),
        NetSpec(
            "nin_zfnet",
            "zoo/nin_zfnet_deploy.prototxt",
            "zoo/nin_zfnet.prototxt",
            (3, 224, 224),
            (16, 64),
        ),
    )
}


def load_case(spec: NetSpec, batch: int, mode: str):
    """(graph, params, inputs) of one case: the deploy net for "infer", the train/val net in
    phase TRAIN for "train"; params from Caffe's fillers (seed 0), random inputs (seed 0)."""
    import jax
    import numpy as np

    import nincc

    shape = (batch, *spec.image)
    if mode == "infer":
        graph = nincc.load_graph(REPO / spec.deploy, phase="TEST", input_shapes={"data": shape})
    else:
        graph = nincc.load_graph(
            REPO / spec.train, phase="TRAIN", input_shapes={"data": shape, "label": (batch,)}
        )
    params = jax.tree_util.tree_map(np.asarray, nincc.compile(graph, jit=False).init(seed=0))
    return graph, params, make_inputs(graph)


def make_inputs(graph, seed: int = 0) -> dict[str, Any]:
    """Gaussian images and in-range labels for every fed blob (host arrays)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    out = {}
    for vid in graph.inputs:
        v = graph.value(vid)
        if v.blob == "label":
            out[v.blob] = rng.integers(0, _classes(graph), v.shape).astype(np.float32)
        else:
            out[v.blob] = rng.standard_normal(v.shape).astype(np.float32)
    return out


def _classes(graph) -> int:
    """The channel count of the loss layer's score bottom."""
    for layer in graph.layers:
        if layer.is_loss:
            return graph.value(layer.bottoms[0]).shape[1]
    raise ValueError("the net has no loss layer")


def graph_flops(graph) -> int:
    from nincc import report

    return report.totals(report.layer_rows(graph))["flops"]


# ---------------------------------------------------------------- measuring


def interleaved_times(cands: Mapping[str, Callable[[], Any]], rounds: int) -> dict[str, list]:
    """Run every candidate once per round, in turn; return each one's wall times."""
    times: dict[str, list[float]] = {name: [] for name in cands}
    for _ in range(rounds):
        for name, fn in cands.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return times


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_growth(fn: Callable[[], Any]) -> int:
    """Bytes the resident set grows to during ``fn()`` above its size just before."""
    gc.collect()
    base = peak = _rss()
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _rss())
            time.sleep(0.0005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        fn()
    finally:
        done.set()
        sampler.join()
    return max(peak, _rss()) - base


def ceilings(n: int, rounds: int, use_torch: bool) -> dict[str, float]:
    """fp32 GFLOP/s of compute-bound kernels (medians); the best of them is the ceiling.

    An n x n x n product through NumPy's BLAS, XLA's dot as nincc's flags route it (YNNPACK),
    and XLA's dot through Eigen (written as a 1x1 convolution, which XLA turns into an Eigen
    dot); a 3x3 channels-last convolution through XLA (256 -> 256 channels on 28x28, batch 16;
    batch 1 when n < 1024); with PyTorch, its matrix product and the same convolution
    (oneDNN, channels_last). No single library reaches the machine's limit on every host: on
    an AVX-512 machine oneDNN's convolutions have run at twice OpenBLAS's 4096^3 product, so a
    ceiling taken from one product alone would flatter everything measured against it.
    """
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax import lax

    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), np.float32)
    b = rng.standard_normal((n, n), np.float32)
    ja, jb = jnp.asarray(a), jnp.asarray(b)
    batch = 16 if n >= 1024 else 1
    x = rng.standard_normal((batch, 28, 28, 256), np.float32)
    w = rng.standard_normal((3, 3, 256, 256), np.float32)
    jx, jw = jnp.asarray(x), jnp.asarray(w)
    mm_flops, conv_flops = 2 * n**3, 2 * batch * 28 * 28 * 256 * 256 * 9

    dot = jax.jit(jnp.dot)

    @jax.jit
    def eigen_dot(a, b):
        dn = ("NHWC", "HWIO", "NHWC")
        y = lax.conv_general_dilated(
            a[None, None], b[None, None], (1, 1), "VALID", dimension_numbers=dn
        )
        return y[0, 0]

    @jax.jit
    def conv(x, w):
        return lax.conv_general_dilated(
            x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )

    cands: dict[str, Callable[[], Any]] = {
        "numpy": lambda: a @ b,
        "xla": lambda: jax.block_until_ready(dot(ja, jb)),
        "xla-eigen": lambda: jax.block_until_ready(eigen_dot(ja, jb)),
        "xla-conv": lambda: jax.block_until_ready(conv(jx, jw)),
    }
    flops = {"numpy": mm_flops, "xla": mm_flops, "xla-eigen": mm_flops, "xla-conv": conv_flops}
    if use_torch:
        import torch

        ta, tb = torch.from_numpy(a), torch.from_numpy(b)
        tx = torch.from_numpy(x).permute(0, 3, 1, 2)  # NCHW view of NHWC memory: channels_last
        tw = torch.from_numpy(w).permute(3, 2, 0, 1).contiguous(memory_format=torch.channels_last)

        def torch_conv() -> None:
            with torch.no_grad():
                torch.nn.functional.conv2d(tx, tw, padding=1)

        cands.update({"torch": lambda: ta @ tb, "torch-conv": torch_conv})
        flops.update({"torch": mm_flops, "torch-conv": conv_flops})
    for fn in cands.values():  # compile and warm up
        fn()
    times = interleaved_times(cands, rounds)
    return {k: flops[k] / statistics.median(v) / 1e9 for k, v in times.items()}


def format_ceilings(ceil: Mapping[str, float]) -> str:
    return ", ".join(f"{k} {v:.0f}" for k, v in ceil.items()) + " GFLOP/s"


def rel_err(got, ref) -> float:
    """max|got - ref| / max|ref|."""
    import numpy as np

    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(got - ref)) / max(np.max(np.abs(ref)), 1e-30))


# ---------------------------------------------------------------- nincc


def lowering(kind: str) -> bool | tuple[str, ...]:
    """``run_graph``'s ``fast`` argument for a lowering kind: the layer table's lowerings
    ("plain"), nincc.fast's ("fast"; "xla": the same on XLA's convolution kernels), or the fast
    lowerings of some types ("fast=Pooling,LRN")."""
    if kind == "plain":
        return False
    if "=" in kind:
        return tuple(kind.split("=", 1)[1].split(","))
    return True


def kernels(kind: str):
    """While tracing a candidate: "xla" turns nincc.onednn off, as NINCC_ONEDNN=0 does."""
    from nincc import onednn

    return onednn.disabled() if kind == "xla" else contextlib.nullcontext()


def _check_kind(kind: str) -> str:
    if kind in ("fast", "plain", "xla") or kind.startswith("fast="):
        return kind
    raise argparse.ArgumentTypeError(
        f"unknown lowering {kind!r}: fast, xla, plain or fast=Type,..."
    )


def impl_name(kind: str) -> str:
    return "nincc" if kind == "fast" else f"nincc-{kind}"


class NinccInfer:
    """The deploy net's forward through nincc.CompiledNet.bind (weights held as the kernels
    read them), jitted, returning the net's outputs only."""

    def __init__(self, graph, params, inputs, kind: str):
        import jax

        from nincc.compile import CompiledNet

        net = CompiledNet(graph, fast=lowering(kind))
        bound = net.bind(params)
        self.names = net.output_names
        fn = bound.function(self.names)
        self.params = bound.params
        self.feeds = jax.device_put(inputs)
        t = time.perf_counter()
        self.compiled = fn.lower(self.params, self.feeds, None).compile()
        self.compile_s = time.perf_counter() - t

    def step(self):
        import jax

        return jax.block_until_ready(self.compiled(self.params, self.feeds, None))

    def output(self):
        return self.step()[0][self.names[-1]]

    def xla_memory(self) -> dict[str, int]:
        return _memory_analysis(self.compiled)


class NinccTrain:
    """One Caffe SGD iteration (iter_size 1) through nincc.train.Trainer."""

    def __init__(self, graph, params, inputs, kind: str):
        import jax
        import jax.numpy as jnp

        import nincc
        from nincc.solver import SolverConfig
        from nincc.train import Trainer

        self.kind = kind
        cfg = SolverConfig(type="SGD", momentum=0.9, base_lr=0.01)
        # As nincc.loop.Solver does on the CPU: k×k weights held as the kernels read them.
        self.trainer = Trainer(nincc.compile(graph, fast=lowering(kind)), cfg, held_layout=True)
        params = self.trainer.held(params)
        self.params = jax.tree_util.tree_map(jnp.array, params)  # copies: the step donates them
        self.opt = self.trainer.init(self.params)
        self.feeds = [jax.device_put(inputs)]
        t = time.perf_counter()
        self.step()
        self.compile_s = time.perf_counter() - t  # the first step: trace, compile and run

    def step(self):
        self.params, self.opt, res = self.trainer.step(self.params, self.opt, self.feeds)
        return res.loss

    def xla_memory(self) -> dict[str, int]:
        import jax

        keys = jax.random.split(jax.random.PRNGKey(0), 1)
        with kernels(self.kind):
            lowered = self.trainer._step.lower(self.params, self.opt, tuple(self.feeds), keys)
        return _memory_analysis(lowered.compile())


def _memory_analysis(compiled) -> dict[str, int]:
    try:
        m = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - not every backend has one
        return {}
    if m is None:
        return {}
    return {
        "temp": int(m.temp_size_in_bytes),
        "args": int(m.argument_size_in_bytes),
        "out": int(m.output_size_in_bytes),
        "alias": int(m.alias_size_in_bytes),
    }


def nincc_output(graph, params, inputs, kind: str) -> Any:
    """The net's last output with the given lowerings."""
    return NinccInfer(graph, params, inputs, kind).output()


def nincc_loss_and_grads(graph, params, inputs, kind: str) -> tuple[float, dict[str, Any]]:
    """Loss and every weight gradient ("layer__i") with dropout off (TEST behaviour)."""
    import jax
    import numpy as np

    from nincc.compile import run_graph, total_loss

    g = dataclasses.replace(graph, phase="TEST")

    def loss(p):
        env, _ = run_graph(g, p, inputs, fast=lowering(kind))
        return total_loss(g, env)

    val, grads = jax.jit(jax.value_and_grad(loss))(params)
    flat = {f"{k}__{i}": np.asarray(a) for k, arrs in grads.items() for i, a in enumerate(arrs)}
    return float(val), flat


# ---------------------------------------------------------------- PyTorch


def torch_available() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def _pair(values: tuple[int, ...], hw: tuple[int, int] | None, default: int) -> tuple[int, int]:
    if hw is not None:
        return (int(hw[0]), int(hw[1]))
    if not values:
        return (default, default)
    return (values[0], values[0]) if len(values) == 1 else (values[0], values[1])


def _torch_op(layer, graph, keys: list[str], train: bool) -> Callable:
    """fn(module, *bottoms) -> top for one zoo layer type (see torch_module)."""
    import torch.nn.functional as F

    a, t = layer.attrs, layer.type
    bshape = graph.value(layer.bottoms[0]).shape
    if t == "Convolution":
        if a.axis != 1 or len(bshape) != 4:
            raise NotImplementedError(f"{layer.name}: only 2-D NCHW convolutions")
        stride, pad = _pair(a.stride, a.stride_hw, 1), _pair(a.pad, a.pad_hw, 0)
        dil = _pair(a.dilation, None, 1)

        def conv(m, x):
            bias = m.w[keys[1]] if len(keys) > 1 else None
            return F.conv2d(x, m.w[keys[0]], bias, stride, pad, dil, a.group)

        return conv
    if t == "ReLU":
        return lambda m, x: (
            F.relu(x) if a.negative_slope == 0 else F.leaky_relu(x, a.negative_slope)
        )
    if t == "Pooling":
        if a.method not in ("MAX", "AVE"):
            raise NotImplementedError(f"{layer.name}: {a.method} pooling")
        kernel = a.kernel if a.kernel is not None else tuple(bshape[2:])
        pool = F.max_pool2d if a.method == "MAX" else F.avg_pool2d
        # torch's ceil_mode drops a last window that starts in the right padding: Caffe's rule
        return lambda m, x: pool(x, kernel, a.stride, a.pad, ceil_mode=a.ceil)
    if t == "Dropout":
        if not a.scale_train:
            raise NotImplementedError(f"{layer.name}: dropout without scale_train")
        return lambda m, x: F.dropout(x, a.ratio, training=m.training)
    if t == "LRN":
        if a.within_channel:
            raise NotImplementedError(f"{layer.name}: WITHIN_CHANNEL LRN")
        # both divide alpha by the window size
        return lambda m, x: F.local_response_norm(x, a.local_size, a.alpha, a.beta, a.k)
    if t == "InnerProduct":
        axis = a.axis % len(bshape)

        def linear(m, x):
            w = m.w[keys[0]].t() if a.transpose else m.w[keys[0]]
            return F.linear(x.flatten(axis), w, m.w[keys[1]] if len(keys) > 1 else None)

        return linear
    if t == "Softmax":
        return lambda m, x: F.softmax(x, dim=a.axis)
    if t == "SoftmaxWithLoss":
        if a.ignore_label is not None or a.normalization not in ("VALID", "FULL"):
            raise NotImplementedError(f"{layer.name}: loss normalization {a.normalization}")

        def xent(m, x, label):
            n, c = x.shape[0], x.shape[1]
            return F.cross_entropy(x.reshape(n, c, -1), label.long().reshape(n, -1))

        return xent
    raise NotImplementedError(f"{layer.name}: no PyTorch translation for {t}")


def torch_module(graph, params, train: bool):
    """A torch.nn.Module computing ``graph`` with a copy of ``params``, shapes checked.

    It covers the zoo's layer types: Input/Data (fed), Convolution, ReLU, Pooling, Dropout, LRN
    (across channels), InnerProduct, Softmax and SoftmaxWithLoss (VALID/FULL normalization, no
    ignore_label). ``forward(feeds)`` returns the net loss when ``train``, else the last output.
    """
    import numpy as np
    import torch
    from torch import nn

    weights = nn.ParameterDict()
    ops: list[tuple[str, Callable, list[str]]] = []
    losses: list[tuple[str, float]] = []
    for layer in graph.layers:
        if layer.type in ("Input", "Data"):
            for vid in layer.tops:
                blob = graph.value(vid).blob
                ops.append((vid, lambda m, feeds, blob=blob: feeds[blob], []))
            continue
        keys = []
        for i, spec in enumerate(layer.params):
            owner, idx = spec.share or (layer.name, i)
            key = f"{owner}__{idx}"
            if key not in weights:
                weights[key] = nn.Parameter(torch.from_numpy(np.array(params[owner][idx])))
            keys.append(key)
        ops.append((layer.tops[0], _torch_op(layer, graph, keys, train), list(layer.bottoms)))
        losses += [(vid, float(w)) for vid, w in zip(layer.tops, layer.loss_weights) if w]
    out_vid = graph.outputs[-1]

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = weights

        def run(self, feeds):
            env: dict[str, Any] = {}
            for top, fn, bottoms in ops:
                env[top] = fn(self, *(env[b] for b in bottoms)) if bottoms else fn(self, feeds)
            return env

        def forward(self, feeds):
            env = self.run(feeds)
            if train:
                return sum(w * env[v] for v, w in losses)
            return env[out_vid]

    net = Net()
    net.train(train)
    with torch.no_grad():
        env = net.run(
            {graph.value(v).blob: torch.zeros(graph.value(v).shape) for v in graph.inputs}
        )
    for vid, x in env.items():
        if tuple(x.shape) != tuple(graph.value(vid).shape):
            raise ValueError(
                f"PyTorch blob '{graph.value(vid).blob}' has shape "
                f"{list(x.shape)}, nincc's is {list(graph.value(vid).shape)}"
            )
    return net


class TorchRunner:
    """One PyTorch variant: eager NCHW, channels_last, or torch.compile of the eager module."""

    def __init__(self, graph, params, inputs, variant: str, train: bool):
        import torch

        self.train = train
        self.net = torch_module(graph, params, train)
        self.feeds = {k: torch.from_numpy(v.copy()) for k, v in inputs.items()}
        if variant == "channels_last":
            self.net = self.net.to(memory_format=torch.channels_last)
            self.feeds = {
                k: v.contiguous(memory_format=torch.channels_last) if v.ndim == 4 else v
                for k, v in self.feeds.items()
            }
        if variant == "compile":
            # Every case compiles the same module code for new shapes; past dynamo's recompile
            # limit (8) it silently runs eager, so each case starts from a fresh dynamo cache.
            torch._dynamo.reset()
            self.fn = torch.compile(self.net)
        else:
            self.fn = self.net
        if train:
            self.opt = torch.optim.SGD(self.net.parameters(), lr=0.01, momentum=0.9)
        t = time.perf_counter()
        self.step()
        self.compile_s = time.perf_counter() - t

    def step(self):
        import torch

        if not self.train:
            with torch.inference_mode():
                return self.fn(self.feeds)
        self.opt.zero_grad(set_to_none=True)
        loss = self.fn(self.feeds)
        loss.backward()
        self.opt.step()
        return float(loss.detach())

    def output(self):
        return self.step().numpy()


def torch_loss_and_grads(graph, params, inputs) -> tuple[float, dict[str, Any]]:
    """Loss and every weight gradient in eval mode (dropout off)."""
    import torch

    net = torch_module(graph, params, True)
    net.eval()
    loss = net({k: torch.from_numpy(v.copy()) for k, v in inputs.items()})
    loss.backward()
    return float(loss.detach()), {k: p.grad.numpy() for k, p in net.w.items()}


# ---------------------------------------------------------------- one case


@dataclass
class Row:
    """One (net, batch, mode, implementation) measurement."""

    net: str
    batch: int
    mode: str
    impl: str
    median_s: float | None = None
    images_s: float | None = None
    gflops: float | None = None
    pct_ceiling: float | None = None
    compile_s: float | None = None
    peak_mb: float | None = None
    xla_mb: dict[str, float] = field(default_factory=dict)
    max_rel_err: float | None = None
    max_grad_err: float | None = None
    note: str = ""


def build(impl: str, graph, params, inputs, mode: str):
    """The candidate object for an implementation name (nincc-*, torch-*)."""
    if impl.startswith("torch-"):
        return TorchRunner(graph, params, inputs, impl[len("torch-") :], mode == "train")
    kind = "fast" if impl == "nincc" else impl[len("nincc-") :]
    with kernels(kind):
        return (NinccInfer if mode == "infer" else NinccTrain)(graph, params, inputs, kind)


class Checker:
    """Compares a candidate with nincc's plain lowering: outputs (infer) or loss and weight
    gradients with dropout off (train)."""

    def __init__(self, graph, params, inputs, mode: str, tol: float, grad_tol: float):
        self.graph, self.params, self.inputs, self.mode = graph, params, inputs, mode
        self.tol, self.grad_tol = tol, grad_tol
        if mode == "infer":
            self.out = nincc_output(graph, params, inputs, "plain")
        else:
            self.loss, self.grads = nincc_loss_and_grads(graph, params, inputs, "plain")

    def check(self, row: Row, cand) -> bool:
        import numpy as np

        if self.mode == "infer":
            row.max_rel_err = rel_err(np.asarray(cand.output()), self.out)
        else:
            if row.impl.startswith("torch-"):
                loss, grads = torch_loss_and_grads(self.graph, self.params, self.inputs)
            else:
                kind = "fast" if row.impl == "nincc" else row.impl[len("nincc-") :]
                with kernels(kind):
                    loss, grads = nincc_loss_and_grads(self.graph, self.params, self.inputs, kind)
            row.max_rel_err = rel_err(loss, self.loss)
            row.max_grad_err = max(rel_err(grads[k], self.grads[k]) for k in self.grads)
        if row.max_rel_err > self.tol:
            row.note = f"outputs differ from nincc-plain's by {row.max_rel_err:.1e}"
            return False
        if row.max_grad_err is not None and row.max_grad_err > self.grad_tol:
            row.note = f"gradients differ from nincc-plain's by {row.max_grad_err:.1e}"
            return False
        return True


def run_case(spec: NetSpec, batch: int, mode: str, args, ceiling: float) -> list[Row]:
    """Build, verify and time (interleaved) every candidate of one (net, batch, mode)."""
    from nincc import onednn

    graph, params, inputs = load_case(spec, batch, mode)
    flops = graph_flops(graph) * (3 if mode == "train" else 1)
    checker = Checker(graph, params, inputs, mode, args.tolerance, args.grad_tolerance)
    impls = [impl_name(k) for k in args.nincc if k != "xla" or onednn.enabled()]
    if torch_available() and not args.no_torch:
        impls += [f"torch-{v}" for v in args.torch]
    rows = {impl: Row(spec.name, batch, mode, impl) for impl in impls}
    cands: dict[str, Any] = {}
    for impl, row in rows.items():
        try:
            cand = build(impl, graph, params, inputs, mode)
            ok = checker.check(row, cand)
        except Exception as e:  # noqa: BLE001 - a variant that fails is reported and skipped
            row.note = f"skipped: {type(e).__name__}: {str(e).strip().splitlines()[0][:90]}"
            continue
        if ok:
            row.compile_s = cand.compile_s
            cands[impl] = cand
    steps = {impl: c.step for impl, c in cands.items()}
    interleaved_times(steps, args.warmup)
    for impl, ts in interleaved_times(steps, args.rounds).items():
        row = rows[impl]
        row.median_s = statistics.median(ts)
        row.images_s = batch / row.median_s
        row.gflops = flops / row.median_s / 1e9
        row.pct_ceiling = 100 * row.gflops / ceiling
        if impl.startswith("nincc"):
            row.xla_mb = {k: v / 2**20 for k, v in cands[impl].xla_memory().items()}
    del cands, steps
    gc.collect()
    if args.memory:
        for impl in impls:
            if rows[impl].median_s is not None and impl != "torch-compile":
                rows[impl].peak_mb = child_peak_mb(spec.name, batch, mode, impl, args)
    return list(rows.values())


# ---------------------------------------------------------------- peak memory (child process)


def child_peak_mb(net: str, batch: int, mode: str, impl: str, args) -> float | None:
    """Peak resident-set growth of one step, measured in a fresh process (see the docstring)."""
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--memory-child",
        json.dumps({"net": net, "batch": batch, "mode": mode, "impl": impl}),
    ]
    if args.no_xla_flags:
        cmd.append("--no-xla-flags")
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=MMAP_THRESHOLD)
    env.pop("GLIBC_TUNABLES", None)  # --malloc retain's would keep the freed memory resident
    try:
        out = subprocess.run(
            cmd, env=env, capture_output=True, text=True, timeout=900, check=True
        ).stdout
        return json.loads(out.strip().splitlines()[-1])["peak_mb"]
    except (subprocess.SubprocessError, ValueError, KeyError, IndexError):
        return None


def memory_child(spec_json: str) -> int:
    """Build one candidate, run two steps, then print the RSS growth of a third as JSON."""
    job = json.loads(spec_json)
    graph, params, inputs = load_case(NETS[job["net"]], job["batch"], job["mode"])
    cand = build(job["impl"], graph, params, inputs, job["mode"])
    cand.step()
    cand.step()
    print(json.dumps({"peak_mb": peak_rss_growth(cand.step) / 2**20}))
    return 0


# ---------------------------------------------------------------- report


COLUMNS = (
    "net",
    "batch",
    "mode",
    "impl",
    "img/s",
    "GFLOP/s",
    "% ceil",
    "vs best torch",
    "goal",
    "compile s",
    "peak MB",
    "XLA temp MB",
    "note",
)


GOAL_RATIO, GOAL_CEILING = 1.2, 85.0


def goal(ratio: float | None, pct_ceiling: float | None) -> str:
    """The speed goal for a nincc row: 1.2x the best PyTorch variant, or 85 % of the ceiling
    where 1.2x would exceed that (so whichever bar is lower). "met", or the speed-up still
    needed to reach the lower bar."""
    if ratio is None or pct_ceiling is None:
        return "-"
    if ratio >= GOAL_RATIO or pct_ceiling >= GOAL_CEILING:
        return "met"
    need = min(GOAL_RATIO / ratio, GOAL_CEILING / pct_ceiling)
    return f"+{100 * (need - 1):.0f} %"


def table_rows(rows: list[Row]) -> list[tuple[str, ...]]:
    best: dict[tuple, float] = {}
    for r in rows:
        if r.impl.startswith("torch-") and r.images_s:
            key = (r.net, r.batch, r.mode)
            best[key] = max(best.get(key, 0.0), r.images_s)

    def fmt(v, spec):
        return "-" if v is None else format(v, spec)

    out = []
    for r in rows:
        b = best.get((r.net, r.batch, r.mode))
        ratio = r.images_s / b if b and r.images_s else None
        out.append(
            (
                r.net,
                str(r.batch),
                r.mode,
                r.impl,
                fmt(r.images_s, ".1f"),
                fmt(r.gflops, ".0f"),
                fmt(r.pct_ceiling, ".0f"),
                fmt(ratio, ".2f") + ("x" if ratio else ""),
                goal(ratio, r.pct_ceiling) if r.impl.startswith("nincc") else "",
                fmt(r.compile_s, ".1f"),
                fmt(r.peak_mb, ".0f"),
                fmt(r.xla_mb.get("temp"), ".0f"),
                r.note,
            )
        )
    return out


def format_table(rows: list[Row]) -> str:
    body = table_rows(rows)
    widths = [max(len(x[i]) for x in [COLUMNS, *body]) for i in range(len(COLUMNS))]
    left = {0, 2, 3, 12}
    lines = []
    for cells in [COLUMNS, tuple("-" * w for w in widths), *body]:
        lines.append(
            "  ".join(
                c.ljust(w) if i in left else c.rjust(w)
                for i, (c, w) in enumerate(zip(cells, widths))
            ).rstrip()
        )
    return "\n".join(lines)


def markdown_table(rows: list[Row]) -> str:
    """The table as Markdown (docs/performance.md), without the note column when it is empty."""
    body = table_rows(rows)
    cols = list(COLUMNS)
    if not any(r[-1] for r in body):
        cols, body = cols[:-1], [r[:-1] for r in body]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(r) + " |" for r in body]
    return "\n".join(lines)


def report(paths: list[str]) -> int:
    """Print one Markdown table of the rows of earlier --json runs, and their environments."""
    rows: list[Row] = []
    for path in paths:
        doc = json.loads(Path(path).read_text())
        env, ceil = doc["environment"], doc["ceilings_gflops"]
        print(
            f"<!-- {path}: {env['date']}, XLA_FLAGS={env['XLA_FLAGS']!r}, malloc: "
            f"{env.get('malloc', '-')}, simd {env.get('simd', '-')}, FFT {env.get('fft', '-')}, "
            f"oneDNN {env.get('onednn', '-')}, "
            "ceiling "
            f"{format_ceilings(ceil)} -->"
        )
        rows += [Row(**r) for r in doc["rows"]]
    print(markdown_table(rows))
    return 0


def environment() -> dict[str, Any]:
    import jax
    import numpy as np

    from nincc import fftconv, onednn
    from nincc.malloc import describe

    env = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "cpu": _cpu_name(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "numpy": np.__version__,
        "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
        # how malloc gets its pages: both frameworks' step times depend on it (sections 9
        # and 23 of docs/performance.md); the benchmark runs them under one setting
        "malloc": describe(),
        # the vector units (the zoo's ratios differ between AVX2 and AVX-512 hosts) and
        # whether the train step may run its 5x5 layers through the FFT (NINCC_FFT; section 26)
        "simd": _simd(),
        "fft": "on" if fftconv.enabled() else "off",
        # oneDNN's convolutions (nincc.onednn; section 27): its version, or off
        "onednn": onednn.version() if onednn.enabled() else "off",
    }
    if torch_available():
        import torch

        env["torch"] = torch.__version__
        env["torch_threads"] = torch.get_num_threads()
    return env


def _cpuinfo(field: str) -> str | None:
    """The first ``field`` line's value in /proc/cpuinfo, or None where it cannot be read."""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith(field):
                return line.split(":", 1)[1].strip()
    return None


def _simd() -> str:
    """The widest x86 vector extension /proc/cpuinfo lists ("-" where it cannot be read)."""
    flags = set((_cpuinfo("flags") or "").split())
    return next((n for n in ("avx512f", "avx2", "avx", "sse4_2") if n in flags), "-")


def _cpu_name() -> str:
    return _cpuinfo("model name") or platform.processor() or platform.machine()


# ---------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nets", nargs="+", choices=sorted(NETS))
    ap.add_argument(
        "--batches", nargs="+", type=int, help="batches for every net (default: each net's own)"
    )
    ap.add_argument("--modes", nargs="+", choices=("infer", "train"), default=["infer", "train"])
    ap.add_argument(
        "--quick",
        action="store_true",
        help="CI: smallest net, batch 2, 1 warm-up and 2 timed rounds, no torch.compile",
    )
    ap.add_argument("--rounds", type=int, default=7, help="timed rounds (the median is shown)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument(
        "--nincc",
        nargs="+",
        type=_check_kind,
        default=["fast", "xla", "plain"],
        help="nincc lowerings: fast (nincc.fast's), xla (the same on XLA's convolution "
        "kernels: NINCC_ONEDNN=0; left out where oneDNN is not installed), plain (the layer "
        "table's), fast=Type,Type (only those types' fast lowerings)",
    )
    ap.add_argument("--torch", nargs="+", choices=TORCH_VARIANTS, default=list(TORCH_VARIANTS))
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument(
        "--no-xla-flags",
        action="store_true",
        help="leave XLA_FLAGS as they are (do not apply nincc.xla_flags)",
    )
    ap.add_argument(
        "--memory",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="measure each candidate's peak memory in a child process",
    )
    ap.add_argument(
        "--malloc",
        choices=("default", "retain"),
        default="default",
        help="retain: re-run this process with the glibc tunables the nincc command runs "
        "with (nincc.malloc: freed memory kept for reuse); both frameworks run under them",
    )
    ap.add_argument("--ceiling-n", type=int, default=4096)
    ap.add_argument(
        "--tolerance",
        type=float,
        default=1e-4,
        help="outputs (infer) or loss (train) must agree within this x max|ref|",
    )
    ap.add_argument(
        "--grad-tolerance",
        type=float,
        default=3e-2,
        help="weight gradients must agree within this x max|ref|: near ties in MAX "
        "pooling after ReLU at initialisation route gradients differently in any "
        "two float32 implementations (up to 1.9e-2 in NIN-ZFNet's middle layers, where "
        "the layers next to the loss agree to ~1e-6)",
    )
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    ap.add_argument(
        "--report",
        nargs="+",
        metavar="JSON",
        help="print the rows of earlier --json runs as one Markdown table; run nothing",
    )
    ap.add_argument("--memory-child", metavar="JOB", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.quick:
        args.nets = args.nets or ["nin_cifar10"]
        args.batches = args.batches or [2]
        args.rounds, args.warmup, args.ceiling_n = min(args.rounds, 2), 1, 256
        args.torch = [v for v in args.torch if v != "compile"]
    args.nets = args.nets or list(NETS)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.report:
        return report(args.report)
    if not args.no_xla_flags:
        from nincc import xla_flags

        xla_flags.apply()
    if args.memory_child:
        return memory_child(args.memory_child)
    if args.malloc == "retain":
        from nincc.malloc import reexec_retaining

        reexec_retaining()  # returns where the tunables are set already or cannot be
    env = environment()
    ceils = ceilings(args.ceiling_n, 3, torch_available() and not args.no_torch)
    ceiling = max(ceils.values())
    print(
        f"# {env['date']}  {env['cpu']} x{env['cores']}  python {env['python']}  "
        f"jax {env['jax']}  torch {env.get('torch', '-')}  XLA_FLAGS={env['XLA_FLAGS']!r}  "
        f"malloc: {env['malloc']}  simd: {env['simd']}  FFT: {env['fft']}  "
        f"oneDNN: {env['onednn']}"
    )
    print(
        f"# fp32 ceiling {ceiling:.0f} GFLOP/s, the best of: products {args.ceiling_n}^3 and a "
        f"3x3 convolution: {format_ceilings(ceils)}",
        flush=True,
    )
    rows: list[Row] = []
    for name in args.nets:
        for batch in args.batches or NETS[name].batches:
            for mode in args.modes:
                case = run_case(NETS[name], batch, mode, args, ceiling)
                rows += case
                print(format_table(case), flush=True)
    print()
    print(format_table(rows))
    if args.json:
        doc = {
            "environment": env,
            "ceilings_gflops": ceils,
            "rows": [dataclasses.asdict(r) for r in rows],
        }
        Path(args.json).write_text(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
