"""Loss layers and Accuracy: Caffe's forward, and Caffe's Backward as the gradient of ``lower``.

Every loss top is a 0-d array; the compiler multiplies it by the layer's loss_weight, so the
top diff Caffe's Backward scales by arrives here as the cotangent. Labels are float arrays
holding integers: they are truncated toward zero (Caffe's ``static_cast<int>``) and never
receive a gradient. Where Caffe's Backward is not the derivative of its forward (clamped logs,
the contrastive ``dist + 1e-4``), a ``jax.custom_vjp`` reproduces Caffe's rule.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ..errors import DataError, GraphError, ShapeError
from .base import LayerType, Shape, canonical_axis, count, no_attrs, register

FLT_MIN = float(np.finfo(np.float32).tiny)  # SoftmaxWithLoss clamps probabilities here
LOG_THRESHOLD = 1e-20  # Caffe's kLOG_THRESHOLD (MultinomialLogisticLoss, InfogainLoss)
NORMALIZATIONS = ("FULL", "VALID", "BATCH_SIZE", "NONE")


# ---------------------------------------------------------------- shared pieces


def _enum_name(msg: Any, field: str) -> str:
    """The symbolic name of an enum field's value (e.g. "VALID")."""
    enum = msg.DESCRIPTOR.fields_by_name[field].enum_type
    return enum.values_by_number[getattr(msg, field)].name


def _ignore_label(param: Any) -> int | None:
    return int(param.ignore_label) if param.HasField("ignore_label") else None


def _normalization(lp: Any, default: str | None) -> str:
    """The normalization mode a loss layer uses.

    SoftmaxWithLoss (``default=None``): the legacy ``normalize`` counts only when
    ``normalization`` is unset (true = VALID, false = BATCH_SIZE); otherwise ``normalization``
    with its proto default VALID. SigmoidCrossEntropyLoss: the same, but unset both = ``default``
    (BATCH_SIZE).
    """
    if lp.HasField("normalization"):
        return _enum_name(lp, "normalization")
    if lp.HasField("normalize"):
        return "VALID" if lp.normalize else "BATCH_SIZE"
    return default or _enum_name(lp, "normalization")


def _normalizer(mode: str, outer: int, inner: int, valid: Any = None) -> Any:
    """Caffe's get_normalizer: FULL = outer*inner, VALID = non-ignored labels, BATCH_SIZE = outer,
    NONE = 1; never below 1 (a loss with every label ignored is 0, not NaN)."""
    if mode == "VALID" and valid is not None:
        return jnp.maximum(jnp.sum(valid, dtype=jnp.float32), 1.0)
    n = {"FULL": outer * inner, "VALID": outer * inner, "BATCH_SIZE": outer, "NONE": 1}[mode]
    return jnp.float32(max(n, 1))


def _int_labels(labels: Any) -> Any:
    """Float labels as Caffe reads them: no gradient, truncated toward zero."""
    return lax.stop_gradient(labels).astype(jnp.int32)


def _valid(labels: Any, ignore_label: int | None) -> Any:
    if ignore_label is None:
        return jnp.ones(labels.shape, bool)
    return labels != ignore_label


def _check_first_dim(shapes: list[Shape]) -> None:
    """LossLayer::Reshape: data and label have the same first dimension."""
    a, b = shapes[0], shapes[1]
    if not a or not b:
        raise ShapeError(f"loss bottoms need a first (batch) axis, got shapes {list(a)}, {list(b)}")
    if a[0] != b[0]:
        raise ShapeError(
            f"the data and label must have the same first dimension, got {list(a)} and {list(b)}"
        )


def _legacy(shape: Shape, what: str) -> tuple[int, int, int, int]:
    """Caffe's num/channels/height/width accessors (missing trailing axes are 1; > 4 axes fail)."""
    if len(shape) > 4:
        raise ShapeError(f"{what} must have at most 4 axes (Caffe's legacy accessors), got {shape}")
    dims = tuple(shape) + (1,) * (4 - len(shape))
    return dims[0], dims[1], dims[2], dims[3]


def _split(shape: Shape, axis: int, what: str) -> tuple[int, int, int, int]:
    """(canonical axis, outer, classes, inner) of a prediction blob around its class axis."""
    ax = canonical_axis(axis, len(shape), what)
    return ax, count(shape, 0, ax), int(shape[ax]), count(shape, ax + 1)


def _check_label_count(shapes: list[Shape], outer: int, inner: int, axis: int) -> None:
    n = count(shapes[1])
    if n != outer * inner:
        raise ShapeError(
            f"label count {n} (shape {list(shapes[1])}) must equal the number of predictions "
            f"{outer * inner} (prediction shape {list(shapes[0])} with class axis {axis})"
        )


def _softmax(x3: Any) -> Any:
    """Caffe's Softmax over axis 1 of an (outer, C, inner) array: subtract max, exp, divide."""
    e = jnp.exp(x3 - jnp.max(x3, axis=1, keepdims=True))
    return e / jnp.sum(e, axis=1, keepdims=True)


def _one_hot(labels: Any, classes: int) -> Any:
    """(outer, inner) labels → (outer, C, inner) float indicator."""
    hot = labels[:, None, :] == jnp.arange(classes)[None, :, None]
    return hot.astype(jnp.float32)


def _per_element(k: int, bottom: int = 0):
    def flops(attrs: Any, bottom_shapes: list[Shape], top_shapes: list[Shape]) -> int:
        return k * count(bottom_shapes[bottom])

    return flops


# ---------------------------------------------------------------- SoftmaxWithLoss


@dataclass(frozen=True)
class SoftmaxLossAttrs:
    axis: int
    ignore_label: int | None
    normalization: str


def _softmax_loss_attrs(msg: Any) -> SoftmaxLossAttrs:
    lp = msg.loss_param
    return SoftmaxLossAttrs(
        axis=int(msg.softmax_param.axis),
        ignore_label=_ignore_label(lp),
        normalization=_normalization(lp, None),
    )


def _class_loss_shape(a: Any, shapes: list[Shape]) -> list[Shape]:
    """Loss top (), optional probability top shaped like the scores."""
    _check_first_dim(shapes)
    _, outer, _, inner = _split(shapes[0], a.axis, "axis")
    _check_label_count(shapes, outer, inner, a.axis)
    return [(), tuple(shapes[0])]


@jax.custom_vjp
def _softmax_xent(x3: Any, labels: Any, valid: Any, normalizer: Any) -> Any:
    return _softmax_xent_fwd(x3, labels, valid, normalizer)[0]


def _softmax_xent_fwd(x3, labels, valid, normalizer):
    prob = _softmax(x3)
    p_true = jnp.take_along_axis(prob, labels[:, None, :], axis=1)[:, 0, :]
    nll = -jnp.log(jnp.maximum(p_true, FLT_MIN))
    return jnp.sum(jnp.where(valid, nll, 0.0)) / normalizer, (prob, labels, valid, normalizer)


def _softmax_xent_bwd(res, g):
    # Caffe: (prob - onehot) at counted positions, 0 at ignored ones, times top_diff/normalizer
    # (also where the FLT_MIN clamp made the forward flat).
    prob, labels, valid, normalizer = res
    diff = jnp.where(valid[:, None, :], prob - _one_hot(labels, prob.shape[1]), 0.0)
    return diff * (g / normalizer), None, None, None


_softmax_xent.defvjp(_softmax_xent_fwd, _softmax_xent_bwd)


def _softmax_loss_lower(a: SoftmaxLossAttrs, params, bottoms, ctx):
    x, label = bottoms
    ax, outer, c, inner = _split(x.shape, a.axis, "axis")
    x3 = x.reshape(outer, c, inner)
    lbl = _int_labels(label).reshape(outer, inner)
    valid = _valid(lbl, a.ignore_label)
    norm = _normalizer(a.normalization, outer, inner, valid)
    loss = _softmax_xent(x3, jnp.where(valid, lbl, 0), valid, norm)
    return [loss, lax.stop_gradient(_softmax(x3)).reshape(x.shape)][: len(ctx.top_names) or 1]


register(
    LayerType(
        name="SoftmaxWithLoss",
        extra={"class_labels": True},  # bottom 1 holds class indices
        doc="softmax over softmax_param.axis, then -log(max(p[label], FLT_MIN)) summed over "
        "non-ignored labels / normalizer (VALID default; legacy normalize: false = BATCH_SIZE)",
        attrs=_softmax_loss_attrs,
        shape=_class_loss_shape,
        lower=_softmax_loss_lower,
        flops=lambda a, b, t: 5 * count(b[0]) + 3 * count(b[1]),
        n_bottoms=(2, 2),
        n_tops=(1, 2),
        param_field="loss_param",
        loss=True,
        no_grad_bottoms=(1,),
        family="loss",
    )
)


# ---------------------------------------------------------------- EuclideanLoss


def _euclidean_shape(a: Any, shapes: list[Shape]) -> list[Shape]:
    _check_first_dim(shapes)
    _legacy(shapes[0], "EuclideanLoss bottom 0")
    if count(shapes[0], 1) != count(shapes[1], 1):
        raise ShapeError(
            f"EuclideanLoss inputs must have the same dimension, got {list(shapes[0])} and "
            f"{list(shapes[1])}"
        )
    return [()]


def _euclidean_lower(a: Any, params, bottoms, ctx):
    x, y = bottoms
    d = x - y.reshape(x.shape)
    return [jnp.sum(d * d) / x.shape[0] / 2.0]


register(
    LayerType(
        name="EuclideanLoss",
        doc="sum((a - b)^2) / (2 N), gradient to both bottoms",
        attrs=no_attrs,
        shape=_euclidean_shape,
        lower=_euclidean_lower,
        flops=_per_element(3),
        n_bottoms=(2, 2),
        loss=True,
        family="loss",
    )
)


# ---------------------------------------------------------------- SigmoidCrossEntropyLoss


@dataclass(frozen=True)
class SigmoidXentAttrs:
    ignore_label: int | None
    normalization: str


def _sigmoid_xent_shape(a: Any, shapes: list[Shape]) -> list[Shape]:
    _check_first_dim(shapes)
    if count(shapes[0]) != count(shapes[1]):
        raise ShapeError(
            f"SigmoidCrossEntropyLoss inputs must have the same count, got {list(shapes[0])} "
            f"and {list(shapes[1])}"
        )
    return [()]


def _sigmoid_xent_lower(a: SigmoidXentAttrs, params, bottoms, ctx):
    x, t = bottoms
    t = lax.stop_gradient(t).reshape(x.shape)
    pos = (x >= 0).astype(x.dtype)
    # Caffe's overflow-free form; its gradient is sigmoid(x) - t, Caffe's Backward.
    term = x * (t - pos) - jnp.log(1.0 + jnp.exp(x - 2.0 * x * pos))
    valid = None if a.ignore_label is None else t.astype(jnp.int32) != a.ignore_label
    total = jnp.sum(term if valid is None else jnp.where(valid, term, 0.0))
    norm = _normalizer(a.normalization, x.shape[0], count(x.shape, 1), valid)
    return [-total / norm]


register(
    LayerType(
        name="SigmoidCrossEntropyLoss",
        doc="stable -(x (t - [x>=0]) - log(1 + exp(x - 2x[x>=0]))) summed / normalizer "
        "(BATCH_SIZE default; VALID counts int(t) != ignore_label)",
        attrs=lambda m: SigmoidXentAttrs(
            _ignore_label(m.loss_param), _normalization(m.loss_param, "BATCH_SIZE")
        ),
        shape=_sigmoid_xent_shape,
        lower=_sigmoid_xent_lower,
        flops=_per_element(8),
        n_bottoms=(2, 2),
        param_field="loss_param",
        loss=True,
        no_grad_bottoms=(1,),
        family="loss",
    )
)


# ---------------------------------------------------------------- HingeLoss


@dataclass(frozen=True)
class HingeAttrs:
    norm: str  # "L1" or "L2"


def _hinge_shape(a: Any, shapes: list[Shape]) -> list[Shape]:
    _check_first_dim(shapes)
    _legacy(shapes[0], "HingeLoss bottom 0")
    return [()]


def _hinge_lower(a: HingeAttrs, params, bottoms, ctx):
    x, label = bottoms
    num = x.shape[0]
    x2 = x.reshape(num, -1)
    lbl = _int_labels(label).reshape(-1)[:num]
    is_true = lbl[:, None] == jnp.arange(x2.shape[1])[None, :]
    m = 1.0 + jnp.where(is_true, -x2, x2)
    margin = jnp.where(m > 0, m, 0.0)  # gradient 0 where the margin is exactly 0, as Caffe's sign
    total = jnp.sum(margin) if a.norm == "L1" else jnp.sum(margin * margin)
    return [total / num]


register(
    LayerType(
        name="HingeLoss",
        extra={"class_labels": True},  # bottom 1 holds class indices
        doc="one-vs-all hinge: sum_j max(0, 1 - t_j s_j) (L1) or its square (L2), / N",
        attrs=lambda m: HingeAttrs(_enum_name(m.hinge_loss_param, "norm")),
        shape=_hinge_shape,
        lower=_hinge_lower,
        flops=_per_element(4),
        n_bottoms=(2, 2),
        param_field="hinge_loss_param",
        loss=True,
        no_grad_bottoms=(1,),
        family="loss",
    )
)


# ---------------------------------------------------------------- ContrastiveLoss


@dataclass(frozen=True)
class ContrastiveAttrs:
    margin: float
    legacy_version: bool


def _contrastive_shape(a: Any, shapes: list[Shape]) -> list[Shape]:
    _check_first_dim(shapes)
    na, ca, ha, wa = _legacy(shapes[0], "ContrastiveLoss bottom 0")
    _, cb, hb, wb = _legacy(shapes[1], "ContrastiveLoss bottom 1")
    _, cy, hy, wy = _legacy(shapes[2], "ContrastiveLoss bottom 2")
    if ca != cb or (ha, wa, hb, wb) != (1, 1, 1, 1):
        raise ShapeError(
            f"ContrastiveLoss needs two N x C (x 1 x 1) features, got {list(shapes[0])} and "
            f"{list(shapes[1])}"
        )
    if (cy, hy, wy) != (1, 1, 1) or count(shapes[2]) < na:
        raise ShapeError(
            f"ContrastiveLoss needs one similarity per pair ({na}), got shape {list(shapes[2])}"
        )
    return [()]


@partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _contrastive(a: Any, b: Any, similar: Any, margin: float, legacy: bool) -> Any:
    return _contrastive_fwd(a, b, similar, margin, legacy)[0]


def _contrastive_fwd(a, b, similar, margin, legacy):
    diff = a - b
    d2 = jnp.sum(diff * diff, axis=1)
    if legacy:
        away = jnp.maximum(margin - d2, 0.0)
    else:
        away = jnp.maximum(margin - jnp.sqrt(d2), 0.0) ** 2
    loss = jnp.sum(jnp.where(similar, d2, away)) / a.shape[0] / 2.0
    return loss, (diff, d2, similar)


def _contrastive_bwd(margin, legacy, res, g):
    # Caffe: similar pairs diff/N; dissimilar pairs -diff/N (legacy) or
    # -(margin - d) / (d + 1e-4) * diff/N, and 0 where the margin term is inactive.
    diff, d2, similar = res
    alpha = g / diff.shape[0]
    if legacy:
        mdist = margin - d2
        beta = -alpha * jnp.ones_like(d2)
    else:
        dist = jnp.sqrt(d2)
        mdist = margin - dist
        beta = -alpha * mdist / (dist + 1e-4)
    coef = jnp.where(similar, alpha, jnp.where(mdist > 0, beta, 0.0))
    grad_a = coef[:, None] * diff
    return grad_a, -grad_a, None


_contrastive.defvjp(_contrastive_fwd, _contrastive_bwd)


def _contrastive_lower(a: ContrastiveAttrs, params, bottoms, ctx):
    x, y, sim = bottoms
    num = x.shape[0]
    similar = _int_labels(sim).reshape(-1)[:num] != 0  # any non-zero int(y) is a similar pair
    loss = _contrastive(x.reshape(num, -1), y.reshape(num, -1), similar, a.margin, a.legacy_version)
    return [loss]


register(
    LayerType(
        name="ContrastiveLoss",
        doc="(sum_similar d^2 + sum_dissimilar max(margin - d, 0)^2) / 2N (legacy_version: "
        "max(margin - d^2, 0)); Caffe's gradient divides by d + 1e-4",
        attrs=lambda m: ContrastiveAttrs(
            float(m.contrastive_loss_param.margin), bool(m.contrastive_loss_param.legacy_version)
        ),
        shape=_contrastive_shape,
        lower=_contrastive_lower,
        flops=_per_element(3),
        n_bottoms=(3, 3),
        param_field="contrastive_loss_param",
        loss=True,
        no_grad_bottoms=(2,),
        family="loss",
    )
)


# ---------------------------------------------------------------- MultinomialLogisticLoss


@partial(jax.custom_vjp, nondiff_argnums=(1,))
def _clamped_log(p: Any, floor: float) -> Any:
    """log(max(p, floor)) whose gradient is 1 / max(p, floor) everywhere (Caffe's Backward)."""
    return jnp.log(jnp.maximum(p, floor))


def _clamped_log_fwd(p, floor):
    q = jnp.maximum(p, floor)
    return jnp.log(q), q


def _clamped_log_bwd(floor, q, g):
    return (g / q,)


_clamped_log.defvjp(_clamped_log_fwd, _clamped_log_bwd)


def _mlogistic_shape(a: Any, shapes: list[Shape]) -> list[Shape]:
    _check_first_dim(shapes)
    _legacy(shapes[0], "MultinomialLogisticLoss bottom 0")
    _, c, h, w = _legacy(shapes[1], "MultinomialLogisticLoss label")
    if (c, h, w) != (1, 1, 1):
        raise ShapeError(
            f"MultinomialLogisticLoss needs one label per sample, got label shape {list(shapes[1])}"
        )
    return [()]


def _mlogistic_lower(a: Any, params, bottoms, ctx):
    p, label = bottoms
    num = p.shape[0]
    lbl = _int_labels(label).reshape(num)
    p_true = jnp.take_along_axis(p.reshape(num, -1), lbl[:, None], axis=1)[:, 0]
    return [-jnp.sum(_clamped_log(p_true, LOG_THRESHOLD)) / num]


register(
    LayerType(
        name="MultinomialLogisticLoss",
        extra={"class_labels": True},  # bottom 1 holds class indices
        doc="takes probabilities: -sum log(max(p[label], 1e-20)) / N",
        attrs=no_attrs,
        shape=_mlogistic_shape,
        lower=_mlogistic_lower,
        flops=lambda a, b, t: 3 * b[0][0] if b[0] else 0,
        n_bottoms=(2, 2),
        loss=True,
        no_grad_bottoms=(1,),
        family="loss",
    )
)


# ---------------------------------------------------------------- InfogainLoss


@dataclass(frozen=True)
class InfogainAttrs:
    axis: int
    ignore_label: int | None
    normalization: str
    source: str
    H: tuple[float, ...] | None  # row-major, float32 values; None when bottom 2 gives H


def _read_blob_values(source: str) -> tuple[float, ...]:
    """The values of a binary BlobProto file, as float32 (Blob::FromProto)."""
    from google.protobuf.message import DecodeError

    from .. import caffe_pb2

    try:
        raw = Path(source).read_bytes()
    except OSError as e:
        raise DataError(
            f"infogain_loss_param.source '{source}' cannot be read ({e.strerror}; relative paths "
            f"are read from the working directory, as in Caffe)"
        ) from None
    blob = caffe_pb2.BlobProto()
    try:
        blob.ParseFromString(raw)
    except DecodeError:
        raise DataError(f"infogain_loss_param.source '{source}' is not a BlobProto") from None
    if any(blob.HasField(f) for f in ("num", "channels", "height", "width")):
        n = blob.num * blob.channels * blob.height * blob.width
    else:
        n = count(blob.shape.dim)
    values = blob.double_data if len(blob.double_data) else blob.data
    if len(values) != n:
        raise DataError(
            f"infogain_loss_param.source '{source}': BlobProto has {len(values)} values for "
            f"a shape of {n} elements"
        )
    return tuple(float(v) for v in np.asarray(values, np.float32))


def _infogain_attrs(msg: Any) -> InfogainAttrs:
    lp, ip = msg.loss_param, msg.infogain_loss_param
    if lp.HasField("normalize"):
        raise GraphError(
            'InfogainLoss refuses loss_param.normalize (deprecated): use "normalization"'
        )
    H = None
    if len(msg.bottom) < 3:
        if not ip.HasField("source"):
            raise GraphError("InfogainLoss needs infogain_loss_param.source or a third bottom (H)")
        H = _read_blob_values(ip.source)
    return InfogainAttrs(
        axis=int(ip.axis),
        ignore_label=_ignore_label(lp),
        normalization=_enum_name(lp, "normalization"),
        source=ip.source,
        H=H,
    )


def _infogain_shape(a: InfogainAttrs, shapes: list[Shape]) -> list[Shape]:
    tops = _class_loss_shape(a, shapes)
    c = shapes[0][canonical_axis(a.axis, len(shapes[0]))]
    n = len(a.H) if a.H is not None else count(shapes[2])
    if n != c * c:
        where = f"'{a.source}'" if a.H is not None else f"bottom 2 {list(shapes[2])}"
        raise ShapeError(f"infogain matrix H must be {c} x {c} ({c * c} values), {where} has {n}")
    return tops


@jax.custom_vjp
def _infogain(x3: Any, labels: Any, valid: Any, normalizer: Any, H: Any) -> Any:
    return _infogain_fwd(x3, labels, valid, normalizer, H)[0]


def _infogain_fwd(x3, labels, valid, normalizer, H):
    prob = _softmax(x3)
    h_rows = jnp.moveaxis(H[labels], -1, 1)  # H[label, :] laid out (outer, C, inner)
    per = jnp.sum(h_rows * jnp.log(jnp.maximum(prob, LOG_THRESHOLD)), axis=1)
    loss = -jnp.sum(jnp.where(valid, per, 0.0)) / normalizer
    return loss, (prob, h_rows, labels, valid, normalizer, H)


def _infogain_bwd(res, g):
    # Caffe: prob * rowsum(H)[label] - H[label, :] at counted positions, times top_diff/normalizer.
    prob, h_rows, labels, valid, normalizer, H = res
    row_sum = jnp.sum(H, axis=1)[labels][:, None, :]
    diff = jnp.where(valid[:, None, :], prob * row_sum - h_rows, 0.0)
    return diff * (g / normalizer), None, None, None, None


_infogain.defvjp(_infogain_fwd, _infogain_bwd)


def _infogain_lower(a: InfogainAttrs, params, bottoms, ctx):
    x, label = bottoms[0], bottoms[1]
    ax, outer, c, inner = _split(x.shape, a.axis, "infogain_loss_param.axis")
    if a.H is not None:
        H = jnp.asarray(np.asarray(a.H, np.float32).reshape(c, c))
    else:
        H = lax.stop_gradient(bottoms[2]).reshape(c, c)
    x3 = x.reshape(outer, c, inner)
    lbl = _int_labels(label).reshape(outer, inner)
    valid = _valid(lbl, a.ignore_label)
    norm = _normalizer(a.normalization, outer, inner, valid)
    loss = _infogain(x3, jnp.where(valid, lbl, 0), valid, norm, H)
    return [loss, lax.stop_gradient(_softmax(x3)).reshape(x.shape)][: len(ctx.top_names) or 1]


register(
    LayerType(
        name="InfogainLoss",
        extra={"class_labels": True},  # bottom 1 holds class indices
        doc="softmax over infogain_loss_param.axis, then -sum_k H[label, k] log(max(p_k, 1e-20)) "
        "/ normalizer; H from a BlobProto file (source) or a third bottom",
        attrs=_infogain_attrs,
        shape=_infogain_shape,
        lower=_infogain_lower,
        flops=_per_element(8),
        n_bottoms=(2, 3),
        n_tops=(1, 2),
        param_field="infogain_loss_param",
        loss=True,
        no_grad_bottoms=(1, 2),
        family="loss",
    )
)


# ---------------------------------------------------------------- Accuracy


@dataclass(frozen=True)
class AccuracyAttrs:
    top_k: int
    axis: int
    ignore_label: int | None


def _accuracy_shape(a: AccuracyAttrs, shapes: list[Shape]) -> list[Shape]:
    n0, n1 = count(shapes[0]), count(shapes[1])
    if n1 == 0 or a.top_k > n0 // n1:
        raise ShapeError(
            f"accuracy_param.top_k {a.top_k} exceeds the number of classes "
            f"({n0} scores / {n1} labels)"
        )
    ax, outer, c, inner = _split(shapes[0], a.axis, "accuracy_param.axis")
    _check_label_count(shapes, outer, inner, a.axis)
    return [(), (c,)]


def _accuracy_lower(a: AccuracyAttrs, params, bottoms, ctx):
    x, label = bottoms
    ax, outer, c, inner = _split(x.shape, a.axis, "accuracy_param.axis")
    x3 = x.reshape(outer, c, inner)
    lbl = _int_labels(label).reshape(outer, inner)
    valid = _valid(lbl, a.ignore_label)
    lbl = jnp.where(valid, lbl, 0)
    true = jnp.take_along_axis(x3, lbl[:, None, :], axis=1)
    # Caffe counts the classes scoring >= the true one (itself included): ties count against it.
    better = jnp.sum(x3 >= true, axis=1) - 1
    hit = valid & (better < a.top_k)
    n = jnp.sum(valid, dtype=jnp.float32)
    acc = jnp.where(n == 0, 0.0, jnp.sum(hit, dtype=jnp.float32) / jnp.maximum(n, 1.0))
    if len(ctx.top_names) < 2:
        return [acc]
    hot = lbl[:, :, None] == jnp.arange(c)[None, None, :]
    per_n = jnp.sum(hot & valid[:, :, None], axis=(0, 1), dtype=jnp.float32)
    per_hit = jnp.sum(hot & hit[:, :, None], axis=(0, 1), dtype=jnp.float32)
    return [acc, jnp.where(per_n == 0, 0.0, per_hit / jnp.maximum(per_n, 1.0))]


register(
    LayerType(
        name="Accuracy",
        extra={"class_labels": True},  # bottom 1 holds class indices
        doc="top_k accuracy over accuracy_param.axis (classes scoring >= the true class count, "
        "so ties count against it); optional per-class top",
        attrs=lambda m: AccuracyAttrs(
            int(m.accuracy_param.top_k),
            int(m.accuracy_param.axis),
            _ignore_label(m.accuracy_param),
        ),
        shape=_accuracy_shape,
        lower=_accuracy_lower,
        flops=_per_element(2),
        n_bottoms=(2, 2),
        n_tops=(1, 2),
        param_field="accuracy_param",
        backward=False,
        no_grad_bottoms=(1,),
        family="loss",
    )
)
