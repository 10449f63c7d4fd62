"""Caffe's LRN on oneDNN's kernels inside the compiled function.

The same plumbing as MAX pooling (nincc.onednn_workspace: XLA FFI custom calls on XLA's own
buffers, channels-last, CPU backend only, ``NINCC_ONEDNN=0`` turns it off). oneDNN's across-channels
LRN is Caffe's formula term for term: ``x * (k + alpha/n * sum of x^2 over the n channels
centred on it)^-beta``, zero beyond the first and last channel, n odd (Caffe's rule).

The forward is even with XLA's loop; the backward is what this buys. XLA's (nincc.fast's
``_lrn_bwd``) recomputes the scale and makes two more passes over the input; oneDNN's reads
the workspace its training forward wrote (the scale, twice the input's size), and runs in
less than half the time (NIN-ZFNet norm1 b16: 13 against 30 ms, docs/performance.md section
30). The workspace lives from the forward to the backward: that is the memory this costs.
oneDNN 3.2's vector kernels take beta 0.75 (Caffe's default, every zoo net's) and 1; for other
betas it has only a reference kernel, far slower than XLA's loop, which is then kept.

WITHIN_CHANNEL is oneDNN's within-channel LRN: Caffe builds it from an AVE pooling of x^2
over a size x size window (padded by (size-1)/2, so every divisor is size^2) and a Power
layer, ``x * (1 + alpha/size^2 * window sum)^-beta``; that is oneDNN's formula with k = 1
(Caffe ignores k there).
"""

from __future__ import annotations

import ctypes as C
from dataclasses import dataclass
from functools import cache, partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from . import act_layout, onednn
from .onednn import _vp
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

_LRN_ACROSS_CHANNELS, _LRN_WITHIN_CHANNEL = 0xAFF, 0xBFF


@dataclass(frozen=True)
class LRNSpec:
    """One LRN: input (n, h, w, c) held in ``layout`` (nincc.act_layout), Caffe's constants
    (odd ``size``), and the region: across channels, or (``within``) a size x size window of
    each channel."""

    n: int
    h: int
    w: int
    c: int
    size: int
    alpha: float
    beta: float
    k: float
    within: bool = False
    layout: str = act_layout.NHWC

    @property
    def algorithm(self) -> int:
        return _LRN_WITHIN_CHANNEL if self.within else _LRN_ACROSS_CHANNELS

    def md(self) -> _vp:
        """oneDNN's descriptor of the input (and of the output and both gradients)."""
        return onednn._md((self.n, self.c, self.h, self.w), onednn.LAYOUT_TAGS[self.layout])

    def constants(self) -> tuple[Any, ...]:
        return (
            C.c_int64(self.size),
            C.c_float(self.alpha),
            C.c_float(self.beta),
            C.c_float(self.k),
        )


class LRNPrimitives(WorkspacePrimitives):
    """The inference forward, training forward (with the workspace) and backward of one
    LRNSpec (nincc.onednn_workspace)."""

    def __init__(self, spec: LRNSpec) -> None:
        self.spec = spec
        md = spec.md()
        super().__init__(md, md)

    def forward_pd(self, prop: int) -> _vp:
        return descriptor(
            onednn._lib().dnnl_lrn_forward_primitive_desc_create, "LRN forward",
            prop, self.spec.algorithm, self.src, self.dst, *self.spec.constants(),
            onednn._user_attr(),
        )

    def backward_pd(self, hint: _vp) -> _vp:
        md = self.src
        return descriptor(
            onednn._lib().dnnl_lrn_backward_primitive_desc_create, "LRN backward",
            self.spec.algorithm, md, md, md, *self.spec.constants(), hint, onednn._user_attr(),
        )


@cache
def primitives(spec: LRNSpec) -> LRNPrimitives:
    """The (cached) primitives of one LRN."""
    return LRNPrimitives(spec)


def _run_backward(p: LRNPrimitives, ins: list[int], outs: list[int]) -> None:
    args = {
        onednn._ARG_SRC: (p.src, ins[0]),
        onednn._ARG_DIFF_DST: (p.dst, ins[1]),
        ARG_WORKSPACE: (p.workspace_md, ins[2]),
        onednn._ARG_DIFF_SRC: (p.src, outs[0]),
    }
    execute(p.backward, args, outs[1])


def _name(spec: LRNSpec, direction: str) -> str:
    consts = "_".join(
        repr(v).replace(".", "p").replace("-", "m") for v in (spec.alpha, spec.beta, spec.k)
    )
    fields = "_".join(map(str, (spec.n, spec.h, spec.w, spec.c, spec.size)))
    kind = "lrnwithin" if spec.within else "lrn"
    if spec.layout != act_layout.NHWC:
        fields += "_" + spec.layout
    return f"nincc_onednn_{kind}_{direction}_{fields}_{consts}"


def _x_type(spec: LRNSpec) -> jax.ShapeDtypeStruct:
    shape = act_layout.array_shape((spec.n, spec.c, spec.h, spec.w), spec.layout)
    return jax.ShapeDtypeStruct(shape, jnp.float32)


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _lrn(spec: LRNSpec, x: Any) -> Any:
    p = primitives(spec)
    return call(_name(spec, "fwd"), run_forward, p, forward_types(p, _x_type(spec)), x)[0]


def _lrn_fwd(spec, x):
    p = primitives(spec)
    y, ws, _ = call(_name(spec, "train"), run_training, p, training_types(p, _x_type(spec)), x)
    return y, (x, ws)


def _lrn_bwd(spec, res, dy):
    x, ws = res
    p = primitives(spec)
    outs = backward_types(p, _x_type(spec))
    return (call(_name(spec, "bwd"), _run_backward, p, outs, x, dy, ws)[0],)


_lrn.defvjp(_lrn_fwd, _lrn_bwd)


def usable(
    x_shape: tuple[int, ...], size: int, alpha: float, beta: float, k: float,
    dtype: Any = np.float32, within: bool = False, layout: str = act_layout.NHWC,
) -> LRNSpec | None:
    """The LRNSpec to run this LRN of ``x_shape`` (held in ``layout``; across channels, or
    ``within`` each) on oneDNN with, or None to keep XLA's lowering: oneDNN off or missing
    (nincc.onednn.enabled), not float32, an empty input, an even window, or a geometry for
    which oneDNN has only its reference kernels (slower than XLA's loop) or will not create
    the primitives."""
    if np.dtype(dtype) != np.float32 or not all(d > 0 for d in x_shape) or size % 2 != 1:
        return None
    if not onednn.enabled():
        return None
    n, c, h, w = (int(d) for d in act_layout.caffe_shape(tuple(x_shape), layout))
    spec = LRNSpec(n, h, w, c, int(size), float(alpha), float(beta), float(k), within, layout)
    try:
        prims = primitives(spec).all()  # created now, so that no call fails to create one
    except onednn.OneDNNError:
        return None
    if any(p.impl.startswith("ref") for p in prims):
        return None
    return spec


def lrn(spec: LRNSpec, x: Any) -> Any:
    """Caffe's LRN of ``x`` (float32, held in ``spec.layout``) as ``spec`` describes,
    differentiable."""
    return _lrn(spec, x)
