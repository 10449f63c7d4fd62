"""Normalization layers (LRN, MVN, BatchNorm, Scale, Bias) against naive NumPy loops of Caffe's
Forward and Backward, and against the real-Caffe fixtures."""

from __future__ import annotations

import itertools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from google.protobuf import text_format

from nincc import caffe_pb2
from nincc.errors import GraphError, ShapeError
from nincc.layers.base import REGISTRY, Filler, LowerCtx

from ..conftest import fixture_case

RNG = np.random.default_rng(7)


# ---------------------------------------------------------------- helpers


def layer(text: str) -> caffe_pb2.LayerParameter:
    return text_format.Parse(text, caffe_pb2.LayerParameter())


def run(msg, bottoms, params=(), phase="TEST", topdiffs=None):
    """Jitted forward through the entry's lower; with topdiffs also the vjp.

    Returns (tops, bottom diffs, param diffs, new state) as float64 NumPy arrays.
    """
    entry = REGISTRY[msg.type]
    attrs = entry.attrs(msg)
    bshapes = [tuple(np.shape(b)) for b in bottoms]
    tshapes = entry.shape(attrs, bshapes)
    assert [s.shape for s in entry.blobs(attrs, bshapes)] == [tuple(np.shape(p)) for p in params]

    def f(ps, bs):
        ctx = LowerCtx(phase, msg.name or "t", top_names=tuple(msg.top))
        tops = entry.lower(attrs, list(ps), list(bs), ctx)
        return tops, (ctx.state or [])

    ps = [jnp.asarray(p, jnp.float32) for p in params]
    bs = [jnp.asarray(b, jnp.float32) for b in bottoms]
    tops, vjp, state = jax.vjp(jax.jit(f), ps, bs, has_aux=True)
    assert [tuple(t.shape) for t in tops] == [tuple(s) for s in tshapes]
    as64 = lambda xs: [np.asarray(x, np.float64) for x in xs]  # noqa: E731
    if topdiffs is None:
        return as64(tops), None, None, as64(state)
    dps, dbs = vjp([jnp.asarray(d, jnp.float32) for d in topdiffs])
    return as64(tops), as64(dbs), as64(dps), as64(state)


def assert_close(got, ref, rel=1e-5, what=""):
    """The fixtures' rule: |got - ref| <= rel * max|ref| elementwise (exact when ref is 0)."""
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    assert got.shape == ref.shape, f"{what}: shape {got.shape} != {ref.shape}"
    scale = float(np.max(np.abs(ref))) if ref.size else 0.0
    err = float(np.max(np.abs(got - ref))) if ref.size else 0.0
    assert err <= rel * scale or (scale == 0 and err == 0), f"{what}: err {err} scale {scale}"


def rand(*shape):
    return RNG.standard_normal(shape)


def numeric_vjp(f, x, dy, h=1e-6):
    """sum(dy * df/dx) by central differences of a float64 function (for smooth layers)."""
    g = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
        xp, xm = x.copy(), x.copy()
        xp[idx] += h
        xm[idx] -= h
        g[idx] = np.sum(dy * (f(xp) - f(xm))) / (2 * h)
    return g


# ---------------------------------------------------------------- LRN


def naive_lrn_across(x, size, alpha, beta, k, dy):
    """Caffe's CrossChannel Forward and Backward as loops over every element."""
    n_, c_, h_, w_ = x.shape
    pad = (size - 1) // 2
    scale = np.zeros_like(x)
    for n, c, h, w in itertools.product(*map(range, x.shape)):
        acc = 0.0
        for cc in range(c - pad, c + pad + 1):
            if 0 <= cc < c_:
                acc += x[n, cc, h, w] ** 2
        scale[n, c, h, w] = k + alpha / size * acc
    y = x * scale**-beta
    dx = np.zeros_like(x)
    for n, c, h, w in itertools.product(*map(range, x.shape)):
        acc = 0.0
        for cc in range(c - pad, c + pad + 1):  # outputs whose window holds channel c
            if 0 <= cc < c_:
                acc += dy[n, cc, h, w] * y[n, cc, h, w] / scale[n, cc, h, w]
        dx[n, c, h, w] = (
            dy[n, c, h, w] * scale[n, c, h, w] ** -beta
            - 2 * alpha * beta / size * x[n, c, h, w] * acc
        )
    return y, dx


def naive_lrn_within(x, size, alpha, beta):
    """WITHIN_CHANNEL: x * (1 + alpha * (zero-padded window sum of x^2) / size^2)^-beta."""
    pad = (size - 1) // 2
    _, _, h_, w_ = x.shape
    y = np.zeros_like(x)
    for n, c, h, w in itertools.product(*map(range, x.shape)):
        acc = 0.0
        for hh, ww in itertools.product(range(h - pad, h + pad + 1), range(w - pad, w + pad + 1)):
            if 0 <= hh < h_ and 0 <= ww < w_:
                acc += x[n, c, hh, ww] ** 2
        y[n, c, h, w] = x[n, c, h, w] * (1 + alpha * acc / size**2) ** -beta
    return y


@pytest.mark.parametrize(
    "size,alpha,beta,k", [(5, 1.0, 0.75, 1.0), (3, 0.3, 0.5, 2.0), (7, 2.0, 1.3, 0.5)]
)
def test_lrn_across_channels(size, alpha, beta, k):
    x, dy = rand(2, 6, 3, 4), rand(2, 6, 3, 4)
    msg = layer(
        f'type: "LRN" lrn_param {{ local_size: {size} alpha: {alpha} beta: {beta} k: {k} }}'
    )
    (y,), (dx,), _, state = run(msg, [x], topdiffs=[dy])
    ref_y, ref_dx = naive_lrn_across(x, size, alpha, beta, k, dy)
    assert_close(y, ref_y, 1e-5, "y")
    assert_close(dx, ref_dx, 1e-4, "dx")
    assert state == []


@pytest.mark.parametrize("size,alpha,beta", [(3, 0.3, 0.6), (5, 1.5, 0.9)])
def test_lrn_within_channel_ignores_k(size, alpha, beta):
    x, dy = rand(1, 2, 5, 6), rand(1, 2, 5, 6)
    text = f"norm_region: WITHIN_CHANNEL local_size: {size} alpha: {alpha} beta: {beta}"
    (y,), (dx,), _, _ = run(layer(f'type: "LRN" lrn_param {{ {text} k: 3 }}'), [x], topdiffs=[dy])
    ref_dx = numeric_vjp(lambda v: naive_lrn_within(v, size, alpha, beta), x, dy)
    assert_close(y, naive_lrn_within(x, size, alpha, beta), 1e-5, "y")
    assert_close(dx, ref_dx, 1e-4, "dx")


def test_lrn_rejects_even_window_and_non_4d_input():
    with pytest.raises(ShapeError, match="odd"):
        REGISTRY["LRN"].attrs(layer('type: "LRN" lrn_param { local_size: 4 }'))
    entry = REGISTRY["LRN"]
    attrs = entry.attrs(layer('type: "LRN"'))
    with pytest.raises(ShapeError, match="4-axis"):
        entry.shape(attrs, [(2, 3, 4)])


# ---------------------------------------------------------------- MVN


def naive_mvn(x, normalize_variance, across_channels, eps, dy):
    """Caffe's MVN per sample (or per sample and channel): forward and Caffe's Backward."""
    n_ = x.shape[0]
    c_ = x.shape[1] if x.ndim > 1 else 1
    rows = x.reshape(n_ if across_channels else n_ * c_, -1)
    drows = dy.reshape(rows.shape)
    y, dx = np.zeros_like(rows), np.zeros_like(rows)
    for r in range(rows.shape[0]):
        v, g = rows[r], drows[r]
        xc = v - v.mean()
        if not normalize_variance:
            y[r], dx[r] = xc, g - g.mean()
            continue
        std = np.sqrt(np.mean(xc**2)) + eps
        y[r] = xc / std
        dx[r] = (g - g.mean() - np.mean(g * y[r]) * y[r]) / std
    return y.reshape(x.shape), dx.reshape(x.shape)


@pytest.mark.parametrize(
    "text,norm,across,eps",
    [
        ("", True, False, 1e-9),
        ("across_channels: true", True, True, 1e-9),
        ("normalize_variance: false", False, False, 1e-9),
        ("normalize_variance: false across_channels: true", False, True, 1e-9),
        ("eps: 0.3", True, False, 0.3),  # Caffe's backward is not the derivative here
    ],
)
@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (3, 4)])
def test_mvn(text, norm, across, eps, shape):
    x, dy = rand(*shape), rand(*shape)
    (y,), (dx,), _, _ = run(layer(f'type: "MVN" mvn_param {{ {text} }}'), [x], topdiffs=[dy])
    ref_y, ref_dx = naive_mvn(x, norm, across, np.float32(eps), dy)
    assert_close(y, ref_y, 1e-5, "y")
    assert_close(dx, ref_dx, 1e-4, "dx")


def test_mvn_rejects_more_than_4_axes():
    entry = REGISTRY["MVN"]
    with pytest.raises(ShapeError, match="at most 4 axes"):
        entry.shape(entry.attrs(layer('type: "MVN"')), [(2, 2, 2, 2, 2)])


# ---------------------------------------------------------------- BatchNorm


def naive_batch_norm_batch(x, eps, dy):
    """Batch statistics per channel over (N, spatial): forward and Caffe's Backward."""
    c_ = x.shape[1]
    y, dx = np.zeros_like(x), np.zeros_like(x)
    means, variances = np.zeros(c_), np.zeros(c_)
    for c in range(c_):
        v, g = x[:, c], dy[:, c]
        means[c] = v.mean()
        variances[c] = np.mean((v - means[c]) ** 2)
        sd = np.sqrt(variances[c] + eps)
        y[:, c] = (v - means[c]) / sd
        dx[:, c] = (g - g.mean() - np.mean(g * y[:, c]) * y[:, c]) / sd
    return y, dx, means, variances


def bn_blobs(c, s):
    return [rand(c) * s, np.abs(rand(c)) * s + 0.1, np.array([s])]


@pytest.mark.parametrize("s", [3.5, 1.0, 0.0])
@pytest.mark.parametrize("phase,text", [("TEST", ""), ("TRAIN", "use_global_stats: true")])
def test_batch_norm_global_stats_divide_by_scale_factor(s, phase, text):
    x, dy = rand(2, 3, 4, 2), rand(2, 3, 4, 2)
    blobs = bn_blobs(3, s)
    msg = layer(f'type: "BatchNorm" batch_norm_param {{ {text} eps: 0.001 }}')
    (y,), (dx,), dps, state = run(msg, [x], blobs, phase=phase, topdiffs=[dy])
    inv = 0.0 if s == 0 else 1.0 / np.float32(s)
    mean = (blobs[0] * inv).reshape(1, 3, 1, 1)
    sd = np.sqrt(blobs[1] * inv + np.float32(0.001)).reshape(1, 3, 1, 1)
    assert_close(y, (x - mean) / sd, 1e-5, "y")
    assert_close(dx, dy / sd, 1e-4, "dx")
    assert state == []  # stored statistics are not touched
    for d in dps:  # Caffe never computes diffs for the statistics
        assert not d.any()


@pytest.mark.parametrize(
    "phase,text", [("TRAIN", ""), ("TEST", "use_global_stats: false"), ("TRAIN", "")]
)
@pytest.mark.parametrize("shape", [(4, 3, 2, 3), (5, 2), (3, 2, 4)])
def test_batch_norm_batch_stats_and_moving_average(phase, text, shape):
    x, dy = rand(*shape), rand(*shape)
    c = shape[1]
    blobs = bn_blobs(c, 2.0)
    msg = layer(
        f'type: "BatchNorm" batch_norm_param {{ {text} moving_average_fraction: 0.9 eps: 1e-4 }}'
    )
    (y,), (dx,), dps, state = run(msg, [x], blobs, phase=phase, topdiffs=[dy])
    ref_y, ref_dx, mean, var = naive_batch_norm_batch(x, np.float32(1e-4), dy)
    assert_close(y, ref_y, 1e-5, "y")
    assert_close(dx, ref_dx, 1e-4, "dx")
    m = x.size // c
    maf = np.float32(0.9)
    assert_close(state[0], maf * blobs[0] + mean, 1e-5, "mean acc")
    assert_close(state[1], maf * blobs[1] + m / (m - 1) * var, 1e-5, "var acc")
    assert_close(state[2], maf * blobs[2] + 1, 1e-6, "factor")
    for d in dps:
        assert not d.any()


def test_batch_norm_blobs_are_frozen_state():
    entry = REGISTRY["BatchNorm"]
    attrs = entry.attrs(layer('type: "BatchNorm" param { lr_mult: 0 } param { lr_mult: 0 }'))
    specs = entry.blobs(attrs, [(2, 5, 3, 3)])
    assert [s.shape for s in specs] == [(5,), (5,), (1,)]
    assert all(s.state and s.lr_mult == 0 and s.filler == Filler("constant", 0.0) for s in specs)
    with pytest.raises(GraphError, match="lr_mult"):
        entry.attrs(layer('type: "BatchNorm" param { lr_mult: 0 } param { lr_mult: 1 }'))
    with pytest.raises(ShapeError):
        entry.shape(attrs, [(7,)])


# ---------------------------------------------------------------- Scale and Bias


def naive_broadcast(x, factor, axis, op, dy):
    """y[i] = op(x[i], factor[i[axis : axis + k]]) by loops; the diffs of x and the factor."""
    k = factor.ndim
    y, dx, df = np.zeros_like(x), np.zeros_like(x), np.zeros_like(factor)
    for idx in np.ndindex(x.shape):
        fi = idx[axis : axis + k]
        if op == "mul":
            y[idx] = x[idx] * factor[fi]
            dx[idx] = dy[idx] * factor[fi]
            df[fi] += dy[idx] * x[idx]
        else:
            y[idx] = x[idx] + factor[fi]
            dx[idx] = dy[idx]
            df[fi] += dy[idx]
    return y, dx, df


SHAPE = (2, 3, 4, 2)


@pytest.mark.parametrize(
    "text,axis,fshape",
    [
        ("", 1, (3,)),
        ("axis: 0 num_axes: 2", 0, (2, 3)),
        ("axis: 1 num_axes: -1", 1, (3, 4, 2)),
        ("axis: -2 num_axes: 1", 2, (4,)),
        ("axis: 3 num_axes: 0", 0, ()),
    ],
)
@pytest.mark.parametrize("op", ["Scale", "Bias"])
def test_learned_factor(op, text, axis, fshape):
    field = "scale_param" if op == "Scale" else "bias_param"
    msg = layer(f'type: "{op}" {field} {{ {text} }}')
    x, dy, p = rand(*SHAPE), rand(*SHAPE), rand(*fshape)
    (y,), (dx,), (dp,), _ = run(msg, [x], [p], topdiffs=[dy])
    ref_y, ref_dx, ref_dp = naive_broadcast(x, p, axis, "mul" if op == "Scale" else "add", dy)
    assert_close(y, ref_y, 1e-5, "y")
    assert_close(dx, ref_dx, 1e-4, "dx")
    assert_close(dp, ref_dp, 1e-4, "dfactor")


@pytest.mark.parametrize(
    "text,axis,fshape",
    [("", 1, (3,)), ("axis: 0", 0, (2, 3, 4)), ("axis: 2", 2, (4, 2)), ("axis: 2", 0, ())],
)
@pytest.mark.parametrize("op", ["Scale", "Bias"])
def test_factor_as_second_bottom(op, text, axis, fshape):
    field = "scale_param" if op == "Scale" else "bias_param"
    msg = layer(f'type: "{op}" {field} {{ {text} }}')
    x, dy, f = rand(*SHAPE), rand(*SHAPE), rand(*fshape)
    (y,), (dx, df), dps, _ = run(msg, [x, f], topdiffs=[dy])
    ref_y, ref_dx, ref_df = naive_broadcast(x, f, axis, "mul" if op == "Scale" else "add", dy)
    assert_close(y, ref_y, 1e-5, "y")
    assert_close(dx, ref_dx, 1e-4, "dx")
    assert_close(df, ref_df, 1e-4, "dfactor")
    assert dps == []


@pytest.mark.parametrize("two_bottoms", [False, True])
def test_scale_with_bias_term(two_bottoms):
    msg = layer('type: "Scale" scale_param { axis: 1 num_axes: 2 bias_term: true }')
    x, dy, s, b = rand(*SHAPE), rand(*SHAPE), rand(3, 4), rand(3, 4)
    bottoms, params = ([x, s], [b]) if two_bottoms else ([x], [s, b])
    (y,), dbs, dps, _ = run(msg, bottoms, params, topdiffs=[dy])
    ref_y, ref_dx, ref_ds = naive_broadcast(x, s, 1, "mul", dy)
    _, _, ref_db = naive_broadcast(x, b, 1, "add", dy)
    assert_close(y, ref_y + b.reshape(1, 3, 4, 1), 1e-5, "y")
    assert_close(dbs[0], ref_dx, 1e-4, "dx")
    assert_close(dbs[1] if two_bottoms else dps[0], ref_ds, 1e-4, "dscale")
    assert_close(dps[-1], ref_db, 1e-4, "dbias")


def test_scale_bias_blob_specs_and_fillers():
    scale, bias = REGISTRY["Scale"], REGISTRY["Bias"]
    a = scale.attrs(layer('type: "Scale" scale_param { bias_term: true }'))
    specs = scale.blobs(a, [SHAPE])
    assert [s.shape for s in specs] == [(3,), (3,)]
    assert specs[0].filler == Filler("constant", 1.0)  # identity by default
    assert specs[1].filler == Filler("constant", 0.0)
    a = scale.attrs(layer('type: "Scale" scale_param { filler { type: "uniform" } }'))
    assert scale.blobs(a, [SHAPE])[0].filler.type == "uniform"
    # with a scalar second bottom the bias covers no axes
    a = scale.attrs(layer('type: "Scale" scale_param { bias_term: true }'))
    assert [s.shape for s in scale.blobs(a, [SHAPE, ()])] == [()]
    a = bias.attrs(layer('type: "Bias" bias_param { num_axes: -1 }'))
    assert [(s.shape, s.filler) for s in bias.blobs(a, [SHAPE])] == [((3, 4, 2), Filler())]


@pytest.mark.parametrize(
    "op,text,shapes",
    [
        ("Scale", "", [SHAPE, (4,)]),
        ("Bias", "axis: 2", [SHAPE, (4, 3)]),
        ("Scale", "num_axes: 4", [SHAPE]),
        ("Bias", "axis: 4", [SHAPE]),
        ("Scale", "num_axes: -2", [SHAPE]),
    ],
)
def test_scale_bias_shape_errors(op, text, shapes):
    entry = REGISTRY[op]
    field = "scale_param" if op == "Scale" else "bias_param"
    with pytest.raises(ShapeError):
        entry.shape(entry.attrs(layer(f'type: "{op}" {field} {{ {text} }}')), shapes)


def test_flops_count_each_element():
    n = 2 * 3 * 4 * 2
    cases = [
        ('type: "LRN" lrn_param { local_size: 3 }', 8 * n),
        ('type: "LRN" lrn_param { local_size: 3 norm_region: WITHIN_CHANNEL }', 14 * n),
        ('type: "MVN"', 5 * n),
        ('type: "MVN" mvn_param { normalize_variance: false }', 2 * n),
        ('type: "BatchNorm" batch_norm_param { use_global_stats: true }', 2 * n),
        ('type: "Scale" scale_param { bias_term: true }', 2 * n),
        ('type: "Bias"', n),
    ]
    for text, want in cases:
        msg = layer(text)
        entry = REGISTRY[msg.type]
        assert entry.flops(entry.attrs(msg), [SHAPE], [SHAPE]) == want, text


# ---------------------------------------------------------------- real-Caffe fixtures


class Case:
    """One fixture case: its net, Caffe's layer list, forward/backward blobs and params."""

    def __init__(self, name: str):
        d = fixture_case(name)
        self.man = json.loads((d / "manifest.json").read_text())
        self.net = text_format.Parse((d / "net.prototxt").read_text(), caffe_pb2.NetParameter())
        self.fwd = np.load(d / "forward.npz")
        self.bwd = np.load(d / "backward.npz")
        self.params = np.load(d / "params.npz") if (d / "params.npz").exists() else None
        self.tol_f = self.man["tolerances"]["forward_rel"]
        self.tol_b = self.man["tolerances"]["backward_rel"]

    def msg(self, name):
        (m,) = [m for m in self.net.layer if m.name == name]
        return m

    def info(self, name):
        (i,) = [i for i in self.man["layers"] if i["name"] == name]
        return i

    def blobs(self, name):
        out, i = [], 0
        while self.params is not None and f"{name}/{i}" in self.params.files:
            out.append(self.params[f"{name}/{i}"])
            i += 1
        return out


SINGLE = [
    ("lrn_across", ["lrn_a", "lrn_b", "lrn_c"]),
    ("lrn_within", ["lrn_w1", "lrn_w2"]),
    ("mvn", ["mvn_a", "mvn_b", "mvn_c", "mvn_d"]),
    (
        "scale_bias_two_bottoms",
        ["scale_2b", "scale_0", "scale_2b_bias", "bias_2b"]
        + ["scale_p", "scale_all", "scale_scalar", "bias_p"],
    ),
    ("batchnorm_scale", ["bn_zero", "bn_b", "sc_b"]),
]


@pytest.mark.parametrize("case,name", [(c, n) for c, names in SINGLE for n in names])
def test_layer_against_caffe_fixture(case, name):
    """Layers whose bottoms and tops are not in-place: checked alone, forward and backward."""
    fx = Case(case)
    info = fx.info(name)
    bottoms = [fx.fwd[b] for b in info["bottoms"]]
    topdiffs = [fx.bwd[f"diff/{t}"] for t in info["tops"]]
    tops, dbs, dps, state = run(
        fx.msg(name), bottoms, fx.blobs(name), phase=fx.man["phase"], topdiffs=topdiffs
    )
    for t, got in zip(info["tops"], tops, strict=True):
        assert_close(got, fx.fwd[t], fx.tol_f, f"{case}/{t}")
    for b, got in zip(info["bottoms"], dbs, strict=True):
        assert_close(got, fx.bwd[f"diff/{b}"], fx.tol_b, f"{case}/diff/{b}")
    for i, got in enumerate(dps):
        assert_close(got, fx.bwd[f"param_diff/{name}/{i}"], fx.tol_b, f"{case}/{name}/{i}")
    for i, got in enumerate(state):  # bn_b uses batch statistics in TEST and updates its blobs
        assert_close(got, fx.fwd[f"param_after_forward/{name}/{i}"], fx.tol_f, f"{name}/{i}")


@pytest.mark.parametrize(
    "case,bn,scale", [("batchnorm_scale", "bn_g", "sc_g"), ("batchnorm_train", "bn", "scale")]
)
def test_batch_norm_then_in_place_scale_against_caffe(case, bn, scale):
    """BatchNorm followed by an in-place Scale: forward.npz holds the Scale's output, and the
    blob's diff after backward is the diff of the BatchNorm's output."""
    fx = Case(case)
    (bottom,) = fx.info(bn)["bottoms"]
    (top,) = fx.info(bn)["tops"]
    bn_entry, sc_entry = REGISTRY["BatchNorm"], REGISTRY["Scale"]
    bn_attrs, sc_attrs = bn_entry.attrs(fx.msg(bn)), sc_entry.attrs(fx.msg(scale))
    phase = fx.man["phase"]
    as32 = lambda xs: [jnp.asarray(v, jnp.float32) for v in xs]  # noqa: E731
    bn_p, sc_p = as32(fx.blobs(bn)), as32(fx.blobs(scale))

    def normalize(x):
        ctx = LowerCtx(phase, bn)
        (mid,) = bn_entry.lower(bn_attrs, bn_p, [x], ctx)
        return mid, (ctx.state or [])

    def rescale(sc, mid):
        return sc_entry.lower(sc_attrs, sc, [mid], LowerCtx(phase, scale))[0]

    mid, vjp_bn, state = jax.vjp(jax.jit(normalize), jnp.asarray(fx.fwd[bottom]), has_aux=True)
    out, vjp_sc = jax.vjp(jax.jit(rescale), sc_p, mid)
    assert_close(out, fx.fwd[top], fx.tol_f, f"{case}/{top}")
    d_scale, d_mid = vjp_sc(jnp.asarray(fx.bwd[f"topdiff/{top}"]))
    # the diff Caffe leaves in the shared in-place blob is that of the BatchNorm's output
    assert_close(d_mid, fx.bwd[f"diff/{top}"], fx.tol_b, f"{case}/diff/{top}")
    for i, got in enumerate(d_scale):
        assert_close(got, fx.bwd[f"param_diff/{scale}/{i}"], fx.tol_b, f"{scale}/{i}")
    (dx,) = vjp_bn(d_mid)
    assert_close(dx, fx.bwd[f"diff/{bottom}"], fx.tol_b, f"{case}/diff/{bottom}")
    if phase == "TEST":
        assert state == []
        return
    for i, got in enumerate(state):
        assert_close(got, fx.fwd[f"param_after_forward/{bn}/{i}"], fx.tol_f, f"{bn}/{i}")
    # Caffe's statistics start at zero, so one forward leaves s = 1, the batch mean and the
    # unbiased batch variance
    x = fx.fwd[bottom].astype(np.float64)
    m = x.size // x.shape[1]
    assert_close(state[0], x.mean(axis=(0, 2, 3)), 1e-5, "mean")
    assert_close(state[1], x.var(axis=(0, 2, 3)) * m / (m - 1), 1e-5, "var")
    assert_close(state[2], [1.0], 0, "factor")
