"""Caffe's MAX and AVE pooling on oneDNN's kernels inside the compiled function.

The same plumbing as nincc.onednn's convolutions (XLA FFI custom calls on XLA's own buffers,
channels-last, CPU backend only, ``NINCC_ONEDNN=0`` turns it off); the primitives and calls
shared with LRN are nincc.onednn_workspace's. Pooling is memory-bound
and cheap in FLOPs, but XLA's lowering of its backward (each window offset's share folded
back onto the input grid, nincc.fast) took 5-11 ms per layer of a NIN ImageNet b16 step;
oneDNN's forward and backward take 0.2-0.8 ms (docs/performance.md, section 28).

Caffe's rule is kept exactly: windows are clipped to the input (padding never wins), the scan
is row-major from -FLT_MAX and only a strictly greater value replaces the maximum, so the first
maximum of a window wins and receives its gradient. oneDNN's max pooling does the same, and its
training forward records the winner of each window in a workspace that the backward reads.
A window with nothing above -FLT_MAX (all -inf or NaN) has no winner: its output is -FLT_MAX
in both, and oneDNN would pass its gradient to the window's first element, so the backward
zeroes those windows' gradients first, as nincc's other lowerings do (Caffe 1.0's index there
is -1, an out-of-bounds write).

AVE pooling runs on oneDNN where one of its divisors is Caffe's for every window. Caffe
divides a window's sum by its extent clipped to the padded input (padding counted, the ceil
overhang past it not). Without padding that is the count of real elements: oneDNN's
"exclude padding" average, the overhang given to it as padding. With padding and no window
reaching past it, every divisor is the full window: oneDNN's "include padding". Other
geometries (padding and an overhang past it, where the divisors mix) keep XLA's lowering.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache, partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from . import act_layout, onednn
from .layers.vision import PoolGeom
from .onednn import _DIMS, _vp
from .onednn_workspace import (
    ARG_WORKSPACE,
    WorkspacePrimitives,
    backward_types,
    call,
    descriptor,
    execute,
    forward_types,
    run_forward,
    run_training,
    training_types,
)

_POOLING_MAX = 0x1FF
_POOLING_AVG_INCLUDE_PADDING = 0x2FF
_POOLING_AVG_EXCLUDE_PADDING = 0x3FF
_ALGORITHMS = {
    _POOLING_MAX: "max",
    _POOLING_AVG_INCLUDE_PADDING: "avgin",
    _POOLING_AVG_EXCLUDE_PADDING: "avgex",
}
_FLT_MAX = float(np.finfo(np.float32).max)


@dataclass(frozen=True)
class PoolSpec:
    """One pooling's geometry: input (n, h, w, c), window, stride, padding low and high (high
    as oneDNN needs it to end on Caffe's last window), output (n, *out, c), and oneDNN's
    algorithm (max, or the average with the divisor that is Caffe's). Input and output are
    held in ``layout`` (nincc.act_layout: channels-last unless nincc.blocked says otherwise)."""

    n: int
    h: int
    w: int
    c: int
    kernel: tuple[int, int]
    stride: tuple[int, int]
    pad_low: tuple[int, int]
    pad_high: tuple[int, int]
    out: tuple[int, int]
    algorithm: int = _POOLING_MAX
    layout: str = act_layout.NHWC

    @property
    def is_max(self) -> bool:
        return self.algorithm == _POOLING_MAX

    def descs(self) -> tuple[_vp, _vp]:
        """oneDNN memory descriptors of the input and the output (logical NCHW)."""
        tag = onednn.LAYOUT_TAGS[self.layout]
        src = onednn._md((self.n, self.c, self.h, self.w), tag)
        dst = onednn._md((self.n, self.c, *self.out), tag)
        return src, dst

    def geometry(self) -> tuple[_DIMS, ...]:
        """strides, kernel, dilation (none), padding low, padding high."""
        return (
            _DIMS(*self.stride),
            _DIMS(*self.kernel),
            _DIMS(0, 0),
            _DIMS(*self.pad_low),
            _DIMS(*self.pad_high),
        )


def spec_of(
    x_shape: tuple[int, ...], g: PoolGeom, layout: str = act_layout.NHWC
) -> PoolSpec | None:
    """The PoolSpec of ``x_shape`` (held in ``layout``) under Caffe's MAX or AVE pooling
    ``g``, or None where oneDNN's output-size rule cannot give Caffe's size (a floor-mode
    last window that stops short) or, for AVE, none of its divisors is Caffe's (see the
    module's docstring)."""
    n, c, h, w = (int(d) for d in act_layout.caffe_shape(tuple(x_shape), layout))
    highs = []
    for i, o, p, k, s in zip((h, w), g.out, g.pad, g.kernel, g.stride, strict=True):
        hi = max(0, (o - 1) * s + k - i - p)
        if (i + p + hi - k) // s + 1 != o:
            return None
        highs.append(hi)
    if g.method == "MAX":
        algorithm = _POOLING_MAX
    elif g.method != "AVE":
        return None
    elif g.pad == (0, 0):
        algorithm = _POOLING_AVG_EXCLUDE_PADDING
    elif all(hi <= p for hi, p in zip(highs, g.pad, strict=True)):
        algorithm = _POOLING_AVG_INCLUDE_PADDING
    else:
        return None
    return PoolSpec(
        n, h, w, c, g.kernel, g.stride, g.pad, (highs[0], highs[1]), g.out, algorithm, layout
    )


class PoolPrimitives(WorkspacePrimitives):
    """The inference forward, training forward (with the workspace) and backward of one
    PoolSpec (nincc.onednn_workspace)."""

    def __init__(self, spec: PoolSpec) -> None:
        self.spec = spec
        super().__init__(*spec.descs())

    def forward_pd(self, prop: int) -> _vp:
        return descriptor(
            onednn._lib().dnnl_pooling_forward_primitive_desc_create, "pooling forward",
            prop, self.spec.algorithm, self.src, self.dst, *self.spec.geometry(),
            onednn._user_attr(),
        )

    def backward_pd(self, hint: _vp) -> _vp:
        return descriptor(
            onednn._lib().dnnl_pooling_backward_primitive_desc_create, "pooling backward",
            self.spec.algorithm, self.src, self.dst, *self.spec.geometry(), hint,
            onednn._user_attr(),
        )


@cache
def primitives(spec: PoolSpec) -> PoolPrimitives:
    """The (cached) primitives of one geometry."""
    return PoolPrimitives(spec)


def _run_backward(p: PoolPrimitives, ins: list[int], outs: list[int]) -> None:
    args = {
        onednn._ARG_DIFF_DST: (p.dst, ins[0]),
        onednn._ARG_DIFF_SRC: (p.src, outs[0]),
    }
    if p.spec.is_max:
        args[ARG_WORKSPACE] = (p.workspace_md, ins[1])
    execute(p.backward, args, outs[1])


def _name(spec: PoolSpec, direction: str) -> str:
    fields = [spec.n, spec.h, spec.w, spec.c, *spec.kernel, *spec.stride, *spec.pad_low,
              *spec.pad_high]
    if spec.layout != act_layout.NHWC:
        fields.append(spec.layout)
    kind = _ALGORITHMS[spec.algorithm]
    return f"nincc_onednn_{kind}pool_{direction}_" + "_".join(map(str, fields))


def _y_type(spec: PoolSpec) -> jax.ShapeDtypeStruct:
    shape = act_layout.array_shape((spec.n, spec.c, *spec.out), spec.layout)
    return jax.ShapeDtypeStruct(shape, jnp.float32)


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _pool(spec: PoolSpec, x: Any) -> Any:
    p = primitives(spec)
    return call(_name(spec, "fwd"), run_forward, p, forward_types(p, _y_type(spec)), x)[0]


def _pool_fwd(spec, x):
    if not spec.is_max:  # an average's backward needs nothing from its forward
        return _pool(spec, x), None
    p = primitives(spec)
    y, ws, _ = call(_name(spec, "train"), run_training, p, training_types(p, _y_type(spec)), x)
    return y, (y, ws)


def _pool_bwd(spec, res, dy):
    args = [dy]
    if spec.is_max:
        y, ws = res
        args = [jnp.where(y > -_FLT_MAX, dy, jnp.zeros((), dy.dtype)), ws]  # no winner: no dx
    p = primitives(spec)
    x_shape = act_layout.array_shape((spec.n, spec.c, spec.h, spec.w), spec.layout)
    outs = backward_types(p, jax.ShapeDtypeStruct(x_shape, jnp.float32))
    return (call(_name(spec, "bwd"), _run_backward, p, outs, *args)[0],)


_pool.defvjp(_pool_fwd, _pool_bwd)


def usable(
    x_shape: tuple[int, ...],
    g: PoolGeom,
    dtype: Any = np.float32,
    layout: str = act_layout.NHWC,
) -> PoolSpec | None:
    """The PoolSpec to run this pooling on oneDNN with, or None to keep XLA's lowering:
    oneDNN off or missing (nincc.onednn.enabled), not float32, an empty input, a method or
    geometry oneDNN cannot express as Caffe computes it, or primitives it will not create."""
    if np.dtype(dtype) != np.float32 or not all(d > 0 for d in x_shape):
        return None
    if not onednn.enabled():
        return None
    spec = spec_of(tuple(x_shape), g, layout)
    if spec is None:
        return None
    try:
        p = primitives(spec)
        p.all()  # created now, so that no call fails to create one
    except onednn.OneDNNError:
        return None
    if layout != act_layout.NHWC and any(
        prim.impl.startswith("ref") for prim in (p.forward, p.training, p.backward)
    ):
        return None  # the blocked layout only where oneDNN has a vector kernel for it
    return spec


def pool(spec: PoolSpec, x: Any) -> Any:
    """Caffe's MAX or AVE pooling of ``x`` (float32, held in ``spec.layout``) as ``spec``
    describes, differentiable."""
    return _pool(spec, x)
