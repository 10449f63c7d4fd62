"""Where a compiled step holds blobs in oneDNN's blocked layout (nChw16c), and the lowerings
that read and write it.

oneDNN 3.2 runs some layers markedly faster with blocked activations than channels-last
(docs/performance.md, section 31): a stem convolution over 3 channels read as Caffe stores
them (NCHW) and written blocked (NIN CIFAR-10's conv1: 2x, forward and weight gradient),
and 1x1 convolutions blocked in and out (NIN CIFAR-10's cccp1 and cccp2: 10-30 %). The k×k
ones run faster channels-last. :func:`plan` therefore picks chains that start at a stem,
go through 1x1 convolutions (each with its fused ReLU) and end at poolings or LRNs (which
oneDNN runs blocked too), and holds the blobs inside a chain blocked. Every reader of a
blocked convolution's output is a layer of the chain, so no convolution's output is
transposed; the blob a chain ends with (a pooling's output, a fraction of the size, in
the zoo) goes to the rest of the net through one transpose. Everything else stays as
nincc.fast holds it.

``NINCC_BLOCKED=0`` turns the plan off (everything channels-last, as before it).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import replace
from typing import Any, NamedTuple

import numpy as np

from . import fast, onednn, onednn_lrn, onednn_pool
from .act_layout import BLOCK, BLOCKED, NCHW, NHWC, array_shape, caffe_shape, convert
from .layers.vision import _geometry, _pool_geom_of
from .switches import switched_off

OPT_OUT = "NINCC_BLOCKED"


class Placement(NamedTuple):
    """The layouts (nincc.act_layout) a layer reads its bottom in and writes its top in."""

    src: str
    dst: str


_HELD = Placement(BLOCKED, BLOCKED)  # a pooling's or LRN's: blocked in and out


def enabled(environ: Mapping[str, str] | None = None) -> bool:
    """Whether steps may hold blobs blocked: oneDNN runs (nincc.onednn.enabled) and
    ``NINCC_BLOCKED`` does not say off (and the library's blocked layout is the one
    nincc.act_layout computes)."""
    env = os.environ if environ is None else environ
    return (
        onednn.enabled() and not switched_off(OPT_OUT, env) and onednn.blocked_layout_ok()
    )


def conv_spec(
    attrs: Any, shape: Sequence[int], relu: float | None, src: str, dst: str
) -> onednn.ConvSpec | None:
    """The oneDNN spec of a 2-D convolution of Caffe-shape ``shape`` read in ``src`` and
    written in ``dst``, or None for one that is not 2-D. Where Caffe's last window stops
    short of the input's end, the high padding is negative (oneDNN then reads no further,
    with no cropped copy of the input; nincc.onednn zeroes those rows' input gradient)."""
    shape = tuple(int(d) for d in shape)
    g = _geometry(attrs, shape)
    if len(g.kernel) != 2 or g.axis != 1:
        return None
    n, c, h, w = shape
    highs = fast.caffe_high_pads(g, shape)
    return onednn.ConvSpec(
        n, h, w, c, attrs.num_output, tuple(g.kernel), tuple(g.stride), tuple(g.pad), highs,
        tuple(g.dilation), attrs.group, attrs.bias_term, None if relu is None else float(relu),
        src, dst,
    )  # fmt: skip


def _vector_kernels(spec: onednn.ConvSpec, directions: Sequence[str]) -> bool:
    """Whether oneDNN runs each direction of ``spec`` with a vector kernel (its reference
    kernels for unusual layouts are orders of magnitude slower)."""
    try:
        p = onednn.primitives(spec)
        bwd = onednn.primitives(replace(spec, relu=None)) if spec.relu is not None else p
        prims = [(p if d == "forward" else bwd) for d in directions]
        return not any(getattr(q, d).impl.startswith("ref") for q, d in zip(prims, directions))
    except onednn.OneDNNError:
        return False


def _conv_kind(
    layer: Any,
    shape: Sequence[int],
    relu: float | None,
    bottom_from_table: bool,
    has_fast: Callable[[Any, list], bool],
) -> str | None:
    """"stem" (reads NCHW, writes blocked), "chain" (blocked in and out) or None: which
    blocked convolution ``layer`` may be, from its own geometry and oneDNN's kernels."""
    a = layer.attrs
    if (
        layer.type != "Convolution"
        or len(layer.bottoms) != 1
        or len(layer.tops) != 1
        or len(shape) != 4
        or not has_fast(layer, [tuple(shape)])
        or not fast.uses_onednn(shape=shape)
        or a.group != 1
        or a.num_output % BLOCK
    ):
        return None
    c = shape[1]
    if c < BLOCK and bottom_from_table:
        kind, src, directions = "stem", NCHW, ("forward", "backward_weights")
    elif c % BLOCK == 0:
        kind, src, directions = "chain", BLOCKED, ("forward", "backward_data", "backward_weights")
    else:
        return None
    spec = conv_spec(a, shape, relu, src, BLOCKED)
    if spec is None:
        return None
    if kind == "chain":
        g = _geometry(a, tuple(shape))
        one = g.kernel == (1, 1) and g.stride == (1, 1) and g.pad == (0, 0)
        rows_rule = fast.pointwise_on_matmul(
            g, a.group, (shape[0], shape[2], shape[3], c), (a.num_output, c, 1, 1)
        )
        if not one or rows_rule:
            return None
    return kind if _vector_kernels(spec, directions) else None


def _passes_ok(layer: Any, shape: Sequence[int], has_fast: Callable[[Any, list], bool]) -> bool:
    """Whether ``layer`` is a pooling or LRN that oneDNN runs blocked in and out with vector
    kernels (a layer a chain may end at or run through)."""
    if (
        layer.type not in ("Pooling", "LRN")
        or len(layer.bottoms) != 1
        or len(layer.tops) != 1
        or len(shape) != 4
        or shape[1] % BLOCK
        or not has_fast(layer, [tuple(shape)])
    ):
        return False
    held = array_shape(tuple(shape), BLOCKED)
    if layer.type == "LRN":
        return fast.onednn_lrn_spec(layer.attrs, held, np.float32, BLOCKED) is not None
    g = _pool_geom_of(layer.attrs, tuple(shape))
    return onednn_pool.usable(held, g, np.float32, BLOCKED) is not None


def plan(
    graph: Any,
    has_fast: Callable[[Any, list], bool],
    relus: Mapping[str, tuple[str, float]],
) -> dict[str, Placement]:
    """Layer name -> Placement for the layers a step runs on blocked blobs (see the
    module's docstring); every other layer is absent.

    ``has_fast(layer, bottom_shapes)``: whether the step runs the layer's fast lowering;
    ``relus``: convolution name -> (its fused ReLU's layer name, slope)
    (nincc.compile.relu_fusions)."""
    if not enabled():
        return {}
    readers: dict[str, list] = {}
    for layer in graph.layers:
        for vid in layer.bottoms:
            readers.setdefault(vid, []).append(layer)

    def out_vid(conv: Any) -> str:
        if conv.name in relus:
            return graph.layer(relus[conv.name][0]).tops[0]
        return conv.tops[0]

    def from_table(vid: str) -> bool:
        producer = graph.value(vid).producer
        if not producer:
            return True
        layer = graph.layer(producer)
        return not has_fast(layer, [graph.value(b).shape for b in layer.bottoms])

    kinds: dict[str, str] = {}
    pools: set[str] = set()
    for layer in graph.layers:
        if not layer.bottoms:
            continue
        shape = graph.value(layer.bottoms[0]).shape
        if layer.type in ("Pooling", "LRN") and _passes_ok(layer, shape, has_fast):
            pools.add(layer.name)
        elif layer.type == "Convolution":
            relu = relus[layer.name][1] if layer.name in relus else None
            kind = _conv_kind(layer, shape, relu, from_table(layer.bottoms[0]), has_fast)
            if kind is not None:
                kinds[layer.name] = kind

    def blocked_vids(convs: Collection[str]) -> set[str]:
        vids = {out_vid(graph.layer(name)) for name in convs}
        for layer in graph.layers:
            if layer.name in pools and layer.bottoms[0] in vids:
                vids.add(layer.tops[0])
        return vids

    chosen = set(kinds)
    while True:
        vids = blocked_vids(chosen)
        dropped = set()
        for name in chosen:
            conv = graph.layer(name)
            after = readers.get(out_vid(conv), [])
            if kinds[name] == "chain" and conv.bottoms[0] not in vids:
                dropped.add(name)
            elif not after or out_vid(conv) in graph.outputs or not all(
                r.name in pools or (r.name in chosen and kinds[r.name] == "chain") for r in after
            ):
                dropped.add(name)
        if not dropped:
            break
        chosen -= dropped
    vids = blocked_vids(chosen)
    out = {}
    for layer in graph.layers:
        if layer.name in chosen:
            out[layer.name] = Placement(NCHW if kinds[layer.name] == "stem" else BLOCKED, BLOCKED)
        elif layer.name in pools and layer.bottoms[0] in vids:
            out[layer.name] = _HELD
    return out


def _channels_last(plain: Any, place: Placement, attrs, params, x, ctx) -> list[Any]:
    """A placed layer on nincc.fast's channels-last lowering ``plain``, between transposes
    from and to ``place``'s layouts: where oneDNN does not run it (inside a data-parallel
    step)."""
    y = plain(attrs, params, [convert(x, place.src, NHWC)], ctx)[0]
    return [convert(y, NHWC, place.dst)]


def conv_lowering(place: Placement, relu: float | None = None, residual: str = "mask"):
    """The Convolution lowering on ``place``'s layouts, with the ReLU after it fused where
    ``relu`` (its slope) is given; ``residual`` as nincc.fast.conv_relu_nhwc's. Inside a
    data-parallel step (no oneDNN there) it runs nincc.fast's channels-last lowering
    between transposes."""

    def lower(attrs, params, bottoms, ctx):
        x, w = bottoms[0], params[0]
        b = params[1] if attrs.bias_term else None
        spec = conv_spec(attrs, caffe_shape(x.shape, place.src), relu, place.src, place.dst)
        if spec is None or onednn.per_device(x):
            plain = fast.conv_relu_nhwc(relu, residual) if relu is not None else fast.conv_nhwc
            return _channels_last(plain, place, attrs, params, x, ctx)
        if relu is None:
            return [onednn.conv_of(spec, x, w, b)]
        return [fast.onednn_conv_relu(spec, residual, x, w, onednn.bias_arg(spec, b))]

    return lower


def pool_lowering(attrs, params, bottoms, ctx):
    """The Pooling lowering on blocked blobs (oneDNN's kernels; inside a data-parallel step
    nincc.fast's channels-last lowering between transposes)."""
    x = bottoms[0]
    g = _pool_geom_of(attrs, caffe_shape(x.shape, BLOCKED))
    spec = None if onednn.per_device(x) else onednn_pool.usable(x.shape, g, x.dtype, BLOCKED)
    if spec is None:
        return _channels_last(fast.pool_nhwc, _HELD, attrs, params, x, ctx)
    return [onednn_pool.pool(spec, x)]


def lrn_lowering(attrs, params, bottoms, ctx):
    """The LRN lowering on blocked blobs (oneDNN's kernels; inside a data-parallel step
    nincc.fast's channels-last lowering between transposes)."""
    x = bottoms[0]
    spec = None if onednn.per_device(x) else fast.onednn_lrn_spec(attrs, x.shape, x.dtype, BLOCKED)
    if spec is None:
        return _channels_last(fast.lrn_nhwc, _HELD, attrs, params, x, ctx)
    return [onednn_lrn.lrn(spec, x)]


def lowering(layer: Any, place: Placement, relu: float | None = None, residual: str = "mask"):
    """The lowering run_graph runs a placed layer with: :func:`pool_lowering` for a
    pooling, :func:`lrn_lowering` for an LRN, :func:`conv_lowering` for a convolution (with
    its fused ReLU's ``relu`` and ``residual``, if any)."""
    if layer.type == "Pooling":
        return pool_lowering
    if layer.type == "LRN":
        return lrn_lowering
    return conv_lowering(place, relu, residual)
