"""The model zoo (zoo/*.prototxt): parameter counts, shapes and FLOPs from an independent walk.

The walk below is deliberately separate from nincc's graph builder: it reads the NetParameter with
protobuf only, filters layers by phase as Caffe's NetStateRule does, and applies Caffe's shape
formulas (convolution rounds down, pooling rounds up and drops a last window that would start in the
padding). It is first checked against the blob shapes real Caffe produced for corpus nets, then used
on the zoo nets.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from google.protobuf import text_format

from nincc import caffe_pb2

from .conftest import CORPUS, FIXTURES, REPO

ZOO = REPO / "zoo"
NETS = ("nin_cifar10", "nin_imagenet", "nin_zfnet")
# Parameter totals fixed by the published models (weights + biases of every layer).
PUBLISHED_PARAMS = {"nin_cifar10": 966_986, "nin_imagenet": 7_595_176}
# (channels, height, width) of one stored record per dataset; Data layers crop it.
DATASETS = {"cifar10": (3, 32, 32), "imagenet": (3, 256, 256)}
IMAGENET_NETS = ("nin_imagenet", "nin_zfnet")
LOSS_TYPES = {"SoftmaxWithLoss"}
SAME_SHAPE = {"ReLU", "Dropout", "LRN", "Softmax"}

Shape = tuple[int, ...]
DataShapes = Callable[[caffe_pb2.LayerParameter], list[Shape]]


# ---------------------------------------------------------------------------------------------
# The independent walk
# ---------------------------------------------------------------------------------------------


@dataclass
class Walk:
    """What walking one net in one phase gives: blob shapes, parameter shapes, FLOPs."""

    blobs: dict[str, Shape] = field(default_factory=dict)
    params: list[tuple[str, list[Shape]]] = field(default_factory=list)
    flops: int = 0
    layers: list[caffe_pb2.LayerParameter] = field(default_factory=list)

    @property
    def n_params(self) -> int:
        return sum(math.prod(s) for _, shapes in self.params for s in shapes)


def load_net(path: Path) -> caffe_pb2.NetParameter:
    return text_format.Parse(path.read_text(), caffe_pb2.NetParameter())


def load_solver(path: Path) -> caffe_pb2.SolverParameter:
    return text_format.Parse(path.read_text(), caffe_pb2.SolverParameter())


def rule_matches(rule: caffe_pb2.NetStateRule, phase: int) -> bool:
    """Caffe's StateMeetsRule restricted to phase (the zoo uses no levels or stages)."""
    for unused in ("min_level", "max_level"):
        if rule.HasField(unused):
            raise NotImplementedError(f"rule field {unused} is outside this walk")
    if rule.stage or rule.not_stage:
        raise NotImplementedError("stage rules are outside this walk")
    return not rule.HasField("phase") or rule.phase == phase


def in_phase(layer: caffe_pb2.LayerParameter, phase: int) -> bool:
    if layer.include:
        return any(rule_matches(r, phase) for r in layer.include)
    return not any(rule_matches(r, phase) for r in layer.exclude)


def two_d(repeated, h: int, w: int, default: int) -> tuple[int, int]:
    """A spatial (h, w) pair from Caffe's repeated field or its explicit _h/_w fields."""
    if h or w:
        return h, w
    values = list(repeated) or [default]
    return (values[0], values[-1])


def conv_shape(layer: caffe_pb2.LayerParameter, bottom: Shape, walk: Walk) -> Shape:
    p = layer.convolution_param
    n, c, height, width = bottom
    kh, kw = two_d(p.kernel_size, p.kernel_h, p.kernel_w, 0)
    ph, pw = two_d(p.pad, p.pad_h, p.pad_w, 0)
    sh, sw = two_d(p.stride, p.stride_h, p.stride_w, 1)
    dh, dw = two_d(p.dilation, 0, 0, 1)
    group = p.group
    ho = (height + 2 * ph - (dh * (kh - 1) + 1)) // sh + 1
    wo = (width + 2 * pw - (dw * (kw - 1) + 1)) // sw + 1
    shapes: list[Shape] = [(p.num_output, c // group, kh, kw)]
    if p.bias_term:
        shapes.append((p.num_output,))
    walk.params.append((layer.name, shapes))
    macs = p.num_output * ho * wo * (c // group) * kh * kw
    walk.flops += n * (2 * macs + (p.num_output * ho * wo if p.bias_term else 0))
    return (n, p.num_output, ho, wo)


def pool_shape(layer: caffe_pb2.LayerParameter, bottom: Shape) -> Shape:
    p = layer.pooling_param
    n, c, height, width = bottom
    if p.global_pooling:
        kh, kw = height, width
    else:
        kh, kw = (p.kernel_h, p.kernel_w) if p.kernel_h else (p.kernel_size, p.kernel_size)
    ph, pw = (p.pad_h, p.pad_w) if p.pad_h or p.pad_w else (p.pad, p.pad)
    sh, sw = (p.stride_h, p.stride_w) if p.stride_h else (p.stride, p.stride)
    out = []
    for size, k, pad, s in ((height, kh, ph, sh), (width, kw, pw, sw)):
        o = -(-(size + 2 * pad - k) // s) + 1  # ceil
        if pad and (o - 1) * s >= size + pad:  # the last window must start inside the image
            o -= 1
        out.append(o)
    return (n, c, out[0], out[1])


def ip_shape(layer: caffe_pb2.LayerParameter, bottom: Shape, walk: Walk) -> Shape:
    p = layer.inner_product_param
    axis = p.axis % len(bottom)
    fan_in = math.prod(bottom[axis:])
    batch = math.prod(bottom[:axis])
    shapes: list[Shape] = [(p.num_output, fan_in)]
    if p.bias_term:
        shapes.append((p.num_output,))
    walk.params.append((layer.name, shapes))
    walk.flops += batch * (2 * fan_in * p.num_output + (p.num_output if p.bias_term else 0))
    return (*bottom[:axis], p.num_output)


def walk_net(net: caffe_pb2.NetParameter, phase: int, data_shapes: DataShapes) -> Walk:
    """Every blob's shape, every parameter blob's shape and the conv/IP FLOPs of one phase."""
    walk = Walk()
    for layer in net.layer:
        if not in_phase(layer, phase):
            continue
        walk.layers.append(layer)
        bottoms = [walk.blobs[b] for b in layer.bottom]
        kind = layer.type
        if kind == "Data":
            tops = data_shapes(layer)
        elif kind == "Input":
            tops = [tuple(s.dim) for s in layer.input_param.shape]
        elif kind == "Convolution":
            tops = [conv_shape(layer, bottoms[0], walk)]
        elif kind == "Pooling":
            tops = [pool_shape(layer, bottoms[0])]
        elif kind == "InnerProduct":
            tops = [ip_shape(layer, bottoms[0], walk)]
        elif kind in SAME_SHAPE:
            tops = [bottoms[0]]
        elif kind in LOSS_TYPES or kind == "Accuracy":
            tops = [() for _ in layer.top]  # a loss without a top gets an unnamed scalar
        else:
            raise NotImplementedError(f"layer {layer.name}: type {kind} is outside this walk")
        assert len(tops) == len(layer.top), layer.name
        walk.blobs.update(zip(layer.top, tops, strict=True))
    return walk


def zoo_data_shapes(layer: caffe_pb2.LayerParameter) -> list[Shape]:
    """Data tops for the zoo's LMDB sources data/<dataset>_{train,val}_lmdb."""
    match = re.fullmatch(r"data/(\w+?)_(train|val)_lmdb", layer.data_param.source)
    assert match, f"unexpected source {layer.data_param.source!r}"
    c, h, w = DATASETS[match.group(1)]
    crop = layer.transform_param.crop_size
    batch = layer.data_param.batch_size
    return [(batch, c, crop or h, crop or w), (batch,)]


def zoo_walks(net: str) -> dict[str, Walk]:
    """The train_val net in both phases and the deploy net."""
    train_val = load_net(ZOO / f"{net}.prototxt")
    deploy = load_net(ZOO / f"{net}_deploy.prototxt")
    return {
        "TRAIN": walk_net(train_val, caffe_pb2.TRAIN, zoo_data_shapes),
        "TEST": walk_net(train_val, caffe_pb2.TEST, zoo_data_shapes),
        "deploy": walk_net(deploy, caffe_pb2.TEST, zoo_data_shapes),
    }


def flops_per_image(walk: Walk) -> int:
    batch = walk.blobs["data"][0]
    assert walk.flops % batch == 0
    return walk.flops // batch


# ---------------------------------------------------------------------------------------------
# The walk itself against real Caffe
# ---------------------------------------------------------------------------------------------

CAFFE_SHAPES = FIXTURES / "shapes_corpus"
CAFFE_UPGRADED = FIXTURES / "upgrade_corpus"
WALK_CHECKS = {  # corpus net -> current-format text of it
    "nin_cifar10_train_val": CAFFE_UPGRADED / "nin_cifar10_train_val.upgraded.prototxt",
    "nin_imagenet_train_val": CAFFE_UPGRADED / "nin_imagenet_train_val.upgraded.prototxt",
    "bvlc_alexnet_train_val": CORPUS / "bvlc_alexnet_train_val.prototxt",
    "bvlc_reference_caffenet_train_val": CORPUS / "bvlc_reference_caffenet_train_val.prototxt",
    "vgg16_deploy": CAFFE_UPGRADED / "vgg16_deploy.upgraded.prototxt",
}


def caffe_shapes(name: str, phase: str) -> dict:
    path = CAFFE_SHAPES / f"{name}.{phase}.shapes.json"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    return json.loads(path.read_text())


def substituted_data(ref: dict) -> DataShapes:
    """Data tops as Caffe's shape run recorded them (it replaced Data layers by Input layers)."""

    def shapes(layer: caffe_pb2.LayerParameter) -> list[Shape]:
        for sub in ref["substitutions"]:
            if sub["layer"] == layer.name and sub["batch_size"] == layer.data_param.batch_size:
                return [tuple(sub["tops"][t]) for t in layer.top]
        raise KeyError(layer.name)

    return shapes


@pytest.mark.parametrize("phase", ["TRAIN", "TEST"])
@pytest.mark.parametrize("name", sorted(WALK_CHECKS))
def test_walk_reproduces_caffe_shapes(name: str, phase: str) -> None:
    ref = caffe_shapes(name, phase)
    if not WALK_CHECKS[name].is_file():
        pytest.skip(f"{WALK_CHECKS[name]} not found")
    walk = walk_net(load_net(WALK_CHECKS[name]), getattr(caffe_pb2, phase), substituted_data(ref))
    caffe_blobs = {b: tuple(s) for b, s in ref["blobs"]}
    assert {b: caffe_blobs.get(b) for b in walk.blobs} == walk.blobs
    expected_params = [
        (layer["name"], [tuple(s) for s in layer["param_shapes"]])
        for layer in ref["layers"]
        if layer["param_shapes"]
    ]
    assert walk.params == expected_params


# ---------------------------------------------------------------------------------------------
# The zoo nets
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("net", sorted(PUBLISHED_PARAMS))
def test_parameter_count_matches_published_model(net: str) -> None:
    for which, walk in zoo_walks(net).items():
        assert walk.n_params == PUBLISHED_PARAMS[net], which


@pytest.mark.parametrize("net", NETS)
def test_deploy_has_the_train_val_parameter_layers(net: str) -> None:
    walks = zoo_walks(net)
    assert walks["TRAIN"].params == walks["TEST"].params == walks["deploy"].params
    # Beyond names and shapes: every layer between input and head is the same message.
    body = {
        "train_val": [
            layer
            for layer in load_net(ZOO / f"{net}.prototxt").layer
            if layer.type not in {"Data", "Accuracy", *LOSS_TYPES}
        ],
        "deploy": [
            layer
            for layer in load_net(ZOO / f"{net}_deploy.prototxt").layer
            if layer.type not in {"Input"} and layer.name != "prob"
        ],
    }
    assert [x.name for x in body["train_val"]] == [x.name for x in body["deploy"]]
    assert body["train_val"] == body["deploy"]


@pytest.mark.parametrize("net", NETS)
def test_deploy_ends_in_softmax_prob_without_loss(net: str) -> None:
    deploy = load_net(ZOO / f"{net}_deploy.prototxt")
    types = [layer.type for layer in deploy.layer]
    assert types[0] == "Input" and types.count("Input") == 1
    assert not LOSS_TYPES & set(types) and "Data" not in types and "Accuracy" not in types
    last = deploy.layer[-1]
    assert (last.type, last.name, list(last.top)) == ("Softmax", "prob", ["prob"])
    walk = zoo_walks(net)["deploy"]
    classes = 10 if net == "nin_cifar10" else 1000
    assert math.prod(walk.blobs["prob"][1:]) == classes
    assert walk.blobs["prob"][1] == classes


@pytest.mark.parametrize("net", NETS)
def test_train_val_data_and_heads(net: str) -> None:
    dataset = "cifar10" if net == "nin_cifar10" else "imagenet"
    walks = zoo_walks(net)
    for phase, split in (("TRAIN", "train"), ("TEST", "val")):
        layers = walks[phase].layers
        data = [x for x in layers if x.type == "Data"]
        assert len(data) == 1
        assert data[0].data_param.source == f"data/{dataset}_{split}_lmdb"
        assert data[0].data_param.backend == caffe_pb2.DataParameter.LMDB
        assert len(data[0].include) == 1
    train_types = [x.type for x in walks["TRAIN"].layers]
    assert "SoftmaxWithLoss" in train_types and "Accuracy" not in train_types
    top_k = sorted(x.accuracy_param.top_k for x in walks["TEST"].layers if x.type == "Accuracy")
    assert top_k == ([1, 5] if net in IMAGENET_NETS else [1])
    assert walks["TEST"].blobs["accuracy"] == ()


@pytest.mark.parametrize("net", NETS)
def test_biases_learn_twice_as_fast_without_decay(net: str) -> None:
    """lr_mult 1/2 and decay_mult 1/0, except NIN CIFAR-10's last cccp (0.1/0.1 in the original)."""
    for layer in load_net(ZOO / f"{net}.prototxt").layer:
        if layer.type not in {"Convolution", "InnerProduct"}:
            continue
        got = [(p.lr_mult, p.decay_mult) for p in layer.param]
        if (net, layer.name) == ("nin_cifar10", "cccp6"):
            assert got == [(pytest.approx(0.1), 1), (pytest.approx(0.1), 0)]
        else:
            assert got == [(1, 1), (2, 0)], layer.name


# ---------------------------------------------------------------------------------------------
# Faithful to the authors' files
# ---------------------------------------------------------------------------------------------

V1_TYPES = {  # V1LayerParameter.LayerType name -> current type string
    "DATA": "Data",
    "CONVOLUTION": "Convolution",
    "RELU": "ReLU",
    "POOLING": "Pooling",
    "DROPOUT": "Dropout",
    "ACCURACY": "Accuracy",
    "SOFTMAX_LOSS": "SoftmaxWithLoss",
}
ORIGINALS = {"nin_cifar10": "nin_cifar10", "nin_imagenet": "nin_imagenet"}
ADDED_LAYERS = {"accuracy_top5"}  # asked for on ImageNet nets; absent from the originals
ADDED_BLOBS = {"accuracy_top5", "loss"}  # the original ImageNet loss layer has no named top


def resolved(msg) -> dict:
    """Every field of a message with defaults filled in, so explicit defaults compare equal."""
    out = {}
    for fd in msg.DESCRIPTOR.fields:
        value = getattr(msg, fd.name)
        if fd.is_repeated:
            out[fd.name] = [resolved(v) if fd.message_type else v for v in value]
        else:
            out[fd.name] = resolved(value) if fd.message_type else value
    return out


def corpus_file(name: str) -> Path:
    path = CORPUS / name
    if not path.is_file():
        pytest.skip(f"{path} not found")
    return path


@pytest.mark.parametrize("net", sorted(ORIGINALS))
def test_train_val_is_a_faithful_port(net: str) -> None:
    """Layer by layer against the authors' V1 text: type, blobs, multipliers and parameters."""
    original = load_net(corpus_file(f"{ORIGINALS[net]}_train_val.prototxt"))
    assert original.layers and not original.layer
    ported = [x for x in load_net(ZOO / f"{net}.prototxt").layer if x.name not in ADDED_LAYERS]
    assert len(ported) == len(original.layers)
    for old, new in zip(original.layers, ported, strict=True):
        kind = caffe_pb2.V1LayerParameter.LayerType.Name(old.type)
        assert (new.name, new.type) == (old.name, V1_TYPES[kind])
        assert list(new.bottom) == list(old.bottom)
        assert list(new.top)[: len(old.top)] == list(old.top)
        assert list(new.include) == list(old.include) and list(new.exclude) == list(old.exclude)
        assert [p.lr_mult for p in new.param] == pytest.approx(list(old.blobs_lr))
        assert [p.decay_mult for p in new.param] == pytest.approx(list(old.weight_decay))
        for sub in ("convolution_param", "pooling_param", "dropout_param", "accuracy_param"):
            assert resolved(getattr(new, sub)) == resolved(getattr(old, sub)), (new.name, sub)
        if kind == "DATA":
            assert new.data_param.batch_size == old.data_param.batch_size
            t_new, t_old = new.transform_param, old.transform_param
            assert (t_new.crop_size, t_new.mirror, t_new.scale) == (
                t_old.crop_size,
                t_old.mirror,
                t_old.scale,
            )
            assert bool(t_new.mean_file) == bool(t_old.mean_file)


@pytest.mark.parametrize("net", sorted(ORIGINALS))
@pytest.mark.parametrize("phase", ["TRAIN", "TEST"])
def test_zoo_blob_shapes_equal_caffes_for_the_original(net: str, phase: str) -> None:
    ref = caffe_shapes(f"{ORIGINALS[net]}_train_val", phase)
    walk = zoo_walks(net)[phase]
    expected = {b: tuple(s) for b, s in ref["blobs"] if b in walk.blobs}
    assert set(walk.blobs) - ADDED_BLOBS == set(expected) - ADDED_BLOBS
    assert {b: walk.blobs[b] for b in expected} == expected


@pytest.mark.parametrize("net", sorted(ORIGINALS))
def test_solver_is_the_original_but_for_paths(net: str) -> None:
    original = load_solver(corpus_file(f"{ORIGINALS[net]}_solver.prototxt"))
    ported = load_solver(ZOO / f"{net}_solver.prototxt")
    own = {"net", "snapshot_prefix", "solver_mode"}  # paths; solver_mode left at its default
    fields = {f.name: v for f, v in original.ListFields() if f.name not in own}
    assert {f.name: v for f, v in ported.ListFields() if f.name not in own} == fields
    assert ported.solver_mode == original.solver_mode  # GPU, the default


@pytest.mark.parametrize("net", NETS)
def test_solver_paths(net: str) -> None:
    solver = load_solver(ZOO / f"{net}_solver.prototxt")
    assert solver.net == f"zoo/{net}.prototxt" and (REPO / solver.net).is_file()
    assert solver.snapshot_prefix == f"snapshots/{net}"


def test_nin_imagenet_solver_settings() -> None:
    s = load_solver(ZOO / "nin_imagenet_solver.prototxt")
    assert (s.base_lr, s.lr_policy, s.gamma, s.stepsize) == (
        pytest.approx(0.01),
        "step",
        pytest.approx(0.1),
        200_000,
    )
    assert (s.momentum, s.weight_decay, s.max_iter) == (
        pytest.approx(0.9),
        pytest.approx(5e-4),
        450_000,
    )
    assert zoo_walks("nin_imagenet")["TRAIN"].blobs["data"] == (64, 3, 224, 224)


# ---------------------------------------------------------------------------------------------
# Network-in-ZFNet
# ---------------------------------------------------------------------------------------------


def test_nin_zfnet_follows_zfnet_geometry() -> None:
    """ZFNet's feature maps (paper Fig. 3): 110, 55, 26, 13, 13, 13, 6 on a 224 crop."""
    walk = zoo_walks("nin_zfnet")["deploy"]
    sizes = {
        "conv1": (96, 110),
        "cccp1": (96, 110),
        "pool1": (96, 55),
        "conv2": (256, 26),
        "cccp2": (256, 26),
        "pool2": (256, 13),
        "conv3": (512, 13),
        "cccp3": (256, 13),
        "conv4": (1024, 13),
        "cccp4": (512, 13),
        "conv5": (512, 13),
        "cccp5": (384, 13),
        "cccp6": (256, 13),
        "pool5": (256, 6),
    }
    for blob, (channels, side) in sizes.items():
        assert walk.blobs[blob][1:] == (channels, side, side), blob
    assert walk.blobs["fc6"][1:] == (4096,) and walk.blobs["fc8"][1:] == (1000,)
    cccp = [n for n, _ in walk.params if n.startswith("cccp")]
    assert cccp == [f"cccp{i}" for i in range(1, 7)]
    for name, shapes in walk.params:
        if name.startswith("cccp"):
            assert shapes[0][2:] == (1, 1), name
    drops = [x.bottom[0] for x in walk.layers if x.type == "Dropout"]
    assert drops == ["fc6", "fc7"]


# ---------------------------------------------------------------------------------------------
# The README table
# ---------------------------------------------------------------------------------------------


def readme_rows() -> dict[str, list[str]]:
    rows = {}
    for line in (ZOO / "README.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        name = cells[0].strip("`*")
        if line.startswith("|") and name in NETS:
            rows[name] = cells
    return rows


def first_int(cell: str) -> int:
    match = re.search(r"\d[\d,]*", cell)
    assert match, cell
    return int(match.group().replace(",", ""))


def test_readme_table_matches_the_files() -> None:
    rows = readme_rows()
    assert sorted(rows) == sorted(NETS)
    for net, cells in rows.items():
        walk = zoo_walks(net)["deploy"]
        params_cell, mb_cell, flops_cell = cells[3], cells[4], cells[5]
        assert first_int(params_cell) == walk.n_params, net
        mb = float(re.search(r"[\d.]+", mb_cell).group())
        assert mb == pytest.approx(walk.n_params * 4 / 1e6, abs=0.006), net
        assert first_int(flops_cell) == flops_per_image(walk), net
        for suffix in ("", "_deploy", "_solver"):
            assert f"{net}{suffix}.prototxt" in cells[1], (net, suffix)
