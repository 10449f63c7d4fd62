"""Caffe's ACROSS_CHANNELS LRN on oneDNN's kernels inside the compiled function.

The same plumbing as nincc.onednn's convolutions (XLA FFI custom calls on XLA's own buffers,
channels-last, CPU backend only, ``NINCC_ONEDNN=0`` turns it off). oneDNN's across-channels
LRN is Caffe's formula term for term: ``x * (k + alpha/n * sum of x^2 over the n channels
centred on it)^-beta``, zero beyond the first and last channel, n odd (Caffe's rule).

The forward is even with XLA's loop; the backward is what this buys. XLA's (nincc.fast's
``_lrn_bwd``) recomputes the scale and makes two more passes over the input; oneDNN's reads
the workspace its training forward wrote (the scale, twice the input's size), and runs in
less than half the time (NIN-ZFNet norm1 b16: 13 against 30 ms, docs/performance.md section
30). The workspace lives from the forward to the backward: that is the memory this costs.
oneDNN 3.2's vector kernels take beta 0.75 (Caffe's default, every zoo net's) and 1; for other
betas it has only a reference kernel, far slower than XLA's loop, which is then kept.
"""

from __future__ import annotations

import ctypes as C
from dataclasses import dataclass
from functools import cache, cached_property, partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from . import onednn
from .onednn import _FORWARD_INFERENCE, _FORWARD_TRAINING, _TAG_NHWC, _vp

_LRN_ACROSS_CHANNELS = 0xAFF
_QUERY_WORKSPACE_MD = 135
_ARG_WORKSPACE = 64


@dataclass(frozen=True)
class LRNSpec:
    """One LRN: NHWC input (n, h, w, c) and Caffe's constants (odd ``size``)."""

    n: int
    h: int
    w: int
    c: int
    size: int
    alpha: float
    beta: float
    k: float

    def md(self) -> _vp:
        """oneDNN's descriptor of the input (and of the output and both gradients)."""
        return onednn._md((self.n, self.c, self.h, self.w), _TAG_NHWC)

    def constants(self) -> tuple[Any, ...]:
        return (
            C.c_int64(self.size),
            C.c_float(self.alpha),
            C.c_float(self.beta),
            C.c_float(self.k),
        )


class LRNPrimitives:
    """The inference forward, training forward (with the workspace) and backward of one
    LRNSpec, each created when first asked for (at trace time)."""

    def __init__(self, spec: LRNSpec) -> None:
        self.spec = spec
        self.md = spec.md()

    def _forward_pd(self, prop: int) -> _vp:
        pd = _vp()
        onednn._check(
            onednn._lib().dnnl_lrn_forward_primitive_desc_create(
                C.byref(pd), onednn._engine(), prop, _LRN_ACROSS_CHANNELS, self.md, self.md,
                *self.spec.constants(), onednn._user_attr(),
            ),
            "LRN forward",
        )
        return pd

    @cached_property
    def forward(self) -> onednn._Primitive:
        return onednn._Primitive(self._forward_pd(_FORWARD_INFERENCE), None, None)

    @cached_property
    def training(self) -> onednn._Primitive:
        return onednn._Primitive(self._forward_pd(_FORWARD_TRAINING), None, None)

    @cached_property
    def workspace_md(self) -> _vp:
        return onednn._query_md(self.training.pd, _QUERY_WORKSPACE_MD)

    @cached_property
    def backward(self) -> onednn._Primitive:
        pd = _vp()
        md = self.md
        onednn._check(
            onednn._lib().dnnl_lrn_backward_primitive_desc_create(
                C.byref(pd), onednn._engine(), _LRN_ACROSS_CHANNELS, md, md, md,
                *self.spec.constants(), self.training.pd, onednn._user_attr(),
            ),
            "LRN backward",
        )
        return onednn._Primitive(pd, None, None)

    def all(self) -> tuple[onednn._Primitive, ...]:
        return (self.forward, self.training, self.backward)


@cache
def primitives(spec: LRNSpec) -> LRNPrimitives:
    """The (cached) primitives of one LRN."""
    return LRNPrimitives(spec)


def _run_forward(p: LRNPrimitives, ins: list[int], outs: list[int]) -> None:
    prim = p.forward
    onednn._execute(prim.prim, {
        onednn._ARG_SRC: (p.md, ins[0]),
        onednn._ARG_DST: (p.md, outs[0]),
        onednn._ARG_SCRATCHPAD: (prim.scratchpad_md, outs[1]),
    })


def _run_training(p: LRNPrimitives, ins: list[int], outs: list[int]) -> None:
    prim = p.training
    onednn._execute(prim.prim, {
        onednn._ARG_SRC: (p.md, ins[0]),
        onednn._ARG_DST: (p.md, outs[0]),
        _ARG_WORKSPACE: (p.workspace_md, outs[1]),
        onednn._ARG_SCRATCHPAD: (prim.scratchpad_md, outs[2]),
    })


def _run_backward(p: LRNPrimitives, ins: list[int], outs: list[int]) -> None:
    prim = p.backward
    onednn._execute(prim.prim, {
        onednn._ARG_SRC: (p.md, ins[0]),
        onednn._ARG_DIFF_DST: (p.md, ins[1]),
        _ARG_WORKSPACE: (p.workspace_md, ins[2]),
        onednn._ARG_DIFF_SRC: (p.md, outs[0]),
        onednn._ARG_SCRATCHPAD: (prim.scratchpad_md, outs[1]),
    })


def _name(spec: LRNSpec, direction: str) -> str:
    consts = "_".join(repr(v).replace(".", "p").replace("-", "m")
                      for v in (spec.alpha, spec.beta, spec.k))
    fields = "_".join(map(str, (spec.n, spec.h, spec.w, spec.c, spec.size)))
    return f"nincc_onednn_lrn_{direction}_{fields}_{consts}"


def _call(spec: LRNSpec, direction: str, run: Any, outs: list, *args: Any) -> list:
    target = onednn._target(_name(spec, direction), partial(run, primitives(spec)))
    return jax.ffi.ffi_call(target, outs, vmap_method="sequential")(*args)


def _x_type(spec: LRNSpec) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct((spec.n, spec.h, spec.w, spec.c), jnp.float32)


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _lrn(spec: LRNSpec, x: Any) -> Any:
    p = primitives(spec)
    outs = [_x_type(spec), onednn._bytes(p.forward.scratchpad_bytes)]
    return _call(spec, "fwd", _run_forward, outs, x)[0]


def _lrn_fwd(spec, x):
    p = primitives(spec)
    outs = [
        _x_type(spec),
        onednn._bytes(onednn._md_size(p.workspace_md)),
        onednn._bytes(p.training.scratchpad_bytes),
    ]
    y, ws, _ = _call(spec, "train", _run_training, outs, x)
    return y, (x, ws)


def _lrn_bwd(spec, res, dy):
    x, ws = res
    outs = [_x_type(spec), onednn._bytes(primitives(spec).backward.scratchpad_bytes)]
    return (_call(spec, "bwd", _run_backward, outs, x, dy, ws)[0],)


_lrn.defvjp(_lrn_fwd, _lrn_bwd)


def usable(
    x_shape: tuple[int, ...], size: int, alpha: float, beta: float, k: float,
    dtype: Any = np.float32,
) -> LRNSpec | None:
    """The LRNSpec to run this across-channels LRN of NHWC ``x_shape`` on oneDNN with, or
    None to keep XLA's lowering: oneDNN off or missing (nincc.onednn.enabled), not float32,
    an empty input, an even window, or a geometry for which oneDNN has only its reference
    kernels (slower than XLA's loop) or will not create the primitives."""
    if np.dtype(dtype) != np.float32 or not all(d > 0 for d in x_shape) or size % 2 != 1:
        return None
    if not onednn.enabled():
        return None
    n, h, w, c = (int(d) for d in x_shape)
    spec = LRNSpec(n, h, w, c, int(size), float(alpha), float(beta), float(k))
    try:
        prims = primitives(spec).all()  # created now, so that no call fails to create one
    except onednn.OneDNNError:
        return None
    if any(p.impl.startswith("ref") for p in prims):
        return None
    return spec


def lrn(spec: LRNSpec, x: Any) -> Any:
    """Caffe's across-channels LRN of NHWC ``x`` (float32) as ``spec`` describes,
    differentiable."""
    return _lrn(spec, x)
