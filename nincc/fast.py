"""Fast lowerings: channels-last replacements for some layer-table ``lower`` functions.

Each entry of :data:`FAST_LOWERINGS` maps a table type name to a :class:`FastLowering`: a
function with the signature of a table entry's ``lower`` (attrs, params, bottoms, ctx) -> tops
that takes and returns 4-D blobs channels-last (N, H, W, C), and a predicate saying for which
attrs and (Caffe-layout, NCHW) bottom shapes it applies. ``nincc.compile.run_graph`` keeps a
blob channels-last from the layer that makes it to the layer that needs it in Caffe's layout,
so a chain of convolutions, ReLUs and poolings runs without a transpose between layers; XLA:CPU
runs its convolutions and products channels-last anyway, and an NCHW graph around them costs a
layout copy at every element-wise or pooling layer (docs/performance.md). Called directly, a
FastLowering takes and returns Caffe's layout (it transposes around the channels-last code),
which is how tests compare it with the table's lowering, the reference every fast path is
tested against (tests/test_fast.py), forward and gradients, within the fixture tolerances.

What is here, and why, is measured in docs/performance.md:

- 2-D convolutions: XLA's convolution channels-last; 1x1 (CCCP) ones, when differentiated, as
  one product over channels with a custom backward (dx by the transposed product, dw by one
  product contracting batch and pixels), where autodiff gives XLA:CPU a whole-image-window
  convolution, and in inference as XLA's 1x1 convolution, which runs them faster; strided
  ones with their input gradient by output phases, where autodiff dilates dy by the stride;
  stride-1 ones with kernels of 5x5 and more, when differentiated at batch 16 and more,
  through the FFT (nincc.fftconv);
- MAX and AVE pooling: the forward records which kernel offset won each window; gradients are
  folded back onto the input phase by phase from shifted copies (no scatter, no strided pads);
- ACROSS_CHANNELS LRN: channel-window sums as shifted slices, scale^-0.75 by square roots and
  Caffe's own backward formula;
- ReLU (negative_slope >= 0) with Caffe's in-place backward, which reads the top: autodiff
  would keep the bottom alive for the mask besides the top;
- layers that do not care about the layout (Sigmoid, TanH, Split, Dropout) pass
  channels-last blobs through, so that they do not force a transpose.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from . import act_layout, fftconv, onednn, onednn_lrn, onednn_matmul, onednn_pool
from .layers import base
from .layers.common import InnerProductAttrs, _ip_axis
from .layers.normalization import LRNAttrs
from .layers.vision import (
    FLT_MAX,
    ConvAttrs,
    Geometry,
    PoolAttrs,
    PoolGeom,
    _ave_divisor,
    _conv_out_sizes,
    _geometry,
    _pool_geom_of,
)

Shape = tuple[int, ...]
Lower = Callable[[Any, list[Any], list[Any], base.LowerCtx], list[Any]]


def to_nhwc(x: Any) -> Any:
    return jnp.transpose(x, (0, 2, 3, 1))


def to_nchw(x: Any) -> Any:
    return jnp.transpose(x, (0, 3, 1, 2))


def nchw_shape(shape: Shape) -> Shape:
    """The Caffe (NCHW) shape of a channels-last array's shape."""
    n, h, w, c = shape
    return (n, c, h, w)


@dataclass(frozen=True)
class FastLowering:
    """A channels-last lowering with a table entry's ``lower`` signature, and where it applies.

    ``applies(attrs, bottom_shapes)`` sees Caffe's (NCHW) shapes, and holds only when every
    bottom and top is 4-D. Calling the object runs the layer on NCHW blobs. With ``nchw`` the
    lowering takes and returns Caffe's layout, as the table's does (any number of axes).
    """

    nhwc: Lower
    applies: Callable[[Any, list[Shape]], bool]
    doc: str = ""
    nchw: bool = False

    def __call__(self, attrs: Any, params: list[Any], bottoms: list[Any], ctx: Any) -> list[Any]:
        if self.nchw:
            return self.nhwc(attrs, params, bottoms, ctx)
        tops = self.nhwc(attrs, params, [to_nhwc(b) for b in bottoms], ctx)
        return [to_nchw(t) for t in tops]


def _all_4d(attrs: Any, bottom_shapes: list[Shape]) -> bool:
    return bool(bottom_shapes) and all(len(s) == 4 for s in bottom_shapes)


# ---------------------------------------------------------------- convolutions


def _is_conv2d(a: ConvAttrs, bottom_shapes: list[Shape]) -> bool:
    """A 2-D convolution: 4-D bottoms, channel axis 1, a kernel over both spatial axes."""
    try:
        gs = [_geometry(a, s) for s in bottom_shapes]
        for g, s in zip(gs, bottom_shapes):
            _conv_out_sizes(g, s)
    except Exception:  # noqa: BLE001 - a shape the table rejects is the table's to report
        return False
    return bool(gs) and all(
        len(s) == 4 and g.axis == 1 and len(g.kernel) == 2 for g, s in zip(gs, bottom_shapes)
    )


def zero_after(values: Sequence[Any]) -> Any:
    """A float32 zero computed from one element of each of ``values``: adding it makes a value
    depend on them without changing it. XLA schedules, merges and fuses by data dependence
    only; this is how nincc orders work it would otherwise move. ``0 * isnan(...)``, so a NaN
    does not spread through it."""
    firsts = [
        v.reshape(-1)[:1].astype(jnp.float32)
        for v in values
        if v.size and jnp.issubdtype(v.dtype, jnp.floating)
    ]
    if not firsts:
        return None
    return jnp.sum(jnp.isnan(jnp.concatenate(firsts)).astype(jnp.float32)) * 0.0


def after(x: Any, values: Sequence[Any]) -> Any:
    """``x``, unchanged, but computed after ``values`` (see zero_after)."""
    zero = zero_after(values)
    return x if zero is None else x + zero.astype(x.dtype)


_CONV_DN = ("NHWC", "OIHW", "NHWC")


def _rows(x: Any) -> Any:
    """A channels-last array as a (pixels, channels) matrix."""
    return x.reshape(-1, x.shape[-1])


def _pointwise_product(x: Any, w: Any) -> Any:
    """x (N, H, W, C) times w (O, C) over channels as one (pixels, C) x (C, O) product."""
    y = lax.dot_general(_rows(x), w, (((1,), (1,)), ((), ())))
    return y.reshape(*x.shape[:3], w.shape[0])


@jax.custom_vjp
def _pointwise(x: Any, w: Any) -> Any:
    """x (N, H, W, C) times w (O, C) over channels: a 1x1 convolution.

    Where no gradient is taken (inference) it runs as XLA's own 1x1 convolution, which
    XLA:CPU gives to Eigen; under differentiation the forward is the product that the
    backward's products pair with (docs/performance.md, section 21).
    """
    return _xla_conv(x, w[:, :, None, None], (1, 1), "VALID")


def _pointwise_fwd(x, w):
    return _pointwise_product(x, w), (x, w)


def _pointwise_bwd(res, dy):
    # dx is the transposed product; dw contracts batch and pixels in a single product. Autodiff
    # of a 1x1 convolution gives XLA:CPU a weight gradient convolution whose window is the whole
    # image, which it runs far below the matrix-product rate. Written on (pixels, channels)
    # matrices: contracting the three leading axes of 4-D arrays instead runs about 2x slower.
    x, w = res
    dx = (_rows(dy) @ w).reshape(x.shape)
    dw = lax.dot_general(_rows(dy), _rows(x), (((0,), (0,)), ((), ())))
    return dx, dw


_pointwise.defvjp(_pointwise_fwd, _pointwise_bwd)


@jax.custom_vjp
def _add_bias(y: Any, b: Any) -> Any:
    """y + b over the channels of a channels-last array."""
    return y + b.reshape(1, 1, 1, -1)


def _add_bias_fwd(y, b):
    return _add_bias(y, b), None


def _add_bias_bwd(_, dy):
    # db as a product with a vector of ones: XLA:CPU's reduction over the leading axes of a
    # channels-last array runs several times slower than this product.
    rows = dy.shape[0] * dy.shape[1] * dy.shape[2]
    return dy, jnp.ones((rows,), dy.dtype) @ dy.reshape(rows, dy.shape[3])


_add_bias.defvjp(_add_bias_fwd, _add_bias_bwd)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _strided_conv(x: Any, w: Any, stride: tuple[int, int], padding: tuple) -> Any:
    """A strided convolution (group 1, no dilation) whose input gradient avoids dilating dy.

    ``padding`` is (low, high) per spatial axis, high >= 0, with exactly the output windows
    fitting. XLA computes the input gradient as a convolution over dy dilated by the stride:
    s*s times the products needed (docs/performance.md). The weight gradient is XLA's.
    """
    return _xla_conv(x, w, stride, padding)


def _xla_conv(x: Any, w: Any, stride, padding) -> Any:
    return lax.conv_general_dilated(x, w, stride, padding, dimension_numbers=_CONV_DN)


def _strided_conv_fwd(x, w, stride, padding):
    return _xla_conv(x, w, stride, padding), (x, w)


def _strided_conv_bwd(stride, padding, res, dy):
    x, w = res
    dw = jax.vjp(lambda k: _xla_conv(x, k, stride, padding), w)[1](dy)[0]
    return _phase_input_grad(dy, w, x.shape[1:3], stride, padding), dw


_strided_conv.defvjp(_strided_conv_fwd, _strided_conv_bwd)


def _phase_input_grad(dy: Any, w: Any, x_hw: tuple[int, int], stride, padding) -> Any:
    """dx of a strided convolution by output phases: input row s*q + a only meets kernel rows
    a, a + s, a + 2s..., so each of the s*s phases is a stride-1 convolution of dy with those
    taps, flipped and with in and out channels swapped; the phases are then interleaved.

    With few input channels the phases' convolutions are too narrow to run well, so they
    run as one convolution whose s*s*C output channels are the phases (taps a phase lacks
    are zero): NIN-ZFNet's conv2 (96 channels) 120 -> 58 ms at batch 16 as separate
    phases, 79 as one; its 3-channel stem 196 -> 97 ms as one, 260 as separate.
    """
    n, oh, ow, o = dy.shape
    _, c, kh, kw = w.shape
    (sh, sw), ((plh, phh), (plw, phw)) = stride, padding
    th, tw = _cdiv(kh, sh), _cdiv(kw, sw)
    if c < 32:
        k = jnp.pad(w, ((0, 0), (0, 0), (0, th * sh - kh), (0, tw * sw - kw)))
        k = k.reshape(o, c, th, sh, tw, sw).transpose(2, 4, 0, 3, 5, 1)
        k = jnp.flip(k, (0, 1)).reshape(th, tw, o, sh * sw * c)
        y = lax.conv_general_dilated(
            dy,
            k,
            (1, 1),
            [(th - 1, th - 1), (tw - 1, tw - 1)],
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )
        qh, qw = y.shape[1], y.shape[2]
        full = y.reshape(n, qh, qw, sh, sw, c).transpose(0, 1, 3, 2, 4, 5)
    else:
        hp, wp = x_hw[0] + plh + phh, x_hw[1] + plw + phw
        qh, qw = _cdiv(hp, sh), _cdiv(wp, sw)
        rows = []
        for a in range(sh):
            cols = []
            for b in range(sw):
                ta, tb = _cdiv(kh - a, sh) if a < kh else 0, _cdiv(kw - b, sw) if b < kw else 0
                if ta == 0 or tb == 0:  # the stride skips past the kernel: no gradient
                    cols.append(jnp.zeros((n, qh, qw, c), dy.dtype))
                    continue
                k = jnp.flip(w[:, :, a::sh, b::sw], (2, 3))
                part = lax.conv_general_dilated(
                    dy,
                    k,
                    (1, 1),
                    [(ta - 1, ta - 1), (tb - 1, tb - 1)],
                    dimension_numbers=("NHWC", "IOHW", "NHWC"),
                )
                pads = ((0, 0), (0, qh - part.shape[1]), (0, qw - part.shape[2]), (0, 0))
                cols.append(jnp.pad(part, pads))
            rows.append(jnp.stack(cols, axis=3))  # (n, qh, qw, sw, c)
        full = jnp.stack(rows, axis=2)  # (n, qh, sh, qw, sw, c)
    full = full.reshape(n, qh * sh, qw * sw, c)
    return full[:, plh : plh + x_hw[0], plw : plw + x_hw[1], :]


def fft_tiles(a: ConvAttrs, shape: Shape) -> int:
    """Tiles per side the FFT path cuts a convolution of the NCHW ``shape`` into when
    differentiated (0: not taken -- oneDNN runs it, or nincc.fftconv.enabled and tiles_for
    say no)."""
    if uses_onednn(shape=shape) or not fftconv.enabled():
        return 0
    g = _geometry(a, shape)
    n, c, h, w = shape
    out = _conv_out_sizes(g, shape)
    return fftconv.tiles_for((n, h, w, c), out, g.kernel, g.stride, g.dilation, a.group)


def uses_onednn(
    x_dtype: Any = np.float32, w_dtype: Any = np.float32, shape: Sequence[int] = (1,)
) -> bool:
    """Whether a convolution of these dtypes and bottom shape runs through oneDNN
    (nincc.onednn.enabled; float32, no empty bottom)."""
    return (
        onednn.enabled() and onednn.supports(x_dtype, w_dtype) and all(d > 0 for d in shape)
    )


def caffe_high_pads(g: Geometry, shape: Sequence[int]) -> tuple[int, ...]:
    """Per spatial axis of Caffe-shape (NCHW) ``shape``, the padding after the input's end
    that makes exactly Caffe's output count of windows fit: negative where its last window
    stops short of the end (im2col reads no further)."""
    out = _conv_out_sizes(g, tuple(shape))
    return tuple(
        (o - 1) * s + e - i - p
        for o, i, p, e, s in zip(out, shape[2:], g.pad, g.extent, g.stride, strict=True)
    )


def _caffe_windows(g: Geometry, x: Any) -> tuple[Any, tuple[tuple[int, int], ...]]:
    """NHWC ``x`` cropped, and its (low, high) padding per spatial axis, so that exactly
    Caffe's output count of windows fits: low by `pad`, high padded (or cropped) as its
    im2col does (the table's lowering does the same)."""
    highs = caffe_high_pads(g, nchw_shape(x.shape))
    x = x[:, : x.shape[1] + min(highs[0], 0), : x.shape[2] + min(highs[1], 0), :]
    return x, tuple((p, max(hi, 0)) for p, hi in zip(g.pad, highs, strict=True))


def _conv_nhwc(
    a: ConvAttrs, params, bottoms, ctx, relu: float | None = None, residual: str = "mask"
):
    w = params[0]
    outs = []
    for x in bottoms:
        g = _geometry(a, nchw_shape(x.shape))
        if (
            uses_onednn(x.dtype, w.dtype, x.shape)
            and math.prod(w.shape) > 0
            and not onednn.per_device(x)
        ):
            b = params[1] if a.bias_term else None
            if pointwise_on_matmul(g, a.group, x.shape, w.shape):
                bias = onednn_matmul.bias_arg(b)
                outs.append(_onednn_pointwise(relu, residual, x, w, bias))
                continue
            x, padding = _caffe_windows(g, x)
            if relu is None:
                outs.append(onednn.conv(x, w, b, g.stride, padding, g.dilation, a.group))
            else:
                spec = onednn.spec_of(
                    x.shape, w.shape, a.bias_term, g.stride, padding, g.dilation, a.group, relu
                )
                bias = onednn.bias_arg(spec, b)
                outs.append(_onednn_conv_relu(spec, residual, x, w, bias))
            continue
        if g.kernel == (1, 1) and g.pad == (0, 0) and a.group == 1:
            if g.stride != (1, 1):  # Caffe's (in - 1) / s + 1 outputs: every s-th pixel
                x = x[:, :: g.stride[0], :: g.stride[1], :]
            y = _pointwise(x, w.reshape(w.shape[:2]))
        else:
            x, padding = _caffe_windows(g, x)
            tiles = fft_tiles(a, nchw_shape(x.shape))
            if tiles:
                y = fftconv.conv(x, w, padding, tiles)
            elif g.stride != (1, 1) and g.dilation == (1, 1) and a.group == 1:
                y = _strided_conv(x, w, tuple(g.stride), padding)
            else:
                y = lax.conv_general_dilated(
                    x,
                    w,
                    window_strides=g.stride,
                    padding=padding,
                    rhs_dilation=g.dilation,
                    feature_group_count=a.group,
                    dimension_numbers=_CONV_DN,
                )
        if a.bias_term:
            y = _add_bias(y, params[1])
        if relu is not None:
            y = _relu_ahead_of_pooling(y, relu) if residual == "pooling" else _relu(y, relu)
        outs.append(y)
    return outs


@partial(jax.custom_vjp, nondiff_argnums=(1,))
def _relu_ahead_of_pooling(x: Any, slope: float) -> Any:
    """A fused ReLU outside oneDNN whose backward the MAX poolings after it apply
    (residual "pooling"): its own backward passes the gradient through."""
    return _relu(x, slope)


_relu_ahead_of_pooling.defvjp(
    lambda x, slope: (_relu(x, slope), None), lambda slope, _, dy: (dy,)
)


def conv_relu_nhwc(slope: float, residual: str = "mask") -> Lower:
    """The fast Convolution lowering with the in-place ReLU (of ``slope``) that follows it
    fused: where oneDNN runs the convolution the ReLU is its post-op, saving a pass over the
    output (nincc.compile.relu_fusions picks the pairs); elsewhere the two in turn. What the
    ReLU's backward reads, ``residual``: see _fused_relu_mask."""
    return partial(_conv_nhwc, relu=slope, residual=residual)


def max_pool_after_relu(lower: Lower, slope: float) -> Lower:
    """A MAX pooling lowering that also applies the backward of the fused ReLU (of
    ``slope``) before it, to its own output gradient: each window's gradient goes to one
    element holding the window's maximum, so that element's ReLU top is the pooling's
    output, and ``dy`` where that is > 0, else ``slope * dy``, is the ReLU's rule at the
    element, on a fraction of the top's size and with no residual of the ReLU's own
    (nincc.compile.relu_fusions' "pooling")."""

    def lowered(attrs, params, bottoms, ctx):
        def pool(x):
            return lower(attrs, params, [x], ctx)[0]

        return [_through_relu(pool, slope, bottoms[0])]

    return lowered


@partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _through_relu(pool: Any, slope: float, x: Any) -> Any:
    return pool(x)


def _through_relu_fwd(pool, slope, x):
    y, pull = jax.vjp(pool, x)
    return y, (y, pull)


def _through_relu_bwd(pool, slope, res, dy):
    y, pull = res
    return pull(jnp.where(y > 0, dy, dy * slope))


_through_relu.defvjp(_through_relu_fwd, _through_relu_bwd)


# ---------------------------------------------------------------- pooling


def _is_windowed_pool(a: PoolAttrs, bottom_shapes: list[Shape]) -> bool:
    """MAX (without the mask top) or AVE pooling of a 4-D bottom with more than one window
    (a single window, as in global pooling, is cheap in the table's lowering already)."""
    if a.method not in ("MAX", "AVE") or a.mask_top or len(bottom_shapes[0]) != 4:
        return False
    try:
        g = _pool_geom_of(a, bottom_shapes[0])
    except Exception:  # noqa: BLE001 - a shape the table rejects is the table's to report
        return False
    return g.out != (1, 1)


def _pool_pads(x_hw: tuple[int, int], g: PoolGeom) -> list[tuple[int, int]]:
    """Low pad, and high pad reaching exactly the last window (negative crops)."""
    return [
        (p, (o - 1) * s + k - i - p)
        for i, o, p, k, s in zip(x_hw, g.out, g.pad, g.kernel, g.stride)
    ]


def _spatial_pad(x: Any, pads: list[tuple[int, int]], fill: Any) -> Any:
    """Pad (or, negative, crop) the two spatial axes of a channels-last array."""
    cfg = [(0, 0, 0)] + [(lo, hi, 0) for lo, hi in pads] + [(0, 0, 0)]
    return lax.pad(x, jnp.asarray(fill, x.dtype), cfg)


def _max_and_first(x: Any, g: PoolGeom) -> tuple[Any, Any]:
    """Caffe's MAX pooling and, per window, which kernel offset (row-major) won.

    Scanning the offsets and replacing only on a strictly greater value from -FLT_MAX, as
    Caffe does: the first maximum wins, NaN never does, and a window whose output stays
    -FLT_MAX has no winner (index kh*kw) and passes no gradient.
    """
    kh, kw = g.kernel
    xp = _spatial_pad(x, _pool_pads(x.shape[1:3], g), -jnp.inf)
    shape = (x.shape[0], *g.out, x.shape[3])
    val = jnp.full(shape, -FLT_MAX, x.dtype)
    first = jnp.full(shape, kh * kw, jnp.int8 if kh * kw < 127 else jnp.int32)
    for k in range(kh * kw):
        i, j = divmod(k, kw)
        lim = (
            xp.shape[0],
            i + (g.out[0] - 1) * g.stride[0] + 1,
            j + (g.out[1] - 1) * g.stride[1] + 1,
            xp.shape[3],
        )
        cand = lax.slice(xp, (0, i, j, 0), lim, (1, *g.stride, 1))
        take = cand > val
        val = jnp.where(take, cand, val)
        first = jnp.where(take, jnp.asarray(k, first.dtype), first)
    return val, first


@partial(jax.custom_vjp, nondiff_argnums=(1,))
def _max_pool(x: Any, g: PoolGeom) -> Any:
    return _max_and_first(x, g)[0]


def _max_pool_fwd(x, g):
    val, first = _max_and_first(x, g)
    return val, (x.shape, _pack_pairs(first, g.kernel[0] * g.kernel[1]))


def _pair_bits(top: int) -> int:
    """Bits per window index in [0, top] when packed two per element (0: left unpacked)."""
    return 4 if top < 16 else 8 if top < 256 else 0


def _pack_pairs(first: Any, top: int) -> Any:
    """Window indices in [0, top] as a flat array, two per element (4 bits each below 16).

    Kept as they are, XLA recomputes the window scan inside the backward's fusions from the
    pooling's input (several times per element, and keeping that input alive); a reduction
    is not recomputed that way (as for the ReLU's mask, _pack_bits)."""
    bits = _pair_bits(top)
    if not bits:
        return first
    return _pack(first, 2, bits, jnp.uint8 if bits == 4 else jnp.uint16)


def _unpack_pairs(packed: Any, shape: Shape, top: int) -> Any:
    """The inverse of _pack_pairs: the indices, of ``shape``."""
    bits = _pair_bits(top)
    return _unpack(packed, shape, 2, bits) if bits else packed


def _max_pool_bwd(g, res, dy):
    # The window's gradient goes to the offset that won it; each offset's share is folded
    # back onto the input grid with shifted copies (no scatter).
    shape, packed = res
    kh, kw = g.kernel
    first = _unpack_pairs(packed, dy.shape, kh * kw)
    zero = jnp.asarray(0, dy.dtype)
    parts = {divmod(k, kw): jnp.where(first == k, dy, zero) for k in range(kh * kw)}
    return (_unfold(parts, g, shape),)


_max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)


def _unfold(parts: dict[tuple[int, int], Any], g: PoolGeom, shape: Shape) -> Any:
    """Sum each kernel offset's share of the window gradients back onto the input grid.

    Row ``s*u + p`` of the padded input only receives offsets ``a = p + s*m`` (from window
    ``u - m``), so each of the s*s phases is a sum of shifted copies of a few parts (no
    scatter); the phases are interleaved by one reshape and the padding is dropped.
    """
    pads = _pool_pads(shape[1:3], g)
    ph, pw = shape[1] + sum(pads[0]), shape[2] + sum(pads[1])
    (sh, sw), (kh, kw), (oh, ow) = g.stride, g.kernel, g.out
    uh, uw = _cdiv(ph, sh), _cdiv(pw, sw)
    some = next(iter(parts.values()))
    n, c = some.shape[0], some.shape[3]
    zero = jnp.asarray(0, some.dtype)
    rows = []
    for p in range(sh):
        cols = []
        for q in range(sw):
            acc = None
            for a in range(p, kh, sh):
                for b in range(q, kw, sw):
                    m, k = (a - p) // sh, (b - q) // sw
                    t = _spatial_pad(parts[(a, b)], [(m, uh - oh - m), (k, uw - ow - k)], zero)
                    acc = t if acc is None else acc + t
            cols.append(jnp.zeros((n, uh, uw, c), some.dtype) if acc is None else acc)
        rows.append(jnp.stack(cols, axis=3))  # (N, uh, uw, sw, C)
    full = jnp.stack(rows, axis=2).reshape(n, uh * sh, uw * sw, c)  # (N, uh, sh, uw, sw, C)
    full = full[:, :ph, :pw, :]
    return _spatial_pad(full, [(-lo, -hi) for lo, hi in pads], zero)


def _ave_divisor_nhwc(g: PoolGeom, hw: tuple[int, int]) -> Any:
    return jnp.asarray(_ave_divisor(g, hw).reshape(1, *g.out, 1))


@partial(jax.custom_vjp, nondiff_argnums=(1,))
def _ave_pool(x: Any, g: PoolGeom) -> Any:
    """Caffe's AVE pooling: the window sum over the zero-padded input, divided by Caffe's
    divisor (which counts padding, not the ceil overhang)."""
    xp = _spatial_pad(x, _pool_pads(x.shape[1:3], g), 0)
    s = lax.reduce_window(xp, 0.0, lax.add, (1, *g.kernel, 1), (1, *g.stride, 1), "VALID")
    return s / _ave_divisor_nhwc(g, x.shape[1:3])


def _ave_pool_fwd(x, g):
    return _ave_pool(x, g), x.shape


def _ave_pool_bwd(g, shape, dy):
    # Every element of a window (padding included, as in Caffe's divisor) gets dy / divisor;
    # the padding's share is then dropped.
    share = dy / _ave_divisor_nhwc(g, shape[1:3])
    parts = {(i, j): share for i in range(g.kernel[0]) for j in range(g.kernel[1])}
    return (_unfold(parts, g, shape),)


_ave_pool.defvjp(_ave_pool_fwd, _ave_pool_bwd)


def _pool_nhwc(a: PoolAttrs, params, bottoms, ctx):
    x = bottoms[0]
    g = _pool_geom_of(a, nchw_shape(x.shape))
    spec = None if onednn.per_device(x) else onednn_pool.usable(x.shape, g, x.dtype)
    if spec is not None:
        return [onednn_pool.pool(spec, x)]
    return [_max_pool(x, g) if a.method == "MAX" else _ave_pool(x, g)]


# ---------------------------------------------------------------- InnerProduct


def _ip_on_onednn(a: InnerProductAttrs, bottom_shapes: list[Shape]) -> bool:
    """One non-empty bottom, with oneDNN's matmul there to run it (nincc.onednn_matmul)."""
    return len(bottom_shapes) == 1 and min(bottom_shapes[0], default=0) > 0 and onednn.enabled()


def _ip(a: InnerProductAttrs, params, bottoms, ctx):
    x = bottoms[0]
    b = params[1] if a.bias_term else None
    if not onednn_matmul.supports(x, *params):
        return base.REGISTRY["InnerProduct"].lower(a, params, bottoms, ctx)
    axis = _ip_axis(a, x.shape)
    m, k = math.prod(x.shape[:axis]), math.prod(x.shape[axis:])
    y = onednn_matmul.inner_product(x.reshape(m, k), params[0], b, a.transpose)
    return [y.reshape(tuple(x.shape[:axis]) + (a.num_output,))]


# ---------------------------------------------------------------- LRN


def _lrn_applies(a: LRNAttrs, bottom_shapes: list[Shape]) -> bool:
    """ACROSS_CHANNELS on any 4-D input; WITHIN_CHANNEL where oneDNN runs it (the table's
    lowering, a window sum on Caffe's layout, is the only other)."""
    s = tuple(bottom_shapes[0])
    if len(s) != 4:
        return False
    return not a.within_channel or onednn_lrn_spec(a, (s[0], s[2], s[3], s[1])) is not None


def _channel_window_sum(v: Any, size: int) -> Any:
    """sum of v over channels c - (size-1)/2 .. c + (size-1)/2 (zero outside): shifted slices
    added in one fused loop, where reduce-window along channels runs much slower on XLA:CPU."""
    pad = (size - 1) // 2
    vp = jnp.pad(v, ((0, 0), (0, 0), (0, 0), (pad, pad)))
    c = v.shape[3]
    out = vp[..., 0:c]
    for k in range(1, size):
        out = out + vp[..., k : k + c]
    return out


def _neg_pow(s: Any, beta: float) -> Any:
    """s ** -beta; for Caffe's usual beta 0.75 (and 0.5, 1) with square roots, which cost a
    fraction of pow's exp(log) and agree with it to a few ulp."""
    if beta == 0.75:
        r = lax.rsqrt(s)
        return r * jnp.sqrt(r)
    if beta == 0.5:
        return lax.rsqrt(s)
    if beta == 1.0:
        return 1.0 / s
    return jnp.power(s, -beta)


def _neg_pow_fused(s: Any, beta: float) -> Any:
    """_neg_pow with each intermediate used once, for beta 0.75: rsqrt(s * sqrt(s)). XLA does
    not repeat an expensive operation for a second user, so _neg_pow's rsqrt gets a buffer of
    its own, as does its square root; this form fuses into one loop."""
    if beta == 0.75:
        return lax.rsqrt(s * jnp.sqrt(s))
    return _neg_pow(s, beta)


def _lrn_scale(x: Any, a: LRNAttrs) -> Any:
    return a.k + (a.alpha / a.local_size) * _channel_window_sum(x * x, a.local_size)


@partial(jax.custom_vjp, nondiff_argnums=(1,))
def _lrn(x: Any, a: LRNAttrs) -> Any:
    """Caffe's ACROSS_CHANNELS LRN: x * (k + alpha/n * sum of x^2 over n channels)^-beta."""
    return x * _neg_pow(_lrn_scale(x, a), a.beta)


def _lrn_fwd(x, a):
    return _lrn(x, a), x  # the scale is recomputed in the backward: cheaper than storing it


def _lrn_bwd(a, x, dy):
    # Caffe's CrossChannelBackward: dx = dy * scale^-beta
    #   - (2 alpha beta / n) * x * sum over the window of (dy * y / scale), y = x * scale^-beta
    # Computed from x after dy (see after): else XLA merges the recomputed scale with the
    # forward's, or runs it during the forward, and keeps it alive until here (NIN-ZFNet b16:
    # two 71 MB buffers).
    x = after(x, [dy])
    scale = _lrn_scale(x, a)
    inv = _neg_pow_fused(scale, a.beta)
    ratio = _channel_window_sum(dy * x * inv / scale, a.local_size)
    coeff = 2.0 * a.alpha * a.beta / a.local_size
    return (dy * inv - coeff * x * ratio,)


_lrn.defvjp(_lrn_fwd, _lrn_bwd)


def onednn_lrn_spec(
    a: LRNAttrs, shape: Sequence[int], dtype: Any = np.float32, layout: str = act_layout.NHWC
):
    """The oneDNN spec of this LRN on an input of ``shape`` held in ``layout``, or None
    where its lowering runs on XLA (nincc.onednn_lrn.usable)."""
    k = 1.0 if a.within_channel else a.k  # Caffe's WITHIN_CHANNEL adds 1, whatever k is
    return onednn_lrn.usable(
        tuple(shape), a.local_size, a.alpha, a.beta, k, dtype, a.within_channel, layout
    )


def _lrn_nhwc(a: LRNAttrs, params, bottoms, ctx):
    x = bottoms[0]
    spec = None if onednn.per_device(x) else onednn_lrn_spec(a, x.shape, x.dtype)
    if spec is not None:
        return [onednn_lrn.lrn(spec, x)]
    if a.within_channel:  # inside a data-parallel step: the table's, on Caffe's layout
        return _via_nchw("LRN")(a, params, bottoms, ctx)
    return [_lrn(x, a)]


# ---------------------------------------------------------------- ReLU


@partial(jax.custom_vjp, nondiff_argnums=(1,))
def _relu(x: Any, slope: float) -> Any:
    """Caffe's ReLU, max(x, 0) + slope * min(x, 0). Its backward needs only where the top is
    positive (for slope >= 0 exactly where x > 0; Caffe's gradient at x == 0 is the slope),
    so the forward keeps that as a bit mask (see _pack_bits)."""
    return jnp.where(x > 0, x, x * slope)


_BIT = 8  # mask bits per uint8


def _pack(v: Any, per: int, bits: int, dt: Any) -> Any:
    """Non-negative integers below 2**bits as a flat array of ``dt``, ``per`` to an element,
    by a reduction: XLA does not recompute a reduction inside its consumers' fusions."""
    flat = v.reshape(-1).astype(dt)
    pad = -flat.shape[0] % per
    if pad:
        flat = jnp.pad(flat, (0, pad))
    shifts = (jnp.arange(per, dtype=dt) * bits)[None, :]
    return jnp.sum(flat.reshape(-1, per) << shifts, axis=1, dtype=dt)


def _unpack(packed: Any, shape: Shape, per: int, bits: int) -> Any:
    """The inverse of _pack: the integers, of ``shape``, in ``packed``'s dtype."""
    dt = packed.dtype
    shifts = (jnp.arange(per, dtype=dt) * bits)[None, :]
    vals = (packed[:, None] >> shifts) & jnp.asarray((1 << bits) - 1, dt)
    return vals.reshape(-1)[: math.prod(shape)].reshape(shape)


def _pack_bits(m: Any) -> Any:
    """A boolean array as a flat uint8 array, 8 elements per byte.

    The mask is the ReLU's only residual. Kept as the top itself (or as a byte per element),
    XLA recomputes it inside the backward's fusion from the bottom, which then stays alive
    until the backward: two activations per ReLU. A reduction is not duplicated that way,
    and the mask is 1/32 of an activation."""
    return _pack(m, _BIT, 1, jnp.uint8)


def _unpack_bits(packed: Any, shape: Shape) -> Any:
    """The inverse of _pack_bits: a boolean array of ``shape``."""
    return _unpack(packed, shape, _BIT, 1) != 0


def _relu_fwd(x, slope):
    y = _relu(x, slope)
    return y, _pack_bits(y > 0)


def _relu_bwd(slope, packed, dy):
    return (jnp.where(_unpack_bits(packed, dy.shape), dy, dy * slope),)


_relu.defvjp(_relu_fwd, _relu_bwd)


# A 1x1 convolution runs as oneDNN's matrix product where it has at most this many output
# pixels (batch x height x width) per channel of its wider side: there the product beat
# oneDNN's 1x1 convolution kernels, forward and backward (docs/performance.md, section 29).
POINTWISE_MATMUL_ROWS = 4


def pointwise_on_matmul(
    g: Geometry, group: int, x_shape: Sequence[int], w_shape: Sequence[int]
) -> bool:
    """Whether a oneDNN convolution of NHWC ``x_shape`` runs as a (pixels, c) x (c, o)
    product (nincc.onednn_matmul): 1x1, stride 1, no padding, one group, and few pixels for
    its channels (POINTWISE_MATMUL_ROWS)."""
    if g.kernel != (1, 1) or g.stride != (1, 1) or g.pad != (0, 0) or group != 1:
        return False
    rows = math.prod(x_shape[:3])
    return rows <= POINTWISE_MATMUL_ROWS * max(w_shape[0], w_shape[1])


@partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _onednn_pointwise(relu: float | None, residual: str, x: Any, w: Any, b: Any) -> Any:
    """A 1x1 convolution of NHWC x with Caffe's (o, c, 1, 1) weights as oneDNN's product of
    (pixels, c) rows and the weights read in place as (c, o), the bias and the ReLU of slope
    ``relu`` (if given) its post-ops; differentiated as the two layers are (the ReLU's
    residual: _fused_relu_mask)."""
    spec = _pointwise_spec(relu, x, w, b)
    y = onednn_matmul.matmul(spec, _rows(x), w.reshape(spec.n, spec.k), b if spec.bias else None)
    return y.reshape(*x.shape[:3], spec.n)


def _pointwise_spec(relu: float | None, x: Any, w: Any, b: Any) -> onednn_matmul.MatmulSpec:
    rows = math.prod(x.shape[:3])
    return onednn_matmul.MatmulSpec(rows, x.shape[3], w.shape[0], False, True, b.size > 0, relu)


def _onednn_pointwise_fwd(relu, residual, x, w, b):
    y = _onednn_pointwise(relu, residual, x, w, b)
    return y, (x, w, b.size > 0, None if relu is None else _fused_relu_mask(y, residual))


def _onednn_pointwise_bwd(relu, residual, res, dy):
    x, w, has_bias, mask = res
    if relu is not None:
        dy = _fused_relu_bwd(relu, residual, mask, dy)
    w2 = w.reshape(w.shape[:2])
    dx, dw, db = onednn_matmul.cotangents(_rows(x), w2, _rows(dy), False, has_bias)
    return dx.reshape(x.shape), dw.reshape(w.shape), db


_onednn_pointwise.defvjp(_onednn_pointwise_fwd, _onednn_pointwise_bwd)


def _fused_relu_mask(y: Any, residual: str) -> Any:
    """What a ReLU fused into a oneDNN call keeps for its backward (``residual``, chosen by
    nincc.compile.relu_fusions): "top", the top itself, where the layers after it keep that
    anyway (a convolution keeps its input for its weight gradient), saving the pass that
    makes the mask; "pooling", nothing, where the MAX poolings after it apply its backward
    (max_pool_after_relu); "mask", the bit mask, 1/32 of the top (_pack_bits), so that the
    top need not stay alive until the backward."""
    if residual == "pooling":
        return None
    return y if residual == "top" else _pack_bits(y > 0)


def _fused_relu_bwd(slope: float, residual: str, mask: Any, dy: Any) -> Any:
    """The fused ReLU's input gradient from _fused_relu_mask's residual (Caffe's in-place
    rule: where the top is > 0, dy, else slope * dy); "pooling": ``dy``, to which the
    poolings after the ReLU applied that rule already."""
    if residual == "pooling":
        return dy
    if residual == "top":
        return jnp.where(mask > 0, dy, dy * slope)
    return _relu_bwd(slope, mask, dy)[0]


@partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _onednn_conv_relu(spec: onednn.ConvSpec, residual: str, x: Any, w: Any, b: Any) -> Any:
    """A oneDNN convolution with the ReLU after it as the primitive's post-op (spec.relu:
    its slope); differentiated as the two layers are: the ReLU's backward (its residual:
    _fused_relu_mask), then the convolution's."""
    return onednn.forward(spec, x, w, b if spec.bias else None)


def _onednn_conv_relu_fwd(spec, residual, x, w, b):
    y = _onednn_conv_relu(spec, residual, x, w, b)
    return y, (x, w, _fused_relu_mask(y, residual))


def _onednn_conv_relu_bwd(spec, residual, res, dy):
    x, w, mask = res
    return onednn.cotangents(spec, x, w, _fused_relu_bwd(spec.relu, residual, mask, dy))


_onednn_conv_relu.defvjp(_onednn_conv_relu_fwd, _onednn_conv_relu_bwd)


def _relu_applies(a: Any, bottom_shapes: list[Shape]) -> bool:
    return _all_4d(a, bottom_shapes) and a.negative_slope >= 0


def _relu_nhwc(a: Any, params, bottoms, ctx):
    return [_relu(bottoms[0], a.negative_slope)]


# ---------------------------------------------------------------- layout-blind layers


def _table(type_name: str) -> Lower:
    """The table's own lowering: right for channels-last blobs when it is element-wise."""

    def lower(attrs, params, bottoms, ctx):
        return base.REGISTRY[type_name].lower(attrs, params, bottoms, ctx)

    return lower


def _via_nchw(type_name: str) -> Lower:
    """The table's lowering on the NCHW view, for element-wise layers whose result depends on
    the element order (Dropout's random mask): XLA fuses the two transposes into the loop."""

    def lower(attrs, params, bottoms, ctx):
        tops = base.REGISTRY[type_name].lower(attrs, params, [to_nchw(b) for b in bottoms], ctx)
        return [to_nhwc(t) for t in tops]

    return lower


# The channels-last lowerings nincc.blocked falls back on.
conv_nhwc, pool_nhwc, lrn_nhwc = _conv_nhwc, _pool_nhwc, _lrn_nhwc
onednn_conv_relu = _onednn_conv_relu


FAST_LOWERINGS: dict[str, FastLowering] = {
    "Convolution": FastLowering(
        _conv_nhwc,
        _is_conv2d,
        "2-D convolution channels-last; 1x1: one product over channels, forward and gradients",
    ),
    "LRN": FastLowering(
        _lrn_nhwc,
        _lrn_applies,
        "LRN on oneDNN's kernels; else ACROSS_CHANNELS as shifted slices summed",
    ),
    "Pooling": FastLowering(
        _pool_nhwc,
        _is_windowed_pool,
        "MAX and AVE pooling: gradients folded back phase by phase, no scatter",
    ),
    "InnerProduct": FastLowering(
        _ip, _ip_on_onednn, "oneDNN's matmul on Caffe's weights as they are stored", nchw=True
    ),
    "ReLU": FastLowering(
        _relu_nhwc, _relu_applies, "element-wise, any layout; the backward reads the top"
    ),
    "Sigmoid": FastLowering(_table("Sigmoid"), _all_4d, "element-wise: any layout"),
    "TanH": FastLowering(_table("TanH"), _all_4d, "element-wise: any layout"),
    "Split": FastLowering(_table("Split"), _all_4d, "copies: any layout"),
    "Dropout": FastLowering(
        _via_nchw("Dropout"), _all_4d, "element-wise; the mask drawn in Caffe's element order"
    ),
}


# ---------------------------------------------------------------- choosing a lowering


def forward_note(type_name: str, attrs: Any, bottom_shapes: Sequence[Sequence[int]]) -> str:
    """Which kernels this layer's fast lowering calls, where not XLA's: "oneDNN" for a
    convolution, pooling, LRN or InnerProduct oneDNN runs (nincc.onednn, onednn_pool,
    onednn_lrn, onednn_matmul; "" elsewhere)."""
    if lowering_for(type_name, attrs, bottom_shapes) is None:
        return ""
    if type_name == "Convolution":
        runs = all(uses_onednn(shape=s) for s in bottom_shapes)
    elif type_name == "InnerProduct":
        runs = True  # the lowering applies only where oneDNN runs it
    elif type_name == "Pooling":
        s = tuple(bottom_shapes[0])
        runs = onednn_pool.usable((s[0], s[2], s[3], s[1]), _pool_geom_of(attrs, s)) is not None
    elif type_name == "LRN":
        s = tuple(bottom_shapes[0])
        runs = onednn_lrn_spec(attrs, (s[0], s[2], s[3], s[1])) is not None
    else:
        runs = False
    return "oneDNN" if runs else ""


def backward_note(type_name: str, attrs: Any, bottom_shapes: Sequence[Sequence[int]]) -> str:
    """How this layer's fast lowering runs when differentiated ("" for XLA's kernels): "oneDNN"
    or the FFT path (its tiles); for `nincc time` and `nincc inspect`."""
    note = forward_note(type_name, attrs, bottom_shapes)
    if note or type_name != "Convolution" or lowering_for(type_name, attrs, bottom_shapes) is None:
        return note
    notes = set()
    for shape in bottom_shapes:
        tiles = fft_tiles(attrs, tuple(shape))
        if tiles:
            notes.add("FFT" if tiles == 1 else f"FFT, {tiles}x{tiles} tiles")
    return "; ".join(sorted(notes))


def lowering_for(type_name: str, attrs: Any, bottom_shapes: Sequence[Sequence[int]]):
    """The fast lowering for this layer (a :class:`FastLowering`: called, it takes and returns
    NCHW blobs; its ``nhwc`` channels-last ones), or None where the table's should run."""
    fl = FAST_LOWERINGS.get(type_name)
    if fl is None or not fl.applies(attrs, [tuple(s) for s in bottom_shapes]):
        return None
    return fl
