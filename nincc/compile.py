"""Graph → pure JAX functions (init, apply, loss), jitted. Knows no layer type by name.

The params pytree is ``{layer name: [blob arrays in Caffe's order and shapes]}``, holding only the
blobs a layer owns (a blob shared with ``param { name }`` lives with its first owner). Running
statistics (BatchNorm) are blobs like any other; forward returns their updated values.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_derivatives import CustomVJPPrimal, SymbolicZero

from . import act_layout, blocked
from . import layers as table
from .errors import InputError, NinccError
from .fast import (
    after,
    conv_relu_nhwc,
    lowering_for,
    max_pool_after_relu,
    uses_onednn,
)
from .ir import Graph
from .layers.base import LowerCtx
from .layout import Layout, kernel_layout, to_caffe, to_held

Params = dict[str, list[Any]]
Fast = bool | Collection[str]


def layer_params(params: Mapping[str, Sequence[Any]], layer, graph: Graph) -> list[Any]:
    """The layer's blobs (shared ones from their owner). Running statistics (BatchNorm's) get
    no diff in Caffe, so they stop gradients; lr_mult 0 blobs still get one (the solver then
    leaves them unchanged)."""
    out = []
    for i, spec in enumerate(layer.params):
        owner, idx = spec.share or (layer.name, i)
        owner_layer = layer if owner == layer.name else graph.layer(owner)
        try:
            blob = params[owner][owner_layer.owned_position(idx)]
        except (KeyError, IndexError):
            raise InputError(
                f"params have no blob {idx} for layer '{owner}' (expected shape {list(spec.shape)})"
            ) from None
        out.append(jax.lax.stop_gradient(blob) if spec.state else blob)
    return out


def _fast_lowering(layer, bottom_shapes: Sequence[Sequence[int]], fast: Fast):
    if fast is True or (fast and layer.type in fast):
        return lowering_for(layer.type, layer.attrs, bottom_shapes)
    return None


def choose_lowering(layer, bottom_shapes: Sequence[Sequence[int]], fast: Fast = True):
    """``(lower, kind)`` for one layer on Caffe-layout (NCHW) blobs: nincc.fast's lowering
    where ``fast`` selects the layer's type and it applies to these shapes (kind "fast"), else
    the layer table's ("table")."""
    lower = _fast_lowering(layer, bottom_shapes, fast)
    if lower is not None:
        return lower, "fast"
    return table.REGISTRY[layer.type].lower, "table"


def channels_last_lowering(layer, ctx: LowerCtx, fast: Fast = True):
    """The channels-last lowering run_graph runs ``layer`` with (bottoms and tops (N, H, W, C)),
    or None where it runs a lowering on Caffe-layout blobs."""
    lower = _fast_lowering(layer, ctx.bottom_shapes, fast)
    if lower is None or lower.nchw or not all(len(s) == 4 for s in ctx.top_shapes):
        return None
    return lower.nhwc


def _primal(x: Any) -> bool:
    return isinstance(x, CustomVJPPrimal)


def _is_zero(x: Any) -> bool:
    return isinstance(x, SymbolicZero)


def _zero_like(x: Any) -> Any:
    return jnp.zeros(x.shape, x.dtype) if _is_zero(x) else x


def params_after_bottoms(fn, params: list[Any], bottoms: list[Any]) -> list[Any]:
    """``fn(params, bottoms)``, differentiated as before, with the params' gradients made to
    depend on the bottoms' gradients (by adding a zero computed from one element of each).

    The train step donates the params and updates them in place. A layer's input gradient
    reads its weights, but nothing the layer's update needs depends on that read, so XLA
    cannot order it before the update overwrites the weights: it copies every such weight at
    the start of the step and keeps the copy to the end (NIN-ZFNet's 144 MB fc6 among them).
    Tied this way (nincc.fast.after), each update waits only for its own layer's input
    gradient. Only bottoms JAX differentiates are read, so no input gradient is computed that
    was not needed."""
    perturbed: list[bool] = []

    @jax.custom_vjp
    def run(p, b):
        return fn(p, b)

    def run_fwd(p, b):
        perturbed[:] = [x.perturbed for x in b]
        p, b = jax.tree_util.tree_map(lambda x: x.value, (p, b), is_leaf=_primal)
        return jax.vjp(fn, p, b)

    def run_bwd(vjp, cts):
        dp, db = vjp(jax.tree_util.tree_map(_zero_like, cts, is_leaf=_is_zero))
        used = [d for d, p in zip(db, perturbed, strict=True) if p]
        return [after(d, used) for d in dp], db

    run.defvjp(run_fwd, run_bwd, symbolic_zeros=True)
    return run(params, bottoms)


def _tie_grads(layer, fast: Fast) -> bool:
    """Whether run_graph ties ``layer``'s param gradients to its input gradients: the fast
    lowerings' graph only (the table's stays the plain reference), layers with learnable
    blobs and bottoms, and no running statistics (their forward writes state)."""
    return bool(fast) and bool(layer.bottoms) and bool(layer.params) and not any(
        p.state for p in layer.params
    )


class ReluFusion(NamedTuple):
    """The ReLU fused after a convolution: its layer, its negative slope, and what its
    backward reads (nincc.fast.conv_relu_nhwc): "top" where only convolutions read its top
    (they keep it for their weight gradients); "pooling" where only MAX poolings read it,
    which then apply the ReLU's backward to their own output gradient (see
    nincc.fast.max_pool_after_relu); else "mask", a bit mask of the top."""

    relu: str
    slope: float
    residual: str


def relu_fusions(
    graph: Graph, fast: Fast = True, taps: Collection[str] = ()
) -> dict[str, ReluFusion]:
    """Convolutions run_graph runs with the ReLU after them fused (nincc.fast.conv_relu_nhwc):
    conv layer name -> ReluFusion.

    A pair qualifies when oneDNN runs the convolution (the only kernels with the ReLU as a
    post-op), both take their fast lowerings, and the ReLU works in place on the
    convolution's only top, which nothing else reads, taps or returns: so the value before
    the ReLU is never needed (run_graph still defines it; XLA drops it unused).
    """
    readers: dict[str, list] = {}
    for layer in graph.layers:
        for vid in layer.bottoms:
            readers.setdefault(vid, []).append(layer)
    out = {}
    for conv in graph.layers:
        if conv.type != "Convolution" or len(conv.bottoms) != 1 or len(conv.tops) != 1:
            continue
        top = conv.tops[0]
        if len(readers.get(top, ())) != 1:
            continue
        relu = readers[top][0]
        if relu.type != "ReLU" or relu.bottoms != (top,) or len(relu.tops) != 1:
            continue
        if graph.value(relu.tops[0]).blob != graph.value(top).blob or not all(relu.propagate_down):
            continue
        if top in taps or top in graph.outputs:
            continue
        shape = graph.value(conv.bottoms[0]).shape
        top_shape = graph.value(top).shape
        if (
            len(top_shape) != 4
            or not uses_onednn(shape=shape)
            or _fast_lowering(conv, [shape], fast) is None
            or _fast_lowering(relu, [top_shape], fast) is None
        ):
            continue
        after = readers.get(relu.tops[0], ())
        residual = "mask"
        if after and relu.tops[0] not in graph.outputs and relu.tops[0] not in taps:
            if all(layer.type == "Convolution" for layer in after):
                residual = "top"
            elif all(_is_max_pooling(layer) for layer in after):
                residual = "pooling"
        out[conv.name] = ReluFusion(relu.name, float(relu.attrs.negative_slope), residual)
    return out


def blocked_placements(
    graph: Graph, fast: Fast = True, fusions: Mapping[str, ReluFusion] | None = None
) -> dict[str, blocked.Placement]:
    """The layers run_graph runs on blobs in oneDNN's blocked layout, and their layouts
    (nincc.blocked.plan; none without fast lowerings)."""
    if not fast:
        return {}
    fusions = relu_fusions(graph, fast) if fusions is None else fusions
    return blocked.plan(
        graph,
        lambda layer, shapes: _fast_lowering(layer, shapes, fast) is not None,
        {conv: (f.relu, f.slope) for conv, f in fusions.items()},
    )


def _is_max_pooling(layer) -> bool:
    """A MAX pooling that passes its gradient down: each window's gradient goes to one
    element holding the window's maximum, so a ReLU before it may apply its backward to
    the pooling's output gradient (nincc.fast.max_pool_after_relu)."""
    return (
        layer.type == "Pooling"
        and layer.attrs.method == "MAX"
        and len(layer.bottoms) == 1
        and len(layer.tops) == 1
        and all(layer.propagate_down)
    )


def pooled_relus(fusions: Mapping[str, ReluFusion], graph: Graph) -> dict[str, float]:
    """MAX pooling layer name -> the negative slope of the fused ReLU whose backward it
    applies (ReluFusion.residual "pooling")."""
    out = {}
    for fusion in fusions.values():
        if fusion.residual == "pooling":
            top = graph.layer(fusion.relu).tops[0]
            for layer in graph.layers:
                if top in layer.bottoms:
                    out[layer.name] = fusion.slope
    return out


def layer_ctx(graph: Graph, layer, key: Any, feeds: Mapping[str, Any]) -> LowerCtx:
    """The LowerCtx run_graph gives ``layer``."""
    return LowerCtx(
        phase=graph.phase,
        layer_name=layer.name,
        key=key,
        feeds=feeds,
        top_names=[graph.value(t).blob for t in layer.tops],
        top_shapes=[graph.value(t).shape for t in layer.tops],
        bottom_shapes=[graph.value(b).shape for b in layer.bottoms],
    )


def run_graph(
    graph: Graph,
    params: Mapping[str, Sequence[Any]],
    feeds: Mapping[str, Any],
    rng: Any = None,
    taps: Mapping[str, Any] | None = None,
    fast: Fast = True,
) -> tuple[dict[str, Any], Params]:
    """Evaluate every layer in order (traceable). Returns (value id → array, updated state).

    ``taps`` adds an array to chosen values right after they are written: its gradient is the
    gradient with respect to that value, which is how tests read Caffe-style per-blob diffs.
    ``fast`` picks nincc.fast's lowerings where they apply (True), the layer table's only
    (False), or the fast lowerings of the named layer types only. Fast lowerings run
    channels-last, and a blob stays channels-last from the layer that writes it to the layers
    that read it so; every value returned is in Caffe's layout.
    """
    env: dict[str, Any] = {}  # value id -> array, held in layouts[value id]
    layouts: dict[str, str] = {}  # value id -> its layout (nincc.act_layout)
    other: dict[tuple[str, str], Any] = {}  # (value id, layout) -> a copy, made once

    def read(vid: str, layout: str) -> Any:
        have = layouts[vid]
        if have == layout:
            return env[vid]
        if (vid, layout) not in other:
            other[vid, layout] = act_layout.convert(env[vid], have, layout)
        return other[vid, layout]

    new_state: Params = {}
    fusions = relu_fusions(graph, fast, taps or ())
    fused: dict[str, tuple[list[Any], str]] = {}  # ReLU name -> its tops (with the conv), layout
    pooled = pooled_relus(fusions, graph)  # MAX pooling name -> slope of the ReLU before it
    placements = blocked_placements(graph, fast, fusions)
    for index, layer in enumerate(graph.layers):
        entry = table.REGISTRY[layer.type]
        key = None if rng is None else jax.random.fold_in(rng, index)
        ctx = layer_ctx(graph, layer, key, feeds)
        # A fast lowering runs channels-last (nincc.fast): its bottoms are read, and its tops
        # kept, in that layout; a table lowering gets Caffe's layout; a layer nincc.blocked
        # places reads and writes the layouts it says.
        place = placements.get(layer.name)
        if place is not None:
            lower = blocked.lowering(layer, place)
            src, dst = place
        else:
            lower = channels_last_lowering(layer, ctx, fast)
            src = dst = act_layout.NCHW if lower is None else act_layout.NHWC
            if lower is None:
                lower = choose_lowering(layer, ctx.bottom_shapes, fast)[0]
        bottoms = [
            x if keep else jax.lax.stop_gradient(x)
            for x, keep in zip((read(b, src) for b in layer.bottoms), layer.propagate_down)
        ]
        with jax.named_scope(layer.name):
            lp = layer_params(params, layer, graph)

            def apply(lower, layer=layer, ctx=ctx, lp=lp, bottoms=bottoms):
                if _tie_grads(layer, fast):
                    return params_after_bottoms(
                        lambda ps, bs: lower(layer.attrs, ps, bs, ctx), lp, bottoms
                    )
                return lower(layer.attrs, lp, bottoms, ctx)

            if layer.name in fused:
                tops, dst = fused.pop(layer.name)
            elif layer.name in pooled:
                tops = apply(max_pool_after_relu(lower, pooled[layer.name]))
            else:
                tops = apply(lower)
            if layer.name in fusions:
                f = fusions[layer.name]
                if place is not None:
                    with_relu = blocked.lowering(layer, place, f.slope, f.residual)
                else:
                    with_relu = conv_relu_nhwc(f.slope, f.residual)
                fused[f.relu] = (apply(with_relu), dst)
        if len(tops) != len(layer.tops):
            raise NinccError(
                f"layer '{layer.name}' ({layer.type}) produced {len(tops)} tops, "
                f"expected {len(layer.tops)}"
            )
        if not entry.backward:
            tops = [jax.lax.stop_gradient(t) for t in tops]
        for vid, top in zip(layer.tops, tops):
            if taps is not None and vid in taps:
                top = top + act_layout.convert(taps[vid], act_layout.NCHW, dst)
            env[vid] = top
            layouts[vid] = dst
            for copy in [k for k in other if k[0] == vid]:
                del other[copy]
        if ctx.state is not None:
            new_state[layer.name] = list(ctx.state)
    # Every value leaves in Caffe's layout; XLA drops the transposes nobody reads.
    return {vid: read(vid, act_layout.NCHW) for vid in env}, new_state


def total_loss(graph: Graph, env: Mapping[str, Any]) -> Any:
    """Caffe's net loss: the sum over tops of loss_weight × sum(top)."""
    loss = jnp.zeros((), jnp.float32)
    for layer in graph.layers:
        for vid, w in zip(layer.tops, layer.loss_weights):
            if w:
                loss = loss + w * jnp.sum(env[vid])
    return loss


class CompiledNet:
    """A graph compiled to jitted JAX functions.

    - ``init(seed)``: params from the layers' Caffe fillers (numpy, deterministic per seed).
    - ``apply(params, inputs, rng=None, blobs=None)``: ``{blob name: array}`` after forward,
      each blob the last value Caffe would hold under that name. ``blobs`` selects a subset,
      and only that subset is computed and kept: one jitted function per selection.
    - ``outputs(params, inputs, rng=None)``: the net outputs only (tops no layer consumes),
      the cheapest forward: XLA frees every intermediate as soon as it is used.
    - ``forward(params, inputs, rng=None)``: ``(blobs, state)`` where ``state`` holds the new
      values of blobs forward updates (BatchNorm statistics), keyed like params.
    - ``loss(params, inputs, rng=None)``: the scalar net loss (sum of loss_weight × loss tops).
    - ``bind(params)``: a :class:`BoundNet`, the same forwards with the weights placed on the
      device once, in the layout the kernels read: for repeated calls on the same weights.

    ``fast`` chooses the lowerings (see :func:`run_graph`); the default takes nincc.fast's.
    """

    def __init__(self, graph: Graph, jit: bool = True, fast: Fast = True):
        self.graph = graph
        self.fast = fast
        self.dynamic = any(
            table.REGISTRY[layer.type].extra.get("data_dependent_shape") for layer in graph.layers
        )
        self._jit = jit and not self.dynamic
        self._blob_ids = graph.blob_values()
        self._selected: dict[tuple[tuple[str, ...], bool, bool], Any] = {}
        self.held_layout: Layout = kernel_layout(graph, pointwise=True)

    def _maybe_jit(self, fn):
        return jax.jit(fn) if self._jit else fn

    def _run(self, params, feeds, rng):
        return run_graph(self.graph, params, feeds, rng, fast=self.fast)

    def _select(self, blobs: tuple[str, ...], held: bool = False, loss: bool = False):
        """The (cached) function computing just ``blobs``, the updated state and, if asked,
        the loss (else None), from params in Caffe's layout or (``held``) :attr:`held_layout`."""
        fn = self._selected.get((blobs, held, loss))
        if fn is None:
            ids = [self._blob_ids[b] for b in blobs]
            layout = self.held_layout if held else {}

            def forward(params, feeds, rng):
                # Converted inside the traced function, a held weight's transpose cancels
                # against the one XLA's convolution would make (nincc.layout).
                env, state = self._run(to_caffe(params, layout), feeds, rng)
                values = {b: env[v] for b, v in zip(blobs, ids)}
                return values, state, total_loss(self.graph, env) if loss else None

            fn = self._selected[(blobs, held, loss)] = self._maybe_jit(forward)
        return fn

    def _blobs(self, blobs: Sequence[str] | None) -> tuple[str, ...]:
        if blobs is None:
            return tuple(self._blob_ids)
        missing = [b for b in blobs if b not in self._blob_ids]
        if missing:
            raise InputError(
                f"no blob(s) {missing} in the net; blobs are {sorted(self._blob_ids)}"
            )
        return tuple(dict.fromkeys(blobs))

    @property
    def input_shapes(self) -> dict[str, tuple[int, ...]]:
        """Blob name → shape of every array the caller feeds."""
        return {self.graph.value(v).blob: self.graph.value(v).shape for v in self.graph.inputs}

    @property
    def output_names(self) -> list[str]:
        """The net outputs' blob names (tops no layer consumes), in graph order."""
        return [self.graph.value(v).blob for v in self.graph.outputs]

    @property
    def has_loss(self) -> bool:
        return any(layer.is_loss for layer in self.graph.layers)

    def init(self, seed: int = 0) -> Params:
        """Params filled by Caffe's fillers from one seeded generator, in layer order."""
        from .fillers import fill

        rng = np.random.default_rng(seed)
        params: Params = {}
        for layer in self.graph.layers:
            owned = [
                jnp.asarray(fill(p.filler, p.shape, rng)) for p in layer.params if p.share is None
            ]
            if owned:
                params[layer.name] = owned
        return params

    def check_params(self, params: Mapping[str, Sequence[Any]]) -> None:
        """Raise InputError naming the first blob whose shape does not fit the net."""
        for name, shapes in self.graph.param_shapes().items():
            got = params.get(name)
            if got is None or len(got) != len(shapes):
                n = "none" if got is None else len(got)
                raise InputError(
                    f"params for layer '{name}': expected {len(shapes)} blobs, got {n}"
                )
            for i, (arr, shape) in enumerate(zip(got, shapes)):
                if tuple(np.shape(arr)) != tuple(shape):
                    raise InputError(
                        f"params for layer '{name}' blob {i}: shape {list(np.shape(arr))}, "
                        f"the net expects {list(shape)}"
                    )

    def _feeds(self, inputs: Mapping[str, Any]) -> dict[str, Any]:
        expected = self.input_shapes
        unknown = sorted(set(inputs) - set(expected))
        if unknown:
            raise InputError(
                f"unknown input blob(s) {unknown}; the net's inputs are {sorted(expected)}"
            )
        feeds = {}
        for name, arr in inputs.items():
            if tuple(np.shape(arr)) != tuple(expected[name]):
                raise InputError(
                    f"input blob '{name}' has shape {list(np.shape(arr))}, "
                    f"the net expects {list(expected[name])}"
                )
            feeds[name] = jnp.asarray(arr, jnp.float32)
        return feeds

    def forward(self, params, inputs, rng=None):
        return self._select(self._blobs(None))(params, self._feeds(inputs), rng)[:2]

    def apply(self, params, inputs, rng=None, blobs: Sequence[str] | None = None):
        return self._select(self._blobs(blobs))(params, self._feeds(inputs), rng)[0]

    def outputs(self, params, inputs, rng=None):
        return self.apply(params, inputs, rng, blobs=self.output_names)

    def loss(self, params, inputs, rng=None):
        return self._select((), loss=True)(params, self._feeds(inputs), rng)[2]

    def bind(self, params: Mapping[str, Sequence[Any]], held: bool | None = None) -> BoundNet:
        """The net's forwards with ``params`` (Caffe's layout) bound; see :class:`BoundNet`."""
        return BoundNet(self, params, held)


class BoundNet:
    """A CompiledNet's forwards on fixed weights, placed on the device once.

    On the CPU the convolution weights are held as XLA's convolutions read them, (kh, kw, in,
    out) (``held``, the default there): the plain forward copies every weight into that
    layout at each call, up to 8 % of a NIN inference step (docs/performance.md, sections 21
    and 22). Caffe's layout stays the API's: ``params`` here is private to the bound net.
    Same values, same jitted functions per blob selection as the net's own.
    """

    def __init__(
        self, net: CompiledNet, params: Mapping[str, Sequence[Any]], held: bool | None = None
    ):
        net.check_params(params)
        self.net = net
        self.held = jax.default_backend() == "cpu" if held is None else held
        placed = {k: [jnp.asarray(a) for a in v] for k, v in params.items()}
        self.params = to_held(placed, net.held_layout) if self.held else placed

    def function(self, blobs: Sequence[str] | None = None, loss: bool = False):
        """The jitted ``f(params, feeds, rng) -> ({blob: array}, state, loss or None)`` that
        :meth:`run` calls with :attr:`params`: to lower, compile or profile it."""
        return self.net._select(self.net._blobs(blobs), self.held, loss)

    def run(self, inputs, rng=None, blobs: Sequence[str] | None = None, loss: bool = False):
        """``({blob: array}, state, loss or None)`` in one forward; ``blobs`` defaults to
        every blob."""
        return self.function(blobs, loss)(self.params, self.net._feeds(inputs), rng)

    def apply(self, inputs, rng=None, blobs: Sequence[str] | None = None):
        return self.run(inputs, rng, blobs)[0]

    def outputs(self, inputs, rng=None):
        return self.apply(inputs, rng, blobs=self.net.output_names)

    def loss(self, inputs, rng=None):
        return self.run(inputs, rng, blobs=(), loss=True)[2]


def compile_graph(graph: Graph, jit: bool = True, fast: Fast = True) -> CompiledNet:
    """Compile a Graph; the functions are traced on first call for the graph's shapes."""
    return CompiledNet(graph, jit=jit, fast=fast)
