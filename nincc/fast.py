"""Fast lowerings: drop-in replacements for some layer-table ``lower`` functions.

Each entry of :data:`FAST_LOWERINGS` maps a table type name to a :class:`FastLowering`: a
function with the signature of a table entry's ``lower`` (attrs, params, bottoms, ctx) -> tops,
and a predicate saying for which attrs and bottom shapes it applies. Where it does not, the
table's own lowering runs; that plain lowering stays the reference every fast path is tested
against (tests/test_fast.py), forward and gradients, within the fixture tolerances.

What is here, and why, is measured in docs/performance.md:

- 1x1 (CCCP) convolutions: XLA's forward (one product over channels) with a custom backward,
  dx by the transposed 1x1 convolution and dw by one product contracting batch and pixels,
  where autodiff gives XLA:CPU a whole-image-window convolution;
- MAX and AVE pooling: the forward records which kernel offset won each window; gradients are
  folded back onto the input phase by phase from shifted copies (no scatter, no strided pads);
- ACROSS_CHANNELS LRN: channel-window sums as shifted slices, scale^-0.75 by square roots and
  Caffe's own backward formula.

``nincc.compile.run_graph`` picks them per layer through :func:`lowering_for` (its ``fast``
argument: all, none, or some types); ``nincc time`` marks the layers that run one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from .layers import base
from .layers.normalization import LRNAttrs
from .layers.vision import (
    FLT_MAX,
    ConvAttrs,
    PoolAttrs,
    PoolGeom,
    _ave_divisor,
    _geometry,
    _pool_geom_of,
)
from .layers.vision import _ave_pool as _table_ave_pool

Shape = tuple[int, ...]
Lower = Callable[[Any, list[Any], list[Any], base.LowerCtx], list[Any]]


@dataclass(frozen=True)
class FastLowering:
    """A lowering with a table entry's ``lower`` signature, and where it applies."""

    lower: Lower
    applies: Callable[[Any, list[Shape]], bool]
    doc: str = ""

    def __call__(self, attrs: Any, params: list[Any], bottoms: list[Any], ctx: Any) -> list[Any]:
        return self.lower(attrs, params, bottoms, ctx)


# ---------------------------------------------------------------- 1x1 convolutions


def _is_pointwise(a: ConvAttrs, bottom_shapes: list[Shape]) -> bool:
    """A 2-D convolution (axis 1, 4-D bottoms) with a 1x1 kernel and no padding."""
    try:
        gs = [_geometry(a, s) for s in bottom_shapes]
    except Exception:  # noqa: BLE001 - a shape the table rejects is the table's to report
        return False
    return all(
        len(s) == 4 and g.axis == 1 and g.kernel == (1, 1) and g.pad == (0, 0)
        for g, s in zip(gs, bottom_shapes)
    )


def _conv1x1(x: Any, w: Any, group: int) -> Any:
    return lax.conv_general_dilated(x, w, (1, 1), "VALID", feature_group_count=group)


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def _pointwise(x: Any, w: Any, group: int) -> Any:
    """A stride-1 1x1 convolution; XLA:CPU turns the forward into one product over channels."""
    return _conv1x1(x, w, group)


def _pointwise_fwd(x, w, group):
    return _conv1x1(x, w, group), (x, w)


def _pointwise_bwd(group, res, dy):
    # dx is the 1x1 convolution of dy with the transposed weights (again one product over
    # channels); dw contracts batch and pixels in a single product per group. Autodiff would
    # express dw as a convolution whose window is the whole image, which XLA:CPU runs far
    # below the matmul rate and with the activations copied to a batch-last layout.
    x, w = res
    n, c, h, wd = x.shape
    o = w.shape[0]
    og, cg = o // group, c // group
    wt = jnp.swapaxes(w.reshape(group, og, cg), 1, 2).reshape(c, og, 1, 1)
    dx = _conv1x1(dy, wt, group)
    dw = lax.dot_general(
        dy.reshape(n, group, og, h, wd),
        x.reshape(n, group, cg, h, wd),
        (((0, 3, 4), (0, 3, 4)), ((1,), (1,))),
    )
    return dx, dw.reshape(w.shape)


_pointwise.defvjp(_pointwise_fwd, _pointwise_bwd)


def _pointwise_lower(a: ConvAttrs, params, bottoms, ctx):
    w = params[0]
    outs = []
    for x in bottoms:
        s = _geometry(a, x.shape).stride
        if s != (1, 1):  # Caffe's (in - 1) / s + 1 outputs: every s-th pixel from the first
            x = x[:, :, :: s[0], :: s[1]]
        y = _pointwise(x, w, a.group)
        if a.bias_term:
            y = y + params[1].reshape(1, -1, 1, 1)
        outs.append(y)
    return outs


# ---------------------------------------------------------------- MAX pooling


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


def _max_and_first(x: Any, g: PoolGeom) -> tuple[Any, Any]:
    """Caffe's MAX pooling and, per window, which kernel offset (row-major) won.

    Scanning the offsets and replacing only on a strictly greater value from -FLT_MAX, as
    Caffe does: the first maximum wins, NaN never does, and a window whose output stays
    -FLT_MAX has no winner (index kh*kw) and passes no gradient.
    """
    kh, kw = g.kernel
    pads = _pool_pads(x.shape[2:], g)
    cfg = [(0, 0, 0), (0, 0, 0)] + [(lo, hi, 0) for lo, hi in pads]
    xp = lax.pad(x, jnp.asarray(-jnp.inf, x.dtype), cfg)
    val = jnp.full(x.shape[:2] + g.out, -FLT_MAX, x.dtype)
    first = jnp.full(val.shape, kh * kw, jnp.int8 if kh * kw < 127 else jnp.int32)
    for k in range(kh * kw):
        i, j = divmod(k, kw)
        lim = (
            *xp.shape[:2],
            i + (g.out[0] - 1) * g.stride[0] + 1,
            j + (g.out[1] - 1) * g.stride[1] + 1,
        )
        cand = lax.slice(xp, (0, 0, i, j), lim, (1, 1, *g.stride))
        take = cand > val
        val = jnp.where(take, cand, val)
        first = jnp.where(take, jnp.asarray(k, first.dtype), first)
    return val, first


@partial(jax.custom_vjp, nondiff_argnums=(1,))
def _max_pool(x: Any, g: PoolGeom) -> Any:
    return _max_and_first(x, g)[0]


def _max_pool_fwd(x, g):
    val, first = _max_and_first(x, g)
    return val, (x.shape, first)


def _max_pool_bwd(g, res, dy):
    # The window's gradient goes to the offset that won it; each offset's share is folded
    # back onto the input grid with shifted copies (no scatter).
    shape, first = res
    kh, kw = g.kernel
    zero = jnp.asarray(0, dy.dtype)
    parts = {divmod(k, kw): jnp.where(first == k, dy, zero) for k in range(kh * kw)}
    return (_unpad(_fold(parts, g, _padded_hw(shape, g)), shape, g),)


_max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)


def _padded_hw(shape: Shape, g: PoolGeom) -> tuple[int, int]:
    pads = _pool_pads(shape[2:], g)
    return (shape[2] + sum(pads[0]), shape[3] + sum(pads[1]))


def _unpad(dxp: Any, shape: Shape, g: PoolGeom) -> Any:
    """Drop the pooling padding (and restore rows the windows never reached) from a gradient."""
    crop = [(0, 0, 0), (0, 0, 0)] + [(-lo, -hi, 0) for lo, hi in _pool_pads(shape[2:], g)]
    return lax.pad(dxp, jnp.asarray(0, dxp.dtype), crop)


def _fold(parts: dict[tuple[int, int], Any], g: PoolGeom, padded_hw: tuple[int, int]) -> Any:
    """Sum each offset's share back onto the padded input grid, without a scatter.

    Row ``s*u + p`` of the input only receives offsets ``a = p + s*m`` (from window ``u - m``),
    so each of the s*s phases is a sum of shifted copies of a few parts; the phases are then
    interleaved by one reshape.
    """
    (sh, sw), (kh, kw), (oh, ow) = g.stride, g.kernel, g.out
    uh, uw = -(-padded_hw[0] // sh), -(-padded_hw[1] // sw)
    zero = jnp.asarray(0, next(iter(parts.values())).dtype)
    rows = []
    for p in range(sh):
        cols = []
        for q in range(sw):
            acc = None
            for a in range(p, kh, sh):
                for b in range(q, kw, sw):
                    m, n = (a - p) // sh, (b - q) // sw
                    cfg = [(0, 0, 0), (0, 0, 0), (m, uh - oh - m, 0), (n, uw - ow - n, 0)]
                    t = lax.pad(parts[(a, b)], zero, cfg)
                    acc = t if acc is None else acc + t
            if acc is None:
                shape = next(iter(parts.values())).shape[:2] + (uh, uw)
                acc = jnp.zeros(shape, zero.dtype)
            cols.append(acc)
        rows.append(jnp.stack(cols, axis=-1))  # (N, C, uh, uw, sw)
    full = jnp.stack(rows, axis=3)  # (N, C, uh, sh, uw, sw)
    n, c = full.shape[:2]
    full = full.reshape(n, c, uh * sh, uw * sw)
    return full[:, :, : padded_hw[0], : padded_hw[1]]


@partial(jax.custom_vjp, nondiff_argnums=(1,))
def _ave_pool(x: Any, g: PoolGeom) -> Any:
    """The table's AVE pooling (Caffe's divisor counts padding, not the ceil overhang)."""
    return _table_ave_pool(x, g)


def _ave_pool_fwd(x, g):
    return _table_ave_pool(x, g), x.shape


def _ave_pool_bwd(g, shape, dy):
    # Every element of a window (padding included, as in Caffe's divisor) gets dy / divisor;
    # the padding's share is then dropped.
    share = dy / jnp.asarray(_ave_divisor(g, shape[2:]))
    parts = {(i, j): share for i in range(g.kernel[0]) for j in range(g.kernel[1])}
    return (_unpad(_fold(parts, g, _padded_hw(shape, g)), shape, g),)


_ave_pool.defvjp(_ave_pool_fwd, _ave_pool_bwd)


def _pool_lower(a: PoolAttrs, params, bottoms, ctx):
    x = bottoms[0]
    g = _pool_geom_of(a, x.shape)
    return [_max_pool(x, g) if a.method == "MAX" else _ave_pool(x, g)]


# ---------------------------------------------------------------- LRN (across channels)


def _is_across_channels(a: LRNAttrs, bottom_shapes: list[Shape]) -> bool:
    return not a.within_channel and len(bottom_shapes[0]) == 4


def _channel_window_sum(v: Any, size: int) -> Any:
    """sum of v over channels c - (size-1)/2 .. c + (size-1)/2 (zero outside): shifted slices
    added in one fused loop, where reduce-window along channels runs much slower on XLA:CPU."""
    pad = (size - 1) // 2
    vp = jnp.pad(v, ((0, 0), (pad, pad), (0, 0), (0, 0)))
    c = v.shape[1]
    out = vp[:, 0:c]
    for k in range(1, size):
        out = out + vp[:, k : k + c]
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
    scale = _lrn_scale(x, a)
    inv = _neg_pow(scale, a.beta)
    ratio = _channel_window_sum(dy * x * inv / scale, a.local_size)
    coeff = 2.0 * a.alpha * a.beta / a.local_size
    return (dy * inv - coeff * x * ratio,)


_lrn.defvjp(_lrn_fwd, _lrn_bwd)


def _lrn_lower(a: LRNAttrs, params, bottoms, ctx):
    return [_lrn(bottoms[0], a)]


FAST_LOWERINGS: dict[str, FastLowering] = {
    "Convolution": FastLowering(
        _pointwise_lower,
        _is_pointwise,
        "1x1 convolution: one product over channels forward and for each gradient",
    ),
    "LRN": FastLowering(
        _lrn_lower,
        _is_across_channels,
        "ACROSS_CHANNELS LRN: channel window sums as shifted slices, Caffe's backward formula",
    ),
    "Pooling": FastLowering(
        _pool_lower,
        _is_windowed_pool,
        "MAX and AVE pooling: gradients folded back phase by phase, no scatter",
    ),
}


# ---------------------------------------------------------------- choosing a lowering


def lowering_for(
    type_name: str, attrs: Any, bottom_shapes: Sequence[Sequence[int]]
) -> Lower | None:
    """The fast lowering for this layer, or None where the table's lowering should run."""
    fl = FAST_LOWERINGS.get(type_name)
    if fl is None or not fl.applies(attrs, [tuple(s) for s in bottom_shapes]):
        return None
    return fl.lower
