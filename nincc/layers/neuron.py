"""Element-wise (neuron) layers: one top shaped like the bottom, computed per element.

Forward formulas follow Caffe 1.0's ``*_layer.cpp``. Where Caffe's Backward is not what automatic
differentiation of the forward formula gives (a subgradient at a kink, a division that Caffe does
literally, a clamped exponential), the layer wraps its forward in :func:`_with_derivative`, whose
derivative *is* Caffe's Backward rule, so ``jax.grad``/``jax.vjp`` reproduce Caffe's diffs.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ..errors import GraphError, ShapeError
from .base import BlobSpec, Filler, LayerType, Shape, count, elementwise_flops, register, same_shape

Array = Any
_F32 = np.float32


def _with_derivative(
    f: Callable[[Array], Array], df: Callable[[Array, Array], Array]
) -> Callable[[Array], Array]:
    """``f`` whose derivative is ``df(x, y)`` (Caffe's Backward), in forward and reverse mode."""

    @jax.custom_jvp
    def g(x):
        return f(x)

    @g.defjvp
    def _jvp(primals, tangents):
        (x,), (t,) = primals, tangents
        y = f(x)
        return y, df(x, y) * t

    return g


def _neuron(name: str, doc: str, lower, flops, attrs=None, param_field=None, **kw) -> None:
    """Register one element-wise layer type of this family."""
    register(
        LayerType(
            name=name,
            doc=doc,
            attrs=attrs or (lambda m: None),
            shape=kw.pop("shape", same_shape),
            lower=lower,
            flops=flops,
            param_field=param_field,
            family="neuron",
            **kw,
        )
    )


def _f32(v: float) -> float:
    """A parameter rounded to float32, as Caffe's Dtype arithmetic holds it."""
    return float(_F32(v))


# ---------------------------------------------------------------- ReLU and PReLU


@dataclass(frozen=True)
class ReLUAttrs:
    negative_slope: float


def _relu_lower(a: ReLUAttrs, params, bottoms, ctx):
    x = bottoms[0]  # Caffe's gradient at x == 0 is negative_slope: use where, not maximum
    return [jnp.where(x > 0, x, x * a.negative_slope)]


_neuron(
    "ReLU",
    "max(x, 0) + negative_slope * min(x, 0)",
    _relu_lower,
    elementwise_flops(1),
    attrs=lambda m: ReLUAttrs(float(m.relu_param.negative_slope)),
    param_field="relu_param",
)


@dataclass(frozen=True)
class PReLUAttrs:
    channel_shared: bool
    filler: Filler


def _prelu_attrs(m: Any) -> PReLUAttrs:
    p = m.prelu_param
    # Caffe's default when no filler is given is constant 0.25 (not FillerParameter's 0).
    filler = Filler.from_proto(p.filler) if p.HasField("filler") else Filler("constant", 0.25)
    return PReLUAttrs(bool(p.channel_shared), filler)


def _prelu_shape(a: PReLUAttrs, bottom_shapes: list[Shape]) -> list[Shape]:
    if len(bottom_shapes[0]) < 2:
        raise ShapeError(f"PReLU needs a bottom with >= 2 axes, got shape {list(bottom_shapes[0])}")
    return [tuple(bottom_shapes[0])]


def _prelu_blobs(a: PReLUAttrs, bottom_shapes: list[Shape]) -> list[BlobSpec]:
    shape: Shape = () if a.channel_shared else (int(bottom_shapes[0][1]),)
    return [BlobSpec(shape, a.filler)]


def _prelu_lower(a: PReLUAttrs, params, bottoms, ctx):
    x, slope = bottoms[0], params[0]
    if not a.channel_shared:  # one slope per channel (axis 1)
        slope = slope.reshape((1, slope.shape[0]) + (1,) * (x.ndim - 2))
    # Caffe: d/dx is slope where x <= 0; d/dslope is x where x <= 0.
    return [jnp.where(x > 0, x, slope * x)]


_neuron(
    "PReLU",
    "max(x, 0) + slope[c] * min(x, 0); learnable slope per channel or shared",
    _prelu_lower,
    elementwise_flops(2),
    attrs=_prelu_attrs,
    param_field="prelu_param",
    shape=_prelu_shape,
    blobs=_prelu_blobs,
)


# ---------------------------------------------------------------- smooth activations


@dataclass(frozen=True)
class ELUAttrs:
    alpha: float


def _elu_lower(a: ELUAttrs, params, bottoms, ctx):
    x = bottoms[0]
    neg = jnp.where(x > 0, 0.0, x)  # the x <= 0 branch, so its gradient at 0 is alpha
    return [jnp.where(x > 0, x, a.alpha * (jnp.exp(neg) - 1.0))]


_neuron(
    "ELU",
    "x for x > 0, alpha * (exp(x) - 1) otherwise",
    _elu_lower,
    elementwise_flops(4),
    attrs=lambda m: ELUAttrs(float(m.elu_param.alpha)),
    param_field="elu_param",
)


def _sigmoid(x: Array) -> Array:
    """Caffe's sigmoid: 0.5 * tanh(0.5 x) + 0.5 (no overflow for large |x|)."""
    return 0.5 * jnp.tanh(0.5 * x) + 0.5


_neuron(
    "Sigmoid",
    "0.5 * tanh(0.5 x) + 0.5",
    lambda a, p, b, ctx: [_sigmoid(b[0])],
    elementwise_flops(4),
)

_neuron("TanH", "tanh(x)", lambda a, p, b, ctx: [jnp.tanh(b[0])], elementwise_flops(1))


@dataclass(frozen=True)
class SwishAttrs:
    beta: float


def _swish_lower(a: SwishAttrs, params, bottoms, ctx):
    x = bottoms[0]
    return [x * _sigmoid(a.beta * x)]


_neuron(
    "Swish",
    "x * sigmoid(beta * x)",
    _swish_lower,
    elementwise_flops(6),
    attrs=lambda m: SwishAttrs(float(m.swish_param.beta)),
    param_field="swish_param",
)

BNLL_THRESHOLD = 50.0  # Caffe's kBNLL_THRESHOLD: exp is clamped here in Backward


def _bnll_lower(a, params, bottoms, ctx):
    def f(x):
        # x + log(1 + exp(-x)) for x > 0, log(1 + exp(x)) otherwise, without overflow
        return jnp.maximum(x, 0.0) + jnp.log1p(jnp.exp(-jnp.abs(x)))

    def df(x, y):
        e = jnp.exp(jnp.minimum(x, BNLL_THRESHOLD))
        return e / (e + 1.0)

    return [_with_derivative(f, df)(bottoms[0])]


_neuron(
    "BNLL",
    "log(1 + exp(x)), computed stably; Backward exp(min(x, 50)) / (exp(...) + 1)",
    _bnll_lower,
    elementwise_flops(4),
)


# ---------------------------------------------------------------- AbsVal, Threshold, Clip


def _absval_attrs(m: Any) -> None:
    if len(m.top) and len(m.bottom) and m.top[0] == m.bottom[0]:
        raise GraphError(f"AbsVal does not allow in-place computation (top '{m.top[0]}')")
    return None


def _absval_lower(a, params, bottoms, ctx):
    # Caffe's Backward multiplies by sign(x), which is 0 at x == 0.
    return [_with_derivative(jnp.abs, lambda x, y: jnp.sign(x))(bottoms[0])]


_neuron(
    "AbsVal",
    "|x|; gradient sign(x) (0 at 0); no in-place",
    _absval_lower,
    elementwise_flops(1),
    attrs=_absval_attrs,
)


@dataclass(frozen=True)
class ThresholdAttrs:
    threshold: float


def _threshold_lower(a: ThresholdAttrs, params, bottoms, ctx):
    x = lax.stop_gradient(bottoms[0])
    return [(x > a.threshold).astype(x.dtype)]


_neuron(
    "Threshold",
    "1 where x > threshold else 0 (no Backward)",
    _threshold_lower,
    elementwise_flops(1),
    attrs=lambda m: ThresholdAttrs(float(m.threshold_param.threshold)),
    param_field="threshold_param",
    backward=False,
)


@dataclass(frozen=True)
class ClipAttrs:
    min: float
    max: float


def _clip_lower(a: ClipAttrs, params, bottoms, ctx):
    x = bottoms[0]
    # Nested where: the diff passes where min <= x <= max, both ends included, as in Caffe.
    return [jnp.where(x < a.min, a.min, jnp.where(x > a.max, a.max, x))]


_neuron(
    "Clip",
    "max(min, min(x, max)); diff passes where min <= x <= max",
    _clip_lower,
    elementwise_flops(2),
    attrs=lambda m: ClipAttrs(float(m.clip_param.min), float(m.clip_param.max)),
    param_field="clip_param",
)


# ---------------------------------------------------------------- Power, Exp, Log


@dataclass(frozen=True)
class PowerAttrs:
    power: float
    scale: float
    shift: float

    @property
    def diff_scale(self) -> float:
        return _f32(_F32(self.power) * _F32(self.scale))


def _power_attrs(m: Any) -> PowerAttrs:
    p = m.power_param
    return PowerAttrs(float(p.power), float(p.scale), float(p.shift))


def _power_lower(a: PowerAttrs, params, bottoms, ctx):
    x = bottoms[0]
    if a.diff_scale == 0.0:  # scale or power is 0: Caffe ignores the input, diff is 0
        value = 1.0 if a.power == 0.0 else _f32(_F32(a.shift) ** _F32(a.power))
        return [jnp.full(x.shape, value, x.dtype)]

    def inner(x):
        u = x * a.scale if a.scale != 1.0 else x
        return u + a.shift if a.shift != 0.0 else u

    if a.power == 1.0:
        return [inner(x)]

    def f(x):
        return jnp.power(inner(x), a.power)

    def df(x, y):
        # Caffe's special cases, computed literally (a zero base gives inf/NaN as in Caffe).
        if a.power == 2.0:
            d = x * _f32(a.diff_scale * a.scale)
            return d + _f32(a.diff_scale * a.shift) if a.shift != 0.0 else d
        if a.shift == 0.0:
            return y / x * a.power
        return y / inner(x) * a.diff_scale

    return [_with_derivative(f, df)(x)]


def _power_flops(a: PowerAttrs, bottom_shapes: list[Shape], top_shapes: list[Shape]) -> int:
    if a.diff_scale == 0.0:
        return 0
    ops = (a.scale != 1.0) + (a.shift != 0.0) + (a.power != 1.0)
    return ops * count(top_shapes[0])


_neuron(
    "Power",
    "(shift + scale * x) ^ power, with Caffe's Backward special cases",
    _power_lower,
    _power_flops,
    attrs=_power_attrs,
    param_field="power_param",
)


def _check_base(what: str, base: float) -> None:
    if base != -1.0 and not base > 0.0:
        raise ShapeError(f"{what}.base must be -1 (for e) or > 0, got {base}")


@dataclass(frozen=True)
class ExpAttrs:
    inner_scale: float  # log(base) * scale
    outer_scale: float  # base ^ shift


def _exp_attrs(m: Any) -> ExpAttrs:
    p = m.exp_param
    base, scale, shift = _F32(p.base), _F32(p.scale), _F32(p.shift)
    _check_base("exp_param", float(base))
    log_base = _F32(1.0) if base == -1 else np.log(base)
    if shift == 0:
        outer = _F32(1.0)
    else:
        outer = np.exp(shift) if base == -1 else np.power(base, shift)
    return ExpAttrs(_f32(log_base * scale), _f32(outer))


def _exp_lower(a: ExpAttrs, params, bottoms, ctx):
    x = bottoms[0]
    y = jnp.exp(x * a.inner_scale if a.inner_scale != 1.0 else x)
    return [y * a.outer_scale if a.outer_scale != 1.0 else y]


def _exp_flops(a: ExpAttrs, bottom_shapes: list[Shape], top_shapes: list[Shape]) -> int:
    return (1 + (a.inner_scale != 1.0) + (a.outer_scale != 1.0)) * count(top_shapes[0])


_neuron(
    "Exp",
    "base ^ (shift + scale * x); base -1 means e",
    _exp_lower,
    _exp_flops,
    attrs=_exp_attrs,
    param_field="exp_param",
)


@dataclass(frozen=True)
class LogAttrs:
    base_scale: float  # 1 / log(base)
    scale: float
    shift: float


def _log_attrs(m: Any) -> LogAttrs:
    p = m.log_param
    base = _F32(p.base)
    _check_base("log_param", float(base))
    if base == -1:
        base_scale = _F32(1.0)
    else:
        with np.errstate(divide="ignore"):
            base_scale = _F32(1.0) / np.log(base)
        if not math.isfinite(float(base_scale)):
            raise ShapeError(f"log_param.base {float(base)} gives an infinite 1 / log(base)")
    return LogAttrs(float(base_scale), float(p.scale), float(p.shift))


def _log_lower(a: LogAttrs, params, bottoms, ctx):
    x = bottoms[0]
    u = x * a.scale if a.scale != 1.0 else x
    y = jnp.log(u + a.shift if a.shift != 0.0 else u)
    return [y * a.base_scale if a.base_scale != 1.0 else y]


def _log_flops(a: LogAttrs, bottom_shapes: list[Shape], top_shapes: list[Shape]) -> int:
    ops = 1 + (a.scale != 1.0) + (a.shift != 0.0) + (a.base_scale != 1.0)
    return ops * count(top_shapes[0])


_neuron(
    "Log",
    "log_base(shift + scale * x); base -1 means e",
    _log_lower,
    _log_flops,
    attrs=_log_attrs,
    param_field="log_param",
)


# ---------------------------------------------------------------- Dropout


@dataclass(frozen=True)
class DropoutAttrs:
    ratio: float
    scale_train: bool = True


def _dropout_attrs(m: Any) -> DropoutAttrs:
    p = m.dropout_param
    ratio = float(p.dropout_ratio)
    if not 0.0 <= ratio < 1.0:
        raise ShapeError(f"dropout_param.dropout_ratio must be in [0, 1), got {ratio}")
    # BVLC's schema has no scale_train; forks that add it default it to true.
    has_scale_train = "scale_train" in type(p).DESCRIPTOR.fields_by_name
    return DropoutAttrs(ratio, bool(p.scale_train) if has_scale_train else True)


def _keep_fields(keep: float) -> tuple[int, int] | None:
    """(bits, threshold) when ``keep`` is threshold / 2**bits exactly, bits in 1, 2, 4, 8."""
    for bits in (1, 2, 4, 8):
        threshold = keep * (1 << bits)
        if threshold == int(threshold):
            return bits, int(threshold)
    return None


def keep_mask(key: Any, keep: float, shape: tuple[int, ...]) -> Any:
    """A boolean mask, each element True with probability ``keep``, independently.

    Where ``keep`` is a multiple of 1/256 (dropout_ratio 0.5, 0.25, 0.75...) each element
    reads only the few random bits that probability needs: a b-bit field of a 32-bit word
    compared with keep * 2**b, exactly that probability. Drawing one 32-bit word per element
    (``jax.random.bernoulli``) costs about ten times as much on the CPU: 6.6 ms against 0.7 ms
    for NIN CIFAR-10's 64x96x16x16 dropout (docs/performance.md, section 24).
    """
    fields = _keep_fields(keep)
    if fields is None:
        return jax.random.bernoulli(key, keep, shape)
    bits, threshold = fields
    n, per = math.prod(shape), 32 // bits
    words = jax.random.bits(key, (-(-n // per),), jnp.uint32)
    shifts = jnp.arange(0, 32, bits, dtype=jnp.uint32)
    values = (words[:, None] >> shifts[None, :]) & jnp.uint32((1 << bits) - 1)
    return (values.reshape(-1)[:n] < jnp.uint32(threshold)).reshape(shape)


def _dropout_lower(a: DropoutAttrs, params, bottoms, ctx):
    x = bottoms[0]
    if ctx.train:
        keep = keep_mask(ctx.key(), 1.0 - a.ratio, x.shape).astype(x.dtype)
        y = x * keep
        return [y * _f32(1.0 / (1.0 - a.ratio)) if a.scale_train else y]
    return [x if a.scale_train else x * _f32(1.0 - a.ratio)]


_neuron(
    "Dropout",
    "TRAIN: keep with prob 1 - ratio and scale by 1 / (1 - ratio); TEST: identity",
    _dropout_lower,
    elementwise_flops(2),
    attrs=_dropout_attrs,
    param_field="dropout_param",
)
