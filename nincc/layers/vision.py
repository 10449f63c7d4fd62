"""Vision layers: Convolution (CCCP), Deconvolution, Pooling, SPP, Im2col and Crop.

Each reproduces Caffe 1.0's geometry exactly: per-axis kernel/stride/pad/dilation fields, the
convolution output size with C++ integer division, ceil-rounded pooling with its clip rule and
AVE divisor, and the first-maximum tie rule of MAX pooling (forward, mask top and gradient).
Arrays are NCHW (any number of spatial axes for the convolution family, 2 for pooling).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ..errors import GraphError, ShapeError
from .base import BlobSpec, Filler, LayerType, Shape, canonical_axis, count, register, repeated

FLT_MAX = float(np.finfo(np.float32).max)


def _trunc_div(a: int, b: int) -> int:
    """C++ integer division (rounds toward zero), as Caffe's shape code uses."""
    q = abs(a) // b
    return q if a >= 0 else -q


def _has(msg: Any, name: str) -> bool:
    return msg.HasField(name)


# ---------------------------------------------------------------- convolution geometry


@dataclass(frozen=True)
class ConvAttrs:
    """ConvolutionParameter as written (per-axis values are resolved once the input is known)."""

    num_output: int
    bias_term: bool
    kernel_size: tuple[int, ...]
    kernel_hw: tuple[int, int] | None
    stride: tuple[int, ...]
    stride_hw: tuple[int, int] | None
    pad: tuple[int, ...]
    pad_hw: tuple[int, int] | None
    dilation: tuple[int, ...]
    group: int
    axis: int
    weight_filler: Filler
    bias_filler: Filler


@dataclass(frozen=True)
class Geometry:
    """Resolved per-spatial-axis window parameters of a convolution-like layer."""

    axis: int  # the channel axis; spatial axes follow it
    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    pad: tuple[int, ...]
    dilation: tuple[int, ...]

    @property
    def extent(self) -> tuple[int, ...]:
        return tuple(d * (k - 1) + 1 for k, d in zip(self.kernel, self.dilation, strict=True))


def _conv_attrs(msg: Any) -> ConvAttrs:
    p = msg.convolution_param

    def hw(name: str) -> tuple[int, int] | None:
        h, w = f"{name}_h", f"{name}_w"
        if _has(p, h) or _has(p, w):
            return (int(getattr(p, h)), int(getattr(p, w)))
        return None

    return ConvAttrs(
        num_output=int(p.num_output),
        bias_term=bool(p.bias_term),
        kernel_size=repeated(p, "kernel_size"),
        kernel_hw=hw("kernel"),
        stride=repeated(p, "stride"),
        stride_hw=hw("stride"),
        pad=repeated(p, "pad"),
        pad_hw=hw("pad"),
        dilation=repeated(p, "dilation"),
        group=int(p.group),
        axis=int(p.axis),
        weight_filler=Filler.from_proto(p.weight_filler),
        bias_filler=Filler.from_proto(p.bias_filler),
    )


def _conv_layer_attrs(msg: Any) -> ConvAttrs:
    """Convolution/Deconvolution: the checks Caffe makes before seeing a bottom."""
    a = _conv_attrs(msg)
    if a.num_output <= 0:
        raise ShapeError(f"convolution_param.num_output must be > 0, got {a.num_output}")
    if a.group <= 0 or a.num_output % a.group:
        raise ShapeError(
            f"num_output {a.num_output} must be a positive multiple of group {a.group}"
        )
    if len(msg.bottom) != len(msg.top):
        raise GraphError(
            f"needs one top per bottom, got {len(msg.bottom)} bottoms and {len(msg.top)} tops"
        )
    return a


def _per_axis(
    name: str, values: tuple[int, ...], hw: tuple[int, int] | None, n: int, default: int | None
) -> tuple[int, ...]:
    """Caffe's rule: `name_h`/`name_w` (2-D only), or `name` once for all axes or once per axis."""
    if hw is not None:
        if n != 2:
            raise ShapeError(f"{name}_h/{name}_w need 2 spatial axes, the input has {n}")
        if values:
            raise ShapeError(f"give either {name} or {name}_h/{name}_w, not both")
        return hw
    allowed = (1, n) if default is None else (0, 1, n)
    if len(values) not in allowed:
        raise ShapeError(
            f"{name} given {len(values)} times; allowed once or once per spatial axis ({n})"
        )
    if not values:
        return (int(default),) * n
    return tuple(int(values[0 if len(values) == 1 else i]) for i in range(n))


def _geometry(a: ConvAttrs, shape: Shape) -> Geometry:
    axis = canonical_axis(a.axis, len(shape), "convolution_param.axis")
    n = len(shape) - axis - 1
    kernel = _per_axis("kernel_size", a.kernel_size, a.kernel_hw, n, None)
    stride = _per_axis("stride", a.stride, a.stride_hw, n, 1)
    pad = _per_axis("pad", a.pad, a.pad_hw, n, 0)
    dilation = _per_axis("dilation", a.dilation, None, n, 1)
    for what, vals in (("kernel size", kernel), ("stride", stride), ("dilation", dilation)):
        if any(v <= 0 for v in vals):
            raise ShapeError(f"{what} must be > 0 on every spatial axis, got {list(vals)}")
    return Geometry(axis, kernel, stride, pad, dilation)


def _conv_out_sizes(g: Geometry, shape: Shape) -> tuple[int, ...]:
    """(in + 2p - extent) / stride + 1 with C++ division, per spatial axis."""
    ins = shape[g.axis + 1 :]
    outs = tuple(
        _trunc_div(i + 2 * p - e, s) + 1
        for i, p, e, s in zip(ins, g.pad, g.extent, g.stride, strict=True)
    )
    if any(o < 1 for o in outs):
        raise ShapeError(
            f"kernel extent {list(g.extent)} with pad {list(g.pad)} does not fit input "
            f"{list(ins)} (output {list(outs)})"
        )
    return outs


def _deconv_out_sizes(g: Geometry, shape: Shape) -> tuple[int, ...]:
    """stride * (in - 1) + extent - 2 * pad, per spatial axis."""
    ins = shape[g.axis + 1 :]
    outs = tuple(
        s * (i - 1) + e - 2 * p for i, p, e, s in zip(ins, g.pad, g.extent, g.stride, strict=True)
    )
    if any(o < 1 for o in outs):
        raise ShapeError(f"pad {list(g.pad)} leaves no output for input {list(ins)}")
    return outs


def _check_bottoms(a: ConvAttrs, bottom_shapes: list[Shape]) -> tuple[Geometry, int]:
    shape = tuple(bottom_shapes[0])
    for s in bottom_shapes[1:]:
        if tuple(s) != shape:
            raise ShapeError(f"all bottoms must have the same shape, got {list(bottom_shapes)}")
    g = _geometry(a, shape)
    channels = shape[g.axis]
    if channels % a.group:
        raise ShapeError(f"input has {channels} channels, not a multiple of group {a.group}")
    return g, channels


# ---------------------------------------------------------------- convolution / deconvolution


def _conv_shape(a: ConvAttrs, bottom_shapes: list[Shape]) -> list[Shape]:
    g, _ = _check_bottoms(a, bottom_shapes)
    shape = tuple(bottom_shapes[0])
    top = shape[: g.axis] + (a.num_output,) + _conv_out_sizes(g, shape)
    return [top] * len(bottom_shapes)


def _deconv_shape(a: ConvAttrs, bottom_shapes: list[Shape]) -> list[Shape]:
    g, _ = _check_bottoms(a, bottom_shapes)
    shape = tuple(bottom_shapes[0])
    top = shape[: g.axis] + (a.num_output,) + _deconv_out_sizes(g, shape)
    return [top] * len(bottom_shapes)


def _conv_blobs(a: ConvAttrs, bottom_shapes: list[Shape]) -> list[BlobSpec]:
    g, channels = _check_bottoms(a, bottom_shapes)
    specs = [BlobSpec((a.num_output, channels // a.group) + g.kernel, a.weight_filler)]
    if a.bias_term:
        specs.append(BlobSpec((a.num_output,), a.bias_filler))
    return specs


def _deconv_blobs(a: ConvAttrs, bottom_shapes: list[Shape]) -> list[BlobSpec]:
    # Caffe stores deconvolution weights transposed: (input channels, num_output / group, k...)
    g, channels = _check_bottoms(a, bottom_shapes)
    specs = [BlobSpec((channels, a.num_output // a.group) + g.kernel, a.weight_filler)]
    if a.bias_term:
        specs.append(BlobSpec((a.num_output,), a.bias_filler))
    return specs


def _to_batch(x: Any, axis: int) -> tuple[Any, Shape]:
    """Fold the axes before the channel axis into one batch axis; give a 0-D spatial input one
    unit spatial axis so the XLA convolution sees (B, C, spatial...)."""
    lead = tuple(x.shape[:axis])
    xb = x.reshape((count(lead),) + tuple(x.shape[axis:]))
    if xb.ndim == 2:
        xb = xb[:, :, None]
    return xb, lead


def _batch_geometry(g: Geometry) -> Geometry:
    """`g` for the (B, C, spatial...) array of _to_batch (no spatial axis becomes a unit one)."""
    if g.kernel:
        return Geometry(1, g.kernel, g.stride, g.pad, g.dilation)
    return Geometry(1, (1,), (1,), (0,), (1,))


def _from_batch(y: Any, lead: Shape, n_spatial: int) -> Any:
    if n_spatial == 0:
        y = y[:, :, 0]
    return y.reshape(lead + tuple(y.shape[1:]))


def _add_bias(y: Any, bias: Any) -> Any:
    return y + bias.reshape((1, -1) + (1,) * (y.ndim - 2))


def _conv_lower(a: ConvAttrs, params, bottoms, ctx):
    w = params[0]
    outs = []
    for x in bottoms:
        g = _geometry(a, x.shape)
        n = len(g.kernel)
        xb, lead = _to_batch(x, g.axis)
        gu = _batch_geometry(g)
        out = _conv_out_sizes(gu, xb.shape)
        wu = w if n else w[:, :, None]
        # Pad low by `pad`; pad (or crop) high so that exactly `out` windows fit, as Caffe's
        # im2col does (C++ division can keep a window that overhangs the padded input).
        padding, crop = [], []
        for o, i, p, e, s in zip(out, xb.shape[2:], gu.pad, gu.extent, gu.stride, strict=True):
            hi = (o - 1) * s + e - i - p
            padding.append((p, max(hi, 0)))
            crop.append(i + min(hi, 0))
        xb = xb[(slice(None), slice(None)) + tuple(slice(0, c) for c in crop)]
        y = lax.conv_general_dilated(
            xb,
            wu,
            window_strides=gu.stride,
            padding=padding,
            rhs_dilation=gu.dilation,
            feature_group_count=a.group,
        )
        if a.bias_term:
            y = _add_bias(y, params[1])
        outs.append(_from_batch(y, lead, n))
    return outs


def _deconv_lower(a: ConvAttrs, params, bottoms, ctx):
    w = params[0]  # (C_in, num_output / group, k...)
    outs = []
    for x in bottoms:
        g = _geometry(a, x.shape)
        n = len(g.kernel)
        xb, lead = _to_batch(x, g.axis)
        gu = _batch_geometry(g)
        wu = w if n else w[:, :, None]
        c_in, o_g = wu.shape[0], wu.shape[1]
        ks = tuple(wu.shape[2:])
        # The equivalent forward convolution: kernel (num_output, C_in / group, k...) flipped.
        wk = wu.reshape((a.group, c_in // a.group, o_g) + ks)
        wk = jnp.swapaxes(wk, 1, 2).reshape((a.group * o_g, c_in // a.group) + ks)
        wk = jnp.flip(wk, axis=tuple(range(2, 2 + len(ks))))
        # Spread the input `stride` apart and pad each side by extent - 1 - pad (a negative value
        # crops: Caffe's col2im drops that border), then convolve with stride 1.
        cfg = [(0, 0, 0), (0, 0, 0)] + [
            (e - 1 - p, e - 1 - p, s - 1)
            for e, p, s in zip(gu.extent, gu.pad, gu.stride, strict=True)
        ]
        y = lax.conv_general_dilated(
            lax.pad(xb, jnp.asarray(0, xb.dtype), cfg),
            wk,
            window_strides=(1,) * len(ks),
            padding="VALID",
            rhs_dilation=gu.dilation,
            feature_group_count=a.group,
        )
        if a.bias_term:
            y = _add_bias(y, params[1])
        outs.append(_from_batch(y, lead, n))
    return outs


def _conv_flops(a: ConvAttrs, bottom_shapes: list[Shape], top_shapes: list[Shape]) -> int:
    total = 0
    for b, t in zip(bottom_shapes, top_shapes, strict=True):
        g = _geometry(a, b)
        k = count(g.kernel)
        total += 2 * count(t) * (b[g.axis] // a.group) * k
        if a.bias_term:
            total += count(t)
    return total


def _deconv_flops(a: ConvAttrs, bottom_shapes: list[Shape], top_shapes: list[Shape]) -> int:
    total = 0
    for b, t in zip(bottom_shapes, top_shapes, strict=True):
        g = _geometry(a, b)
        total += 2 * count(b) * (a.num_output // a.group) * count(g.kernel)
        if a.bias_term:
            total += count(t)
    return total


register(
    LayerType(
        name="Convolution",
        doc="grouped, dilated N-d convolution; weights (out, in/group, k...); C++-division sizes",
        attrs=_conv_layer_attrs,
        shape=_conv_shape,
        lower=_conv_lower,
        blobs=_conv_blobs,
        flops=_conv_flops,
        n_bottoms=(1, None),
        n_tops=(1, None),
        aliases=("CCCP",),
        param_field="convolution_param",
        family="vision",
    )
)

register(
    LayerType(
        name="Deconvolution",
        doc="transposed convolution; weights (in, out/group, k...); out = s(in-1)+d(k-1)+1-2p",
        attrs=_conv_layer_attrs,
        shape=_deconv_shape,
        lower=_deconv_lower,
        blobs=_deconv_blobs,
        flops=_deconv_flops,
        n_bottoms=(1, None),
        n_tops=(1, None),
        param_field="convolution_param",
        family="vision",
    )
)


# ---------------------------------------------------------------- windows (Im2col, pooling)


def _pad_windows(x: Any, first: int, g: Geometry, out: tuple[int, ...], fill: float) -> Any:
    """Pad spatial axes (from `first` on) low by `pad` and high exactly as far as the last of
    `out` windows reaches (negative high padding crops input no window reads)."""
    cfg = [(0, 0, 0)] * first
    for i, o, p, e, s in zip(x.shape[first:], out, g.pad, g.extent, g.stride, strict=True):
        cfg.append((p, (o - 1) * s + e - i - p, 0))
    return lax.pad(x, jnp.asarray(fill, x.dtype), cfg)


def _window_slices(xp: Any, first: int, g: Geometry, out: tuple[int, ...]):
    """Yield (offset, strided slice) for every kernel offset in row-major order."""
    lead = tuple(xp.shape[:first])
    for off in itertools.product(*(range(k) for k in g.kernel)):
        start = (0,) * first + tuple(o * d for o, d in zip(off, g.dilation, strict=True))
        limit = lead + tuple(
            st + (n - 1) * s + 1 for st, n, s in zip(start[first:], out, g.stride, strict=True)
        )
        yield off, lax.slice(xp, start, limit, (1,) * first + g.stride)


# ---------------------------------------------------------------- Im2col


def _im2col_geometry(a: ConvAttrs, shape: Shape) -> Geometry:
    g = _geometry(a, shape)
    if not g.kernel:
        raise ShapeError(f"Im2col needs at least one spatial axis after axis {g.axis}")
    return g


def _im2col_shape(a: ConvAttrs, bottom_shapes: list[Shape]) -> list[Shape]:
    shape = tuple(bottom_shapes[0])
    g = _im2col_geometry(a, shape)
    out = _conv_out_sizes(g, shape)
    return [shape[: g.axis] + (shape[g.axis] * count(g.kernel),) + out]


def _im2col_lower(a: ConvAttrs, params, bottoms, ctx):
    x = bottoms[0]
    g = _im2col_geometry(a, x.shape)
    out = _conv_out_sizes(g, x.shape)
    xb, lead = _to_batch(x, g.axis)
    xp = _pad_windows(xb, 2, g, out, 0.0)
    cols = jnp.stack([s for _, s in _window_slices(xp, 2, g, out)], axis=2)  # (B, C, K, out..)
    y = cols.reshape((xb.shape[0], xb.shape[1] * count(g.kernel)) + out)
    return [y.reshape(lead + tuple(y.shape[1:]))]


register(
    LayerType(
        name="Im2col",
        doc="Caffe's im2col as a layer: (N, C*prod(k), out...), channel index (c*kh + i)*kw + j",
        attrs=_conv_attrs,
        shape=_im2col_shape,
        lower=_im2col_lower,
        param_field="convolution_param",
        family="vision",
    )
)


# ---------------------------------------------------------------- pooling


POOL_METHODS = ("MAX", "AVE", "STOCHASTIC")


@dataclass(frozen=True)
class PoolAttrs:
    """PoolingParameter resolved; ``kernel`` is None for global pooling (the whole plane)."""

    method: str
    kernel: tuple[int, int] | None
    stride: tuple[int, int]
    pad: tuple[int, int]
    ceil: bool
    mask_top: bool


@dataclass(frozen=True)
class PoolGeom:
    """One pooling's window parameters and output size for a known input."""

    method: str
    kernel: tuple[int, int]
    stride: tuple[int, int]
    pad: tuple[int, int]
    out: tuple[int, int]

    @property
    def conv(self) -> Geometry:
        return Geometry(1, self.kernel, self.stride, self.pad, (1, 1))


def _enum_name(msg: Any, field: str) -> str:
    return (
        type(msg)
        .DESCRIPTOR.fields_by_name[field]
        .enum_type.values_by_number[getattr(msg, field)]
        .name
    )


def _pool_pair(p: Any, name: str) -> tuple[int, int]:
    """`name` for both axes, or both `name_h` and `name_w` (Caffe rejects a mix)."""
    has_h, has_w = _has(p, f"{name}_h"), _has(p, f"{name}_w")
    if has_h or has_w:
        if _has(p, name) or not (has_h and has_w):
            raise ShapeError(f"give {name}, or both {name}_h and {name}_w (not both forms)")
        return (int(getattr(p, f"{name}_h")), int(getattr(p, f"{name}_w")))
    v = int(getattr(p, name))
    return (v, v)


def _pool_attrs(msg: Any) -> PoolAttrs:
    p = msg.pooling_param
    method = _enum_name(p, "pool")
    has_k, has_kh, has_kw = _has(p, "kernel_size"), _has(p, "kernel_h"), _has(p, "kernel_w")
    glob = bool(p.global_pooling)
    if glob:
        if has_k or has_kh or has_kw:
            raise ShapeError("global_pooling takes no kernel_size/kernel_h/kernel_w")
        kernel = None
    else:
        if has_k == (has_kh and has_kw):
            raise ShapeError("give kernel_size, or both kernel_h and kernel_w (not both forms)")
        kernel = (int(p.kernel_size),) * 2 if has_k else (int(p.kernel_h), int(p.kernel_w))
        if min(kernel) <= 0:
            raise ShapeError(f"kernel must be > 0, got {list(kernel)}")
    pad, stride = _pool_pair(p, "pad"), _pool_pair(p, "stride")
    if min(stride) <= 0:
        raise ShapeError(f"stride must be > 0, got {list(stride)}")
    if glob and (pad != (0, 0) or stride != (1, 1)):
        raise ShapeError("global_pooling allows only pad 0 and stride 1")
    if pad != (0, 0):
        if method == "STOCHASTIC":
            raise ShapeError("padding is implemented only for MAX and AVE pooling")
        if kernel is not None and (pad[0] >= kernel[0] or pad[1] >= kernel[1]):
            raise ShapeError(f"pad {list(pad)} must be smaller than kernel {list(kernel)}")
    if len(msg.top) > 1 and method != "MAX":
        raise GraphError(f"{method} pooling has one top, got {len(msg.top)}")
    return PoolAttrs(
        method=method,
        kernel=kernel,
        stride=stride,
        pad=pad,
        ceil=_enum_name(p, "round_mode") == "CEIL",
        mask_top=len(msg.top) > 1,
    )


def _pool_geom(
    method: str,
    kernel: tuple[int, int],
    stride: tuple[int, int],
    pad: tuple[int, int],
    ceil: bool,
    hw: tuple[int, int],
) -> PoolGeom:
    """Caffe's pooled size: ceil (or floor) division, then — if pad_h or pad_w is non-zero — on
    BOTH axes drop a last window that would start at or beyond in + pad."""
    out = []
    for i, k, s, p in zip(hw, kernel, stride, pad, strict=True):
        num = i + 2 * p - k
        out.append((-(-num // s) if ceil else num // s) + 1)
    if pad[0] or pad[1]:
        out = [
            o - 1 if (o - 1) * s >= i + p else o
            for o, i, s, p in zip(out, hw, stride, pad, strict=True)
        ]
    if min(out) < 1:
        raise ShapeError(
            f"kernel {list(kernel)} with pad {list(pad)} does not fit input {list(hw)}"
        )
    return PoolGeom(method, kernel, stride, pad, (out[0], out[1]))


def _pool_geom_of(a: PoolAttrs, shape: Shape) -> PoolGeom:
    if len(shape) != 4:
        raise ShapeError(f"pooling needs a 4-axis (N, C, H, W) input, got shape {list(shape)}")
    hw = (int(shape[2]), int(shape[3]))
    kernel = a.kernel if a.kernel is not None else hw
    return _pool_geom(a.method, kernel, a.stride, a.pad, a.ceil, hw)


def _pool_shape(a: PoolAttrs, bottom_shapes: list[Shape]) -> list[Shape]:
    shape = tuple(bottom_shapes[0])
    g = _pool_geom_of(a, shape)
    top = shape[:2] + g.out
    return [top, top] if a.method == "MAX" else [top]


def _starts(g: PoolGeom, axis: int) -> np.ndarray:
    return np.arange(g.out[axis]) * g.stride[axis] - g.pad[axis]


def _plane_index(g: PoolGeom, width: int, off: tuple[int, int]) -> np.ndarray:
    """The float index h * W + w of kernel offset `off` in every window, shaped (1, 1, oh, ow)."""
    h = _starts(g, 0) + off[0]
    w = _starts(g, 1) + off[1]
    return (h[:, None] * width + w[None, :]).astype(np.float32).reshape((1, 1) + g.out)


def _max_pool(x: Any, g: PoolGeom) -> tuple[Any, Any]:
    """MAX over each window clipped to the input, scanning row-major and replacing only on a
    strictly greater value: the first maximum wins, an empty window gives -FLT_MAX and index -1.
    The where-chain routes the gradient to that same first maximum."""
    n, c, h, w = x.shape
    if g.out == (1, 1) and g.pad == (0, 0):  # one window at the origin (global pooling, SPP)
        kh, kw = min(g.kernel[0], h), min(g.kernel[1], w)
        flat = x[:, :, :kh, :kw].reshape((n, c, kh * kw))
        i = jnp.argmax(jnp.where(jnp.isnan(flat), -jnp.inf, flat), axis=2, keepdims=True)
        v = jnp.take_along_axis(flat, i, axis=2)
        ok = v > -FLT_MAX
        idx = ((i // kw) * w + i % kw).astype(jnp.float32)
        val = jnp.where(ok, v, jnp.float32(-FLT_MAX)).reshape((n, c, 1, 1))
        return val, jnp.where(ok, idx, jnp.float32(-1)).reshape((n, c, 1, 1))
    xp = _pad_windows(x, 2, g.conv, g.out, -np.inf)
    val = jnp.full((n, c) + g.out, -FLT_MAX, x.dtype)
    mask = jnp.full((n, c) + g.out, -1.0, jnp.float32)
    for off, cand in _window_slices(xp, 2, g.conv, g.out):
        take = cand > val
        val = jnp.where(take, cand, val)
        mask = jnp.where(take, jnp.asarray(_plane_index(g, w, off)), mask)
    return val, mask


def _ave_divisor(g: PoolGeom, hw: tuple[int, int]) -> np.ndarray:
    """Caffe's AVE divisor: the window clipped to [-pad, in + pad), not to the input; so padding
    counts but a ceil overhang beyond in + pad does not (and an empty window divides by <= 0)."""
    sizes = []
    for axis in (0, 1):
        start = _starts(g, axis)
        end = np.minimum(start + g.kernel[axis], hw[axis] + g.pad[axis])
        sizes.append(end - start)
    return np.outer(sizes[0], sizes[1]).astype(np.float32).reshape((1, 1) + g.out)


def _window_sum(x: Any, g: PoolGeom) -> Any:
    xp = _pad_windows(x, 2, g.conv, g.out, 0.0)
    return lax.reduce_window(xp, 0.0, lax.add, (1, 1) + g.kernel, (1, 1) + g.stride, "VALID")


def _ave_pool(x: Any, g: PoolGeom) -> Any:
    return _window_sum(x, g) / jnp.asarray(_ave_divisor(g, x.shape[2:]))


def _stochastic_test(x: Any, g: PoolGeom) -> Any:
    """Caffe's TEST-phase stochastic pooling: sum(x^2) / sum(x) over the window (0 if sum <= 0).
    Its gradient is this formula's derivative (Caffe's Backward would reuse the indices sampled
    by the last TRAIN forward)."""
    s1 = _window_sum(x, g)
    s2 = _window_sum(x * x, g)
    pos = s1 > 0
    return jnp.where(pos, s2 / jnp.where(pos, s1, 1.0), 0.0)


def _stochastic_train(x: Any, g: PoolGeom, key: Any) -> Any:
    """Caffe's TRAIN-phase stochastic pooling: threshold u * sum(window), u ~ U[0, 1); the output
    is the first element (row-major) whose running sum reaches it; the gradient goes there."""
    n, c, h, w = x.shape
    thres = jax.random.uniform(key, (n, c) + g.out, x.dtype) * _window_sum(x, g)
    xp = _pad_windows(x, 2, g.conv, g.out, 0.0)
    run = jnp.zeros_like(thres)
    done = jnp.zeros(thres.shape, bool)
    val = jnp.zeros_like(thres)
    hs, ws = _starts(g, 0), _starts(g, 1)
    for off, cand in _window_slices(xp, 2, g.conv, g.out):
        inside = ((hs + off[0] < h)[:, None] & (ws + off[1] < w)[None, :]).reshape((1, 1) + g.out)
        run = run + cand
        take = jnp.asarray(inside) & ~done & (run >= thres)
        val = jnp.where(take, cand, val)
        done = done | take
    return val


def _pool(x: Any, g: PoolGeom, ctx: Any) -> tuple[Any, Any | None]:
    if g.method == "MAX":
        return _max_pool(x, g)
    if g.method == "AVE":
        return _ave_pool(x, g), None
    if ctx.train:
        return _stochastic_train(x, g, ctx.key()), None
    return _stochastic_test(x, g), None


def _pool_lower(a: PoolAttrs, params, bottoms, ctx):
    x = bottoms[0]
    val, mask = _pool(x, _pool_geom_of(a, x.shape), ctx)
    return [val, mask] if a.mask_top else [val]


def _pool_flops(a: PoolAttrs, bottom_shapes: list[Shape], top_shapes: list[Shape]) -> int:
    g = _pool_geom_of(a, tuple(bottom_shapes[0]))
    return count(top_shapes[0]) * g.kernel[0] * g.kernel[1]


register(
    LayerType(
        name="Pooling",
        doc="MAX/AVE/STOCHASTIC pooling, ceil-rounded with Caffe's clip rule; MAX mask top",
        attrs=_pool_attrs,
        shape=_pool_shape,
        lower=_pool_lower,
        flops=_pool_flops,
        n_tops=(1, 2),
        param_field="pooling_param",
        family="vision",
    )
)


# ---------------------------------------------------------------- SPP


@dataclass(frozen=True)
class SPPAttrs:
    pyramid_height: int
    method: str


def _spp_attrs(msg: Any) -> SPPAttrs:
    p = msg.spp_param
    height = int(p.pyramid_height)
    if height < 1:
        raise ShapeError(f"spp_param.pyramid_height must be >= 1, got {height}")
    return SPPAttrs(height, _enum_name(p, "pool"))


def _spp_levels(a: SPPAttrs, shape: Shape) -> list[PoolGeom]:
    """Level l pools 2^l bins per axis: kernel = stride = ceil(in / bins),
    pad = (kernel * bins - in + 1) / 2, then Caffe's pooling rules (ceil rounding)."""
    if len(shape) != 4:
        raise ShapeError(f"SPP needs a 4-axis (N, C, H, W) input, got shape {list(shape)}")
    hw = (int(shape[2]), int(shape[3]))
    if min(hw) <= 0:
        raise ShapeError(f"SPP input plane must be non-empty, got {list(hw)}")
    levels = []
    for level in range(a.pyramid_height):
        bins = 2**level
        kernel = (-(-hw[0] // bins), -(-hw[1] // bins))
        pad = ((kernel[0] * bins - hw[0] + 1) // 2, (kernel[1] * bins - hw[1] + 1) // 2)
        if pad[0] >= kernel[0] or pad[1] >= kernel[1]:
            raise ShapeError(
                f"SPP level {level} ({bins} bins) needs pad {list(pad)} >= "
                f"kernel {list(kernel)}: input {list(hw)} is too small"
            )
        if a.method == "STOCHASTIC" and pad != (0, 0):
            raise ShapeError(f"SPP level {level}: STOCHASTIC pooling cannot pad {list(pad)}")
        levels.append(_pool_geom(a.method, kernel, kernel, pad, True, hw))
    return levels


def _spp_shape(a: SPPAttrs, bottom_shapes: list[Shape]) -> list[Shape]:
    shape = tuple(bottom_shapes[0])
    levels = _spp_levels(a, shape)
    if a.pyramid_height == 1:  # a single level is the pooling layer itself: 4-D output
        return [shape[:2] + levels[0].out]
    return [(shape[0], sum(shape[1] * count(g.out) for g in levels))]


def _spp_lower(a: SPPAttrs, params, bottoms, ctx):
    x = bottoms[0]
    outs = [_pool(x, g, ctx)[0] for g in _spp_levels(a, x.shape)]
    if a.pyramid_height == 1:
        return outs
    return [jnp.concatenate([y.reshape((y.shape[0], -1)) for y in outs], axis=1)]


def _spp_flops(a: SPPAttrs, bottom_shapes: list[Shape], top_shapes: list[Shape]) -> int:
    shape = tuple(bottom_shapes[0])
    return sum(
        shape[0] * shape[1] * count(g.out) * g.kernel[0] * g.kernel[1]
        for g in _spp_levels(a, shape)
    )


register(
    LayerType(
        name="SPP",
        doc="spatial pyramid pooling: levels of 2^l x 2^l bins pooled, flattened, concatenated",
        attrs=_spp_attrs,
        shape=_spp_shape,
        lower=_spp_lower,
        flops=_spp_flops,
        param_field="spp_param",
        family="vision",
    )
)


# ---------------------------------------------------------------- Crop


@dataclass(frozen=True)
class CropAttrs:
    axis: int
    offset: tuple[int, ...]


def _crop_attrs(msg: Any) -> CropAttrs:
    p = msg.crop_param
    return CropAttrs(int(p.axis), repeated(p, "offset"))


def _crop_offsets(a: CropAttrs, shape: Shape, ref: Shape) -> tuple[int, ...]:
    """Per-axis start of the crop; axes before `axis` keep the first bottom's size."""
    nd = len(shape)
    start = canonical_axis(a.axis, nd, "crop_param.axis")
    if len(a.offset) > 1 and start + len(a.offset) != nd:
        raise ShapeError(
            f"{len(a.offset)} offsets given for the {nd - start} axes from axis {start} on"
        )
    if len(ref) < nd:
        raise ShapeError(f"reference bottom {list(ref)} has fewer axes than {list(shape)}")
    offsets = []
    for i in range(nd):
        if i < start:
            offsets.append(0)
            continue
        off = 0 if not a.offset else a.offset[0 if len(a.offset) == 1 else i - start]
        if shape[i] - off < ref[i]:
            raise ShapeError(
                f"crop of axis {i} to size {ref[i]} at offset {off} exceeds input size {shape[i]}"
            )
        offsets.append(off)
    return tuple(offsets)


def _crop_shape(a: CropAttrs, bottom_shapes: list[Shape]) -> list[Shape]:
    shape, ref = tuple(bottom_shapes[0]), tuple(bottom_shapes[1])
    _crop_offsets(a, shape, ref)
    start = canonical_axis(a.axis, len(shape), "crop_param.axis")
    return [shape[:start] + ref[start : len(shape)]]


def _crop_lower(a: CropAttrs, params, bottoms, ctx):
    x, ref = bottoms[0], bottoms[1]
    offsets = _crop_offsets(a, x.shape, ref.shape)
    (top,) = _crop_shape(a, [x.shape, ref.shape])
    return [x[tuple(slice(o, o + n) for o, n in zip(offsets, top, strict=True))]]


register(
    LayerType(
        name="Crop",
        doc="crop bottom 0 to bottom 1's shape from `axis` on, at the given offsets",
        attrs=_crop_attrs,
        shape=_crop_shape,
        lower=_crop_lower,
        n_bottoms=(2, 2),
        no_grad_bottoms=(1,),
        param_field="crop_param",
        family="vision",
    )
)
