"""What a net compiles to: its phase program at each level, XLA's cost and memory analyses.

The phase program is what a user runs: in phase TEST the forward pass returning the net's output
blobs; in phase TRAIN the loss and its gradient with respect to every parameter blob (a net with
no loss gets Caffe's Backward from output diffs instead: the diffs are arguments). Each layer is
traced inside ``jax.named_scope(<layer name>)``, so its Caffe name is in the jaxpr's name stack,
the StableHLO locations, and the HLO ``op_name`` metadata, before and after XLA's optimisation.

``--cost`` sets nincc's own counts (the layer table's forward FLOPs, and the bytes a layer must
read and write: bottoms, tops and parameters once each) beside XLA's cost analysis of each layer
compiled alone, and of the whole program. ``--memory`` sets the memory Caffe's blobs take beside
XLA's buffer assignment of the compiled inference and training programs.
"""

from __future__ import annotations

import re
import textwrap
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from . import layers as table
from .build import AUTO_TOP
from .compile import run_graph, total_loss
from .errors import GraphError, InputError, ShapeError
from .ir import Graph, Layer
from .layers.base import LowerCtx, count

LEVELS = ("jaxpr", "stablehlo", "hlo", "optimized-hlo")
F32 = 4  # bytes per element: every blob and parameter is float32


# ---------------------------------------------------------------- building at a batch size


def batch_shapes(graph: Graph, batch: int) -> dict[str, tuple[int, ...]]:
    """The input shapes of ``graph`` with the leading (batch) axis set to ``batch``."""
    if batch < 1:
        raise InputError(f"--batch must be at least 1, got {batch}")
    shapes = {}
    for vid in graph.inputs:
        v = graph.value(vid)
        if not v.shape:
            raise InputError(f"input blob '{v.blob}' is a scalar: it has no batch axis to set")
        shapes[v.blob] = (batch, *v.shape[1:])
    return shapes


def load_graph_at(
    source: Any,
    batch: int | None = None,
    phase: str = "TEST",
    level: int | None = None,
    stages: Sequence[str] = (),
    input_shapes: Mapping[str, Sequence[int]] | None = None,
) -> Graph:
    """``nincc.load_graph`` with every input's batch axis set to ``batch`` (None: as written).

    A batch the net cannot take (a Reshape with a fixed count, a Slice of the batch axis) raises
    ShapeError naming the batch and the layer.
    """
    from . import load_graph, load_net_param

    net = load_net_param(source)
    graph = load_graph(net, phase, level, stages, input_shapes)
    if batch is None:
        return graph
    shapes = {**dict(input_shapes or {}), **batch_shapes(graph, batch)}
    try:
        return load_graph(net, phase, level, stages, shapes)
    except ShapeError as e:
        raise ShapeError(f"the net cannot take batch {batch}: {e}") from None


def check_lowerable(graph: Graph) -> None:
    """Raise GraphError if a layer's output shape depends on its data (no single XLA program)."""
    dynamic = [
        layer.name
        for layer in graph.layers
        if table.REGISTRY[layer.type].extra.get("data_dependent_shape")
    ]
    if dynamic:
        raise GraphError(
            f"layer(s) {dynamic} have data-dependent output shapes; "
            "the net runs op by op and has no single XLA program"
        )


# ---------------------------------------------------------------- the phase program


def _spec(shape: Sequence[Any], dtype: Any = jnp.float32) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(shape), dtype)


def param_specs(graph: Graph) -> dict[str, list[jax.ShapeDtypeStruct]]:
    """The params pytree of ``graph`` as abstract float32 arrays."""
    return {name: [_spec(s) for s in shapes] for name, shapes in graph.param_shapes().items()}


def input_specs(graph: Graph) -> dict[str, jax.ShapeDtypeStruct]:
    """Fed blob name → abstract float32 array of its shape."""
    return {graph.value(v).blob: _spec(graph.value(v).shape) for v in graph.inputs}


def output_blobs(graph: Graph) -> dict[str, str]:
    """Blob name → value id of the net's outputs (every blob when nothing is left over)."""
    outs = {graph.value(v).blob: v for v in graph.outputs if graph.value(v).blob != AUTO_TOP}
    return outs or {b: v for b, v in graph.blob_values().items() if b != AUTO_TOP}


def forward_fn(graph: Graph, blobs: Sequence[str] | None = None) -> Callable:
    """``forward(params, inputs) -> {blob: array}`` for the net's outputs (or the named blobs).

    Layers that draw random numbers get a fixed key, so the function is deterministic.
    """
    ids = graph.blob_values()
    if blobs is None:
        chosen = output_blobs(graph)
    else:
        missing = [b for b in blobs if b not in ids]
        if missing:
            raise InputError(f"no blob(s) {missing} in net '{graph.name}'; blobs are {sorted(ids)}")
        chosen = {b: ids[b] for b in blobs}

    def forward(params, inputs):
        env, _ = run_graph(graph, params, inputs, jax.random.PRNGKey(0))
        return {blob: env[vid] for blob, vid in chosen.items()}

    return forward


@dataclass(frozen=True)
class Program:
    """A traceable phase program with abstract arguments, ready for ``jax.jit(fn).trace``."""

    fn: Callable
    args: tuple
    what: str


def phase_program(graph: Graph) -> Program:
    """TEST: the forward pass. TRAIN: the loss and its gradient (or Caffe's Backward from
    output diffs when the net has no loss), with a PRNG key argument for dropout."""
    check_lowerable(graph)
    params, inputs = param_specs(graph), input_specs(graph)
    if graph.phase == "TEST":
        return Program(forward_fn(graph), (params, inputs), "forward: inputs -> output blobs")
    key = _spec((2,), jnp.uint32)
    if any(layer.is_loss for layer in graph.layers):

        def loss_and_grad(params, inputs, rng):
            def loss(p):
                env, _ = run_graph(graph, p, inputs, rng)
                return total_loss(graph, env)

            return jax.value_and_grad(loss)(params)

        return Program(loss_and_grad, (params, inputs, key), "the loss and its parameter gradient")
    outs = output_blobs(graph)
    diffs = {b: _spec(graph.value(v).shape) for b, v in outs.items()}

    def backward(params, inputs, top_diffs, rng):
        def fwd(p):
            env, _ = run_graph(graph, p, inputs, rng)
            return {b: env[v] for b, v in outs.items()}

        out, vjp = jax.vjp(fwd, params)
        return out, vjp(top_diffs)[0]

    return Program(
        backward,
        (params, inputs, diffs, key),
        "no loss: Caffe's Backward from output diffs (an argument) to parameter gradients",
    )


_SCOPE_COMMENT = re.compile(r" {2,}# \[([^\]]*)\]$", re.M)


def _tidy_jaxpr(text: str) -> str:
    """The printer aligns each equation's scope comment past the longest line: pull the
    comments in to two spaces, and drop empty ones."""
    return _SCOPE_COMMENT.sub(lambda m: f"  # [{m.group(1)}]" if m.group(1) else "", text)


def lowered_text(graph: Graph, level: str) -> str:
    """The phase program at one of LEVELS, with layer names kept (named scopes)."""
    if level not in LEVELS:
        raise InputError(f"--lowered {level!r}: choose one of {', '.join(LEVELS)}")
    prog = phase_program(graph)
    traced = jax.jit(prog.fn).trace(*prog.args)
    if level == "jaxpr":
        return _tidy_jaxpr(traced.jaxpr.pretty_print(name_stack=True))
    lowered = traced.lower()
    if level == "stablehlo":
        return lowered.as_text(debug_info=True)
    if level == "hlo":
        return lowered.as_text(dialect="hlo", debug_info=True)
    return lowered.compile().as_text()


def _compiled(prog: Program) -> Any:
    return jax.jit(prog.fn).trace(*prog.args).lower().compile()


def _cost_dict(compiled: Any) -> dict[str, float]:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older jax: one dict per device program
        cost = cost[0] if cost else None
    return dict(cost or {})


# ---------------------------------------------------------------- cost: per layer and total


def _wrap(line: str, width: int = 100) -> str:
    """Wrap a prose line (tables stay as they are) with a hanging indent."""
    if len(line) <= width or "  " in line.strip():
        return line
    return textwrap.fill(line, width, subsequent_indent="    ")


@dataclass(frozen=True)
class LayerCost:
    """One layer's forward cost: nincc's count beside XLA's for the layer compiled alone."""

    name: str
    type: str
    flops: int
    xla_flops: float
    transcendentals: float
    bytes: int
    xla_bytes: float
    reason: str


def _layer_program(graph: Graph, layer: Layer) -> Program:
    """The layer's lower(), alone: (params, bottoms, fed inputs) -> tops."""
    entry = table.REGISTRY[layer.type]
    bshapes = [graph.value(b).shape for b in layer.bottoms]
    tshapes = [graph.value(t).shape for t in layer.tops]
    names = [graph.value(t).blob for t in layer.tops]

    def one_layer(params, bottoms, feeds):
        ctx = LowerCtx(
            phase=graph.phase,
            layer_name=layer.name,
            key=jax.random.PRNGKey(0),
            feeds=feeds,
            top_names=names,
            top_shapes=tshapes,
            bottom_shapes=bshapes,
        )
        with jax.named_scope(layer.name):
            return entry.lower(layer.attrs, params, bottoms, ctx)

    feeds = {n: _spec(s) for n, s in zip(names, tshapes)} if entry.source else {}
    args = ([_spec(p.shape) for p in layer.params], [_spec(s) for s in bshapes], feeds)
    return Program(one_layer, args, f"layer {layer.name}")


def _has_padding(attrs: Any) -> bool:
    """Whether a layer's attributes ask for zero padding (any nonzero ``pad*`` field)."""
    fields = getattr(attrs, "__dataclass_fields__", {})
    for name in fields:
        if name.startswith("pad"):
            value = getattr(attrs, name)
            items = value if isinstance(value, tuple) else (value,)
            if any(isinstance(v, int) and v for v in items):
                return True
    return False


REASONS = {
    "identity": "XLA does no arithmetic: the layer is a copy or identity in this phase",
    "uncounted": "nincc's table gives this layer type no FLOPs (data movement or not modelled)",
    "padding": "XLA does not count the multiply-adds over zero padding; nincc counts full windows",
    "transcendental": "XLA counts exp/log/pow/rsqrt as transcendentals, not FLOPs",
    "elementwise": (
        "XLA counts every element-wise op of the lowering (compare, select, multiply; a max "
        "window's compare and select per tap); nincc counts the nominal arithmetic once"
    ),
    "simplified": "XLA's algebraic simplification removed part of the arithmetic",
}


def _reason(ours: float, xla: float, transcendentals: float, attrs: Any) -> str:
    if abs(xla - ours) <= 0.01 * max(ours, xla):
        return ""
    if xla == 0:
        return "identity"
    if ours == 0:
        return "uncounted"
    if xla > ours:
        return "elementwise"
    if _has_padding(attrs):
        return "padding"
    if transcendentals:
        return "transcendental"
    return "simplified"


def layer_costs(graph: Graph) -> list[LayerCost]:
    """Each layer's forward FLOPs and bytes: nincc's counts and XLA's cost analysis of the
    layer compiled alone (identical layers on identical shapes are compiled once)."""
    check_lowerable(graph)
    cache: dict[Any, dict[str, float]] = {}
    rows = []
    for layer in graph.layers:
        entry = table.REGISTRY[layer.type]
        bshapes = [graph.value(b).shape for b in layer.bottoms]
        tshapes = [graph.value(t).shape for t in layer.tops]
        pshapes = tuple(p.shape for p in layer.params)
        key = (layer.type, layer.attrs, tuple(bshapes), tuple(tshapes), pshapes)
        if key not in cache:
            cache[key] = _cost_dict(_compiled(_layer_program(graph, layer)))
        cost = cache[key]
        flops = int(entry.flops(layer.attrs, bshapes, tshapes))
        xla, trans = float(cost.get("flops", 0.0)), float(cost.get("transcendentals", 0.0))
        moved = sum(count(s) for s in (*bshapes, *tshapes, *pshapes))
        rows.append(
            LayerCost(
                name=layer.name,
                type=layer.type,
                flops=flops,
                xla_flops=xla,
                transcendentals=trans,
                bytes=F32 * moved,
                xla_bytes=float(cost.get("bytes accessed", 0.0)),
                reason=_reason(flops, xla, trans, layer.attrs),
            )
        )
    return rows


def program_cost(graph: Graph) -> dict[str, float]:
    """XLA's cost analysis of the whole phase program (after fusion and simplification)."""
    return _cost_dict(_compiled(phase_program(graph)))


def cost_report(graph: Graph) -> str:
    """`nincc inspect --cost`: per-layer and total FLOPs and bytes, nincc's beside XLA's."""
    from .report import format_table, human

    rows = layer_costs(graph)
    whole = program_cost(graph)
    codes = sorted({r.reason for r in rows if r.reason}, key=list(REASONS).index)
    mark = {c: f"[{i + 1}]" for i, c in enumerate(codes)}
    head = ("layer", "type", "FLOPs", "XLA FLOPs", "bytes", "XLA bytes", "why")
    body = [
        (
            r.name,
            r.type,
            human(r.flops),
            human(r.xla_flops),
            human(r.bytes, "B"),
            human(r.xla_bytes, "B"),
            mark.get(r.reason, ""),
        )
        for r in rows
    ]
    ours = sum(r.flops for r in rows)
    xla_sum = sum(r.xla_flops for r in rows)
    foot = (
        "total",
        f"{len(rows)} layers",
        human(ours),
        human(xla_sum),
        human(sum(r.bytes for r in rows), "B"),
        human(sum(r.xla_bytes for r in rows), "B"),
        "",
    )
    batch = graph.value(graph.inputs[0]).shape[:1] if graph.inputs else ()
    out = [
        f"net {graph.name or '(unnamed)'}, phase {graph.phase}"
        + (f", batch {batch[0]}" if batch else "")
        + ": forward cost per layer (XLA: the layer compiled alone)",
        format_table(head, body, foot, right=range(2, 6)),
    ]
    prog = phase_program(graph)
    whole_flops = float(whole.get("flops", 0.0))
    out.append(
        f"whole {graph.phase} program ({prog.what}): XLA {human(whole_flops)} FLOPs, "
        f"{human(float(whole.get('transcendentals', 0.0)))} transcendentals, "
        f"{human(float(whole.get('bytes accessed', 0.0)), 'B')} accessed"
    )
    if graph.phase == "TRAIN":
        out.append(
            f"nincc's training estimate: 3 x forward = {human(3 * ours)} FLOPs (the backward pass "
            "computes a gradient for the input and one for the weights, each about one forward)"
        )
    elif xla_sum and abs(whole_flops - xla_sum) > 0.01 * xla_sum:
        out.append(
            f"the whole program differs from the sum of layers ({human(xla_sum)}): compiled "
            "together, XLA fuses and simplifies across layers (and drops unused blobs)"
        )
    out += [f"{mark[c]} {REASONS[c]}" for c in codes]
    out.append(
        "bytes: nincc counts each layer reading its bottoms and parameters and writing its tops "
        "once; XLA counts every operand of every op, including passes inside a layer"
    )
    return "\n".join(_wrap(line) for line in out)


# ---------------------------------------------------------------- memory


@dataclass(frozen=True)
class BlobMemory:
    """Bytes Caffe's blobs hold for one net: parameters, fed inputs and the other blobs."""

    params: int
    inputs: int
    activations: int


def blob_memory(graph: Graph) -> BlobMemory:
    """Caffe's allocation: one blob per name (in-place layers share it); anonymous loss tops
    are blobs of their own; shared parameter blobs count once."""
    inputs = {graph.value(v).blob for v in graph.inputs}
    sizes: dict[str, int] = {}
    for v in graph.values:
        key = v.id if v.blob == AUTO_TOP else v.blob
        sizes[key] = count(v.shape)
    params = sum(count(s) for shapes in graph.param_shapes().values() for s in shapes)
    fed = sum(n for k, n in sizes.items() if k in inputs)
    return BlobMemory(F32 * params, F32 * fed, F32 * (sum(sizes.values()) - fed))


def xla_memory(graph: Graph) -> Any:
    """XLA's CompiledMemoryStats of the phase program (arguments, outputs, temporaries)."""
    return _compiled(phase_program(graph)).memory_analysis()


def memory_report(test: Graph, train: Graph | None, train_note: str = "") -> str:
    """`nincc inspect --memory`: inference (TEST) and training (TRAIN) memory, Caffe's blobs
    beside XLA's buffer assignment of the compiled programs."""
    from .report import format_table, human

    def b(n: float) -> str:
        return human(n, "B", binary=True)

    body: list[tuple[str, ...]] = []
    notes = []
    for title, graph in (("inference (TEST, forward)", test), ("training (TRAIN)", train)):
        if graph is None:
            continue
        ours = blob_memory(graph)
        stats = xla_memory(graph)
        diff = 2 if graph.phase == "TRAIN" else 1  # training: every blob has a diff as well
        args = stats.argument_size_in_bytes
        temp, outs = stats.temp_size_in_bytes, stats.output_size_in_bytes
        xla_total = args + outs + temp - stats.alias_size_in_bytes
        p_label = "parameters + diffs" if diff == 2 else "parameters"
        a_label = "activations + diffs" if diff == 2 else "activations"
        total = diff * ours.params + ours.inputs + diff * ours.activations
        body += [
            (title, "", "", ""),
            (f"  {p_label}", b(diff * ours.params), "arguments", b(args)),
            ("  inputs", b(ours.inputs), "outputs", b(outs)),
            (f"  {a_label}", b(diff * ours.activations), "temporaries", b(temp)),
            ("  total", b(total), "total", b(xla_total)),
        ]
        more = "more" if xla_total > total else "less"
        notes.append(f"{title.split()[0]}: XLA needs {b(abs(xla_total - total))} {more} than Caffe")
    batch = test.value(test.inputs[0]).shape[:1] if test.inputs else ()
    title = "memory" + (f" at batch {batch[0]}" if batch else "")
    head = (title, "nincc (Caffe blobs)", "XLA (compiled)", "")
    out = [format_table(head, body, None, right=(1, 3))]
    out += [
        "; ".join(notes) + ".",
        "nincc counts what Caffe allocates: one float32 blob per name (in-place layers share it) "
        "and, when training, a diff beside every blob and parameter.",
        "XLA's arguments are the parameters and inputs; its outputs are the output blobs (TEST) "
        "or the loss and parameter gradients (TRAIN, and the output blobs when the net has no "
        "loss); its temporaries are the buffers of the compiled program: element-wise layers "
        "fused into their producers need none and a buffer is reused after its last use (less "
        "than Caffe), but layout copies (XLA's CPU convolutions run channels-last) and "
        "convolution scratch space add some (more than Caffe).",
        "Neither counts an optimizer's state (SGD momentum: one more copy of the parameters; "
        "Adam: two).",
    ]
    if train is not None and not any(layer.is_loss for layer in train.layers):
        out.append("the net has no loss: training is Caffe's Backward from output diffs")
    if train_note:
        out.append(train_note)
    return "\n".join(_wrap(line) for line in out)


def random_inputs(graph: Graph, seed: int = 0) -> dict[str, np.ndarray]:
    """Uniform [0, 1) float32 arrays for every fed blob (valid labels and indices: int() = 0)."""
    rng = np.random.default_rng(seed)
    return {
        graph.value(v).blob: rng.random(graph.value(v).shape, dtype=np.float32)
        for v in graph.inputs
    }
