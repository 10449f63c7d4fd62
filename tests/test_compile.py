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
