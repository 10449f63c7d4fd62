"""The layout a trainer holds weights in between steps (nincc.layout)."""

from __future__ import annotations

import numpy as np
import pytest

import nincc
from nincc import onednn
from nincc.layout import kernel_layout, to_caffe, to_held

pytestmark = pytest.mark.usefixtures("xla_kernels")  # oneDNN's kernels hold nothing

NET = """
input: "data" input_shape { dim: 2 dim: 3 dim: 9 dim: 9 }
input: "vec" input_shape { dim: 2 dim: 18 }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
        convolution_param { num_output: 4 kernel_h: 3 kernel_w: 2 } }
layer { name: "odd" type: "Convolution" bottom: "data" top: "odd"
        param { name: "w" } convolution_param { num_output: 4 kernel_h: 3 kernel_w: 2 } }
layer { name: "flat" type: "InnerProduct" bottom: "vec" top: "flat"
        param { name: "w" share_mode: PERMISSIVE } inner_product_param { num_output: 4 } }
layer { name: "cccp" type: "Convolution" bottom: "conv" top: "cccp"
        convolution_param { num_output: 5 kernel_size: 1 } }
layer { name: "twin" type: "Convolution" bottom: "conv" top: "twin"
        param { name: "shared" } convolution_param { num_output: 4 kernel_size: 2 } }
layer { name: "twin2" type: "Convolution" bottom: "conv" top: "twin2"
        param { name: "shared" } convolution_param { num_output: 4 kernel_size: 2 } }
layer { name: "ip" type: "InnerProduct" bottom: "cccp" top: "ip"
        inner_product_param { num_output: 2 } }
"""


def test_only_kxk_convolution_weights_are_held(tmp_path):
    (tmp_path / "net.prototxt").write_text(NET)
    graph = nincc.load_graph(tmp_path / "net.prototxt")
    # conv's and twin's weights (twin2 shares twin's), not biases, 1x1 weights, ip's or a
    # weight an InnerProduct reads too
    assert kernel_layout(graph) == {"conv": (True, False), "twin": (True, False)}
    # a forward without gradients holds 1x1 weights too
    assert kernel_layout(graph, pointwise=True) == {
        "conv": (True, False), "cccp": (True, False), "twin": (True, False)
    }


def test_held_is_kh_kw_in_out_and_converts_back():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 3, 5, 2)).astype(np.float32)  # (out, in, kh, kw)
    b = rng.standard_normal(4).astype(np.float32)
    tree = {"conv": [w, b], "ip": [w[:, :, 0, 0]]}
    layout = {"conv": (True, False)}
    held = to_held(tree, layout)
    expect = np.empty((5, 2, 3, 4), np.float32)
    for o in range(4):
        for i in range(3):
            for y in range(5):
                for x in range(2):
                    expect[y, x, i, o] = w[o, i, y, x]
    np.testing.assert_array_equal(held["conv"][0], expect)
    assert held["conv"][1] is b and held["ip"][0] is tree["ip"][0]
    back = to_caffe(held, layout)
    np.testing.assert_array_equal(back["conv"][0], w)


def test_nothing_held_where_onednn_runs_the_convolutions(tmp_path, monkeypatch):
    if not onednn.available():
        pytest.skip("oneDNN is not installed")
    monkeypatch.delenv(onednn.OPT_OUT)
    path = tmp_path / "net.prototxt"
    path.write_text(NET)
    assert kernel_layout(nincc.load_graph(path), pointwise=True) == {}
