"""Blobs held in oneDNN's blocked layout (nincc.act_layout, nincc.blocked): the layout
conversions against index arithmetic; blocked convolutions and poolings against float64
loops; which layers a step places blocked; and a net whose stem, 1x1 chain and pooling run
blocked giving the layer table's loss and gradients (input gradient included)."""

from __future__ import annotations

import dataclasses
import importlib
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nincc import act_layout, blocked, onednn, onednn_pool
from nincc.act_layout import BLOCKED, NCHW, NHWC

from .test_fast import BWD_REL, FWD_REL, assert_close, layer_attrs, randn
from .test_onednn import naive_conv

compile_module = importlib.import_module("nincc.compile")

needs_onednn = pytest.mark.skipif(
    not onednn.available(), reason="oneDNN is not installed (pip install 'nincc[onednn]')"
)


@pytest.mark.parametrize("src,dst", list(itertools.permutations((NCHW, NHWC, BLOCKED), 2)))
def test_convert_moves_every_element_where_its_layout_puts_it(src, dst):
    n, c, h, w = 2, 32, 3, 5
    caffe = np.arange(n * c * h * w, dtype=np.float32).reshape(n, c, h, w)

    def held(layout):
        out = np.zeros(act_layout.array_shape((n, c, h, w), layout), np.float32)
        for i, j, k, m in itertools.product(range(n), range(c), range(h), range(w)):
            if layout == NCHW:
                out[i, j, k, m] = caffe[i, j, k, m]
            elif layout == NHWC:
                out[i, k, m, j] = caffe[i, j, k, m]
            else:
                out[i, j // 16, k, m, j % 16] = caffe[i, j, k, m]
        return out

    got = act_layout.convert(jnp.asarray(held(src)), src, dst)
    np.testing.assert_array_equal(np.asarray(got), held(dst))
    assert act_layout.caffe_shape(got.shape, dst) == (n, c, h, w)


def test_blocked_needs_whole_blocks_of_channels():
    with pytest.raises(ValueError, match="multiples of 16"):
        act_layout.array_shape((1, 24, 2, 2), BLOCKED)


# n, h, w, c, o, kernel, stride, pad, src layout
CONVS = [
    (2, 9, 9, 3, 16, 3, 1, 1, NCHW),  # a stem
    (2, 36, 37, 3, 32, 11, 4, 0, NCHW),  # NIN ImageNet's stem; Caffe's last windows stop
    # one row and two columns short of the input's end (a negative high padding)
    (2, 6, 7, 32, 16, 1, 1, 0, BLOCKED),  # a 1x1 in a chain
    (1, 5, 5, 16, 32, 3, 2, 1, BLOCKED),
]


@needs_onednn
@pytest.mark.parametrize("n,h,w,c,o,k,s,p,src", CONVS)
def test_blocked_convolution_matches_a_naive_loop(n, h, w, c, o, k, s, p, src):
    """Forward (with the fused ReLU) and the three gradients, inputs and outputs held blocked
    (or the stem's input NCHW), against the float64 loop."""
    attrs = layer_attrs(
        "Convolution",
        f"convolution_param {{ num_output: {o} kernel_size: {k} stride: {s} pad: {p} }}",
    )
    rng = np.random.default_rng(c + o + k)
    x = rng.standard_normal((n, h, w, c)).astype(np.float32)
    wt = (rng.standard_normal((o, c, k, k)) * 0.2).astype(np.float32)
    b = rng.standard_normal(o).astype(np.float32)
    place = blocked.Placement(src, BLOCKED)
    relu = blocked.conv_lowering(place, 0.0, "mask")

    def f(x_held, wt, b):
        return relu(attrs, [wt, b], [x_held], None)[0]

    x_held = act_layout.convert(jnp.asarray(x), NHWC, src)
    spec = blocked.conv_spec(attrs, (n, c, h, w), 0.0, src, BLOCKED)
    crop = tuple(max(-p, 0) for p in spec.pad_high)
    xc = x[:, : h - crop[0], : w - crop[1], :]
    padding = tuple((lo, max(hi, 0)) for lo, hi in zip(spec.pad_low, spec.pad_high, strict=True))
    ref = naive_conv(xc, wt, b, (s, s), padding, (1, 1), 1)
    y = jax.jit(f)(x_held, wt, b)
    assert y.shape == act_layout.array_shape(spec.y_nchw, BLOCKED)
    assert_close(act_layout.convert(y, BLOCKED, NHWC), np.maximum(ref, 0), 1e-5, "forward")

    ct = rng.standard_normal(ref.shape).astype(np.float32)
    ct_held = act_layout.convert(jnp.asarray(ct), NHWC, BLOCKED)
    dx, dw, db = jax.jit(jax.grad(lambda *a: jnp.vdot(f(*a), ct_held), (0, 1, 2)))(
        x_held, wt, b
    )
    masked = np.where(ref > 0, ct, 0).astype(np.float64)
    want_dx, want_dw, want_db = naive_conv(xc, wt, b, (s, s), padding, (1, 1), 1, masked)
    full_dx = np.zeros_like(x, np.float64)
    full_dx[:, : h - crop[0], : w - crop[1], :] = want_dx
    assert_close(act_layout.convert(dx, src, NHWC), full_dx, 1e-5, "dx")
    assert_close(dw, want_dw, 1e-5, "dw")
    assert_close(db, want_db, 1e-5, "db")


def _held_matches_plain(attrs, plain_lower, held_lower, shape, seed):
    """A layer on blocked blobs (held_lower) gives the channels-last lowering's output and
    input gradient, on a random NHWC input of ``shape``."""
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal(shape), jnp.float32)

    def plain(x):
        return plain_lower(attrs, [], [x], None)[0]

    def held(x):
        xb = act_layout.convert(x, NHWC, BLOCKED)
        return act_layout.convert(held_lower(attrs, [], [xb], None)[0], BLOCKED, NHWC)

    ct = jnp.asarray(rng.standard_normal(plain(x).shape), jnp.float32)
    assert_close(jax.jit(held)(x), jax.jit(plain)(x), 1e-6, "forward")
    g_held = jax.jit(jax.grad(lambda x: jnp.vdot(held(x), ct)))(x)
    g_plain = jax.jit(jax.grad(lambda x: jnp.vdot(plain(x), ct)))(x)
    assert_close(g_held, g_plain, 1e-6, "dx")


@needs_onednn
@pytest.mark.parametrize("method", ["MAX", "AVE"])
def test_blocked_pooling_matches_the_channels_last_one(method):
    from nincc import fast

    attrs = layer_attrs("Pooling", f"pooling_param {{ pool: {method} kernel_size: 3 stride: 2 }}")
    geom = fast._pool_geom_of(attrs, (2, 32, 7, 7))
    assert onednn_pool.usable((2, 2, 7, 7, 16), geom, np.float32, BLOCKED) is not None
    _held_matches_plain(attrs, fast.pool_nhwc, blocked.pool_lowering, (2, 7, 7, 32), 1)


@needs_onednn
@pytest.mark.parametrize("within", [False, True])
def test_blocked_lrn_matches_the_channels_last_one(within):
    from nincc import fast

    region = "WITHIN_CHANNEL" if within else "ACROSS_CHANNELS"
    attrs = layer_attrs(
        "LRN", f"lrn_param {{ local_size: 5 alpha: 0.5 beta: 0.75 norm_region: {region} }}"
    )
    assert fast.onednn_lrn_spec(attrs, (2, 2, 5, 6, 16), np.float32, BLOCKED) is not None
    _held_matches_plain(attrs, fast.lrn_nhwc, blocked.lrn_lowering, (2, 5, 6, 32), 2)


NET = """
name: "chain"
layer {{ name: "data" type: "Input" top: "data"
        input_param {{ shape {{ dim: 2 dim: 3 dim: 14 dim: 14 }} }} }}
layer {{ name: "label" type: "Input" top: "label" input_param {{ shape {{ dim: 2 }} }} }}
layer {{ name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
        convolution_param {{ num_output: 32 kernel_size: 3 pad: 1
          weight_filler {{ type: "gaussian" std: 0.2 }}
          bias_filler {{ type: "gaussian" std: 0.1 }} }} }}
layer {{ name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1"
        relu_param {{ negative_slope: 0.1 }} }}
layer {{ name: "cccp1" type: "Convolution" bottom: "conv1" top: "cccp1"
        convolution_param {{ num_output: 32 kernel_size: 1
          weight_filler {{ type: "gaussian" std: 0.2 }}
          bias_filler {{ type: "gaussian" std: 0.1 }} }} }}
layer {{ name: "relu2" type: "ReLU" bottom: "cccp1" top: "cccp1" }}
layer {{ name: "cccp2" type: "Convolution" bottom: "cccp1" top: "cccp2"
        convolution_param {{ num_output: 16 kernel_size: 1
          weight_filler {{ type: "gaussian" std: 0.2 }}
          bias_filler {{ type: "gaussian" std: 0.1 }} }} }}
layer {{ name: "relu3" type: "ReLU" bottom: "cccp2" top: "cccp2" }}
{lrn}
layer {{ name: "pool1" type: "Pooling" bottom: "{pooled}" top: "pool1"
        pooling_param {{ pool: MAX kernel_size: 3 stride: 2 }} }}
{extra}
layer {{ name: "conv2" type: "Convolution" bottom: "pool1" top: "conv2"
        convolution_param {{ num_output: 10 kernel_size: 3
          weight_filler {{ type: "gaussian" std: 0.2 }} }} }}
layer {{ name: "pool2" type: "Pooling" bottom: "conv2" top: "pool2"
        pooling_param {{ pool: AVE global_pooling: true }} }}
layer {{ name: "loss" type: "SoftmaxWithLoss" bottom: "pool2" bottom: "label" top: "loss" }}
"""

# An LRN between the chain's last convolution and its pooling: run blocked too.
LRN = """
layer { name: "norm1" type: "LRN" bottom: "cccp2" top: "norm1"
        lrn_param { local_size: 5 alpha: 0.01 beta: 0.75 } }
"""

# A second reader of cccp1's top that is not a blocked layer: the chain stops before it.
SIDE = """
layer { name: "side" type: "Pooling" bottom: "cccp1" top: "side"
        pooling_param { pool: AVE global_pooling: true } }
"""


def _graph(tmp_path, extra="", lrn=False):
    import nincc

    path = tmp_path / "chain.prototxt"
    text = NET.format(extra=extra, lrn=LRN if lrn else "", pooled="norm1" if lrn else "cccp2")
    path.write_text(text)
    return nincc.load_graph(path, phase="TRAIN")


def _plan(graph):
    fusions = compile_module.relu_fusions(graph, True)
    return blocked.plan(
        graph,
        lambda layer, shapes: compile_module._fast_lowering(layer, shapes, True) is not None,
        {conv: (f.relu, f.slope) for conv, f in fusions.items()},
    )


@needs_onednn
def test_plan_places_the_stem_the_1x1_chain_and_its_pooling(tmp_path, monkeypatch):
    monkeypatch.delenv(blocked.OPT_OUT, raising=False)
    plan = _plan(_graph(tmp_path))
    assert {k: tuple(v) for k, v in plan.items()} == {
        "conv1": (NCHW, BLOCKED),
        "cccp1": (BLOCKED, BLOCKED),
        "cccp2": (BLOCKED, BLOCKED),
        "pool1": (BLOCKED, BLOCKED),
    }
    with_lrn = _plan(_graph(tmp_path, lrn=True))
    assert with_lrn["norm1"] == with_lrn["pool1"] == (BLOCKED, BLOCKED)
    assert with_lrn["cccp2"] == (BLOCKED, BLOCKED)
    monkeypatch.setenv(blocked.OPT_OUT, "0")
    assert _plan(_graph(tmp_path)) == {}


@needs_onednn
def test_plan_stops_a_chain_whose_output_another_layer_reads(tmp_path, monkeypatch):
    """cccp1's top is also read by a global pooling (not run blocked): cccp1 then writes
    channels-last, so cccp2 cannot read blocked, and conv1 feeds a layer outside the chain."""
    monkeypatch.delenv(blocked.OPT_OUT, raising=False)
    assert _plan(_graph(tmp_path, SIDE)) == {}


@needs_onednn
@pytest.mark.parametrize("extra,lrn", [("", False), ("", True), (SIDE, False)])
def test_net_with_blocked_chain_matches_the_table(tmp_path, monkeypatch, extra, lrn):
    """Loss, every parameter gradient and the input gradient (the stem's, which oneDNN
    computes channels-last) equal the layer table's."""
    import nincc
    from nincc.compile import run_graph, total_loss

    monkeypatch.delenv(blocked.OPT_OUT, raising=False)
    graph = dataclasses.replace(_graph(tmp_path, extra, lrn), phase="TEST")
    params = nincc.compile(graph, jit=False).init(seed=0)
    rng = np.random.default_rng(0)
    feeds = {"data": randn(rng, (2, 3, 14, 14)), "label": jnp.asarray([3.0, 7.0])}

    def value_and_grad(use_fast):
        def loss(p, data):
            env, _ = run_graph(graph, p, {**feeds, "data": data}, fast=use_fast)
            return total_loss(graph, env)

        return jax.jit(jax.value_and_grad(loss, (0, 1)))(params, feeds["data"])

    ref_loss, (ref, ref_dx) = value_and_grad(False)
    got_loss, (got, got_dx) = value_and_grad(True)
    assert_close(got_loss, ref_loss, FWD_REL, "loss")
    assert_close(got_dx, ref_dx, BWD_REL, "data")
    for name in ref:
        for i, (g, r) in enumerate(zip(got[name], ref[name], strict=True)):
            assert_close(g, r, BWD_REL, f"{name}[{i}]")
