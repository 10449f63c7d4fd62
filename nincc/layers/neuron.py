"""Element-wise (neuron) layers: one top shaped like the bottom, computed per element."""

from __future__ import annotations

from dataclasses import dataclass

import jax.numpy as jnp

from .base import LayerType, elementwise_flops, register, same_shape


@dataclass(frozen=True)
class ReLUAttrs:
    negative_slope: float


def _relu_lower(a: ReLUAttrs, params, bottoms, ctx):
    x = bottoms[0]  # Caffe's gradient at x == 0 is negative_slope: use where, not maximum
    return [jnp.where(x > 0, x, x * a.negative_slope)]


register(
    LayerType(
        name="ReLU",
        doc="max(x, 0) + negative_slope * min(x, 0)",
        attrs=lambda m: ReLUAttrs(float(m.relu_param.negative_slope)),
        shape=same_shape,
        lower=_relu_lower,
        flops=elementwise_flops(1),
        param_field="relu_param",
        family="neuron",
    )
)
