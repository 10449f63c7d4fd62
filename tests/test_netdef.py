"""Layer definitions as Caffe's Net::ToProto writes them, checked against the files real Caffe
wrote (every fixture's weights.caffemodel, the solver cases' init and snapshot files)."""

from __future__ import annotations

import json

import numpy as np
import pytest

import nincc
from nincc import caffe_pb2
from nincc import caffemodel as cm
from nincc.build import NetState
from nincc.errors import GraphError
from nincc.netdef import full_blobs, net_to_proto, owned_blobs

from .conftest import FIXTURES

WEIGHT_CASES = sorted(p.parent.name for p in FIXTURES.glob("*/weights.caffemodel"))
SOLVER_FILES = sorted(f"{p.parent.name}/{p.name}" for p in FIXTURES.glob("solver_*/*.caffemodel"))


def _npz_params(path) -> dict[str, list[np.ndarray]]:
    """A case's params.npz ("<layer>/<i>", split at the last '/') regrouped per layer."""
    with np.load(path, allow_pickle=False) as ref:
        grouped: dict[str, dict[int, np.ndarray]] = {}
        for key in ref.files:
            layer, index = key.rsplit("/", 1)
            grouped.setdefault(layer, {})[int(index)] = ref[key]
    return {name: [blobs[i] for i in sorted(blobs)] for name, blobs in grouped.items()}


def _definitions(case, monkeypatch):
    """Our definitions for a case, built as Caffe ran it (from inside the case directory, since
    some layers read files by relative path)."""
    monkeypatch.chdir(case)
    manifest = json.loads((case / "manifest.json").read_text())
    net = nincc.load_net_param(case / "net.prototxt")
    graph = nincc.build_graph(net, phase=manifest.get("phase", "TRAIN"), insert_splits=True)
    return net_to_proto(net, graph)


def _without_blobs(raw: bytes) -> caffe_pb2.NetParameter:
    net = caffe_pb2.NetParameter.FromString(raw)
    for layer in net.layer:
        layer.ClearField("blobs")
    return net


@pytest.mark.parametrize("case", WEIGHT_CASES)
def test_definitions_equal_caffes(case, monkeypatch):
    ours = _definitions(FIXTURES / case, monkeypatch)
    theirs = _without_blobs((FIXTURES / case / "weights.caffemodel").read_bytes())
    assert ours.name == theirs.name
    assert [layer.name for layer in ours.layer] == [layer.name for layer in theirs.layer]
    for mine, caffes in zip(ours.layer, theirs.layer, strict=True):
        assert mine == caffes, mine.name


def _case_params(case) -> dict[str, list[np.ndarray]]:
    """params.npz; where a case has none, the caffemodel as read, checked against the
    manifest's float64 checksums of every param blob."""
    if (case / "params.npz").exists():
        return _npz_params(case / "params.npz")
    params = dict(cm.load_params(case / "weights.caffemodel"))
    checksums = json.loads((case / "manifest.json").read_text()).get("param_checksums", {})
    assert sum(len(blobs) for blobs in params.values()) == len(checksums)
    for key, ref in checksums.items():
        layer, index = key.rsplit("/", 1)
        blob = params[layer][int(index)].astype(np.float64)
        assert np.isclose(blob.sum(), ref["sum"], rtol=1e-9, atol=1e-9), key
        assert np.isclose((blob * blob).sum(), ref["sumsq"], rtol=1e-9), key
    return params


@pytest.mark.parametrize("case", WEIGHT_CASES)
def test_write_reproduces_caffes_file(case, monkeypatch, tmp_path):
    """Definitions from the graph + weights from params.npz: the very bytes Caffe wrote."""
    params = _case_params(FIXTURES / case)
    definitions = _definitions(FIXTURES / case, monkeypatch)
    out = tmp_path / "w.caffemodel"
    cm.write_caffemodel(out, definitions, params)
    assert out.read_bytes() == (FIXTURES / case / "weights.caffemodel").read_bytes()


@pytest.mark.parametrize("name", SOLVER_FILES)
def test_train_net_definitions_equal_caffes(name, monkeypatch):
    """The TRAIN nets of the solver cases (HDF5Data, loss layers) as Caffe's snapshots hold."""
    case, file = name.split("/")
    ours = _definitions(FIXTURES / case, monkeypatch)
    assert ours == _without_blobs((FIXTURES / case / file).read_bytes())


# ------------------------------------------------------------------------------------------------
# Caffe's rules on small nets (insert_splits.cpp, LossLayer::LayerSetUp, Net::Init)
# ------------------------------------------------------------------------------------------------

_INPUT = 'layer { name: "in" type: "Input" top: "x" top: "y" ' + (
    "input_param { shape { dim: 2 dim: 3 } shape { dim: 2 dim: 3 } } }\n"
)


def _proto(text: str, phase: str = "TEST", **kwargs) -> caffe_pb2.NetParameter:
    net = nincc.load_net_param('name: "t"\n' + text)
    return net_to_proto(net, nincc.build_graph(net, phase=phase, insert_splits=True, **kwargs))


def test_explicit_loss_weight_moves_to_the_split():
    """A loss top read by another layer: InsertSplits gives the Split [w, 0, ...] and clears the
    layer's loss_weight; the loss layer's SetUp then adds its default 1 again."""
    out = _proto(
        _INPUT + 'layer { name: "l" type: "EuclideanLoss" bottom: "x" bottom: "y" top: "loss" '
        "loss_weight: 2 }\n"
        'layer { name: "p" type: "Power" bottom: "loss" top: "p" }\n'
    )
    by_name = {layer.name: layer for layer in out.layer}
    split = by_name["loss_l_0_split"]
    assert list(split.bottom) == ["loss"]
    assert list(split.top) == ["loss_l_0_split_0", "loss_l_0_split_1"]
    assert list(split.loss_weight) == [2.0, 0.0]
    assert list(by_name["l"].loss_weight) == [1.0]
    assert list(by_name["p"].bottom) == ["loss_l_0_split_1"]  # split top 0 carries the loss
    assert [layer.name for layer in out.layer] == ["in", "l", "loss_l_0_split", "p"]


def test_non_loss_layer_with_loss_weight_read_twice():
    out = _proto(
        _INPUT + 'layer { name: "r" type: "Reduction" bottom: "x" top: "r" loss_weight: 0.5 }\n'
        'layer { name: "p" type: "Power" bottom: "r" top: "p" }\n'
    )
    by_name = {layer.name: layer for layer in out.layer}
    assert list(by_name["r"].loss_weight) == []
    assert list(by_name["r_r_0_split"].loss_weight) == [0.5, 0.0]


def test_phase_kept_when_set_and_filled_otherwise():
    out = _proto(
        _INPUT + 'layer { name: "a" type: "ReLU" bottom: "x" top: "a" phase: TRAIN }\n'
        'layer { name: "b" type: "ReLU" bottom: "y" top: "b" }\n'
    )
    assert [layer.phase for layer in out.layer] == [caffe_pb2.TEST, caffe_pb2.TRAIN, caffe_pb2.TEST]


def test_batchnorm_param_specs_completed():
    """BatchNorm::LayerSetUp appends `param { lr_mult: 0 }` for each blob without a spec."""
    out = _proto(
        'layer { name: "in" type: "Input" top: "x" input_param { shape { dim: 2 dim: 3 } } }\n'
        'layer { name: "bn" type: "BatchNorm" bottom: "x" top: "x" '
        "param { lr_mult: 0 decay_mult: 0 } }\n"
    )
    params = list(out.layer[1].param)
    assert len(params) == 3
    assert params[0] == caffe_pb2.ParamSpec(lr_mult=0, decay_mult=0)
    assert params[1] == params[2] == caffe_pb2.ParamSpec(lr_mult=0)


def test_filtered_by_state_and_stage():
    text = (
        _INPUT + 'layer { name: "d" type: "ReLU" bottom: "x" top: "z" include { phase: TRAIN } }\n'
        'layer { name: "d" type: "TanH" bottom: "x" top: "z" include { stage: "deploy" } }\n'
    )
    assert [layer.type for layer in _proto(text, phase="TRAIN").layer] == ["Input", "ReLU"]
    net = nincc.load_net_param('name: "t"\n' + text)
    graph = nincc.build_graph(net, phase="TEST", stages=["deploy"])
    out = net_to_proto(net, graph, NetState("TEST", 0, ("deploy",)))
    assert [layer.type for layer in out.layer] == ["Input", "TanH"]
    with pytest.raises(GraphError, match="lacks layer 'd'|does not follow"):
        net_to_proto(net, graph)  # without the stage, the graph does not fit the definitions


def test_graph_of_another_net_is_refused():
    net = nincc.load_net_param(FIXTURES / "split_implicit" / "net.prototxt")
    other = nincc.load_graph(FIXTURES / "nin_cifar10_deploy" / "net.prototxt")
    with pytest.raises(GraphError, match="does not follow"):
        net_to_proto(net, other)
    legacy = caffe_pb2.NetParameter()
    legacy.layers.add(name="x")
    with pytest.raises(GraphError, match="V1"):
        net_to_proto(legacy, other)


_SHARED = """
layer { name: "in" type: "Input" top: "x" input_param { shape { dim: 1 dim: 2 dim: 5 dim: 5 } } }
layer { name: "a" type: "Convolution" bottom: "x" top: "a"
        param { name: "w" } convolution_param { num_output: 3 kernel_size: 3 } }
layer { name: "b" type: "Convolution" bottom: "x" top: "b"
        param { name: "w" } convolution_param { num_output: 3 kernel_size: 3 } }
layer { name: "c" type: "InnerProduct" bottom: "a" top: "c"
        param { name: "v" } param { name: "u" } inner_product_param { num_output: 4 } }
layer { name: "d" type: "InnerProduct" bottom: "b" top: "d"
        param { name: "u2" } param { name: "u" } inner_product_param { num_output: 4 } }
"""


def test_full_and_owned_blobs_with_shared_params():
    graph = nincc.load_graph('name: "s"\n' + _SHARED)
    rng = np.random.default_rng(0)
    params = {
        name: [rng.standard_normal(s).astype(np.float32) for s in shapes]
        for name, shapes in graph.param_shapes().items()
    }
    # Owned blobs in order: a [w, bias], b [bias], c [v, u], d [u2] (d's blob 1 is c's blob 1).
    assert [len(params[n]) for n in "abcd"] == [2, 1, 2, 1]
    full = full_blobs(graph, params)
    assert full["b"][0] is not params["a"][0] and np.array_equal(full["b"][0], params["a"][0])
    assert np.array_equal(full["b"][1], params["b"][0])
    assert np.array_equal(full["d"][0], params["d"][0])
    assert np.array_equal(full["d"][1], params["c"][1])
    owned = owned_blobs(graph, params)
    assert owned["b"][0] is None and np.array_equal(owned["b"][1], params["b"][0])
    assert owned["d"][1] is None and np.array_equal(owned["d"][0], params["d"][0])
    assert [b is None for b in owned["a"] + owned["c"]] == [False] * 4
