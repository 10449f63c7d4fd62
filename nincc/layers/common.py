"""Common layers: InnerProduct, blob plumbing (Concat, Slice, Split, Flatten, Reshape, Tile,
Silence), Eltwise, Reduction, ArgMax, Softmax, lookups (Embed, BatchReindex, Filter), Parameter.

Shapes and formulas follow Caffe 1.0's ``*_layer.cpp``. Where Caffe's Backward is not what automatic
differentiation of the forward gives (Eltwise PROD's two gradient rules, Reduction ASUM's sign at 0,
Eltwise MAX's tie rule) the lower is written so that ``jax.vjp`` reproduces Caffe's diffs exactly.
Index inputs (Embed, BatchReindex, Filter) are floats holding integers and get no gradient.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ..errors import GraphError, InputError, ShapeError
from .base import (
    BlobSpec,
    Filler,
    LayerType,
    LowerCtx,
    Shape,
    canonical_axis,
    count,
    elementwise_flops,
    no_attrs,
    register,
    repeated,
)

Array = Any
_F32 = np.float32


def _entry(name: str, doc: str, **kw: Any) -> None:
    """Register one layer type of this family."""
    register(LayerType(name=name, doc=doc, family="common", **kw))


def _enum_name(msg: Any, field: str) -> str:
    """The symbolic name of an enum field's value (e.g. "SUM")."""
    enum = type(msg).DESCRIPTOR.fields_by_name[field].enum_type
    return enum.values_by_number[getattr(msg, field)].name


def _fmt(shape: Shape) -> str:
    return str(list(shape))


def _no_inplace(msg: Any, layer_type: str) -> None:
    if len(msg.top) and len(msg.bottom) and msg.top[0] == msg.bottom[0]:
        raise GraphError(f"{layer_type} does not allow in-place computation (top '{msg.top[0]}')")


def _concrete(x: Array) -> np.ndarray | None:
    """The value of ``x`` as a NumPy array, or None when it is only known inside a jit trace."""
    try:
        return np.asarray(lax.stop_gradient(x))
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


def _legacy_or_axis(p: Any, legacy: str, kind: str) -> tuple[int, bool]:
    """(axis, is_legacy) of Concat/Slice: the legacy uint32 field wins; setting both is an error."""
    if p.HasField(legacy) and p.HasField("axis"):
        raise ShapeError(f"{kind}.axis and {kind}.{legacy} are both set; give only one")
    if p.HasField(legacy):
        return int(getattr(p, legacy)), True
    return int(p.axis), False


def _legacy_axis(axis: int, legacy: bool, ndim: int, what: str) -> int:
    """Caffe's axis rule for Concat/Slice: a legacy dim must be in [0, ndim), else canonical."""
    if legacy:
        if not 0 <= axis < ndim:
            raise ShapeError(f"{what} {axis} out of range for a blob with {ndim} axes")
        return axis
    return canonical_axis(axis, ndim, what)


# ---------------------------------------------------------------- InnerProduct


@dataclass(frozen=True)
class InnerProductAttrs:
    num_output: int
    bias_term: bool
    axis: int
    transpose: bool
    weight_filler: Filler
    bias_filler: Filler


def _ip_attrs(msg: Any) -> InnerProductAttrs:
    p = msg.inner_product_param
    if p.num_output <= 0:
        raise ShapeError(f"inner_product_param.num_output must be > 0, got {p.num_output}")
    return InnerProductAttrs(
        num_output=int(p.num_output),
        bias_term=bool(p.bias_term),
        axis=int(p.axis),
        transpose=bool(p.transpose),
        weight_filler=Filler.from_proto(p.weight_filler),
        bias_filler=Filler.from_proto(p.bias_filler),
    )


def _ip_axis(a: InnerProductAttrs, shape: Shape) -> int:
    return canonical_axis(a.axis, len(shape), "inner_product_param.axis")


def _ip_shape(a: InnerProductAttrs, bottom_shapes: list[Shape]) -> list[Shape]:
    b = tuple(bottom_shapes[0])
    return [b[: _ip_axis(a, b)] + (a.num_output,)]


def _ip_blobs(a: InnerProductAttrs, bottom_shapes: list[Shape]) -> list[BlobSpec]:
    b = tuple(bottom_shapes[0])
    k = count(b, _ip_axis(a, b))
    weight = (k, a.num_output) if a.transpose else (a.num_output, k)
    specs = [BlobSpec(weight, a.weight_filler)]
    if a.bias_term:
        specs.append(BlobSpec((a.num_output,), a.bias_filler))
    return specs


def _ip_lower(a: InnerProductAttrs, params, bottoms, ctx):
    x, w = bottoms[0], params[0]
    axis = _ip_axis(a, x.shape)
    m, k = count(x.shape, 0, axis), count(x.shape, axis)
    # The axes from `axis` on flatten in C-order into K, as Caffe's row-major GEMM reads them.
    x2 = x.reshape(m, k)
    y = x2 @ w if a.transpose else x2 @ w.T
    if a.bias_term:
        y = y + params[1].reshape(1, a.num_output)
    return [y.reshape(tuple(x.shape[:axis]) + (a.num_output,))]


def _ip_flops(a: InnerProductAttrs, bottom_shapes: list[Shape], top_shapes: list[Shape]) -> int:
    b = tuple(bottom_shapes[0])
    axis = _ip_axis(a, b)
    m, k, n = count(b, 0, axis), count(b, axis), a.num_output
    return 2 * m * k * n + (m * n if a.bias_term else 0)


_entry(
    "InnerProduct",
    "fully connected: axes from `axis` on flatten (C-order) to K; y = x W^T + b, W (out, in) "
    "or (in, out) with transpose",
    attrs=_ip_attrs,
    shape=_ip_shape,
    blobs=_ip_blobs,
    lower=_ip_lower,
    flops=_ip_flops,
    param_field="inner_product_param",
)


# ---------------------------------------------------------------- Concat


@dataclass(frozen=True)
class ConcatAttrs:
    axis: int
    legacy: bool  # the value came from concat_dim (no negative indexing)


def _concat_attrs(msg: Any) -> ConcatAttrs:
    return ConcatAttrs(*_legacy_or_axis(msg.concat_param, "concat_dim", "concat_param"))


def _concat_axis(a: ConcatAttrs, bottom_shapes: list[Shape]) -> int:
    ndim = len(bottom_shapes[0])
    what = "concat_param.concat_dim" if a.legacy else "concat_param.axis"
    return _legacy_axis(a.axis, a.legacy, ndim, what)


def _concat_shape(a: ConcatAttrs, bottom_shapes: list[Shape]) -> list[Shape]:
    first = tuple(bottom_shapes[0])
    axis = _concat_axis(a, bottom_shapes)
    total = 0
    for i, s in enumerate(bottom_shapes):
        s = tuple(s)
        if len(s) != len(first):
            raise ShapeError(
                f"Concat bottoms need the same number of axes: bottom 0 is {_fmt(first)}, "
                f"bottom {i} is {_fmt(s)}"
            )
        if s[:axis] + s[axis + 1 :] != first[:axis] + first[axis + 1 :]:
            raise ShapeError(
                f"Concat along axis {axis} needs equal sizes on every other axis: bottom 0 is "
                f"{_fmt(first)}, bottom {i} is {_fmt(s)}"
            )
        total += s[axis]
    return [first[:axis] + (total,) + first[axis + 1 :]]


def _concat_lower(a: ConcatAttrs, params, bottoms, ctx):
    if len(bottoms) == 1:
        return [bottoms[0]]
    axis = _concat_axis(a, [tuple(b.shape) for b in bottoms])
    return [jnp.concatenate(bottoms, axis=axis)]


_entry(
    "Concat",
    "join bottoms along `axis` (legacy concat_dim); all other axes must match",
    attrs=_concat_attrs,
    shape=_concat_shape,
    lower=_concat_lower,
    n_bottoms=(1, None),
    param_field="concat_param",
)


# ---------------------------------------------------------------- Slice


@dataclass(frozen=True)
class SliceAttrs:
    axis: int
    legacy: bool  # the value came from slice_dim (no negative indexing)
    slice_points: tuple[int, ...]
    n_tops: int


def _slice_attrs(msg: Any) -> SliceAttrs:
    p = msg.slice_param
    axis, legacy = _legacy_or_axis(p, "slice_dim", "slice_param")
    return SliceAttrs(axis, legacy, tuple(int(v) for v in repeated(p, "slice_point")), len(msg.top))


def _slice_sizes(a: SliceAttrs, shape: Shape) -> tuple[int, list[int]]:
    """(axis, size of each top along it), with Caffe's checks."""
    what = "slice_param.slice_dim" if a.legacy else "slice_param.axis"
    axis = _legacy_axis(a.axis, a.legacy, len(shape), what)
    dim, n = int(shape[axis]), a.n_tops
    if not a.slice_points:
        if dim % n:
            raise ShapeError(
                f"Slice into {n} equal parts needs axis {axis} of {_fmt(shape)} divisible by {n}"
            )
        return axis, [dim // n] * n
    points = a.slice_points
    if len(points) != n - 1:
        raise ShapeError(
            f"Slice with {n} tops needs {n - 1} slice_point values, got {len(points)}: "
            f"{list(points)}"
        )
    if n > dim:
        raise ShapeError(f"Slice into {n} tops needs axis {axis} of {_fmt(shape)} to be >= {n}")
    sizes, prev = [], 0
    for pt in points:
        if pt <= prev:
            raise ShapeError(f"slice_point values must be increasing and > 0, got {list(points)}")
        sizes.append(pt - prev)
        prev = pt
    if prev > dim:
        raise ShapeError(f"slice_point {prev} is beyond axis {axis} of {_fmt(shape)} (size {dim})")
    sizes.append(dim - prev)
    return axis, sizes


def _slice_shape(a: SliceAttrs, bottom_shapes: list[Shape]) -> list[Shape]:
    b = tuple(bottom_shapes[0])
    axis, sizes = _slice_sizes(a, b)
    return [b[:axis] + (s,) + b[axis + 1 :] for s in sizes]


def _slice_lower(a: SliceAttrs, params, bottoms, ctx):
    x = bottoms[0]
    axis, sizes = _slice_sizes(a, tuple(x.shape))
    tops, start = [], 0
    for s in sizes:
        tops.append(lax.slice_in_dim(x, start, start + s, axis=axis))
        start += s
    return tops


_entry(
    "Slice",
    "cut the bottom along `axis` (legacy slice_dim) at slice_point, or into equal parts",
    attrs=_slice_attrs,
    shape=_slice_shape,
    lower=_slice_lower,
    n_tops=(1, None),
    param_field="slice_param",
)


# ---------------------------------------------------------------- Split


@dataclass(frozen=True)
class SplitAttrs:
    n_tops: int | None  # None for the splits the graph builder inserts (count from the graph)


def _split_attrs(msg: Any) -> SplitAttrs:
    return SplitAttrs(None if msg is None else len(msg.top))


def _split_shape(a: SplitAttrs, bottom_shapes: list[Shape]) -> list[Shape]:
    """One top shaped like the bottom per top (one when the count is not in the attrs)."""
    return [tuple(bottom_shapes[0])] * (a.n_tops or 1)


def _split_lower(a: SplitAttrs, params, bottoms, ctx: LowerCtx):
    n = a.n_tops or len(ctx.top_shapes) or len(ctx.top_names) or 1
    return [bottoms[0]] * n


_entry(
    "Split",
    "copy the bottom to every top; Backward sums the tops' diffs",
    attrs=_split_attrs,
    shape=_split_shape,
    lower=_split_lower,
    n_tops=(1, None),
)


# ---------------------------------------------------------------- Eltwise


@dataclass(frozen=True)
class EltwiseAttrs:
    operation: str  # PROD, SUM or MAX
    coeffs: tuple[float, ...]
    stable_prod_grad: bool


def _eltwise_attrs(msg: Any) -> EltwiseAttrs:
    p = msg.eltwise_param
    op = _enum_name(p, "operation")
    coeffs = tuple(float(c) for c in repeated(p, "coeff"))
    if coeffs and op != "SUM":
        raise ShapeError(f"eltwise_param.coeff is only allowed with operation SUM, not {op}")
    return EltwiseAttrs(op, coeffs, bool(p.stable_prod_grad))


def _eltwise_shape(a: EltwiseAttrs, bottom_shapes: list[Shape]) -> list[Shape]:
    first = tuple(bottom_shapes[0])
    if a.coeffs and len(a.coeffs) != len(bottom_shapes):
        raise ShapeError(
            f"Eltwise takes one coeff per bottom: {len(bottom_shapes)} bottoms, "
            f"{len(a.coeffs)} coeffs"
        )
    for i, s in enumerate(bottom_shapes[1:], start=1):
        if tuple(s) != first:
            raise ShapeError(
                f"Eltwise bottoms must have equal shapes: bottom 0 is {_fmt(first)}, "
                f"bottom {i} is {_fmt(tuple(s))}"
            )
    return [first]


def _prod(stable: bool):
    """The product of the bottoms with Caffe's PROD Backward, literally.

    stable: the diff of bottom i is the product of the other bottoms (in bottom order) times the
    top diff; otherwise it is top / bottom_i * top diff (inf/NaN where bottom_i is 0, as in Caffe).
    """

    def forward(*xs):
        y = xs[0] * xs[1]
        for x in xs[2:]:
            y = y * x
        return y

    @jax.custom_vjp
    def prod(*xs):
        return forward(*xs)

    def fwd(*xs):
        y = forward(*xs)
        return y, (xs, y)

    def bwd(res, g):
        xs, y = res
        grads = []
        for i, xi in enumerate(xs):
            if stable:
                others = [x for j, x in enumerate(xs) if j != i]
                d = others[0]
                for x in others[1:]:
                    d = d * x
            else:
                d = y / xi
            grads.append(d * g)
        return tuple(grads)

    prod.defvjp(fwd, bwd)
    return prod


_PROD = {True: _prod(True), False: _prod(False)}


def _eltwise_max(xs: list[Array]) -> Array:
    """Caffe's MAX: bottoms 0 and 1 compared with a > b (a tie goes to bottom 1); a later bottom
    replaces the maximum only if strictly greater. Nested where routes the diff to the winner."""
    y = jnp.where(xs[0] > xs[1], xs[0], xs[1])
    for x in xs[2:]:
        y = jnp.where(x > y, x, y)
    return y


def _eltwise_lower(a: EltwiseAttrs, params, bottoms, ctx):
    if a.operation == "PROD":
        return [_PROD[a.stable_prod_grad](*bottoms)]
    if a.operation == "MAX":
        return [_eltwise_max(list(bottoms))]
    coeffs = a.coeffs or (1.0,) * len(bottoms)
    terms = [x if c == 1.0 else x * float(_F32(c)) for c, x in zip(coeffs, bottoms, strict=True)]
    y = terms[0]
    for t in terms[1:]:
        y = y + t
    return [y]


def _eltwise_flops(a: EltwiseAttrs, bottom_shapes: list[Shape], top_shapes: list[Shape]) -> int:
    n, per = len(bottom_shapes), len(bottom_shapes) - 1
    if a.operation == "SUM":
        per += sum(c != 1.0 for c in a.coeffs[:n])
    return per * count(top_shapes[0])


_entry(
    "Eltwise",
    "element-wise PROD, SUM (with coeffs) or MAX (tie of bottoms 0/1 goes to 1, later bottoms "
    "win only if greater)",
    attrs=_eltwise_attrs,
    shape=_eltwise_shape,
    lower=_eltwise_lower,
    flops=_eltwise_flops,
    n_bottoms=(2, None),
    param_field="eltwise_param",
)


# ---------------------------------------------------------------- Flatten and Reshape


@dataclass(frozen=True)
class FlattenAttrs:
    axis: int
    end_axis: int


def _flatten_attrs(msg: Any) -> FlattenAttrs:
    _no_inplace(msg, "Flatten")
    p = msg.flatten_param
    return FlattenAttrs(int(p.axis), int(p.end_axis))


def _flatten_shape(a: FlattenAttrs, bottom_shapes: list[Shape]) -> list[Shape]:
    b = tuple(bottom_shapes[0])
    start = canonical_axis(a.axis, len(b), "flatten_param.axis")
    end = canonical_axis(a.end_axis, len(b), "flatten_param.end_axis")
    if end < start:
        raise ShapeError(
            f"flatten_param.end_axis {a.end_axis} comes before axis {a.axis} for {_fmt(b)}"
        )
    return [b[:start] + (count(b, start, end + 1),) + b[end + 1 :]]


def _flatten_lower(a: FlattenAttrs, params, bottoms, ctx):
    x = bottoms[0]
    return [x.reshape(_flatten_shape(a, [tuple(x.shape)])[0])]


_entry(
    "Flatten",
    "merge axes axis..end_axis into one (C-order); no in-place",
    attrs=_flatten_attrs,
    shape=_flatten_shape,
    lower=_flatten_lower,
    param_field="flatten_param",
)


@dataclass(frozen=True)
class ReshapeAttrs:
    dims: tuple[int, ...]
    axis: int
    num_axes: int


def _reshape_attrs(msg: Any) -> ReshapeAttrs:
    p = msg.reshape_param
    dims = tuple(int(d) for d in p.shape.dim)
    if sum(d == -1 for d in dims) > 1:
        raise ShapeError(f"reshape_param.shape {list(dims)} has more than one -1 (inferred) dim")
    if any(d < -1 for d in dims):
        raise ShapeError(f"reshape_param.shape {list(dims)} has a dim below -1")
    if p.num_axes < -1:
        raise ShapeError(f"reshape_param.num_axes must be >= 0, or -1 for all; got {p.num_axes}")
    return ReshapeAttrs(dims, int(p.axis), int(p.num_axes))


def _reshape_shape(a: ReshapeAttrs, bottom_shapes: list[Shape]) -> list[Shape]:
    b = tuple(int(d) for d in bottom_shapes[0])
    ndim = len(b)
    start = a.axis if a.axis >= 0 else ndim + a.axis + 1
    if not 0 <= start <= ndim:
        raise ShapeError(f"reshape_param.axis {a.axis} out of range for a {ndim}-axis bottom")
    end = ndim if a.num_axes == -1 else start + a.num_axes
    if end > ndim:
        raise ShapeError(
            f"reshape_param.axis + num_axes = {end} is beyond the {ndim} axes of {_fmt(b)}"
        )
    new = list(a.dims)
    for i, d in enumerate(a.dims):
        if d == 0:  # copy the bottom's dim at the same position
            if start + i >= ndim:
                raise ShapeError(
                    f"reshape_param.shape {list(a.dims)} has a 0 at position {i} but {_fmt(b)} "
                    "has no axis there to copy"
                )
            new[i] = b[start + i]
    total = count(b)
    if -1 in a.dims:
        explicit = count(b, 0, start) * count(b, end) * count([d for d in new if d != -1])
        if explicit == 0 or total % explicit:
            raise ShapeError(
                f"Reshape of {_fmt(b)} ({total} elements) to {list(a.dims)}: {total} is not "
                f"divisible by the product of the given dims ({explicit})"
            )
        new[a.dims.index(-1)] = total // explicit
    top = b[:start] + tuple(new) + b[end:]
    if count(top) != total:
        raise ShapeError(
            f"Reshape of {_fmt(b)} ({total} elements) to {_fmt(top)} ({count(top)} elements): "
            "the counts differ"
        )
    return [top]


def _reshape_lower(a: ReshapeAttrs, params, bottoms, ctx):
    x = bottoms[0]
    return [x.reshape(_reshape_shape(a, [tuple(x.shape)])[0])]


_entry(
    "Reshape",
    "new shape over axes [axis, axis + num_axes): 0 copies the bottom's dim, -1 is inferred",
    attrs=_reshape_attrs,
    shape=_reshape_shape,
    lower=_reshape_lower,
    param_field="reshape_param",
)


# ---------------------------------------------------------------- Tile


@dataclass(frozen=True)
class TileAttrs:
    axis: int
    tiles: int


def _tile_attrs(msg: Any) -> TileAttrs:
    p = msg.tile_param
    if not p.HasField("tiles") or p.tiles <= 0:
        got = p.tiles if p.HasField("tiles") else "nothing"
        raise ShapeError(f"tile_param.tiles must be given and > 0, got {got}")
    return TileAttrs(int(p.axis), int(p.tiles))


def _tile_axis(a: TileAttrs, shape: Shape) -> int:
    return canonical_axis(a.axis, len(shape), "tile_param.axis")


def _tile_shape(a: TileAttrs, bottom_shapes: list[Shape]) -> list[Shape]:
    b = tuple(bottom_shapes[0])
    axis = _tile_axis(a, b)
    return [b[:axis] + (b[axis] * a.tiles,) + b[axis + 1 :]]


def _tile_lower(a: TileAttrs, params, bottoms, ctx):
    x = bottoms[0]
    axis = _tile_axis(a, x.shape)
    # Caffe repeats the whole block of axes [axis, end) `tiles` times: np.tile along `axis`.
    reps = (1,) * axis + (a.tiles,) + (1,) * (x.ndim - axis - 1)
    return [jnp.tile(x, reps)]


_entry(
    "Tile",
    "repeat the bottom `tiles` times along `axis` (the block of axes from `axis` on)",
    attrs=_tile_attrs,
    shape=_tile_shape,
    lower=_tile_lower,
    param_field="tile_param",
)


# ---------------------------------------------------------------- Reduction


@dataclass(frozen=True)
class ReductionAttrs:
    operation: str  # SUM, ASUM, SUMSQ or MEAN
    axis: int
    coeff: float


def _reduction_attrs(msg: Any) -> ReductionAttrs:
    p = msg.reduction_param
    return ReductionAttrs(_enum_name(p, "operation"), int(p.axis), float(p.coeff))


def _reduction_axis(a: ReductionAttrs, shape: Shape) -> int:
    return canonical_axis(a.axis, len(shape), "reduction_param.axis")


def _reduction_shape(a: ReductionAttrs, bottom_shapes: list[Shape]) -> list[Shape]:
    b = tuple(bottom_shapes[0])
    return [b[: _reduction_axis(a, b)]]


def _reduction_lower(a: ReductionAttrs, params, bottoms, ctx):
    x = bottoms[0]
    axis = _reduction_axis(a, x.shape)
    num, dim = count(x.shape, 0, axis), count(x.shape, axis)
    x2 = x.reshape(num, dim)
    if a.operation == "ASUM":
        # |x| as x * sign(x): Caffe's Backward uses sign(x), which is 0 at x == 0.
        y = jnp.sum(x2 * lax.stop_gradient(jnp.sign(x2)), axis=1)
    elif a.operation == "SUMSQ":
        y = jnp.sum(x2 * x2, axis=1)
    else:  # SUM, MEAN
        y = jnp.sum(x2, axis=1)
    coeff = _F32(a.coeff)
    if a.operation == "MEAN":
        coeff = coeff / _F32(dim)  # Caffe folds 1/dim into coeff, in float32
    if coeff != 1:
        y = y * float(coeff)
    return [y.reshape(tuple(x.shape[:axis]))]


def _reduction_flops(a: ReductionAttrs, bottom_shapes: list[Shape], top_shapes: list[Shape]) -> int:
    per = 1 if a.operation in ("SUM", "MEAN") else 2  # add (, abs or square)
    scale = count(top_shapes[0]) if (a.coeff != 1.0 or a.operation == "MEAN") else 0
    return per * count(bottom_shapes[0]) + scale


_entry(
    "Reduction",
    "SUM, ASUM, SUMSQ or MEAN over all axes from `axis` on, times coeff; top is shape[:axis]",
    attrs=_reduction_attrs,
    shape=_reduction_shape,
    lower=_reduction_lower,
    flops=_reduction_flops,
    param_field="reduction_param",
)


# ---------------------------------------------------------------- ArgMax


@dataclass(frozen=True)
class ArgMaxAttrs:
    out_max_val: bool
    top_k: int
    axis: int | None  # None: per sample over the flattened axes 1..end


def _argmax_attrs(msg: Any) -> ArgMaxAttrs:
    p = msg.argmax_param
    if p.top_k < 1:
        raise ShapeError(f"argmax_param.top_k must be >= 1, got {p.top_k}")
    axis = int(p.axis) if p.HasField("axis") else None
    return ArgMaxAttrs(bool(p.out_max_val), int(p.top_k), axis)


def _argmax_shape(a: ArgMaxAttrs, bottom_shapes: list[Shape]) -> list[Shape]:
    b = tuple(bottom_shapes[0])
    if a.axis is not None:
        axis = canonical_axis(a.axis, len(b), "argmax_param.axis")
        if a.top_k > b[axis]:
            raise ShapeError(
                f"argmax_param.top_k {a.top_k} exceeds axis {axis} of {_fmt(b)} ({b[axis]})"
            )
        return [b[:axis] + (a.top_k,) + b[axis + 1 :]]
    if len(b) < 1:
        raise ShapeError("ArgMax without argmax_param.axis needs a bottom with a batch axis")
    if a.top_k > count(b, 1):
        raise ShapeError(
            f"argmax_param.top_k {a.top_k} exceeds the {count(b, 1)} values per sample of {_fmt(b)}"
        )
    # (N, 1 or 2, top_k), padded with 1s to the bottom's number of axes
    top = [1] * max(len(b), 3)
    top[0], top[1], top[2] = b[0], 2 if a.out_max_val else 1, a.top_k
    return [tuple(top)]


def _top_k_last(x: Array, k: int) -> tuple[Array, Array]:
    """Values and indices of the k largest along the last axis, ranked as Caffe's std::greater on
    (value, index) pairs: equal values list the larger index first."""
    dim = x.shape[-1]
    rev = jnp.flip(x, axis=-1)  # a stable descending sort of the reversed row puts ties high-first
    order = jnp.argsort(rev, axis=-1, descending=True, stable=True)[..., :k]
    values = jnp.take_along_axis(rev, order, axis=-1)
    return values, (dim - 1 - order).astype(x.dtype)


def _argmax_lower(a: ArgMaxAttrs, params, bottoms, ctx):
    x = lax.stop_gradient(bottoms[0])
    top_shape = _argmax_shape(a, [tuple(x.shape)])[0]
    if a.axis is not None:
        axis = canonical_axis(a.axis, x.ndim)
        values, index = _top_k_last(jnp.moveaxis(x, axis, -1), a.top_k)
        out = values if a.out_max_val else index
        return [jnp.moveaxis(out, -1, axis)]
    values, index = _top_k_last(x.reshape(x.shape[0], -1), a.top_k)
    parts = [index, values] if a.out_max_val else [index]
    return [jnp.stack(parts, axis=1).reshape(top_shape)]


def _argmax_flops(a: ArgMaxAttrs, bottom_shapes: list[Shape], top_shapes: list[Shape]) -> int:
    return count(bottom_shapes[0])  # one comparison per input (top_k = 1); more for a larger k


_entry(
    "ArgMax",
    "indices (and/or values) of the top_k largest per sample or along `axis`; ties rank the "
    "larger index first; no Backward",
    attrs=_argmax_attrs,
    shape=_argmax_shape,
    lower=_argmax_lower,
    flops=_argmax_flops,
    backward=False,
    param_field="argmax_param",
)


# ---------------------------------------------------------------- Silence


_entry(
    "Silence",
    "consume bottoms, produce nothing; Backward writes zero diffs",
    attrs=no_attrs,
    shape=lambda a, bottom_shapes: [],
    lower=lambda a, params, bottoms, ctx: [],
    n_bottoms=(1, None),
    n_tops=(0, 0),
)


# ---------------------------------------------------------------- Softmax


@dataclass(frozen=True)
class SoftmaxAttrs:
    axis: int


def _softmax_shape(a: SoftmaxAttrs, bottom_shapes: list[Shape]) -> list[Shape]:
    b = tuple(bottom_shapes[0])
    canonical_axis(a.axis, len(b), "softmax_param.axis")
    return [b]


def _softmax_lower(a: SoftmaxAttrs, params, bottoms, ctx):
    x = bottoms[0]
    return [jax.nn.softmax(x, axis=canonical_axis(a.axis, x.ndim))]


_entry(
    "Softmax",
    "exp(x - max) / sum exp(x - max) along `axis`",
    attrs=lambda m: SoftmaxAttrs(int(m.softmax_param.axis)),
    shape=_softmax_shape,
    lower=_softmax_lower,
    flops=elementwise_flops(5),  # max, subtract, exp, sum, divide
    param_field="softmax_param",
)


# ---------------------------------------------------------------- Embed


@dataclass(frozen=True)
class EmbedAttrs:
    num_output: int
    input_dim: int
    bias_term: bool
    weight_filler: Filler
    bias_filler: Filler


def _embed_attrs(msg: Any) -> EmbedAttrs:
    p = msg.embed_param
    for field in ("num_output", "input_dim"):
        if getattr(p, field) <= 0:
            raise ShapeError(f"embed_param.{field} must be > 0, got {getattr(p, field)}")
    return EmbedAttrs(
        num_output=int(p.num_output),
        input_dim=int(p.input_dim),
        bias_term=bool(p.bias_term),
        weight_filler=Filler.from_proto(p.weight_filler),
        bias_filler=Filler.from_proto(p.bias_filler),
    )


def _embed_blobs(a: EmbedAttrs, bottom_shapes: list[Shape]) -> list[BlobSpec]:
    specs = [BlobSpec((a.input_dim, a.num_output), a.weight_filler)]
    if a.bias_term:
        specs.append(BlobSpec((a.num_output,), a.bias_filler))
    return specs


def _embed_lower(a: EmbedAttrs, params, bottoms, ctx):
    # Indices are floats truncated to int; an out-of-range index reads NaN (Caffe reads garbage).
    idx = lax.stop_gradient(bottoms[0]).astype(jnp.int32)
    y = jnp.take(params[0], idx, axis=0, mode="fill", fill_value=jnp.nan)
    if a.bias_term:
        y = y + params[1].reshape((1,) * idx.ndim + (a.num_output,))
    return [y]


_entry(
    "Embed",
    "lookup table: row int(x) of W (input_dim, num_output), plus bias; no diff to the indices",
    attrs=_embed_attrs,
    shape=lambda a, bottom_shapes: [tuple(bottom_shapes[0]) + (a.num_output,)],
    blobs=_embed_blobs,
    lower=_embed_lower,
    flops=lambda a, b, t: count(t[0]) if a.bias_term else 0,
    no_grad_bottoms=(0,),
    param_field="embed_param",
)


# ---------------------------------------------------------------- BatchReindex


def _reindex_shape(a: None, bottom_shapes: list[Shape]) -> list[Shape]:
    b, idx = tuple(bottom_shapes[0]), tuple(bottom_shapes[1])
    if len(idx) != 1:
        raise ShapeError(f"BatchReindex indices (bottom 1) must be 1-D, got shape {_fmt(idx)}")
    if len(b) < 1:
        raise ShapeError("BatchReindex bottom 0 must have at least one axis, got a scalar")
    return [idx + b[1:]]


def _reindex_lower(a: None, params, bottoms, ctx: LowerCtx):
    x = bottoms[0]
    idx = lax.stop_gradient(bottoms[1])
    known = _concrete(idx)
    if known is not None and known.size and (known.min() < 0 or known.max() >= x.shape[0]):
        bad = known[(known < 0) | (known >= x.shape[0])][0]
        raise InputError(
            f"layer '{ctx.layer_name}' (BatchReindex): index {bad:g} is outside the batch of "
            f"{x.shape[0]}"
        )
    # take's transpose is a scatter-add: repeated indices sum their diffs, as Caffe's Backward.
    return [jnp.take(x, idx.astype(jnp.int32), axis=0, mode="fill", fill_value=jnp.nan)]


_entry(
    "BatchReindex",
    "gather rows of bottom 0 (axis 0) by the indices in bottom 1; Backward scatter-adds",
    attrs=no_attrs,
    shape=_reindex_shape,
    lower=_reindex_lower,
    n_bottoms=(2, 2),
    no_grad_bottoms=(1,),
)


# ---------------------------------------------------------------- Filter


def _filter_attrs(msg: Any) -> None:
    if len(msg.top) != len(msg.bottom) - 1:
        raise GraphError(
            f"Filter needs one top per filtered bottom (all bottoms but the last, the selector): "
            f"{len(msg.bottom)} bottoms, {len(msg.top)} tops"
        )
    return None


def _filter_shape(a: None, bottom_shapes: list[Shape]) -> list[Shape]:
    """The bottoms' shapes: an upper bound, as Caffe's set-up gives (the real number of rows is
    the number of non-zero selector entries, known only from the data)."""
    sel = tuple(bottom_shapes[-1])
    if len(sel) < 1 or any(d != 1 for d in sel[1:]):
        raise ShapeError(
            f"Filter selector (last bottom) must be (N) or (N, 1, ...), got shape {_fmt(sel)}"
        )
    for i, s in enumerate(bottom_shapes[:-1]):
        if len(s) < 1 or s[0] != sel[0]:
            raise ShapeError(
                f"Filter bottom {i} {_fmt(tuple(s))} must have as many rows as the selector "
                f"{_fmt(sel)}"
            )
    return [tuple(s) for s in bottom_shapes[:-1]]


def _filter_lower(a: None, params, bottoms, ctx: LowerCtx):
    selector = _concrete(bottoms[-1])
    if selector is None:
        raise InputError(
            f"layer '{ctx.layer_name}' (Filter): its output shape depends on the selector's "
            "values, which must be concrete arrays (run the net without jax.jit)"
        )
    keep = np.flatnonzero(selector.reshape(-1))  # the selector's other axes are all 1
    # Rows not kept get a zero diff; kept rows get their top diff back (take's transpose).
    return [jnp.take(x, jnp.asarray(keep, jnp.int32), axis=0) for x in bottoms[:-1]]


_entry(
    "Filter",
    "keep the rows (axis 0) whose selector (last bottom) is non-zero; output rows depend on "
    "data (shape is an upper bound)",
    attrs=_filter_attrs,
    shape=_filter_shape,
    lower=_filter_lower,
    n_bottoms=(2, None),
    n_tops=(1, None),
    no_grad_bottoms=(-1,),
    extra={"data_dependent_shape": True},
)


# ---------------------------------------------------------------- Parameter


@dataclass(frozen=True)
class ParameterAttrs:
    shape: Shape


def _parameter_attrs(msg: Any) -> ParameterAttrs:
    dims = tuple(int(d) for d in msg.parameter_param.shape.dim)
    if any(d < 0 for d in dims):
        raise ShapeError(f"parameter_param.shape {list(dims)} has a negative dim")
    return ParameterAttrs(dims)


_entry(
    "Parameter",
    "a learned blob of parameter_param.shape exposed as the top (Caffe fills it with zeros)",
    attrs=_parameter_attrs,
    shape=lambda a, bottom_shapes: [a.shape],
    # Caffe allocates the blob without a filler: zeros.
    blobs=lambda a, bottom_shapes: [BlobSpec(a.shape, Filler("constant", 0.0))],
    lower=lambda a, params, bottoms, ctx: [params[0]],
    n_bottoms=(0, 0),
    param_field="parameter_param",
)
