"""Caffe's InnerProduct on oneDNN's matrix multiply inside the compiled function.

A fully-connected layer at a small batch streams its weights once per call: NIN-ZFNet's fc6
holds 151 MB. XLA's dot reads Caffe's (out, in) weights at 7-8 GB/s (fc6 at b16: 19.6 ms);
oneDNN's matmul reads them in place, as a transposed operand given by its strides, at about
twice that (7.4 ms; PyTorch's linear 10.8 ms; docs/performance.md, section 28). The same
plumbing as nincc.onednn (XLA FFI custom calls on XLA's buffers, CPU only, ``NINCC_ONEDNN=0``
turns it off). The backward is two more products on the same operands: dx = dy·W and
dW = dyᵀ·x (x·dyᵀ's transpose for Caffe's ``transpose: true`` weights); db is XLA's sum.
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
from .onednn import _DIMS, _F32, _vp


@dataclass(frozen=True)
class MatmulSpec:
    """y (m, n) = A (m, k) · B (k, n) (+ bias (n,)), float32, every array row-major; A is
    stored as its transpose (k, m) when ``a_t``, B as its transpose (n, k) when ``b_t``;
    then a ReLU of negative slope ``relu``, if given, as the primitive's post-op."""

    m: int
    k: int
    n: int
    a_t: bool
    b_t: bool
    bias: bool
    relu: float | None = None


def _strided(rows: int, cols: int, transposed: bool) -> _vp:
    """The (rows, cols) operand, stored row-major as itself or as its transpose."""
    md = _vp()
    strides = _DIMS(1, rows) if transposed else _DIMS(cols, 1)
    onednn._check(
        onednn._lib().dnnl_memory_desc_create_with_strides(
            C.byref(md), 2, _DIMS(rows, cols), _F32, strides
        ),
        "matmul operand",
    )
    return md


class MatmulPrimitive:
    """The created product of one MatmulSpec and its memory descriptors."""

    def __init__(self, spec: MatmulSpec) -> None:
        self.spec = spec
        self.a = _strided(spec.m, spec.k, spec.a_t)
        self.b = _strided(spec.k, spec.n, spec.b_t)
        self.y = _strided(spec.m, spec.n, False)
        self.bias = onednn._md((1, spec.n), 3) if spec.bias else None  # dnnl_ab

    @cached_property
    def prim(self) -> onednn._Primitive:
        pd = _vp()
        onednn._check(
            onednn._lib().dnnl_matmul_primitive_desc_create(
                C.byref(pd), onednn._engine(), self.a, self.b, self.bias, self.y,
                onednn._user_attr(self.spec.relu),
            ),
            "matmul",
        )
        return onednn._Primitive(pd, None, None)


@cache
def primitive(spec: MatmulSpec) -> MatmulPrimitive:
    return MatmulPrimitive(spec)


def _run(p: MatmulPrimitive, ins: list[int], outs: list[int]) -> None:
    prim = p.prim
    args = {
        onednn._ARG_SRC: (p.a, ins[0]),
        onednn._ARG_WEIGHTS: (p.b, ins[1]),
        onednn._ARG_DST: (p.y, outs[0]),
        onednn._ARG_SCRATCHPAD: (prim.scratchpad_md, outs[1]),
    }
    if p.spec.bias:
        args[onednn._ARG_BIAS] = (p.bias, ins[2])
    onednn._execute(prim.prim, args)


def _name(spec: MatmulSpec) -> str:
    fields: list = [spec.m, spec.k, spec.n, int(spec.a_t), int(spec.b_t), int(spec.bias)]
    if spec.relu is not None:
        fields.append(onednn.relu_tag(spec.relu))
    return "nincc_onednn_matmul_" + "_".join(map(str, fields))


def matmul(spec: MatmulSpec, a: Any, b: Any, bias: Any | None = None) -> Any:
    """The product ``spec`` describes, one custom call (not differentiable by itself)."""
    p = primitive(spec)
    target = onednn._target(_name(spec), partial(_run, p))
    outs = [
        jax.ShapeDtypeStruct((spec.m, spec.n), jnp.float32),
        onednn._bytes(p.prim.scratchpad_bytes),
    ]
    args = (a, b) if bias is None else (a, b, bias)
    return jax.ffi.ffi_call(target, outs, vmap_method="sequential")(*args)[0]


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _inner(transpose: bool, x: Any, w: Any, b: Any) -> Any:
    m, k = x.shape
    n = w.shape[1] if transpose else w.shape[0]
    spec = MatmulSpec(m, k, n, False, not transpose, b.shape[0] > 0)
    return matmul(spec, x, w, b if spec.bias else None)


def _inner_fwd(transpose, x, w, b):
    return _inner(transpose, x, w, b), (x, w, b.shape[0] > 0)


def _inner_bwd(transpose, res, dy):
    x, w, has_bias = res
    return cotangents(x, w, dy, transpose, has_bias)


def cotangents(
    x: Any, w: Any, dy: Any, transpose: bool, has_bias: bool
) -> tuple[Any, Any, Any]:
    """(dx, dW, db) of y = x·Wᵀ + b ((n, k) weights; x·W for ``transpose`` (k, n) ones) for
    the output gradient dy (m, n): two products on the operands as they are stored, and db
    (an empty array without a bias) as XLA's product of dy with a vector of ones: its column
    sum runs several times slower where dy is a channels-last array's rows."""
    m, k = x.shape
    n = dy.shape[1]
    # dx (m, k) = dy (m, n) · Wᵀ-as-(n, k): W stored (n, k) is that operand as it is
    dx = matmul(MatmulSpec(m, n, k, False, transpose, False), dy, w)
    if transpose:  # W (k, n): dW = x (k, m via xᵀ) · dy (m, n)
        dw = matmul(MatmulSpec(k, m, n, True, False, False), x, dy)
    else:  # W (n, k): dW = dyᵀ (n, m) · x (m, k)
        dw = matmul(MatmulSpec(n, m, k, True, False, False), dy, x)
    db = jnp.ones((m,), dy.dtype) @ dy if has_bias else jnp.zeros((0,), jnp.float32)
    return dx, dw, db


_inner.defvjp(_inner_fwd, _inner_bwd)


def bias_arg(b: Any | None) -> Any:
    """The bias operand of a custom VJP: ``b``, or an empty array for a layer without one."""
    return b if b is not None else jnp.zeros((0,), jnp.float32)


def inner_product(x: Any, w: Any, b: Any | None, transpose: bool) -> Any:
    """Caffe's InnerProduct on a (m, k) input: x·Wᵀ (+ b) for (n, k) weights, x·W for
    ``transpose`` (k, n) ones; differentiable in x, w and b."""
    return _inner(transpose, x, w, bias_arg(b))


def supports(*arrays: Any) -> bool:
    """float32 only, no empty operand, not inside a shard_map (nincc.onednn.per_device)."""
    return all(
        np.dtype(a.dtype) == np.float32 and a.size > 0 and not onednn.per_device(a)
        for a in arrays
    )
