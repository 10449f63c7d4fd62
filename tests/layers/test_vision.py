"""Vision layers against naive NumPy loops of Caffe's rules and real-Caffe fixtures."""

from __future__ import annotations

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from google.protobuf import text_format

from nincc import caffe_pb2
from nincc.errors import GraphError, NinccError, ShapeError
from nincc.layers.base import REGISTRY, LowerCtx, canonical_type

from ..conftest import fixture_case, manifest

FLT_MAX = float(np.finfo(np.float32).max)
RNG = np.random.default_rng(0)


# ---------------------------------------------------------------- helpers


def layer(text: str) -> caffe_pb2.LayerParameter:
    return text_format.Parse(text, caffe_pb2.LayerParameter())


def build(msg):
    """The table entry, attrs and top shapes for bottoms of the given shapes."""
    entry = REGISTRY[canonical_type(msg.type)]
    return entry, entry.attrs(msg)


def run(msg, bottoms, params=(), phase="TEST", key=None, topdiffs=None):
    """Forward through the entry's lower (jitted); with topdiffs also the vjp.

    Returns (tops, bottom grads, param grads) as float64 NumPy arrays.
    """
    entry, attrs = build(msg)
    bshapes = [tuple(b.shape) for b in bottoms]
    tshapes = entry.shape(attrs, bshapes)
    specs = entry.blobs(attrs, bshapes)
    assert [s.shape for s in specs] == [tuple(p.shape) for p in params]
    ctx = LowerCtx(phase, msg.name or "t", key=key, top_names=tuple(msg.top))

    def f(ps, bs):
        return entry.lower(attrs, list(ps), list(bs), ctx)

    ps = [jnp.asarray(p, jnp.float32) for p in params]
    bs = [jnp.asarray(b, jnp.float32) for b in bottoms]
    tops, vjp = jax.vjp(jax.jit(f), ps, bs)
    assert len(tops) == len(msg.top)
    for t, s in zip(tops, tshapes[: len(tops)], strict=True):
        assert tuple(t.shape) == tuple(s)
    tops = [np.asarray(t, np.float64) for t in tops]
    if topdiffs is None:
        return tops, None, None
    dps, dbs = vjp([jnp.asarray(d, jnp.float32) for d in topdiffs])
    return tops, [np.asarray(d, np.float64) for d in dbs], [np.asarray(d, np.float64) for d in dps]


def assert_close(got, ref, rel=1e-5, what=""):
    """The fixtures' rule: |got - ref| <= rel * max|ref| elementwise (exact when ref is 0)."""
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    assert got.shape == ref.shape, f"{what}: shape {got.shape} != {ref.shape}"
    scale = float(np.max(np.abs(ref))) if ref.size else 0.0
    err = float(np.max(np.abs(got - ref))) if ref.size else 0.0
    assert err <= rel * scale or (scale == 0 and err == 0), f"{what}: err {err} scale {scale}"


def rand(*shape):
    return RNG.standard_normal(shape)


# ---------------------------------------------------------------- naive references


def naive_conv(x, w, b, stride, pad, dil, group, dy=None):
    """Caffe's convolution as loops over every output and kernel tap (any number of spatial
    axes); with dy also the backward pass (dx, dw, db)."""
    n_, c_ = x.shape[:2]
    sp = x.shape[2:]
    o_, cg = w.shape[:2]
    ks = w.shape[2:]
    og = o_ // group
    out = [
        (i + 2 * p - (d * (k - 1) + 1)) // s + 1
        for i, p, d, k, s in zip(sp, pad, dil, ks, stride, strict=True)
    ]
    y = np.zeros((n_, o_, *out))
    dx, dw = np.zeros_like(x), np.zeros_like(w)
    db = np.zeros(o_)
    for n, o in itertools.product(range(n_), range(o_)):
        g = o // og
        for pos in itertools.product(*map(range, out)):
            acc = 0.0 if b is None else b[o]
            gy = None if dy is None else dy[(n, o, *pos)]
            if gy is not None:
                db[o] += gy
            for ci in range(cg):
                c = g * cg + ci
                for off in itertools.product(*map(range, ks)):
                    idx = [
                        q * s - p + f * d
                        for q, s, p, f, d in zip(pos, stride, pad, off, dil, strict=True)
                    ]
                    if all(0 <= i < L for i, L in zip(idx, sp, strict=True)):
                        acc += x[(n, c, *idx)] * w[(o, ci, *off)]
                        if gy is not None:
                            dx[(n, c, *idx)] += gy * w[(o, ci, *off)]
                            dw[(o, ci, *off)] += gy * x[(n, c, *idx)]
            y[(n, o, *pos)] = acc
    return y, dx, dw, db


def naive_deconv(x, w, b, stride, pad, dil, group, dy):
    """Deconvolution as Caffe defines it (col2im of the weights): every input element scatters
    w[c, o_local] into the output window it generates; plus the backward pass."""
    n_, c_ = x.shape[:2]
    sp = x.shape[2:]
    og = w.shape[1]
    ks = w.shape[2:]
    o_ = og * group
    cg = c_ // group
    out = [
        s * (i - 1) + d * (k - 1) + 1 - 2 * p
        for i, p, d, k, s in zip(sp, pad, dil, ks, stride, strict=True)
    ]
    y = np.zeros((n_, o_, *out))
    if b is not None:
        y += b.reshape((1, -1) + (1,) * len(sp))
    dx, dw = np.zeros_like(x), np.zeros_like(w)
    for n, c in itertools.product(range(n_), range(c_)):
        g = c // cg
        for pos in itertools.product(*map(range, sp)):
            for ol in range(og):
                o = g * og + ol
                for off in itertools.product(*map(range, ks)):
                    idx = [
                        q * s - p + f * d
                        for q, s, p, f, d in zip(pos, stride, pad, off, dil, strict=True)
                    ]
                    if all(0 <= i < L for i, L in zip(idx, out, strict=True)):
                        y[(n, o, *idx)] += x[(n, c, *pos)] * w[(c, ol, *off)]
                        dx[(n, c, *pos)] += dy[(n, o, *idx)] * w[(c, ol, *off)]
                        dw[(c, ol, *off)] += dy[(n, o, *idx)] * x[(n, c, *pos)]
    db = dy.sum(axis=tuple(i for i in range(dy.ndim) if i != 1))
    return y, dx, dw, db


def naive_pool_size(H, k, s, p, ceil=True):
    f = math.ceil if ceil else math.floor
    return int(f((H + 2 * p - k) / s)) + 1


def naive_pool(x, method, k, s, p, ceil=True, dy=None):
    """Caffe's pooling_layer.cpp loops: output size with the clip rule, MAX (strict >, row-major,
    -FLT_MAX / index -1 when empty) with its mask and routing, AVE with Caffe's divisor."""
    n_, c_, H, W = x.shape
    oh, ow = naive_pool_size(H, k[0], s[0], p[0], ceil), naive_pool_size(W, k[1], s[1], p[1], ceil)
    if p[0] or p[1]:
        if (oh - 1) * s[0] >= H + p[0]:
            oh -= 1
        if (ow - 1) * s[1] >= W + p[1]:
            ow -= 1
    y = np.zeros((n_, c_, oh, ow))
    mask = np.full((n_, c_, oh, ow), -1.0)
    dx = np.zeros_like(x)
    for n, c, ph, pw in itertools.product(range(n_), range(c_), range(oh), range(ow)):
        h0, w0 = ph * s[0] - p[0], pw * s[1] - p[1]
        if method == "MAX":
            h1, w1 = min(h0 + k[0], H), min(w0 + k[1], W)
            best, arg = -FLT_MAX, -1
            for h in range(max(h0, 0), h1):
                for w in range(max(w0, 0), w1):
                    if x[n, c, h, w] > best:
                        best, arg = x[n, c, h, w], h * W + w
            y[n, c, ph, pw], mask[n, c, ph, pw] = best, arg
            if dy is not None and arg >= 0:
                dx[n, c, arg // W, arg % W] += dy[n, c, ph, pw]
        else:
            h1, w1 = min(h0 + k[0], H + p[0]), min(w0 + k[1], W + p[1])
            size = (h1 - h0) * (w1 - w0)
            cells = [
                (h, w) for h in range(max(h0, 0), min(h1, H)) for w in range(max(w0, 0), min(w1, W))
            ]
            y[n, c, ph, pw] = sum(x[n, c, h, w] for h, w in cells) / size
            if dy is not None:
                for h, w in cells:
                    dx[n, c, h, w] += dy[n, c, ph, pw] / size
    return y, mask, dx


def pool_layer(params: str, tops=1) -> caffe_pb2.LayerParameter:
    top = "".join(f' top: "t{i}"' for i in range(tops))
    return layer(f'name: "p" type: "Pooling" bottom: "x"{top} pooling_param {{ {params} }}')


def conv_layer(params: str, type_="Convolution", n=1) -> caffe_pb2.LayerParameter:
    io = "".join(f' bottom: "x{i}" top: "y{i}"' for i in range(n))
    return layer(f'name: "c" type: "{type_}"{io} convolution_param {{ {params} }}')


# ---------------------------------------------------------------- Convolution


CONV_CASES = [
    # (input shape, num_output, params text, kernel, stride, pad, dilation, group)
    ((2, 3, 6, 5), 4, "kernel_size: 3", (3, 3), (1, 1), (0, 0), (1, 1), 1),
    (
        (2, 4, 7, 6),
        6,
        "kernel_h: 3 kernel_w: 2 stride_h: 2 stride_w: 1 pad_h: 2 pad_w: 1 dilation: 2 group: 2",
        (3, 2),
        (2, 1),
        (2, 1),
        (2, 2),
        2,
    ),
    (
        (1, 4, 7, 8),
        4,
        "kernel_size: 3 kernel_size: 2 stride: 1 stride: 2 pad: 0 pad: 1 "
        "dilation: 1 dilation: 2 group: 4",
        (3, 2),
        (1, 2),
        (0, 1),
        (1, 2),
        4,
    ),
    ((2, 2, 5, 5), 3, "kernel_size: 1 stride: 2", (1, 1), (2, 2), (0, 0), (1, 1), 1),
    (
        (2, 2, 6, 7),
        2,
        "kernel_size: 3 stride: 3 pad: 1 bias_term: false",
        (3, 3),
        (3, 3),
        (1, 1),
        (1, 1),
        1,
    ),
]


@pytest.mark.parametrize("shape,nout,text,k,s,p,d,group", CONV_CASES)
def test_convolution_matches_naive_loops(shape, nout, text, k, s, p, d, group):
    msg = conv_layer(f"num_output: {nout} {text}")
    bias = "bias_term: false" not in text
    x = rand(*shape)
    w = rand(nout, shape[1] // group, *k)
    b = rand(nout) if bias else None
    ref, dx, dw, db = naive_conv(x, w, b, s, p, d, group, dy=None)
    dy = rand(*ref.shape)
    ref, dx, dw, db = naive_conv(x, w, b, s, p, d, group, dy=dy)
    params = [w, b] if bias else [w]
    (y,), (gx,), gps = run(msg, [x], params, topdiffs=[dy])
    assert_close(y, ref, what="top")
    assert_close(gx, dx, what="bottom diff")
    assert_close(gps[0], dw, what="weight diff")
    if bias:
        assert_close(gps[1], db, what="bias diff")


def test_convolution_nd_and_channel_axis():
    # 1-D and 3-D spatial convolutions, and a channel axis of 2 (leading axes are the batch).
    for shape, k in (((2, 3, 9), (3,)), ((1, 2, 4, 5, 3), (2, 3, 2))):
        x = rand(*shape)
        w = rand(4, shape[1], *k)
        b = rand(4)
        ks = " ".join(f"kernel_size: {v}" for v in k)
        msg = conv_layer(f"num_output: 4 {ks} pad: 1 stride: 2")
        n = len(k)
        ref, *_ = naive_conv(x, w, b, (2,) * n, (1,) * n, (1,) * n, 1)
        (y,), _, _ = run(msg, [x], [w, b])
        assert_close(y, ref)
    x = rand(2, 3, 4, 6, 5)
    w = rand(2, 4, 3, 3)
    b = rand(2)
    msg = conv_layer("num_output: 2 kernel_size: 3 axis: 2")
    (y,), _, _ = run(msg, [x], [w, b])
    ref, *_ = naive_conv(x.reshape(6, 4, 6, 5), w, b, (1, 1), (0, 0), (1, 1), 1)
    assert_close(y, ref.reshape(2, 3, 2, 4, 3))


def test_convolution_shared_weights_over_bottom_pairs_and_flops():
    msg = conv_layer("num_output: 4 kernel_size: 3 group: 2", n=2)
    x0, x1 = rand(2, 4, 5, 5), rand(2, 4, 5, 5)
    w, b = rand(4, 2, 3, 3), rand(4)
    (y0, y1), _, _ = run(msg, [x0, x1], [w, b])
    assert_close(y0, naive_conv(x0, w, b, (1, 1), (0, 0), (1, 1), 2)[0])
    assert_close(y1, naive_conv(x1, w, b, (1, 1), (0, 0), (1, 1), 2)[0])
    entry, attrs = build(msg)
    tops = entry.shape(attrs, [(2, 4, 5, 5)] * 2)
    assert tops == [(2, 4, 3, 3)] * 2
    per = 2 * 2 * 4 * 3 * 3 * 2 * 9 + 2 * 4 * 3 * 3
    assert entry.flops(attrs, [(2, 4, 5, 5)] * 2, tops) == 2 * per


def test_convolution_blobs_and_default_fillers():
    entry, attrs = build(conv_layer("num_output: 6 kernel_h: 3 kernel_w: 2 group: 3"))
    w, b = entry.blobs(attrs, [(1, 9, 8, 8)])
    assert w.shape == (6, 3, 3, 2) and b.shape == (6,)
    assert (w.filler.type, w.filler.value) == ("constant", 0.0)
    assert (b.filler.type, b.filler.value) == ("constant", 0.0)
    entry, attrs = build(
        conv_layer('num_output: 2 kernel_size: 1 bias_term: false weight_filler { type: "xavier" }')
    )
    (w,) = entry.blobs(attrs, [(1, 3, 4, 4)])
    assert w.filler.type == "xavier"


def test_cccp_is_convolution():
    assert canonical_type("CCCP") == "Convolution"
    assert canonical_type("cccp") == "Convolution"
    msg = conv_layer("num_output: 3 kernel_size: 1", type_="CCCP")
    x, w, b = rand(2, 4, 3, 3), rand(3, 4, 1, 1), rand(3)
    (y,), _, _ = run(msg, [x], [w, b])
    assert_close(y, np.einsum("nchw,oc->nohw", x, w[:, :, 0, 0]) + b.reshape(1, 3, 1, 1))


def test_convolution_output_size_uses_cpp_division():
    # (3 + 0 - 4) / 2 truncates to 0 in C++: one output whose window overhangs the input.
    msg = conv_layer("num_output: 1 kernel_size: 4 stride: 2 bias_term: false")
    entry, attrs = build(msg)
    assert entry.shape(attrs, [(1, 1, 3, 3)]) == [(1, 1, 1, 1)]
    x, w = rand(1, 1, 3, 3), rand(1, 1, 4, 4)
    (y,), _, _ = run(msg, [x], [w])
    assert_close(y.reshape(()), (x * w[:, :, :3, :3]).sum())


@pytest.mark.parametrize(
    "text,shape,err",
    [
        ("num_output: 2 kernel_size: 3 kernel_h: 3 kernel_w: 3", (1, 2, 5, 5), ShapeError),
        ("num_output: 2 kernel_size: 3 kernel_size: 3 kernel_size: 3", (1, 2, 5, 5), ShapeError),
        ("num_output: 2 kernel_h: 3", (1, 2, 5, 5), ShapeError),
        ("num_output: 2 kernel_size: 3 stride_h: 2", (1, 2, 5, 5), ShapeError),
        ("num_output: 2 kernel_size: 3 group: 2", (1, 3, 5, 5), ShapeError),
        ("num_output: 2 kernel_size: 7", (1, 2, 5, 5), ShapeError),
        ("num_output: 2 kernel_h: 1 kernel_w: 1", (1, 2, 5), ShapeError),
    ],
)
def test_convolution_rejects_bad_geometry(text, shape, err):
    entry, attrs = build(conv_layer(text))
    with pytest.raises(err):
        entry.shape(attrs, [shape])


def test_convolution_rejects_bad_params():
    with pytest.raises(ShapeError):
        build(conv_layer("num_output: 3 kernel_size: 1 group: 2"))
    with pytest.raises(ShapeError):
        build(conv_layer("kernel_size: 1"))
    with pytest.raises(GraphError):
        build(
            layer(
                'type: "Convolution" bottom: "a" bottom: "b" top: "c" '
                "convolution_param { num_output: 1 kernel_size: 1 }"
            )
        )


# ---------------------------------------------------------------- Deconvolution


DECONV_CASES = [
    ((2, 3, 4, 5), 2, "kernel_size: 4 stride: 2 pad: 1", (4, 4), (2, 2), (1, 1), (1, 1), 1, True),
    (
        (1, 4, 3, 4),
        4,
        "kernel_h: 3 kernel_w: 2 stride_h: 2 stride_w: 3 pad_h: 1 pad_w: 0 "
        "dilation: 2 group: 2 bias_term: false",
        (3, 2),
        (2, 3),
        (1, 0),
        (2, 2),
        2,
        False,
    ),
    ((2, 2, 3, 3), 2, "kernel_size: 2 stride: 1 pad: 1", (2, 2), (1, 1), (1, 1), (1, 1), 1, True),
    # pad beyond the kernel extent: Caffe's col2im drops a border of the full output
    (
        (1, 2, 4, 4),
        2,
        "kernel_size: 2 stride: 2 pad: 2 group: 2",
        (2, 2),
        (2, 2),
        (2, 2),
        (1, 1),
        2,
        True,
    ),
]


@pytest.mark.parametrize("shape,nout,text,k,s,p,d,group,bias", DECONV_CASES)
def test_deconvolution_matches_naive_loops(shape, nout, text, k, s, p, d, group, bias):
    msg = conv_layer(f"num_output: {nout} {text}", type_="Deconvolution")
    x = rand(*shape)
    w = rand(shape[1], nout // group, *k)
    b = rand(nout) if bias else None
    out = [
        s_ * (i - 1) + d_ * (k_ - 1) + 1 - 2 * p_
        for i, k_, s_, p_, d_ in zip(shape[2:], k, s, p, d, strict=True)
    ]
    dy = rand(shape[0], nout, *out)
    ref, dx, dw, db = naive_deconv(x, w, b, s, p, d, group, dy)
    (y,), (gx,), gps = run(msg, [x], [w, b] if bias else [w], topdiffs=[dy])
    assert_close(y, ref, what="top")
    assert_close(gx, dx, what="bottom diff")
    assert_close(gps[0], dw, what="weight diff")
    if bias:
        assert_close(gps[1], db, what="bias diff")
    entry, attrs = build(msg)
    flops = 2 * x.size * (nout // group) * k[0] * k[1] + (y.size if bias else 0)
    assert entry.flops(attrs, [shape], [y.shape]) == flops


# ---------------------------------------------------------------- Pooling


POOL_CASES = [
    # (input HW, params text, kernel, stride, pad, ceil)
    ((6, 6), "kernel_size: 3 stride: 2", (3, 3), (2, 2), (0, 0), True),
    ((6, 6), "kernel_size: 3 stride: 2 round_mode: FLOOR", (3, 3), (2, 2), (0, 0), False),
    ((7, 7), "kernel_size: 3 stride: 2 pad: 1", (3, 3), (2, 2), (1, 1), True),
    ((5, 5), "kernel_size: 2 stride: 2 pad: 1", (2, 2), (2, 2), (1, 1), True),
    ((8, 8), "kernel_size: 2 stride: 3", (2, 2), (3, 3), (0, 0), True),
    (
        (7, 9),
        "kernel_h: 3 kernel_w: 2 stride_h: 2 stride_w: 3 pad_h: 1 pad_w: 0",
        (3, 2),
        (2, 3),
        (1, 0),
        True,
    ),
    (
        (9, 7),
        "kernel_h: 2 kernel_w: 3 stride_h: 3 stride_w: 2 pad_h: 0 pad_w: 1",
        (2, 3),
        (3, 2),
        (0, 1),
        True,
    ),
    ((6, 5), "kernel_size: 4 stride: 3 pad: 2", (4, 4), (3, 3), (2, 2), True),
    ((5, 6), "kernel_size: 3 stride: 1 pad: 1", (3, 3), (1, 1), (1, 1), True),
]


@pytest.mark.parametrize("method", ["MAX", "AVE"])
@pytest.mark.parametrize("hw,text,k,s,p,ceil", POOL_CASES)
def test_pooling_matches_naive_loops(method, hw, text, k, s, p, ceil):
    x = rand(2, 3, *hw)
    ref, mask, _ = naive_pool(x, method, k, s, p, ceil)
    dy = rand(*ref.shape)
    _, _, dx = naive_pool(x, method, k, s, p, ceil, dy=dy)
    tops = 2 if method == "MAX" else 1
    msg = pool_layer(f"pool: {method} {text}", tops)
    got, (gx,), _ = run(msg, [x], topdiffs=[dy] + [rand(*ref.shape)] * (tops - 1))
    assert_close(got[0], ref, what="top")
    if method == "MAX":
        np.testing.assert_array_equal(got[1], mask)
    assert_close(gx, dx, rel=1e-4, what="bottom diff")
    entry, attrs = build(msg)
    assert entry.flops(attrs, [x.shape], [ref.shape]) == ref.size * k[0] * k[1]


def test_max_pooling_ties_first_maximum_wins_forward_and_backward():
    # small integers: many windows hold several equal maxima; overlapping windows accumulate
    x = RNG.integers(-2, 3, size=(2, 3, 7, 7)).astype(np.float64)
    for text, k, s, p in (
        ("kernel_size: 3 stride: 2", (3, 3), (2, 2), (0, 0)),
        ("kernel_size: 3 stride: 1 pad: 1", (3, 3), (1, 1), (1, 1)),
        ("kernel_size: 2 stride: 2", (2, 2), (2, 2), (0, 0)),
    ):
        ref, mask, _ = naive_pool(x, "MAX", k, s, p)
        dy = rand(*ref.shape)
        _, _, dx = naive_pool(x, "MAX", k, s, p, dy=dy)
        for tops in (1, 2):
            got, (gx,), _ = run(pool_layer(f"pool: MAX {text}", tops), [x], topdiffs=[dy] * tops)
            assert_close(got[0], ref)
            if tops == 2:
                np.testing.assert_array_equal(got[1], mask)
            assert_close(gx, dx, rel=1e-5, what=text)


def test_max_pooling_all_negative_input_ignores_padding():
    x = -1.0 - np.abs(rand(1, 2, 5, 5))
    ref, mask, _ = naive_pool(x, "MAX", (3, 3), (1, 1), (1, 1))
    (y, m), _, _ = run(pool_layer("pool: MAX kernel_size: 3 stride: 1 pad: 1", 2), [x])
    assert (y < 0).all()
    assert_close(y, ref)
    np.testing.assert_array_equal(m, mask)


def test_max_pooling_empty_window_gives_lowest_float_and_index_minus_one():
    x = rand(1, 2, 9, 9)
    (y, m), _, _ = run(pool_layer("pool: MAX kernel_size: 2 stride: 3", 2), [x])
    ref, mask, _ = naive_pool(x, "MAX", (2, 2), (3, 3), (0, 0))
    assert y.shape == (1, 2, 4, 4)
    assert (y[:, :, 3, :] == np.float32(-FLT_MAX)).all() and (m[:, :, :, 3] == -1).all()
    assert_close(y, ref)
    np.testing.assert_array_equal(m, mask)


@pytest.mark.parametrize("method", ["MAX", "AVE"])
def test_global_pooling(method):
    x = rand(2, 3, 5, 7)
    x[0, 0, 1, 2] = x[0, 0, 3, 4] = 10.0  # a tie: the first in row-major order wins
    msg = pool_layer(f"pool: {method} global_pooling: true", 2 if method == "MAX" else 1)
    dy = rand(2, 3, 1, 1)
    got, (gx,), _ = run(msg, [x], topdiffs=[dy] * len(msg.top))
    ref, mask, _ = naive_pool(x, method, (5, 7), (1, 1), (0, 0))
    _, _, dx = naive_pool(x, method, (5, 7), (1, 1), (0, 0), dy=dy)
    assert_close(got[0], ref)
    assert_close(gx, dx)
    if method == "MAX":
        np.testing.assert_array_equal(got[1], mask)
        assert got[1][0, 0, 0, 0] == 1 * 7 + 2


def test_stochastic_pooling_test_phase_is_weighted_average():
    x = np.abs(rand(2, 2, 5, 6))
    x[0, 0, :3, :3] = 0.0  # a window summing to 0 gives 0
    msg = pool_layer("pool: STOCHASTIC kernel_size: 3 stride: 2")
    (y,), _, _ = run(msg, [x])
    oh, ow = naive_pool_size(5, 3, 2, 0), naive_pool_size(6, 3, 2, 0)
    ref = np.zeros((2, 2, oh, ow))
    for n, c, i, j in itertools.product(range(2), range(2), range(oh), range(ow)):
        win = x[n, c, 2 * i : 2 * i + 3, 2 * j : 2 * j + 3]
        ref[n, c, i, j] = (win**2).sum() / win.sum() if win.sum() > 0 else 0.0
    assert_close(y, ref)


def test_stochastic_pooling_train_phase_samples_by_running_sum():
    x = np.abs(rand(2, 2, 5, 5)) + 0.1
    key = jax.random.PRNGKey(3)
    msg = pool_layer("pool: STOCHASTIC kernel_size: 2 stride: 2")
    dy = rand(2, 2, 3, 3)
    (y,), (gx,), _ = run(msg, [x], phase="TRAIN", key=key, topdiffs=[dy])
    u = np.asarray(jax.random.uniform(LowerCtx("TRAIN", "p", key).key(), (2, 2, 3, 3)))
    ref, dx = np.zeros((2, 2, 3, 3)), np.zeros_like(x)
    for n, c, i, j in itertools.product(range(2), range(2), range(3), range(3)):
        cells = [
            (h, w) for h in range(2 * i, min(2 * i + 2, 5)) for w in range(2 * j, min(2 * j + 2, 5))
        ]
        thres = u[n, c, i, j] * sum(x[n, c, h, w] for h, w in cells)
        run_sum = 0.0
        for h, w in cells:
            run_sum += x[n, c, h, w]
            if run_sum >= thres:
                ref[n, c, i, j] = x[n, c, h, w]
                dx[n, c, h, w] += dy[n, c, i, j]
                break
    assert_close(y, ref)
    assert_close(gx, dx)


@pytest.mark.parametrize(
    "text,tops,err",
    [
        ("pool: MAX kernel_size: 2 kernel_h: 2 kernel_w: 2", 1, ShapeError),
        ("pool: MAX kernel_h: 2", 1, ShapeError),
        ("pool: MAX", 1, ShapeError),
        ("pool: MAX kernel_size: 2 pad: 1 pad_h: 1 pad_w: 1", 1, ShapeError),
        ("pool: MAX kernel_size: 2 stride_h: 2", 1, ShapeError),
        ("pool: MAX kernel_size: 2 pad: 2", 1, ShapeError),
        ("pool: STOCHASTIC kernel_size: 3 pad: 1", 1, ShapeError),
        ("pool: MAX global_pooling: true kernel_size: 2", 1, ShapeError),
        ("pool: MAX global_pooling: true stride: 2", 1, ShapeError),
        ("pool: AVE kernel_size: 2", 2, GraphError),
    ],
)
def test_pooling_rejects_bad_params(text, tops, err):
    with pytest.raises(err):
        build(pool_layer(text, tops))


def test_pooling_needs_4_axes():
    entry, attrs = build(pool_layer("pool: MAX kernel_size: 2"))
    with pytest.raises(ShapeError):
        entry.shape(attrs, [(2, 3, 4)])
    with pytest.raises(NinccError):
        entry.shape(attrs, [(1, 1, 2, 2, 2)])


# ---------------------------------------------------------------- SPP


def naive_spp(x, height, method):
    n_, c_, H, W = x.shape
    levels = []
    for lv in range(height):
        bins = 2**lv
        k = (math.ceil(H / bins), math.ceil(W / bins))
        p = ((k[0] * bins - H + 1) // 2, (k[1] * bins - W + 1) // 2)
        levels.append(naive_pool(x, method, k, k, p)[0])
    if height == 1:
        return levels[0]
    return np.concatenate([y.reshape(n_, -1) for y in levels], axis=1)


@pytest.mark.parametrize("method", ["MAX", "AVE"])
@pytest.mark.parametrize("height,hw", [(3, (7, 9)), (2, (6, 5)), (1, (5, 4)), (3, (10, 11))])
def test_spp_matches_naive_pooling_levels(method, height, hw):
    x = rand(2, 3, *hw)
    msg = layer(
        f'type: "SPP" bottom: "x" top: "y" spp_param {{ pyramid_height: {height} pool: {method} }}'
    )
    ref = naive_spp(x, height, method)
    (y,), _, _ = run(msg, [x])
    assert_close(y, ref)
    # the gradient is that of the concatenated poolings
    dy = rand(*ref.shape)
    _, (gx,), _ = run(msg, [x], topdiffs=[dy])
    expect = np.zeros_like(x)
    flat = dy.reshape(2, -1)
    at = 0
    for lv in range(height):
        bins = 2**lv
        k = (math.ceil(hw[0] / bins), math.ceil(hw[1] / bins))
        p = ((k[0] * bins - hw[0] + 1) // 2, (k[1] * bins - hw[1] + 1) // 2)
        y_l = naive_pool(x, method, k, k, p)[0]
        part = flat[:, at : at + y_l[0].size].reshape(y_l.shape)
        at += y_l[0].size
        expect += naive_pool(x, method, k, k, p, dy=part)[2]
    assert_close(gx, expect, rel=1e-4)


def test_spp_rejects_a_plane_smaller_than_the_bins():
    msg = layer('type: "SPP" bottom: "x" top: "y" spp_param { pyramid_height: 3 }')
    entry, attrs = build(msg)
    with pytest.raises(ShapeError):
        entry.shape(attrs, [(1, 1, 3, 3)])
    with pytest.raises(ShapeError):
        build(layer('type: "SPP" bottom: "x" top: "y" spp_param { pool: MAX }'))


# ---------------------------------------------------------------- Im2col


def naive_im2col(x, k, s, p, d):
    n_, c_, H, W = x.shape
    oh = (H + 2 * p[0] - (d[0] * (k[0] - 1) + 1)) // s[0] + 1
    ow = (W + 2 * p[1] - (d[1] * (k[1] - 1) + 1)) // s[1] + 1
    y = np.zeros((n_, c_ * k[0] * k[1], oh, ow))
    for n, c, i, j, a, b in itertools.product(
        range(n_), range(c_), range(k[0]), range(k[1]), range(oh), range(ow)
    ):
        h, w = a * s[0] - p[0] + i * d[0], b * s[1] - p[1] + j * d[1]
        if 0 <= h < H and 0 <= w < W:
            y[n, (c * k[0] + i) * k[1] + j, a, b] = x[n, c, h, w]
    return y


@pytest.mark.parametrize(
    "text,k,s,p,d",
    [
        ("kernel_size: 3 stride: 2 pad: 1", (3, 3), (2, 2), (1, 1), (1, 1)),
        ("kernel_h: 2 kernel_w: 3 dilation: 2", (2, 3), (1, 1), (0, 0), (2, 2)),
        ("kernel_size: 2 stride: 1 stride: 2 pad: 0 pad: 1", (2, 2), (1, 2), (0, 1), (1, 1)),
    ],
)
def test_im2col_matches_naive_loops(text, k, s, p, d):
    x = rand(2, 3, 6, 5)
    msg = layer(f'type: "Im2col" bottom: "x" top: "y" convolution_param {{ {text} }}')
    ref = naive_im2col(x, k, s, p, d)
    dy = rand(*ref.shape)
    (y,), (gx,), _ = run(msg, [x], topdiffs=[dy])
    assert_close(y, ref)
    # col2im: every column entry's diff goes back to the input cell it copied
    dx = np.zeros_like(x)
    for n, c, i, j, a, b in itertools.product(
        range(2), range(3), range(k[0]), range(k[1]), range(ref.shape[2]), range(ref.shape[3])
    ):
        h, w = a * s[0] - p[0] + i * d[0], b * s[1] - p[1] + j * d[1]
        if 0 <= h < 6 and 0 <= w < 5:
            dx[n, c, h, w] += dy[n, (c * k[0] + i) * k[1] + j, a, b]
    assert_close(gx, dx)


# ---------------------------------------------------------------- Crop


@pytest.mark.parametrize(
    "text,shape,ref_shape,offsets",
    [
        ("axis: 2 offset: 1", (2, 4, 10, 12), (2, 3, 6, 7), (0, 0, 1, 1)),
        ("axis: 1 offset: 1 offset: 2 offset: 3", (2, 4, 10, 12), (2, 3, 6, 7), (0, 1, 2, 3)),
        ("", (2, 4, 10, 12), (2, 3, 6, 7), (0, 0, 0, 0)),
        ("axis: -1 offset: 4", (2, 4, 10, 12), (1, 1, 1, 7), (0, 0, 0, 4)),
    ],
)
def test_crop(text, shape, ref_shape, offsets):
    msg = layer(f'type: "Crop" bottom: "x" bottom: "r" top: "y" crop_param {{ {text} }}')
    x, r = rand(*shape), rand(*ref_shape)
    entry, attrs = build(msg)
    (top,) = entry.shape(attrs, [shape, ref_shape])
    dy = rand(*top)
    (y,), (gx, gr), _ = run(msg, [x, r], topdiffs=[dy])
    window = tuple(slice(o, o + n) for o, n in zip(offsets, top, strict=True))
    np.testing.assert_array_equal(y, x[window].astype(np.float32))
    dx = np.zeros_like(x)
    dx[window] = dy
    assert_close(gx, dx)
    assert (gr == 0).all()
    assert entry.no_grad_bottoms == (1,)


def test_crop_rejects_out_of_bounds_and_wrong_offset_count():
    entry, attrs = build(
        layer('type: "Crop" bottom: "x" bottom: "r" top: "y" crop_param { offset: 5 }')
    )
    with pytest.raises(ShapeError):
        entry.shape(attrs, [(2, 4, 10, 12), (2, 3, 6, 8)])
    entry, attrs = build(
        layer(
            'type: "Crop" bottom: "x" bottom: "r" top: "y" '
            "crop_param { offset: 1 offset: 1 offset: 1 }"
        )
    )
    with pytest.raises(ShapeError):
        entry.shape(attrs, [(2, 4, 10, 12), (2, 3, 6, 8)])


# ---------------------------------------------------------------- real-Caffe fixtures


FIXTURE_LAYERS = [
    ("conv_group_dilation", ["conv_a", "conv_b", "conv_c", "conv_d"]),
    ("deconv", ["deconv_a", "deconv_b", "deconv_c"]),
    (
        "pool_max_ceil",
        ["pool_a", "pool_b", "pool_b_floor", "pool_c", "pool_e", "pool_rect", "pool_mask"],
    ),
    ("pool_ave_pad", ["ave_a", "ave_b", "ave_c", "ave_d", "ave_e", "ave_f", "ave_g"]),
    ("pool_global", ["gmax", "gave"]),
    ("pool_pad_clip_axes", ["max_h1w0", "ave_h1w0", "max_h0w1", "ave_h0w1"]),
    ("pool_empty_window", ["pool_f"]),
    ("ties", ["pool_k2s2", "pool_k3s2", "pool_k3s1p1"]),
    ("spp", ["spp_max", "spp_ave"]),
    ("im2col", ["im2col", "im2col_dil"]),
    ("crop", ["crop_a", "crop_b", "crop_c", "crop_d", "crop_e"]),
]


@pytest.mark.parametrize("case,name", [(c, n) for c, names in FIXTURE_LAYERS for n in names])
def test_layer_against_caffe_fixture(case, name):
    d = fixture_case(case)
    man = manifest(case)
    net = text_format.Parse((d / "net.prototxt").read_text(), caffe_pb2.NetParameter())
    (msg,) = [m for m in net.layer if m.name == name]
    (info,) = [entry for entry in man["layers"] if entry["name"] == name]
    tol_f, tol_b = man["tolerances"]["forward_rel"], man["tolerances"]["backward_rel"]
    fwd = np.load(d / "forward.npz")
    bottoms = [fwd[b] for b in info["bottoms"]]
    params = []
    if (d / "params.npz").exists():
        stored = np.load(d / "params.npz")
        i = 0
        while f"{name}/{i}" in stored.files:
            params.append(stored[f"{name}/{i}"])
            i += 1
    has_backward = (d / "backward.npz").exists()
    bwd = np.load(d / "backward.npz") if has_backward else None
    topdiffs = [bwd[f"diff/{t}"] for t in info["tops"]] if has_backward else None
    tops, dbs, dps = run(msg, bottoms, params, topdiffs=topdiffs)
    for t, got in zip(info["tops"], tops, strict=True):
        assert_close(got, fwd[t], tol_f, what=f"{case}/{t}")
    if not has_backward:
        return
    for b, got in zip(info["bottoms"], dbs, strict=True):
        assert_close(got, bwd[f"diff/{b}"], tol_b, what=f"{case}/diff/{b}")
    for i, got in enumerate(dps):
        assert_close(got, bwd[f"param_diff/{name}/{i}"], tol_b, what=f"{case}/{name}/{i}")


def test_convolution_family_without_spatial_axes_and_3d_deconvolution():
    # no spatial axis after the channel axis: a grouped matrix product
    x, w, b = rand(5, 4), rand(6, 2, *()), rand(6)
    (y,), _, _ = run(conv_layer("num_output: 6 kernel_size: 1 group: 2"), [x], [w, b])
    ref = np.concatenate([x[:, :2] @ w[:3].T, x[:, 2:] @ w[3:].T], axis=1) + b
    assert_close(y, ref)
    x, w = rand(1, 2, 3, 2, 3), rand(2, 3, 2, 3, 2)
    msg = conv_layer(
        "num_output: 3 kernel_size: 2 kernel_size: 3 kernel_size: 2 stride: 2 "
        "pad: 1 bias_term: false",
        type_="Deconvolution",
    )
    dy = rand(1, 3, 4, 3, 4)
    ref, dx, dw, _ = naive_deconv(x, w, None, (2, 2, 2), (1, 1, 1), (1, 1, 1), 1, dy)
    (y,), (gx,), (gw,) = run(msg, [x], [w], topdiffs=[dy])
    assert_close(y, ref)
    assert_close(gx, dx)
    assert_close(gw, dw)
