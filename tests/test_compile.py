"""CompiledNet: selected-blob forwards, outputs only, and the lowering choice."""

from __future__ import annotations

import numpy as np
import pytest

import nincc
from nincc.errors import InputError

from .conftest import REPO


@pytest.fixture(scope="module")
def cifar():
    graph = nincc.load_graph(
        REPO / "zoo" / "nin_cifar10_deploy.prototxt", input_shapes={"data": (2, 3, 32, 32)}
    )
    net = nincc.compile(graph)
    params = net.init(seed=1)
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    return net, params, {"data": x}


def test_selected_blobs_equal_the_full_forward(cifar):
    net, params, inputs = cifar
    full = net.apply(params, inputs)
    some = net.apply(params, inputs, blobs=["pool1", "cccp4"])
    assert sorted(some) == ["cccp4", "pool1"]
    for name, arr in some.items():
        np.testing.assert_allclose(np.asarray(arr), np.asarray(full[name]), rtol=1e-5, atol=1e-6)


def test_outputs_are_the_unconsumed_tops(cifar):
    net, params, inputs = cifar
    assert net.output_names == ["prob"]
    out = net.outputs(params, inputs)
    assert list(out) == ["prob"] and out["prob"].shape == (2, 10, 1, 1)
    # another jitted program: XLA may fuse differently, so the last bits may differ
    np.testing.assert_allclose(
        np.asarray(out["prob"]), np.asarray(net.apply(params, inputs)["prob"]), rtol=1e-5
    )


def test_unknown_blob_is_an_input_error(cifar):
    net, params, inputs = cifar
    with pytest.raises(InputError, match="no blob"):
        net.apply(params, inputs, blobs=["nope"])


def test_reference_lowerings_agree_with_fast(cifar):
    net, params, inputs = cifar
    plain = nincc.compile(net.graph, fast=False)
    a = np.asarray(net.apply(params, inputs, blobs=["pool3"])["pool3"])
    b = np.asarray(plain.apply(params, inputs, blobs=["pool3"])["pool3"])
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * np.abs(b).max())


BOUND_NET = """
input: "data" input_shape { dim: 2 dim: 4 dim: 9 dim: 9 }
input: "label" input_shape { dim: 2 }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
        convolution_param { num_output: 6 kernel_size: 3 stride: 2 pad: 1 group: 2 } }
layer { name: "relu" type: "ReLU" bottom: "conv" top: "conv" }
layer { name: "cccp" type: "Convolution" bottom: "conv" top: "cccp"
        convolution_param { num_output: 6 kernel_size: 1 } }
layer { name: "twin" type: "Convolution" bottom: "cccp" top: "twin"
        param { name: "shared" } convolution_param { num_output: 6 kernel_size: 2 } }
layer { name: "twin2" type: "Convolution" bottom: "twin" top: "twin2"
        param { name: "shared" } convolution_param { num_output: 6 kernel_size: 2 } }
layer { name: "pool" type: "Pooling" bottom: "twin2" top: "pool"
        pooling_param { pool: AVE global_pooling: true } }
layer { name: "ip" type: "InnerProduct" bottom: "pool" top: "ip"
        inner_product_param { num_output: 3 } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }
"""


@pytest.fixture(scope="module")
def bound_case(tmp_path_factory):
    path = tmp_path_factory.mktemp("bound") / "net.prototxt"
    path.write_text(BOUND_NET)
    net = nincc.compile(nincc.load_graph(path))
    rng = np.random.default_rng(4)
    # random blobs: the prototxt's fillers default to constant 0
    params = {
        name: [rng.standard_normal(np.shape(a)).astype(np.float32) for a in blobs]
        for name, blobs in net.init().items()
    }
    inputs = {
        "data": rng.standard_normal((2, 4, 9, 9)).astype(np.float32),
        "label": np.array([0, 2], np.float32),
    }
    return net, params, inputs


@pytest.mark.parametrize("held", [True, False])
def test_bound_net_equals_the_net_on_caffe_layout_params(kernels, bound_case, held):
    net, params, inputs = bound_case
    net = nincc.compile(net.graph)  # built on this test's kernels
    bound = net.bind(params, held=held)
    full = net.apply(params, inputs)
    blobs, _, loss = bound.run(inputs, loss=True)
    assert sorted(blobs) == sorted(full)
    for name in full:
        np.testing.assert_allclose(
            np.asarray(blobs[name]), np.asarray(full[name]), rtol=1e-5, atol=1e-6, err_msg=name
        )
    np.testing.assert_allclose(float(loss), float(net.loss(params, inputs)), rtol=1e-5)
    np.testing.assert_allclose(
        np.asarray(bound.outputs(inputs)["loss"]), np.asarray(full["loss"]), rtol=1e-5
    )
    assert sorted(bound.apply(inputs, blobs=["cccp"])) == ["cccp"]


def test_bound_net_holds_conv_weights_as_the_kernels_read_them(xla_kernels, bound_case):
    """XLA's kernels read (kh, kw, in, out); oneDNN's read Caffe's layout (nothing held)."""
    net, params, _ = bound_case
    net = nincc.compile(net.graph)
    held = net.bind(params, held=True).params
    # (out, in/group, kh, kw) -> (kh, kw, in/group, out), 1x1 included; biases and
    # InnerProduct weights as they were
    np.testing.assert_array_equal(held["conv"][0], np.transpose(params["conv"][0], (2, 3, 1, 0)))
    assert held["cccp"][0].shape == (1, 1, 6, 6) and held["twin"][0].shape == (2, 2, 6, 6)
    np.testing.assert_array_equal(held["conv"][1], params["conv"][1])
    np.testing.assert_array_equal(held["ip"][0], params["ip"][0])
    assert net.bind(params, held=False).params["conv"][0].shape == (6, 2, 3, 3)


def test_binding_params_that_do_not_fit_is_an_input_error(bound_case):
    net, params, _ = bound_case
    wrong = dict(params, cccp=[params["cccp"][0][:5], params["cccp"][1]])
    with pytest.raises(InputError, match=r"'cccp' blob 0: shape \[5, 6, 1, 1\]"):
        net.bind(wrong)
