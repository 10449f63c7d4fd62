"""Recurrent layers (LSTM, RNN, LSTMUnit) against naive NumPy loops over time of Caffe's unrolled
nets (forward, and backpropagation through time with Caffe's LSTMUnit Backward), and against the
real-Caffe `recurrent` fixture."""

from __future__ import annotations

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

RNG = np.random.default_rng(11)


# ---------------------------------------------------------------- helpers


def layer(text: str) -> caffe_pb2.LayerParameter:
    return text_format.Parse(text, caffe_pb2.LayerParameter())


def run(msg, bottoms, params=(), topdiffs=None):
    """Jitted forward through the entry's lower and, with topdiffs, its vjp (float64 results)."""
    entry = REGISTRY[msg.type]
    attrs = entry.attrs(msg)
    bshapes = [tuple(np.shape(b)) for b in bottoms]
    tshapes = entry.shape(attrs, bshapes)
    assert [s.shape for s in entry.blobs(attrs, bshapes)] == [tuple(np.shape(p)) for p in params]

    def f(ps, bs):
        return entry.lower(attrs, list(ps), list(bs), LowerCtx("TEST", msg.name or "t"))

    ps = [jnp.asarray(p, jnp.float32) for p in params]
    bs = [jnp.asarray(b, jnp.float32) for b in bottoms]
    tops, vjp = jax.vjp(jax.jit(f), ps, bs)
    assert [tuple(t.shape) for t in tops] == [tuple(s) for s in tshapes]
    as64 = lambda xs: [np.asarray(x, np.float64) for x in xs]  # noqa: E731
    if topdiffs is None:
        return as64(tops), None, None
    dps, dbs = vjp([jnp.asarray(d, jnp.float32) for d in topdiffs])
    return as64(tops), as64(dbs), as64(dps)


def assert_close(got, ref, rel=1e-5, what=""):
    """The fixtures' rule: |got - ref| <= rel * max|ref| elementwise (exact when ref is 0)."""
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    assert got.shape == ref.shape, f"{what}: shape {got.shape} != {ref.shape}"
    scale = float(np.max(np.abs(ref))) if ref.size else 0.0
    err = float(np.max(np.abs(got - ref))) if ref.size else 0.0
    assert err <= rel * scale or (scale == 0 and err == 0), f"{what}: err {err} scale {scale}"


def rand(*shape, s=1.0):
    return RNG.standard_normal(shape) * s


def sigmoid(v):
    return 1.0 / (1.0 + np.exp(-v))


# ---------------------------------------------------------------- naive references


def unit_forward(c_prev, gates, cont):
    """Caffe's LSTMUnit for (N, H) cells, (N, 4H) gates (i, f, o, g) and (N,) cont."""
    h = c_prev.shape[1]
    i = sigmoid(gates[:, :h])
    f = np.where(cont[:, None] == 0, 0.0, cont[:, None] * sigmoid(gates[:, h : 2 * h]))
    o = sigmoid(gates[:, 2 * h : 3 * h])
    g = np.tanh(gates[:, 3 * h :])
    c = f * c_prev + i * g
    return c, o * np.tanh(c), (i, f, o, g)


def unit_backward(c_prev, c, acts, dc, dh):
    """Caffe's LSTMUnit Backward: the diffs of c_prev and of the gate inputs."""
    i, f, o, g = acts
    tanh_c = np.tanh(c)
    c_term = dc + dh * o * (1 - tanh_c**2)
    d_gates = np.concatenate(
        [
            c_term * g * i * (1 - i),
            c_term * c_prev * f * (1 - f),  # f includes cont: Caffe's rule, not d/dx
            dh * tanh_c * o * (1 - o),
            c_term * i * (1 - g * g),
        ],
        axis=1,
    )
    return c_term * f, d_gates


def naive_lstm(x, cont, w_x, b, w_h, dtop, w_s=None, xs=None, h0=None, c0=None):
    """LSTM over time as Caffe's unrolled net, then BPTT by hand.

    Returns (h for every step, h_T, c_T, dx, [dW_xc, db_c, (dW_s,) dW_hc], dxs)."""
    t_, n_ = x.shape[:2]
    hid = w_h.shape[1]
    xf = x.reshape(t_, n_, -1)
    static = 0.0 if xs is None else xs.reshape(n_, -1) @ w_s.T
    h = np.zeros((n_, hid)) if h0 is None else h0.reshape(n_, hid)
    c = np.zeros((n_, hid)) if c0 is None else c0.reshape(n_, hid)
    hs, saved = [], []
    for t in range(t_):
        hc = cont[t][:, None] * h
        gates = xf[t] @ w_x.T + b + hc @ w_h.T + static
        c_prev = c
        c, h, acts = unit_forward(c_prev, gates, cont[t])
        hs.append(h)
        saved.append((hc, c_prev, c, acts))
    h_last, c_last = h, c
    dx = np.zeros_like(xf)
    dw_x, db, dw_h = np.zeros_like(w_x), np.zeros_like(b), np.zeros_like(w_h)
    dw_s = None if w_s is None else np.zeros_like(w_s)
    dxs = None if xs is None else np.zeros((n_, w_s.shape[1]))
    dh_next, dc_next = np.zeros((n_, hid)), np.zeros((n_, hid))
    for t in reversed(range(t_)):
        hc, c_prev, c, acts = saved[t]
        dc_prev, dg = unit_backward(c_prev, c, acts, dc_next, dtop[t] + dh_next)
        dw_x += dg.T @ xf[t]
        db += dg.sum(axis=0)
        dw_h += dg.T @ hc
        dx[t] = dg @ w_x
        if xs is not None:
            dw_s += dg.T @ xs.reshape(n_, -1)
            dxs += dg @ w_s
        dh_next = cont[t][:, None] * (dg @ w_h)
        dc_next = dc_prev
    dparams = [dw_x, db] + ([] if w_s is None else [dw_s]) + [dw_h]
    return np.stack(hs), h_last, c_last, dx.reshape(x.shape), dparams, dxs


def naive_rnn(x, cont, w_x, b_h, w_hh, w_ho, b_o, dtop, w_s=None, xs=None, h0=None):
    """RNN over time as Caffe's unrolled net, then BPTT by hand.

    Returns (o for every step, h_T, dx, [dW_xh, db_h, (dW_s,) dW_hh, dW_ho, db_o], dxs)."""
    t_, n_ = x.shape[:2]
    hid = w_hh.shape[0]
    xf = x.reshape(t_, n_, -1)
    static = 0.0 if xs is None else xs.reshape(n_, -1) @ w_s.T
    h = np.zeros((n_, hid)) if h0 is None else h0.reshape(n_, hid)
    outs, saved = [], []
    for t in range(t_):
        hc = cont[t][:, None] * h
        h = np.tanh(xf[t] @ w_x.T + b_h + hc @ w_hh.T + static)
        o = np.tanh(h @ w_ho.T + b_o)
        outs.append(o)
        saved.append((hc, h, o))
    h_last = h
    dx = np.zeros_like(xf)
    grads = [np.zeros_like(p) for p in (w_x, b_h, w_hh, w_ho, b_o)]
    dw_s = None if w_s is None else np.zeros_like(w_s)
    dxs = None if xs is None else np.zeros((n_, w_s.shape[1]))
    dh_next = np.zeros((n_, hid))
    for t in reversed(range(t_)):
        hc, h, o = saved[t]
        do = dtop[t] * (1 - o**2)
        grads[3] += do.T @ h
        grads[4] += do.sum(axis=0)
        dz = (do @ w_ho + dh_next) * (1 - h**2)
        grads[0] += dz.T @ xf[t]
        grads[1] += dz.sum(axis=0)
        grads[2] += dz.T @ hc
        dx[t] = dz @ w_x
        if xs is not None:
            dw_s += dz.T @ xs.reshape(n_, -1)
            dxs += dz @ w_s
        dh_next = cont[t][:, None] * (dz @ w_hh)
    dparams = grads[:2] + ([] if w_s is None else [dw_s]) + grads[2:]
    return np.stack(outs), h_last, dx.reshape(x.shape), dparams, dxs


# cont: stream 0 runs on, stream 1 restarts at t = 2, stream 2 carries a non-binary indicator
CONT = np.array([[0, 0, 0], [1, 1, 0.5], [1, 0, 1], [1, 1, 0.25]], dtype=np.float64)


# ---------------------------------------------------------------- LSTMUnit


def test_lstm_unit_matches_caffe_rules():
    n, h = 4, 3
    c_prev, gates = rand(1, n, h), rand(1, n, 4 * h, s=2.0)
    cont = np.array([[1.0, 0.0, 0.5, 2.0]])  # non-binary values follow Caffe's f(1 - f) rule
    dc, dh = rand(1, n, h), rand(1, n, h)
    msg = layer('type: "LSTMUnit" top: "c" top: "h"')
    (c, hid), (dc_prev, dgates, dcont), dps = run(msg, [c_prev, gates, cont], topdiffs=[dc, dh])
    ref_c, ref_h, acts = unit_forward(c_prev[0], gates[0], cont[0])
    ref_dc_prev, ref_dgates = unit_backward(c_prev[0], ref_c, acts, dc[0], dh[0])
    assert_close(c, ref_c[None], 1e-5, "c")
    assert_close(hid, ref_h[None], 1e-5, "h")
    assert_close(dc_prev, ref_dc_prev[None], 1e-4, "dc_prev")
    assert_close(dgates, ref_dgates[None], 1e-4, "dgates")
    assert not dcont.any() and dps == []
    assert REGISTRY["LSTMUnit"].no_grad_bottoms == (2,)


@pytest.mark.parametrize(
    "shapes",
    [
        [(1, 2, 3), (1, 2, 11), (1, 2)],  # gates not 4H
        [(2, 2, 3), (2, 2, 12), (2, 2)],  # more than one step
        [(1, 2, 3), (1, 3, 12), (1, 2)],  # streams differ
        [(1, 2, 3), (1, 2, 12), (1, 2, 1)],  # cont with 3 axes
    ],
)
def test_lstm_unit_shape_errors(shapes):
    entry = REGISTRY["LSTMUnit"]
    with pytest.raises(ShapeError):
        entry.shape(None, shapes)


# ---------------------------------------------------------------- LSTM and RNN


def lstm_params(i, h, s=None):
    ps = [rand(4 * h, i, s=0.5), rand(4 * h, s=0.3)]
    if s is not None:
        ps.append(rand(4 * h, s, s=0.5))
    return ps + [rand(4 * h, h, s=0.5)]


def rnn_params(i, h, s=None):
    ps = [rand(h, i, s=0.5), rand(h, s=0.3)]
    if s is not None:
        ps.append(rand(h, s, s=0.5))
    return ps + [rand(h, h, s=0.5), rand(h, h, s=0.5), rand(h, s=0.3)]


@pytest.mark.parametrize("static", [False, True])
def test_lstm_against_naive_bptt(static):
    t, n, h = 4, 3, 5
    x, dtop = rand(t, n, 2, 3), rand(t, n, h)
    xs = rand(n, 2, 2) if static else None
    params = lstm_params(6, h, 4 if static else None)
    msg = layer(f'type: "LSTM" recurrent_param {{ num_output: {h} }} top: "h"')
    bottoms = [x, CONT] + ([xs] if static else [])
    (hs,), dbs, dps = run(msg, bottoms, params, topdiffs=[dtop])
    w_s = params[2] if static else None
    ref = naive_lstm(x, CONT, params[0], params[1], params[-1], dtop, w_s=w_s, xs=xs)
    ref_hs, _, _, ref_dx, ref_dps, ref_dxs = ref
    assert_close(hs, ref_hs, 1e-5, "h")
    assert_close(dbs[0], ref_dx, 1e-4, "dx")
    assert not dbs[1].any()  # no diff reaches cont
    for k, (got, want) in enumerate(zip(dps, ref_dps, strict=True)):
        assert_close(got, want, 1e-4, f"dparam {k}")
    if static:
        assert_close(dbs[2], ref_dxs.reshape(xs.shape), 1e-4, "dx_static")


@pytest.mark.parametrize("static", [False, True])
def test_rnn_against_naive_bptt(static):
    t, n, h = 4, 3, 3
    x, dtop = rand(t, n, 4), rand(t, n, h)
    xs = rand(n, 5) if static else None
    params = rnn_params(4, h, 5 if static else None)
    msg = layer(f'type: "RNN" recurrent_param {{ num_output: {h} }} top: "o"')
    bottoms = [x, CONT] + ([xs] if static else [])
    (out,), dbs, dps = run(msg, bottoms, params, topdiffs=[dtop])
    w_s = params[2] if static else None
    w_x, b_h, w_hh, w_ho, b_o = [p for k, p in enumerate(params) if not (static and k == 2)]
    ref_o, _, ref_dx, ref_dps, ref_dxs = naive_rnn(
        x, CONT, w_x, b_h, w_hh, w_ho, b_o, dtop, w_s=w_s, xs=xs
    )
    assert_close(out, ref_o, 1e-5, "o")
    assert_close(dbs[0], ref_dx, 1e-4, "dx")
    assert not dbs[1].any()
    for k, (got, want) in enumerate(zip(dps, ref_dps, strict=True)):
        assert_close(got, want, 1e-4, f"dparam {k}")
    if static:
        assert_close(dbs[2], ref_dxs, 1e-4, "dx_static")


def test_lstm_expose_hidden_shares_data_only():
    """Exposed initial states feed the first step but get no diff; diffs on the final-state tops
    are ignored (Caffe shares only their data with the unrolled net)."""
    t, n, h = 3, 2, 4
    x, h0, c0 = rand(t, n, 3), rand(1, n, h), rand(1, n, h)
    cont = np.ones((t, n))
    params = lstm_params(3, h)
    msg = layer(
        f'type: "LSTM" recurrent_param {{ num_output: {h} expose_hidden: true }} '
        'top: "h" top: "hT" top: "cT"'
    )
    dtop = rand(t, n, h)
    (hs, h_t, c_t), dbs, dps = run(
        msg, [x, cont, h0, c0], params, topdiffs=[dtop, rand(1, n, h), rand(1, n, h)]
    )
    ref_hs, ref_ht, ref_ct, ref_dx, ref_dps, _ = naive_lstm(
        x, cont, params[0], params[1], params[2], dtop, h0=h0, c0=c0
    )
    assert_close(hs, ref_hs, 1e-5, "h")
    assert_close(h_t, ref_ht[None], 1e-5, "h_T")
    assert_close(c_t, ref_ct[None], 1e-5, "c_T")
    assert_close(dbs[0], ref_dx, 1e-4, "dx")  # the final-state diffs added nothing
    assert not dbs[2].any() and not dbs[3].any()
    for k, (got, want) in enumerate(zip(dps, ref_dps, strict=True)):
        assert_close(got, want, 1e-4, f"dparam {k}")


def test_rnn_expose_hidden():
    t, n, h = 3, 2, 3
    x, h0, dtop = rand(t, n, 2), rand(1, n, h), rand(t, n, h)
    cont = np.ones((t, n))
    params = rnn_params(2, h)
    msg = layer(
        f'type: "RNN" recurrent_param {{ num_output: {h} expose_hidden: true }} top: "o" top: "hT"'
    )
    (out, h_t), dbs, _ = run(msg, [x, cont, h0], params, topdiffs=[dtop, rand(1, n, h)])
    ref_o, ref_ht, ref_dx, _, _ = naive_rnn(x, cont, *params, dtop, h0=h0)
    assert_close(out, ref_o, 1e-5, "o")
    assert_close(h_t, ref_ht[None], 1e-5, "h_T")
    assert_close(dbs[0], ref_dx, 1e-4, "dx")
    assert not dbs[2].any()


def test_blob_layout_and_fillers():
    lstm, rnn = REGISTRY["LSTM"], REGISTRY["RNN"]
    text = (
        'num_output: 5 weight_filler { type: "uniform" } bias_filler { type: "constant" value: 1 }'
    )
    a = lstm.attrs(layer(f'type: "LSTM" recurrent_param {{ {text} }} top: "h"'))
    specs = lstm.blobs(a, [(3, 2, 4, 2), (3, 2)])
    assert [s.shape for s in specs] == [(20, 8), (20,), (20, 5)]
    assert [s.filler.type for s in specs] == ["uniform", "constant", "uniform"]
    assert specs[1].filler == Filler("constant", 1.0)
    assert [s.shape for s in lstm.blobs(a, [(3, 2, 4), (3, 2), (2, 7)])] == [
        (20, 4),
        (20,),
        (20, 7),
        (20, 5),
    ]
    a = rnn.attrs(layer('type: "RNN" recurrent_param { num_output: 3 } top: "o"'))
    assert [s.shape for s in rnn.blobs(a, [(3, 2, 4), (3, 2)])] == [
        (3, 4),
        (3,),
        (3, 3),
        (3, 3),
        (3,),
    ]
    assert all(s.filler == Filler() and not s.state for s in rnn.blobs(a, [(3, 2, 4), (3, 2)]))


def test_recurrent_errors():
    lstm = REGISTRY["LSTM"]
    a = lstm.attrs(layer('type: "LSTM" recurrent_param { num_output: 2 } top: "h"'))
    with pytest.raises(ShapeError, match="cont"):
        lstm.shape(a, [(3, 2, 4), (3, 3)])
    with pytest.raises(ShapeError, match="static"):
        lstm.shape(a, [(3, 2, 4), (3, 2), (3, 5)])
    with pytest.raises(ShapeError, match="num_output"):
        lstm.attrs(layer('type: "LSTM" top: "h"'))
    with pytest.raises(GraphError, match="3 top"):
        lstm.attrs(
            layer('type: "LSTM" recurrent_param { num_output: 2 expose_hidden: true } top: "h"')
        )
    a = lstm.attrs(
        layer(
            'type: "LSTM" recurrent_param { num_output: 2 expose_hidden: true } '
            'top: "h" top: "a" top: "b"'
        )
    )
    with pytest.raises(GraphError):
        lstm.shape(a, [(3, 2, 4), (3, 2)])
    with pytest.raises(ShapeError, match="initial state"):
        lstm.shape(a, [(3, 2, 4), (3, 2), (1, 2, 3), (1, 2, 2)])


def test_flops_grow_with_steps_and_width():
    lstm = REGISTRY["LSTM"]
    a = lstm.attrs(layer('type: "LSTM" recurrent_param { num_output: 8 } top: "h"'))
    one = lstm.flops(a, [(1, 2, 16), (1, 2)], [(1, 2, 8)])
    assert lstm.flops(a, [(5, 2, 16), (5, 2)], [(5, 2, 8)]) == 5 * one
    # the matrix products dominate: W_xc (32 x 16) and W_hc (32 x 8), 2 flops per multiply-add
    assert one >= 2 * 2 * 32 * (16 + 8)


# ---------------------------------------------------------------- real-Caffe fixture


@pytest.mark.parametrize("name", ["lstm", "rnn", "lstm_unit"])
def test_against_caffe_fixture(name):
    d = fixture_case("recurrent")
    man = json.loads((d / "manifest.json").read_text())
    net = text_format.Parse((d / "net.prototxt").read_text(), caffe_pb2.NetParameter())
    (msg,) = [m for m in net.layer if m.name == name]
    (info,) = [i for i in man["layers"] if i["name"] == name]
    fwd, bwd, stored = (np.load(d / f) for f in ("forward.npz", "backward.npz", "params.npz"))
    params = [stored[k] for k in sorted(stored.files) if k.rpartition("/")[0] == name]
    bottoms = [fwd[b] for b in info["bottoms"]]
    topdiffs = [bwd[f"diff/{t}"] for t in info["tops"]]
    tops, dbs, dps = run(msg, bottoms, params, topdiffs=topdiffs)
    tol_f, tol_b = man["tolerances"]["forward_rel"], man["tolerances"]["backward_rel"]
    for t, got in zip(info["tops"], tops, strict=True):
        assert_close(got, fwd[t], tol_f, t)
    for b, got in zip(info["bottoms"], dbs, strict=True):
        assert_close(got, bwd[f"diff/{b}"], tol_b, f"diff/{b}")
    for i, got in enumerate(dps):
        assert_close(got, bwd[f"param_diff/{name}/{i}"], tol_b, f"{name}/{i}")
