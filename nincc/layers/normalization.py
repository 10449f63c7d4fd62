"""Normalization layers: LRN, MVN, BatchNorm, Scale and Bias, as Caffe 1.0 computes them.

Forward values and the gradients jax.grad gives through each lowering reproduce Caffe's Forward
and Backward; where Caffe's Backward is not the derivative of its Forward (MVN with eps) a
custom VJP carries Caffe's formula. BatchNorm's three blobs are running state: with batch
statistics forward hands their updated values to ``ctx.set_state``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ..errors import GraphError, ShapeError
from .base import BlobSpec, Filler, LayerType, Shape, canonical_axis, count, register


def _enum_name(msg: Any, field: str) -> str:
    enum = msg.DESCRIPTOR.fields_by_name[field].enum_type
    return enum.values_by_number[getattr(msg, field)].name


def _legacy_dims(shape: Shape, what: str) -> tuple[int, int]:
    """Caffe's Blob::num() and channels() (legacy accessors: at most 4 axes, missing ones are 1)."""
    if len(shape) > 4:
        raise ShapeError(
            f"{what} needs at most 4 axes (Caffe's legacy accessors), got {list(shape)}"
        )
    dims = tuple(shape) + (1,) * (2 - min(len(shape), 2))
    return int(dims[0]), int(dims[1])


# ---------------------------------------------------------------- LRN


@dataclass(frozen=True)
class LRNAttrs:
    local_size: int
    alpha: float
    beta: float
    k: float
    within_channel: bool


def _lrn_attrs(msg: Any) -> LRNAttrs:
    p = msg.lrn_param
    size = int(p.local_size)
    if size % 2 != 1:
        raise ShapeError(f"lrn_param.local_size must be odd, got {size}")
    return LRNAttrs(
        local_size=size,
        alpha=float(p.alpha),
        beta=float(p.beta),
        k=float(p.k),
        within_channel=_enum_name(p, "norm_region") == "WITHIN_CHANNEL",
    )


def _lrn_shape(a: LRNAttrs, bottom_shapes: list[Shape]) -> list[Shape]:
    shape = tuple(bottom_shapes[0])
    if len(shape) != 4:
        raise ShapeError(f"LRN needs a 4-axis (N, C, H, W) input, got shape {list(shape)}")
    return [shape]


def _window_sum(x: Any, window: tuple[int, ...], pad: tuple[int, ...]) -> Any:
    """Sum over a stride-1 window with zero padding (its adjoint spreads diffs back evenly)."""
    # a concrete zero init selects the differentiable window-sum primitive (a traced one does not)
    zero = np.zeros((), x.dtype)
    return lax.reduce_window(x, zero, lax.add, window, (1,) * x.ndim, tuple((p, p) for p in pad))


def _lrn_lower(a: LRNAttrs, params, bottoms, ctx):
    x = bottoms[0]
    n, pad = a.local_size, (a.local_size - 1) // 2
    sq = x * x
    if a.within_channel:
        # Caffe builds this mode from sub-layers: AVE pooling of x^2 (kernel n, pad (n-1)/2, so
        # the divisor is always n*n), then Power (1 + alpha * avg)^-beta; k is not used.
        avg = _window_sum(sq, (1, 1, n, n), (0, 0, pad, pad)) / float(n * n)
        scale = 1.0 + a.alpha * avg
    else:
        # alpha is divided by the window size (Caffe's alpha_over_size).
        scale = a.k + (a.alpha / n) * _window_sum(sq, (1, n, 1, 1), (0, pad, 0, 0))
    return [x * jnp.power(scale, -a.beta)]


def _lrn_flops(a: LRNAttrs, bottom_shapes: list[Shape], top_shapes: list[Shape]) -> int:
    window = a.local_size * a.local_size if a.within_channel else a.local_size
    # square, window sum, scale and shift, power, product
    return (window + 5) * count(top_shapes[0])


register(
    LayerType(
        name="LRN",
        doc="local response normalization; ACROSS_CHANNELS: x * (k + alpha/n * sum x^2)^-beta; "
        "WITHIN_CHANNEL: x * (1 + alpha * avg-pooled x^2)^-beta",
        attrs=_lrn_attrs,
        shape=_lrn_shape,
        lower=_lrn_lower,
        flops=_lrn_flops,
        param_field="lrn_param",
        family="normalization",
    )
)


# ---------------------------------------------------------------- MVN


@dataclass(frozen=True)
class MVNAttrs:
    normalize_variance: bool
    across_channels: bool
    eps: float


def _mvn_attrs(msg: Any) -> MVNAttrs:
    p = msg.mvn_param
    return MVNAttrs(bool(p.normalize_variance), bool(p.across_channels), float(p.eps))


def _mvn_shape(a: MVNAttrs, bottom_shapes: list[Shape]) -> list[Shape]:
    _legacy_dims(bottom_shapes[0], "MVN input")
    return [tuple(bottom_shapes[0])]


def _mvn_center(x2: Any) -> Any:
    return x2 - jnp.mean(x2, axis=1, keepdims=True)


@partial(jax.custom_vjp, nondiff_argnums=(1,))
def _mvn_normalize(x2: Any, eps: float) -> Any:
    return _mvn_normalize_fwd(x2, eps)[0]


def _mvn_normalize_fwd(x2: Any, eps: float):
    xc = _mvn_center(x2)
    # Caffe adds eps to the standard deviation, not to the variance.
    std = jnp.sqrt(jnp.mean(xc * xc, axis=1, keepdims=True)) + eps
    y = xc / std
    return y, (y, std)


def _mvn_normalize_bwd(eps: float, res, g):
    # Caffe's MVN Backward, (dy - mean(dy) - mean(dy * y) * y) / (std + eps), is the derivative
    # of its Forward only when eps is 0.
    y, std = res
    mean_g = jnp.mean(g, axis=1, keepdims=True)
    mean_gy = jnp.mean(g * y, axis=1, keepdims=True)
    return ((g - mean_g - mean_gy * y) / std,)


_mvn_normalize.defvjp(_mvn_normalize_fwd, _mvn_normalize_bwd)


def _mvn_lower(a: MVNAttrs, params, bottoms, ctx):
    x = bottoms[0]
    num, channels = _legacy_dims(x.shape, "MVN input")
    x2 = x.reshape(num if a.across_channels else num * channels, -1)
    y = _mvn_normalize(x2, a.eps) if a.normalize_variance else _mvn_center(x2)
    return [y.reshape(x.shape)]


def _mvn_flops(a: MVNAttrs, bottom_shapes: list[Shape], top_shapes: list[Shape]) -> int:
    per = 5 if a.normalize_variance else 2  # mean, subtract (, square, sum, divide)
    return per * count(top_shapes[0])


register(
    LayerType(
        name="MVN",
        doc="mean (and variance) normalization per channel or per sample; eps added to the std",
        attrs=_mvn_attrs,
        shape=_mvn_shape,
        lower=_mvn_lower,
        flops=_mvn_flops,
        param_field="mvn_param",
        family="normalization",
    )
)


# ---------------------------------------------------------------- BatchNorm


@dataclass(frozen=True)
class BatchNormAttrs:
    use_global_stats: bool | None  # None: Caffe's default, phase == TEST
    moving_average_fraction: float
    eps: float


def _batch_norm_attrs(msg: Any) -> BatchNormAttrs:
    p = msg.batch_norm_param
    for i, spec in enumerate(msg.param):
        if spec.HasField("lr_mult") and spec.lr_mult != 0:
            raise GraphError(
                f"BatchNorm statistics cannot be learned: param {i} has lr_mult {spec.lr_mult}, "
                "only 0 is allowed"
            )
    return BatchNormAttrs(
        use_global_stats=bool(p.use_global_stats) if p.HasField("use_global_stats") else None,
        moving_average_fraction=float(p.moving_average_fraction),
        eps=float(p.eps),
    )


def _batch_norm_channels(shape: Shape) -> int:
    if len(shape) < 2:
        raise ShapeError(f"BatchNorm needs at least 2 axes (N, C, ...), got shape {list(shape)}")
    return int(shape[1])


def _batch_norm_shape(a: BatchNormAttrs, bottom_shapes: list[Shape]) -> list[Shape]:
    _batch_norm_channels(bottom_shapes[0])
    return [tuple(bottom_shapes[0])]


def _batch_norm_blobs(a: BatchNormAttrs, bottom_shapes: list[Shape]) -> list[BlobSpec]:
    c = _batch_norm_channels(bottom_shapes[0])
    # mean * s, variance * s, and the scale factor s; Caffe fixes their lr_mult at 0.
    return [
        BlobSpec((c,), lr_mult=0.0, state=True),
        BlobSpec((c,), lr_mult=0.0, state=True),
        BlobSpec((1,), lr_mult=0.0, state=True),
    ]


def _batch_norm_lower(a: BatchNormAttrs, params, bottoms, ctx):
    x = bottoms[0]
    mean_acc, var_acc, factor = (lax.stop_gradient(p) for p in params)
    c = x.shape[1]
    axes = (0,) + tuple(range(2, x.ndim))
    bshape = (1, c) + (1,) * (x.ndim - 2)
    use_global = a.use_global_stats if a.use_global_stats is not None else ctx.phase == "TEST"
    if use_global:
        # The third blob is a scale factor: the statistics are blob / s (0 when s is 0).
        s = factor[0]
        inv = jnp.where(s == 0, 0.0, 1.0 / jnp.where(s == 0, 1.0, s))
        mean, var = mean_acc * inv, var_acc * inv
        return [(x - mean.reshape(bshape)) / jnp.sqrt(var + a.eps).reshape(bshape)]
    mean = jnp.mean(x, axis=axes)
    xc = x - mean.reshape(bshape)
    var = jnp.mean(xc * xc, axis=axes)  # biased
    m = count(x.shape) // c
    correction = m / (m - 1) if m > 1 else 1.0
    maf = a.moving_average_fraction
    # Caffe updates the stored statistics whenever it uses batch statistics, in any phase.
    ctx.set_state(
        [
            lax.stop_gradient(mean + maf * mean_acc),
            lax.stop_gradient(correction * var + maf * var_acc),
            lax.stop_gradient(factor * maf + 1.0),
        ]
    )
    return [xc / jnp.sqrt(var + a.eps).reshape(bshape)]


def _batch_norm_flops(
    a: BatchNormAttrs, bottom_shapes: list[Shape], top_shapes: list[Shape]
) -> int:
    # batch statistics: mean, subtract, square, sum, divide; stored ones: subtract, divide
    per = 2 if a.use_global_stats else 5
    return per * count(top_shapes[0])


register(
    LayerType(
        name="BatchNorm",
        doc="(x - mean) / sqrt(var + eps) per channel; blobs mean*s, var*s and scale factor s; "
        "batch statistics update them by moving average",
        attrs=_batch_norm_attrs,
        shape=_batch_norm_shape,
        lower=_batch_norm_lower,
        blobs=_batch_norm_blobs,
        flops=_batch_norm_flops,
        param_field="batch_norm_param",
        family="normalization",
    )
)


# ---------------------------------------------------------------- Scale and Bias


@dataclass(frozen=True)
class BroadcastAttrs:
    """Scale/Bias: which axes of bottom 0 the factor covers, and the learned blobs' fillers."""

    axis: int
    num_axes: int
    filler: Filler
    bias_term: bool = False
    bias_filler: Filler = Filler()


def _scale_attrs(msg: Any) -> BroadcastAttrs:
    p = msg.scale_param
    # Without a filler the learned scale starts at 1 (identity).
    filler = Filler.from_proto(p.filler) if p.HasField("filler") else Filler("constant", 1.0)
    return BroadcastAttrs(
        int(p.axis), int(p.num_axes), filler, bool(p.bias_term), Filler.from_proto(p.bias_filler)
    )


def _bias_attrs(msg: Any) -> BroadcastAttrs:
    p = msg.bias_param
    return BroadcastAttrs(int(p.axis), int(p.num_axes), Filler.from_proto(p.filler))


def _learned_shape(a: BroadcastAttrs, shape: Shape, what: str) -> Shape:
    """The learned factor's shape: shape[axis : axis + num_axes] (-1: to the end)."""
    axis = canonical_axis(a.axis, len(shape), f"{what} axis")
    if a.num_axes < -1:
        raise ShapeError(f"{what} num_axes must be >= -1, got {a.num_axes}")
    if a.num_axes >= 0 and len(shape) < axis + a.num_axes:
        raise ShapeError(
            f"{what} axis {a.axis} with num_axes {a.num_axes} exceeds the {len(shape)} axes "
            f"of bottom {list(shape)}"
        )
    end = len(shape) if a.num_axes == -1 else axis + a.num_axes
    return tuple(shape[axis:end])


def _factor_axis(a: BroadcastAttrs, shape: Shape, factor: Shape, what: str) -> int:
    """Where a factor of shape ``factor`` sits in bottom 0 (a scalar factor sits anywhere)."""
    if len(factor) == 0:
        return 0
    axis = canonical_axis(a.axis, len(shape), f"{what} axis")
    if tuple(shape[axis : axis + len(factor)]) != tuple(factor):
        raise ShapeError(
            f"{what} factor shape {list(factor)} does not match bottom {list(shape)} "
            f"from axis {axis}"
        )
    return axis


def _broadcast(factor: Any, axis: int, ndim: int) -> Any:
    return factor.reshape((1,) * axis + factor.shape + (1,) * (ndim - axis - factor.ndim))


def _scale_check(a: BroadcastAttrs, bottom_shapes: list[Shape]) -> tuple[Shape, Shape | None]:
    """The scale's and the bias's shapes (bias None without bias_term), checked against bottom 0."""
    x = tuple(bottom_shapes[0])
    scale = tuple(bottom_shapes[1]) if len(bottom_shapes) > 1 else _learned_shape(a, x, "Scale")
    _factor_axis(a, x, scale, "Scale")
    if not a.bias_term:
        return scale, None
    # Caffe's inner Bias layer covers as many axes as the scale does.
    bias = _learned_shape(BroadcastAttrs(a.axis, len(scale), a.bias_filler), x, "Scale bias")
    return scale, bias


def _scale_shape(a: BroadcastAttrs, bottom_shapes: list[Shape]) -> list[Shape]:
    _scale_check(a, bottom_shapes)
    return [tuple(bottom_shapes[0])]


def _scale_blobs(a: BroadcastAttrs, bottom_shapes: list[Shape]) -> list[BlobSpec]:
    scale, bias = _scale_check(a, bottom_shapes)
    specs = [] if len(bottom_shapes) > 1 else [BlobSpec(scale, a.filler)]
    if bias is not None:
        specs.append(BlobSpec(bias, a.bias_filler))
    return specs


def _scale_lower(a: BroadcastAttrs, params, bottoms, ctx):
    x = bottoms[0]
    two = len(bottoms) > 1
    scale = bottoms[1] if two else params[0]
    y = x * _broadcast(scale, _factor_axis(a, x.shape, scale.shape, "Scale"), x.ndim)
    if a.bias_term:
        bias = params[0 if two else 1]
        y = y + _broadcast(bias, _factor_axis(a, x.shape, bias.shape, "Scale bias"), x.ndim)
    return [y]


def _scale_flops(a: BroadcastAttrs, bottom_shapes: list[Shape], top_shapes: list[Shape]) -> int:
    return (2 if a.bias_term else 1) * count(top_shapes[0])


register(
    LayerType(
        name="Scale",
        doc="x * scale broadcast from axis (second bottom or learned, default 1), plus an "
        "optional learned bias",
        attrs=_scale_attrs,
        shape=_scale_shape,
        lower=_scale_lower,
        blobs=_scale_blobs,
        flops=_scale_flops,
        n_bottoms=(1, 2),
        param_field="scale_param",
        family="normalization",
    )
)


def _bias_check(a: BroadcastAttrs, bottom_shapes: list[Shape]) -> Shape:
    x = tuple(bottom_shapes[0])
    bias = tuple(bottom_shapes[1]) if len(bottom_shapes) > 1 else _learned_shape(a, x, "Bias")
    _factor_axis(a, x, bias, "Bias")
    return bias


def _bias_shape(a: BroadcastAttrs, bottom_shapes: list[Shape]) -> list[Shape]:
    _bias_check(a, bottom_shapes)
    return [tuple(bottom_shapes[0])]


def _bias_blobs(a: BroadcastAttrs, bottom_shapes: list[Shape]) -> list[BlobSpec]:
    bias = _bias_check(a, bottom_shapes)
    return [] if len(bottom_shapes) > 1 else [BlobSpec(bias, a.filler)]


def _bias_lower(a: BroadcastAttrs, params, bottoms, ctx):
    x = bottoms[0]
    bias = bottoms[1] if len(bottoms) > 1 else params[0]
    return [x + _broadcast(bias, _factor_axis(a, x.shape, bias.shape, "Bias"), x.ndim)]


register(
    LayerType(
        name="Bias",
        doc="x + bias broadcast from axis (second bottom or learned, default 0)",
        attrs=_bias_attrs,
        shape=_bias_shape,
        lower=_bias_lower,
        blobs=_bias_blobs,
        flops=lambda a, b, t: count(t[0]),
        n_bottoms=(1, 2),
        param_field="bias_param",
        family="normalization",
    )
)
