"""Common layers against naive NumPy loops of Caffe's Forward/Backward and real-Caffe fixtures."""

from __future__ import annotations

import itertools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from google.protobuf import text_format

from nincc import caffe_pb2
from nincc.errors import GraphError, InputError, ShapeError
from nincc.layers.base import REGISTRY, LowerCtx

from ..conftest import fixture_case

RNG = np.random.default_rng(7)

# ---------------------------------------------------------------- helpers


def layer(text: str) -> caffe_pb2.LayerParameter:
    return text_format.Parse(text, caffe_pb2.LayerParameter())


def setup(text: str):
    msg = layer(text)
    entry = REGISTRY[msg.type]
    return msg, entry, entry.attrs(msg)


def run(text, bottoms, params=(), topdiffs=None, jit=True):
    """Tops of one layer (and with topdiffs the bottom and param diffs), as float64 arrays.

    Also checks the tops against the entry's shape rule and its blob specs against ``params``.
    """
    msg, entry, attrs = setup(text)
    bshapes = [tuple(np.shape(b)) for b in bottoms]
    tshapes = entry.shape(attrs, bshapes)
    assert [s.shape for s in entry.blobs(attrs, bshapes)] == [np.shape(p) for p in params]
    ctx = LowerCtx("TEST", msg.name or "l", top_names=tuple(msg.top), top_shapes=tshapes)

    def f(ps, bs):
        return entry.lower(attrs, list(ps), list(bs), ctx)

    ps = [jnp.asarray(p, jnp.float32) for p in params]
    bs = [jnp.asarray(b, jnp.float32) for b in bottoms]
    tops, vjp = jax.vjp(jax.jit(f) if jit else f, ps, bs)
    if not entry.extra.get("data_dependent_shape"):
        assert [tuple(t.shape) for t in tops] == [tuple(s) for s in tshapes]
    out = [np.asarray(t, np.float64) for t in tops]
    if topdiffs is None:
        return out
    dps, dbs = vjp([jnp.asarray(d, jnp.float32) for d in topdiffs])
    return out, [np.asarray(d, np.float64) for d in dbs], [np.asarray(d, np.float64) for d in dps]


def close(got, ref, rel=1e-5, what=""):
    """The fixtures' rule: |got - ref| <= rel * max|ref| elementwise (exact when ref is 0)."""
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    assert got.shape == ref.shape, f"{what}: shape {got.shape} != {ref.shape}"
    scale = float(np.max(np.abs(ref))) if ref.size else 0.0
    err = float(np.max(np.abs(got - ref))) if ref.size else 0.0
    assert err <= rel * scale or (scale == 0 and err == 0), f"{what}: err {err} scale {scale}"


def rand(*shape):
    return RNG.standard_normal(shape).astype(np.float32).astype(np.float64)


def shape_error(text, bshapes, *fragments):
    """Assert that the layer's attrs or shape rule raises ShapeError naming every fragment."""
    with pytest.raises(ShapeError) as info:
        _, entry, attrs = setup(text)
        entry.shape(attrs, bshapes)
    for frag in fragments:
        assert frag in str(info.value), str(info.value)


# ---------------------------------------------------------------- InnerProduct


def naive_ip(x, w, b, axis, transpose, dy):
    """Loops over (m, n, k) of Caffe's GEMM after flattening axes [axis, end) in C order."""
    lead = x.shape[:axis]
    x2 = x.reshape(int(np.prod(lead, dtype=int)), -1)
    wn = w.T if transpose else w  # (N, K)
    m_, k_ = x2.shape
    n_ = wn.shape[0]
    dy2 = dy.reshape(m_, n_)
    y = np.zeros((m_, n_))
    dx, dwn, db = np.zeros_like(x2), np.zeros_like(wn), np.zeros(n_)
    for m, n in itertools.product(range(m_), range(n_)):
        y[m, n] = (b[n] if b is not None else 0.0) + sum(x2[m, k] * wn[n, k] for k in range(k_))
        db[n] += dy2[m, n]
        for k in range(k_):
            dx[m, k] += dy2[m, n] * wn[n, k]
            dwn[n, k] += dy2[m, n] * x2[m, k]
    dw = dwn.T if transpose else dwn
    return y.reshape(*lead, n_), dx.reshape(x.shape), dw, db


@pytest.mark.parametrize(
    "shape,axis,transpose,bias",
    [((2, 3, 2, 2), 1, False, True), ((2, 3, 4), 2, True, True), ((3, 2, 2), -2, False, False),
     ((4, 5), 0, True, False)],
)  # fmt: skip
def test_inner_product(shape, axis, transpose, bias):
    n_out = 3
    k = int(np.prod(shape[axis % len(shape) :]))
    w = rand(k, n_out) if transpose else rand(n_out, k)
    params = [w, rand(n_out)] if bias else [w]
    text = (
        f'type: "InnerProduct" inner_product_param {{ num_output: {n_out} axis: {axis} '
        f"transpose: {str(transpose).lower()} bias_term: {str(bias).lower()} }}"
    )
    x = rand(*shape)
    lead = shape[: axis % len(shape)]
    dy = rand(*lead, n_out)
    (y,), (dx,), dps = run(text, [x], params, [dy])
    ry, rdx, rdw, rdb = naive_ip(
        x, w, params[1] if bias else None, axis % len(shape), transpose, dy
    )
    close(y, ry, what="top")
    close(dx, rdx, what="bottom diff")
    close(dps[0], rdw, what="weight diff")
    if bias:
        close(dps[1], rdb, what="bias diff")
    _, entry, attrs = setup(text)
    m = int(np.prod(lead, dtype=int))
    flops = entry.flops(attrs, [shape], [(*lead, n_out)])
    assert flops == 2 * m * k * n_out + (m * n_out if bias else 0)


def test_inner_product_fillers_and_blob_shapes():
    _, entry, attrs = setup(
        'type: "InnerProduct" inner_product_param { num_output: 4 '
        'weight_filler { type: "xavier" } bias_filler { type: "constant" value: 0.5 } }'
    )
    w, b = entry.blobs(attrs, [(2, 3, 5)])
    assert (w.shape, w.filler.type) == ((4, 15), "xavier")
    assert (b.shape, b.filler.type, b.filler.value) == ((4,), "constant", 0.5)
    with pytest.raises(ShapeError, match="num_output"):
        setup('type: "InnerProduct" inner_product_param { }')


# ---------------------------------------------------------------- Concat, Slice, Split


def naive_concat(xs, axis):
    size = sum(x.shape[axis] for x in xs)
    out_shape = list(xs[0].shape)
    out_shape[axis] = size
    y = np.zeros(out_shape)
    offset = 0
    for x in xs:
        for idx in np.ndindex(*x.shape):
            j = list(idx)
            j[axis] += offset
            y[tuple(j)] = x[idx]
        offset += x.shape[axis]
    return y


@pytest.mark.parametrize(
    "param,axis", [("", 1), ("concat_param { axis: -1 }", 2), ("concat_param { concat_dim: 0 }", 0)]
)
def test_concat(param, axis):
    shapes = [[2, 3, 4], [2, 3, 4], [2, 3, 4]]
    for i, s in enumerate(shapes):
        s[axis] = i + 1
    xs = [rand(*s) for s in shapes]
    y_ref = naive_concat(xs, axis)
    dy = rand(*y_ref.shape)
    (y,), dxs, _ = run(f'type: "Concat" {param}', xs, topdiffs=[dy])
    close(y, y_ref)
    offset = 0
    for x, dx in zip(xs, dxs, strict=True):  # each bottom's diff is its own part of the top diff
        part = np.zeros_like(x)
        for idx in np.ndindex(*x.shape):
            j = list(idx)
            j[axis] += offset
            part[idx] = dy[tuple(j)]
        close(dx, part)
        offset += x.shape[axis]


def test_concat_errors():
    shape_error(
        'type: "Concat" concat_param { axis: 1 }',
        [(2, 3, 4), (2, 3, 5)],
        "Concat",
        "bottom 1",
        "[2, 3, 5]",
    )
    shape_error('type: "Concat"', [(2, 3, 4), (2, 3)], "same number of axes")
    shape_error('type: "Concat" concat_param { axis: 1 concat_dim: 1 }', [], "both")
    shape_error('type: "Concat" concat_param { concat_dim: 3 }', [(2, 3, 4)], "concat_dim 3")


def naive_slice(x, axis, bounds):
    tops = []
    for lo, hi in bounds:
        shape = list(x.shape)
        shape[axis] = hi - lo
        t = np.zeros(shape)
        for idx in np.ndindex(*shape):
            j = list(idx)
            j[axis] += lo
            t[idx] = x[tuple(j)]
        tops.append(t)
    return tops


@pytest.mark.parametrize(
    "param,ntops,axis,bounds",
    [
        ("slice_param { axis: 1 slice_point: 1 slice_point: 4 }", 3, 1, [(0, 1), (1, 4), (4, 6)]),
        ("slice_param { slice_dim: 2 slice_point: 3 }", 2, 2, [(0, 3), (3, 4)]),
        ("slice_param { axis: -2 }", 3, 1, [(0, 2), (2, 4), (4, 6)]),
    ],
)
def test_slice(param, ntops, axis, bounds):
    tops_txt = " ".join(f'top: "t{i}"' for i in range(ntops))
    x = rand(2, 6, 4)
    refs = naive_slice(x, axis, bounds)
    dys = [rand(*r.shape) for r in refs]
    tops, (dx,), _ = run(f'type: "Slice" {tops_txt} {param}', [x], topdiffs=dys)
    for t, r in zip(tops, refs, strict=True):
        close(t, r)
    dref = np.zeros_like(x)
    for (lo, _), dy in zip(bounds, dys, strict=True):
        for idx in np.ndindex(*dy.shape):
            j = list(idx)
            j[axis] += lo
            dref[tuple(j)] = dy[idx]
    close(dx, dref)


def test_slice_errors():
    tops3 = 'top: "a" top: "b" top: "c"'
    shape_error(
        f'type: "Slice" {tops3} slice_param {{ slice_point: 3 slice_point: 2 }}',
        [(2, 6)],
        "increasing",
        "[3, 2]",
    )
    shape_error(
        f'type: "Slice" {tops3} slice_param {{ slice_point: 2 }}', [(2, 6)], "2 slice_point"
    )
    shape_error(f'type: "Slice" {tops3}', [(2, 7)], "divisible by 3")
    shape_error(
        f'type: "Slice" {tops3} slice_param {{ slice_point: 2 slice_point: 9 }}',
        [(2, 6)],
        "slice_point 9",
    )


def test_split_sums_diffs():
    x = rand(2, 3)
    dys = [rand(2, 3) for _ in range(3)]
    tops, (dx,), _ = run('type: "Split" top: "a" top: "b" top: "c"', [x], topdiffs=dys)
    for t in tops:
        close(t, x)
    close(dx, dys[0] + dys[1] + dys[2])


def test_split_inserted_by_builder_takes_top_count_from_context():
    entry = REGISTRY["Split"]
    attrs = entry.attrs(None)
    ctx = LowerCtx("TEST", "s", top_names=("s_0", "s_1"), top_shapes=((2,), (2,)))
    tops = entry.lower(attrs, [], [jnp.ones(2)], ctx)
    assert len(tops) == 2


# ---------------------------------------------------------------- Eltwise


def naive_eltwise_max(xs):
    """Caffe's loop: bottoms 0/1 with a > b, then later bottoms if strictly greater."""
    y, mask = np.zeros(xs[0].shape), np.zeros(xs[0].shape, int)
    for idx in np.ndindex(*xs[0].shape):
        if xs[0][idx] > xs[1][idx]:
            best, arg = xs[0][idx], 0
        else:
            best, arg = xs[1][idx], 1
        for i in range(2, len(xs)):
            if xs[i][idx] > best:
                best, arg = xs[i][idx], i
        y[idx], mask[idx] = best, arg
    return y, mask


def test_eltwise_max_ties():
    # values in {0, 1}: most elements are decided by a tie
    xs = [RNG.integers(0, 2, (3, 4, 5)).astype(np.float64) for _ in range(4)]
    dy = rand(3, 4, 5)
    (y,), dxs, _ = run('type: "Eltwise" eltwise_param { operation: MAX }', xs, topdiffs=[dy])
    ry, mask = naive_eltwise_max(xs)
    close(y, ry)
    for i, dx in enumerate(dxs):
        np.testing.assert_array_equal(dx, np.where(mask == i, dy.astype(np.float32), 0.0))
    assert {0, 1, 2, 3} <= set(mask.ravel())  # every bottom wins somewhere


def test_eltwise_sum_coeff():
    xs = [rand(2, 3, 2) for _ in range(3)]
    dy = rand(2, 3, 2)
    coeff = [1.0, -0.5, 2.0]
    text = 'type: "Eltwise" eltwise_param { operation: SUM coeff: 1 coeff: -0.5 coeff: 2 }'
    (y,), dxs, _ = run(text, xs, topdiffs=[dy])
    ry = np.zeros_like(xs[0])
    for idx in np.ndindex(*ry.shape):
        ry[idx] = sum(c * x[idx] for c, x in zip(coeff, xs, strict=True))
    close(y, ry)
    for c, dx in zip(coeff, dxs, strict=True):
        close(dx, c * dy)
    _, entry, attrs = setup(text)
    assert entry.flops(attrs, [(2, 3, 2)] * 3, [(2, 3, 2)]) == (2 + 2) * 12


@pytest.mark.parametrize("stable", [True, False])
def test_eltwise_prod_gradient_rules(stable):
    xs = [rand(2, 3, 4) for _ in range(3)]
    xs[1][0, 0, 0] = 0.0  # a zero input: the unstable rule divides by it
    dy = rand(2, 3, 4)
    flag = str(stable).lower()
    text = f'type: "Eltwise" eltwise_param {{ operation: PROD stable_prod_grad: {flag} }}'
    with np.errstate(divide="ignore", invalid="ignore"):
        (y,), dxs, _ = run(text, xs, topdiffs=[dy])
        ry = np.ones_like(xs[0])
        for idx in np.ndindex(*ry.shape):
            for x in xs:
                ry[idx] *= x[idx]
        close(y, ry)
        for i, dx in enumerate(dxs):
            if stable:
                ref = np.ones_like(xs[0])
                for j, x in enumerate(xs):
                    if j != i:
                        ref = ref * x
                ref = ref * dy
            else:
                ref = ry.astype(np.float32) / xs[i].astype(np.float32) * dy
            finite = np.isfinite(ref)
            close(dx[finite], ref[finite], 1e-5)
            assert np.array_equal(np.isfinite(dx), finite)
    assert stable or not np.isfinite(dxs[1][0, 0, 0])  # Caffe's 0/0 for the zero input


def test_eltwise_errors():
    shape_error('type: "Eltwise"', [(2, 3), (2, 4)], "equal shapes", "bottom 1", "[2, 4]")
    shape_error('type: "Eltwise" eltwise_param { coeff: 1 }', [(2, 3), (2, 3)], "one coeff")
    shape_error('type: "Eltwise" eltwise_param { operation: PROD coeff: 1 coeff: 2 }', [], "SUM")


# ---------------------------------------------------------------- Flatten, Reshape, Tile


@pytest.mark.parametrize(
    "param,expected",
    [("", (2, 60)), ("flatten_param { axis: 2 }", (2, 3, 20)),
     ("flatten_param { axis: 1 end_axis: -2 }", (2, 12, 5)),
     ("flatten_param { axis: 0 end_axis: 0 }", (2, 3, 4, 5))],
)  # fmt: skip
def test_flatten(param, expected):
    x = rand(2, 3, 4, 5)
    dy = rand(*expected)
    (y,), (dx,), _ = run(f'type: "Flatten" {param}', [x], topdiffs=[dy])
    # C-order flattening: the i-th element in memory order is the same in top and bottom
    close(y.ravel(), x.ravel())
    close(dx.ravel(), dy.ravel())
    assert y.shape == expected


def test_flatten_errors():
    shape_error('type: "Flatten" flatten_param { axis: 2 end_axis: 1 }', [(2, 3, 4)], "end_axis")
    with pytest.raises(GraphError, match="in-place"):
        setup('type: "Flatten" bottom: "x" top: "x"')


@pytest.mark.parametrize(
    "param,expected",
    [
        ("shape { dim: 0 dim: -1 dim: 10 }", (2, 6, 10)),
        ("shape { dim: -1 } axis: 1 num_axes: 2", (2, 12, 5)),
        ("shape { dim: 1 } axis: 2 num_axes: 0", (2, 3, 1, 4, 5)),
        ("shape { dim: -1 }", (120,)),
        ("shape { dim: 5 dim: -1 } axis: -3", (2, 3, 5, 4)),
        ("shape { dim: 0 dim: 0 dim: 0 dim: 0 }", (2, 3, 4, 5)),
    ],
)
def test_reshape(param, expected):
    x = rand(2, 3, 4, 5)
    dy = rand(*expected)
    (y,), (dx,), _ = run(f'type: "Reshape" reshape_param {{ {param} }}', [x], topdiffs=[dy])
    assert y.shape == expected
    close(y.ravel(), x.ravel())
    close(dx.ravel(), dy.ravel())


def test_reshape_errors():
    shape_error(
        'type: "Reshape" reshape_param { shape { dim: 7 dim: -1 } }',
        [(2, 3, 4)],
        "24",
        "not divisible",
    )
    shape_error(
        'type: "Reshape" reshape_param { shape { dim: 5 dim: 5 } }', [(2, 3, 4)], "counts differ"
    )
    shape_error('type: "Reshape" reshape_param { shape { dim: -1 dim: -1 } }', [], "more than one")
    shape_error(
        'type: "Reshape" reshape_param { shape { dim: 0 dim: 0 dim: 0 } }', [(2, 3)], "no axis"
    )
    shape_error(
        'type: "Reshape" reshape_param { shape { dim: 6 } axis: 1 num_axes: 3 }',
        [(2, 3)],
        "beyond",
    )


@pytest.mark.parametrize("axis,tiles", [(1, 3), (-1, 2), (0, 2)])
def test_tile(axis, tiles):
    x = rand(2, 3, 4)
    ax = axis % 3
    shape = list(x.shape)
    shape[ax] *= tiles
    ref = np.zeros(shape)
    for idx in np.ndindex(*shape):
        j = list(idx)
        j[ax] %= x.shape[ax]
        ref[idx] = x[tuple(j)]
    dy = rand(*shape)
    dref = np.zeros_like(x)
    for idx in np.ndindex(*shape):
        j = list(idx)
        j[ax] %= x.shape[ax]
        dref[tuple(j)] += dy[idx]
    text = f'type: "Tile" tile_param {{ axis: {axis} tiles: {tiles} }}'
    (y,), (dx,), _ = run(text, [x], topdiffs=[dy])
    close(y, ref)
    close(dx, dref)


def test_tile_needs_tiles():
    shape_error('type: "Tile" tile_param { axis: 1 }', [(2, 3)], "tiles")
    shape_error('type: "Tile" tile_param { tiles: 0 }', [(2, 3)], "tiles")


# ---------------------------------------------------------------- Reduction


@pytest.mark.parametrize("op", ["SUM", "ASUM", "SUMSQ", "MEAN"])
@pytest.mark.parametrize("axis,coeff", [(0, 1.0), (1, 0.5), (-1, -2.0)])
def test_reduction(op, axis, coeff):
    x = rand(2, 3, 4)
    x[0, 0, :2] = 0.0  # ASUM's gradient at 0 is sign(0) = 0
    ax = axis % 3
    lead = x.shape[:ax]
    num, dim = int(np.prod(lead, dtype=int)), int(np.prod(x.shape[ax:]))
    x2 = x.reshape(num, dim)
    dy = rand(*lead)
    dy2 = dy.reshape(num)
    ref, dref = np.zeros(num), np.zeros((num, dim))
    c = coeff / dim if op == "MEAN" else coeff
    for i in range(num):
        for j in range(dim):
            v = x2[i, j]
            ref[i] += {"SUM": v, "MEAN": v, "ASUM": abs(v), "SUMSQ": v * v}[op] * c
            deriv = {"SUM": 1.0, "MEAN": 1.0, "ASUM": float(np.sign(v)), "SUMSQ": 2 * v}[op]
            dref[i, j] = deriv * c * dy2[i]
    text = f'type: "Reduction" reduction_param {{ operation: {op} axis: {axis} coeff: {coeff} }}'
    (y,), (dx,), _ = run(text, [x], topdiffs=[dy])
    assert y.shape == lead
    close(y, ref.reshape(lead))
    close(dx, dref.reshape(x.shape))


# ---------------------------------------------------------------- ArgMax


def naive_rank(values, k):
    """Caffe's partial_sort by std::greater on (value, index): ties rank the larger index first."""
    order = sorted(range(len(values)), key=lambda j: (values[j], j), reverse=True)[:k]
    return order, [values[j] for j in order]


@pytest.mark.parametrize("out_max_val", [False, True])
@pytest.mark.parametrize("top_k", [1, 3])
def test_argmax_flat(out_max_val, top_k):
    x = RNG.integers(0, 3, (3, 2, 2, 2)).astype(np.float64)  # many ties
    (y,) = run(
        f'type: "ArgMax" argmax_param {{ top_k: {top_k} out_max_val: {str(out_max_val).lower()} }}',
        [x],
    )
    assert y.shape == (3, 2 if out_max_val else 1, top_k, 1)
    for n in range(3):
        idx, vals = naive_rank(list(x[n].ravel()), top_k)
        np.testing.assert_array_equal(y[n, 0, :, 0], idx)
        if out_max_val:
            np.testing.assert_array_equal(y[n, 1, :, 0], vals)


@pytest.mark.parametrize("out_max_val", [False, True])
@pytest.mark.parametrize("axis", [0, 1, -1])
def test_argmax_axis(out_max_val, axis):
    x = RNG.integers(0, 3, (3, 4, 5)).astype(np.float64)
    ax = axis % 3
    flag = str(out_max_val).lower()
    text = f'type: "ArgMax" argmax_param {{ axis: {axis} top_k: 2 out_max_val: {flag} }}'
    (y,) = run(text, [x])
    moved = np.moveaxis(x, ax, -1)
    got = np.moveaxis(y, ax, -1)
    for idx in np.ndindex(*moved.shape[:-1]):
        order, vals = naive_rank(list(moved[idx]), 2)
        np.testing.assert_array_equal(got[idx], vals if out_max_val else order)


def test_argmax_table_and_errors():
    assert REGISTRY["ArgMax"].backward is False
    shape_error('type: "ArgMax" argmax_param { top_k: 7 }', [(2, 3, 2)], "top_k 7")
    shape_error('type: "ArgMax" argmax_param { axis: 1 top_k: 4 }', [(2, 3, 2)], "top_k 4")
    shape_error('type: "ArgMax" argmax_param { top_k: 0 }', [(2, 3)], "top_k")
    _, entry, attrs = setup('type: "ArgMax" argmax_param { top_k: 2 }')
    assert entry.shape(attrs, [(4, 8)]) == [(4, 1, 2)]  # padded to 3 axes


# ---------------------------------------------------------------- Softmax, Silence, Parameter


@pytest.mark.parametrize("axis", [1, 0, -1])
def test_softmax(axis):
    x = rand(2, 3, 4) * 3
    dy = rand(2, 3, 4)
    ax = axis % 3
    xm, dym = np.moveaxis(x, ax, -1), np.moveaxis(dy, ax, -1)
    ref, dref = np.zeros_like(xm), np.zeros_like(xm)
    for idx in np.ndindex(*xm.shape[:-1]):
        row = xm[idx]
        e = np.exp(row - row.max())
        p = e / e.sum()
        ref[idx] = p
        dref[idx] = (dym[idx] - np.dot(dym[idx], p)) * p  # Caffe's Backward formula
    text = f'type: "Softmax" softmax_param {{ axis: {axis} }}'
    (y,), (dx,), _ = run(text, [x], topdiffs=[dy])
    close(y, np.moveaxis(ref, -1, ax))
    close(dx, np.moveaxis(dref, -1, ax))


def test_silence_has_no_tops_and_zero_diffs():
    entry = REGISTRY["Silence"]
    assert entry.n_tops == (0, 0)
    _, entry, attrs = setup('type: "Silence" bottom: "a" bottom: "b"')
    assert entry.shape(attrs, [(2, 3), (4,)]) == []
    ctx = LowerCtx("TEST", "s")

    def f(a, b):  # a consumer of a and b next to the Silence: only it contributes diffs
        assert entry.lower(attrs, [], [a, b], ctx) == []
        return jnp.sum(a)

    da, db = jax.grad(f, argnums=(0, 1))(jnp.ones((2, 3)), jnp.ones(4))
    np.testing.assert_array_equal(np.asarray(db), np.zeros(4))


def test_parameter_layer():
    _, entry, attrs = setup('type: "Parameter" parameter_param { shape { dim: 2 dim: 3 } }')
    assert entry.n_bottoms == (0, 0)
    (spec,) = entry.blobs(attrs, [])
    assert spec.shape == (2, 3) and (spec.filler.type, spec.filler.value) == ("constant", 0.0)
    p = rand(2, 3)
    dy = rand(2, 3)
    (y,), _, (dp,) = run(
        'type: "Parameter" parameter_param { shape { dim: 2 dim: 3 } }', [], [p], [dy]
    )
    close(y, p)
    close(dp, dy)


# ---------------------------------------------------------------- Embed, BatchReindex, Filter


@pytest.mark.parametrize("bias", [True, False])
def test_embed(bias):
    k_, n_ = 5, 3
    idx = np.array([[0.0, 4.0, 2.0], [2.0, 2.0, 1.0]])  # repeated indices accumulate
    w, b = rand(k_, n_), rand(n_)
    params = [w, b] if bias else [w]
    dy = rand(2, 3, n_)
    text = (
        f'type: "Embed" embed_param {{ num_output: {n_} input_dim: {k_} '
        f"bias_term: {str(bias).lower()} }}"
    )
    (y,), (didx,), dps = run(text, [idx], params, [dy])
    ref, dw, db = np.zeros((2, 3, n_)), np.zeros_like(w), np.zeros(n_)
    for i, j in np.ndindex(2, 3):
        r = int(idx[i, j])
        for n in range(n_):
            ref[i, j, n] = w[r, n] + (b[n] if bias else 0.0)
            dw[r, n] += dy[i, j, n]
            db[n] += dy[i, j, n]
    close(y, ref)
    close(dps[0], dw)
    if bias:
        close(dps[1], db)
    np.testing.assert_array_equal(didx, 0.0)
    _, entry, attrs = setup(text)
    assert [s.shape for s in entry.blobs(attrs, [(2, 3)])] == [(k_, n_), (n_,)][: len(params)]


def test_batch_reindex():
    x = rand(4, 3, 2)
    permut = np.array([3.0, 0.0, 3.0, 1.0, 3.0])
    dy = rand(5, 3, 2)
    (y,), (dx, dperm), _ = run('type: "BatchReindex"', [x, permut], topdiffs=[dy])
    ref, dref = np.zeros((5, 3, 2)), np.zeros_like(x)
    for n, src in enumerate(permut.astype(int)):
        ref[n] = x[src]
        dref[src] += dy[n]
    close(y, ref)
    close(dx, dref)
    np.testing.assert_array_equal(dperm, 0.0)
    shape_error('type: "BatchReindex"', [(4, 3), (2, 2)], "1-D")
    with pytest.raises(InputError, match="index 4"):
        run('type: "BatchReindex"', [x, np.array([0.0, 4.0])], jit=False)


def test_filter():
    x, z = rand(4, 3, 2), rand(4, 2)
    selector = np.array([0.0, 2.0, 0.0, -1.0]).reshape(4, 1)
    keep = [n for n in range(4) if selector[n, 0] != 0]
    dys = [rand(len(keep), 3, 2), rand(len(keep), 2)]
    text = 'type: "Filter" bottom: "x" bottom: "z" bottom: "s" top: "fx" top: "fz"'
    tops, (dx, dz, dsel), _ = run(text, [x, z, selector], topdiffs=dys, jit=False)
    for t, b, dy, d in zip(tops, (x, z), dys, (dx, dz), strict=True):
        ref, dref = np.zeros((len(keep),) + b.shape[1:]), np.zeros_like(b)
        for i, n in enumerate(keep):
            ref[i] = b[n]
            dref[n] = dy[i]
        close(t, ref)
        close(d, dref)
    np.testing.assert_array_equal(dsel, 0.0)
    _, entry, attrs = setup(text)
    assert entry.extra["data_dependent_shape"] is True
    assert entry.shape(attrs, [(4, 3, 2), (4, 2), (4, 1)]) == [(4, 3, 2), (4, 2)]  # upper bound


def test_filter_errors():
    with pytest.raises(InputError, match="concrete"):
        run('type: "Filter" bottom: "x" bottom: "s" top: "f"', [rand(4, 2), np.ones(4)], jit=True)
    shape_error('type: "Filter" bottom: "x" bottom: "s" top: "f"', [(4, 2), (4, 2)], "selector")
    shape_error(
        'type: "Filter" bottom: "x" bottom: "s" top: "f"', [(3, 2), (4,)], "bottom 0", "rows"
    )
    with pytest.raises(GraphError, match="one top per"):
        setup('type: "Filter" bottom: "a" bottom: "s" top: "x" top: "y"')


# ---------------------------------------------------------------- real-Caffe fixtures


def _fixture(case: str):
    path = fixture_case(case)
    net = text_format.Parse((path / "net.prototxt").read_text(), caffe_pb2.NetParameter())
    man = json.loads((path / "manifest.json").read_text())
    npz = {}
    for name in ("forward", "backward", "params"):
        if (path / f"{name}.npz").exists():
            with np.load(path / f"{name}.npz") as d:
                npz[name] = {k: d[k] for k in d.files}
    return {lay.name: lay for lay in net.layer}, npz, man


FIXTURE_LAYERS = [
    ("innerproduct_axis", ["ip_a", "ip_b", "ip_c", "ip_d", "ip_e"]),
    ("concat_slice", ["cat1", "cat2", "cat3", "slice1", "slice2", "slice3"]),
    ("eltwise", ["sum_coeff", "sum_plain", "prod", "prod_unstable", "emax"]),
    ("ties", ["emax", "argmax_flat", "argmax_axis1"]),
    ("reshape_flatten", ["reshape_a", "reshape_b", "reshape_c", "reshape_d", "flat_a", "flat_b",
                         "flat_c"]),
    ("argmax_tile_reduction", ["tile_a", "tile_b", "red_sum", "red_mean", "red_asum",
                               "red_sumsq", "argmax_a", "argmax_b", "argmax_c"]),
    ("softmax_axis", ["sm_a", "sm_b", "sm_c", "sm_d"]),
    ("embed", ["embed", "embed_nb"]),
    ("reindex_filter", ["reindex", "filter"]),
    ("parameter_layer", ["param"]),
]  # fmt: skip


@pytest.mark.parametrize(
    "case,name", [(c, n) for c, names in FIXTURE_LAYERS for n in names], ids=lambda v: str(v)
)
def test_fixture_layer(case, name):
    """One layer in isolation: Caffe's bottoms in, Caffe's tops out; Caffe's top diffs back,
    Caffe's bottom and param diffs out (each bottom here is consumed by this layer only)."""
    layers, npz, man = _fixture(case)
    fwd, bwd, prm = npz["forward"], npz.get("backward", {}), npz.get("params", {})
    tol = man["tolerances"]
    info = next(lay for lay in man["layers"] if lay["name"] == name)
    msg = layers[name]
    entry = REGISTRY[msg.type]
    attrs = entry.attrs(msg)
    bottoms = [jnp.asarray(fwd[b]) for b in info["bottoms"]]
    bshapes = [tuple(b.shape) for b in bottoms]
    params = [jnp.asarray(prm[f"{name}/{i}"]) for i in range(len(entry.blobs(attrs, bshapes)))]
    tshapes = entry.shape(attrs, bshapes)
    ctx = LowerCtx("TEST", name, top_names=info["tops"], top_shapes=tshapes)

    def f(ps, bs):
        return entry.lower(attrs, ps, bs, ctx)

    tops, vjp = jax.vjp(f, params, bottoms)
    for t, top, s in zip(tops, info["tops"], tshapes, strict=True):
        close(t, fwd[top], tol["forward_rel"], f"forward {top}")
        if not entry.extra.get("data_dependent_shape"):
            assert tuple(t.shape) == tuple(s)
    if not entry.backward or not bwd:
        return
    diffs = [jnp.asarray(bwd.get(f"diff/{t}", np.zeros(np.shape(tt)))) for t, tt in zip(
        info["tops"], tops, strict=True)]  # fmt: skip
    dps, dbs = vjp(diffs)
    written = set(man["backward"]["diff_written_by_caffe"])
    checked = 0
    for i, (b, d) in enumerate(zip(info["bottoms"], dbs, strict=True)):
        if b in written and i not in entry.no_grad_bottoms:
            close(d, bwd[f"diff/{b}"], tol["backward_rel"], f"diff {b}")
            checked += 1
    for i, d in enumerate(dps):
        close(d, bwd[f"param_diff/{name}/{i}"], tol["backward_rel"], f"param diff {i}")
        checked += 1
    assert checked


def test_fixture_shapes_match_caffe():
    """The shape rules alone reproduce Caffe's top shapes for every fixture layer above."""
    for case, names in FIXTURE_LAYERS:
        layers, npz, man = _fixture(case)
        fwd = npz["forward"]
        for name in names:
            info = next(lay for lay in man["layers"] if lay["name"] == name)
            entry = REGISTRY[layers[name].type]
            if entry.extra.get("data_dependent_shape"):
                continue
            attrs = entry.attrs(layers[name])
            got = entry.shape(attrs, [tuple(fwd[b].shape) for b in info["bottoms"]])
            assert got == [tuple(fwd[t].shape) for t in info["tops"]], (case, name)
