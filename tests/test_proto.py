"""The Caffe schema: generated module is current, real Caffe files parse, defaults and numbers."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest
from google.protobuf import text_format, unknown_fields

from nincc import caffe_pb2

from .conftest import CORPUS, FIXTURES, REPO

CAFFEMODELS = sorted(FIXTURES.glob("*/*.caffemodel"))
CORPUS_FILES = sorted(CORPUS.glob("*.prototxt"))


def _unknown_fields(msg, path: str = "") -> list[str]:
    """Paths of every sub-message holding fields the schema does not know."""
    found = []
    if len(unknown_fields.UnknownFieldSet(msg)):
        found.append(path or msg.DESCRIPTOR.name)
    for field, value in msg.ListFields():
        if field.message_type is None:
            continue
        items = value if field.is_repeated else [value]
        for i, item in enumerate(items):
            found += _unknown_fields(item, f"{path}.{field.name}[{i}]")
    return found


def _caffe_rejected() -> set[str]:
    """Corpus files whose text Caffe itself could not parse (per the fixture records); files
    Caffe parsed but refused to upgrade (e.g. mixed V1/current layers) still parse here."""
    rejected = set()
    index = json.loads((FIXTURES / "shapes_corpus" / "index.json").read_text())
    for entry in index["files"]:
        if entry["status"] != "ok" and "pars" in json.dumps(entry["failures"]).lower():
            rejected.add(entry["corpus_file"])
    with open(FIXTURES / "upgrade_corpus" / "sources.tsv", newline="") as handle:
        for row in csv.DictReader(handle, delimiter="\t"):
            if row["exit_code"] != "0" and "pars" in row["caffe_messages"].lower():
                rejected.add(row["corpus_file"])
    return rejected


def test_generated_module_is_current():
    result = subprocess.run(
        [sys.executable, str(REPO / "tools" / "gen_proto.py"), "--check"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("path", CAFFEMODELS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_caffemodel_parses_losslessly(path):
    raw = path.read_bytes()
    net = caffe_pb2.NetParameter()
    net.ParseFromString(raw)
    assert _unknown_fields(net) == []
    # Both writers emit fields in number order, so a faithful schema re-serialises exactly.
    assert net.SerializeToString() == raw
    manifest = json.loads((path.parent / "manifest.json").read_text())
    if "layers" in manifest and path.name == "weights.caffemodel":
        assert [layer.name for layer in net.layer] == [x["name"] for x in manifest["layers"]]


def test_v1_caffemodel_uses_legacy_layers():
    net = caffe_pb2.NetParameter()
    net.ParseFromString((FIXTURES / "v1_nin_cifar10" / "weights_v1.caffemodel").read_bytes())
    manifest = json.loads((FIXTURES / "v1_nin_cifar10" / "manifest.json").read_text())
    assert len(net.layer) == 0
    # Caffe's upgrade adds the "input" layer in front; the V1 file has the rest.
    assert [layer.name for layer in net.layers] == [x["name"] for x in manifest["layers"]][1:]
    assert net.layers[0].type == caffe_pb2.V1LayerParameter.CONVOLUTION
    bias = net.layers[0].blobs[1]
    assert (bias.num, bias.channels, bias.height, bias.width) == (1, 1, 1, 192)
    assert not bias.HasField("shape")


@pytest.mark.parametrize("path", sorted(FIXTURES.glob("*/*.solverstate")), ids=str)
def test_solverstate_parses_losslessly(path):
    raw = path.read_bytes()
    state = caffe_pb2.SolverState()
    state.ParseFromString(raw)
    assert _unknown_fields(state) == []
    assert state.SerializeToString() == raw
    assert state.iter > 0 and len(state.history) > 0


@pytest.mark.parametrize("path", CORPUS_FILES, ids=lambda p: p.name)
def test_corpus_prototxt_parses(path):
    text = path.read_text()
    kind = caffe_pb2.SolverParameter if "solver" in path.name else caffe_pb2.NetParameter
    if path.name in _caffe_rejected():
        with pytest.raises(text_format.ParseError):
            text_format.Parse(text, kind())
        return
    msg = text_format.Parse(text, kind())
    assert msg.ListFields()


CAFFE_TEXT = sorted(FIXTURES.glob("upgrade_*/*.upgraded.prototxt"))
CAFFE_TEXT += sorted(FIXTURES.glob("*/net.prototxt"))


@pytest.mark.parametrize("path", CAFFE_TEXT, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_fixture_prototxt_round_trips(path):
    """Caffe's own text output parses, and printing it back loses nothing."""
    text = path.read_text()
    kind = caffe_pb2.NetParameter
    if "solver" in path.name or path.name.startswith("legacy_"):
        kind = caffe_pb2.SolverParameter
    msg = text_format.Parse(text, kind())
    again = text_format.Parse(text_format.MessageToString(msg), kind())
    assert again == msg


def test_defaults():
    assert caffe_pb2.ConvolutionParameter().bias_term is True
    assert caffe_pb2.ConvolutionParameter().group == 1
    assert caffe_pb2.PoolingParameter().pool == caffe_pb2.PoolingParameter.MAX
    assert caffe_pb2.PoolingParameter().round_mode == caffe_pb2.PoolingParameter.CEIL
    assert caffe_pb2.PoolingParameter().stride == 1
    lrn = caffe_pb2.LRNParameter()
    assert (lrn.local_size, lrn.alpha, lrn.beta, lrn.k) == (5, 1.0, 0.75, 1.0)
    assert lrn.norm_region == caffe_pb2.LRNParameter.ACROSS_CHANNELS
    bn = caffe_pb2.BatchNormParameter()
    assert bn.moving_average_fraction == pytest.approx(0.999, rel=1e-7)
    assert bn.eps == pytest.approx(1e-5, rel=1e-7)
    assert not bn.HasField("use_global_stats")
    solver = caffe_pb2.SolverParameter()
    assert solver.type == "SGD"
    assert solver.snapshot_format == caffe_pb2.SolverParameter.BINARYPROTO
    assert solver.solver_type == caffe_pb2.SolverParameter.SGD
    assert solver.regularization_type == "L2"
    assert (solver.iter_size, solver.average_loss, solver.random_seed) == (1, 1, -1)
    assert solver.clip_gradients == -1
    assert solver.momentum2 == pytest.approx(0.999, rel=1e-7)
    assert solver.delta == pytest.approx(1e-8, rel=1e-7)
    filler = caffe_pb2.FillerParameter()
    assert (filler.type, filler.std, filler.max, filler.sparse) == ("constant", 1.0, 1.0, -1)
    assert caffe_pb2.NetState().phase == caffe_pb2.TEST
    assert caffe_pb2.ParamSpec().lr_mult == 1.0 and caffe_pb2.ParamSpec().decay_mult == 1.0
    assert caffe_pb2.LossParameter().normalization == caffe_pb2.LossParameter.VALID
    assert caffe_pb2.ReshapeParameter().num_axes == -1
    assert caffe_pb2.CropParameter().axis == 2
    assert caffe_pb2.MVNParameter().eps == pytest.approx(1e-9, rel=1e-7)
    assert caffe_pb2.ExpParameter().base == -1.0
    assert caffe_pb2.DataParameter().backend == caffe_pb2.DataParameter.LEVELDB
    assert caffe_pb2.V0LayerParameter().biasterm is True


@pytest.mark.parametrize(
    "message, field, number",
    [
        ("NetParameter", "layer", 100),
        ("NetParameter", "layers", 2),
        ("NetParameter", "input_dim", 4),
        ("BlobProto", "shape", 7),
        ("BlobProto", "double_data", 8),
        ("LayerParameter", "convolution_param", 106),
        ("LayerParameter", "batch_norm_param", 139),
        ("LayerParameter", "recurrent_param", 146),
        ("LayerParameter", "swish_param", 147),
        ("LayerParameter", "clip_param", 148),
        ("ConvolutionParameter", "dilation", 18),
        ("PoolingParameter", "round_mode", 13),
        ("SolverParameter", "type", 40),
        ("SolverParameter", "layer_wise_reduce", 41),
        ("SolverParameter", "weights", 42),
        ("V1LayerParameter", "blobs_lr", 7),
        ("V1LayerParameter", "weight_decay", 8),
        ("V1LayerParameter", "layer", 1),
        ("V0LayerParameter", "blobs", 50),
        ("V0LayerParameter", "hdf5_output_param", 1001),
    ],
)
def test_field_numbers(message, field, number):
    assert getattr(caffe_pb2, message).DESCRIPTOR.fields_by_name[field].number == number


def test_v1_layer_type_numbers():
    v1 = caffe_pb2.V1LayerParameter
    assert (v1.CONVOLUTION, v1.INNER_PRODUCT, v1.SOFTMAX_LOSS, v1.DECONVOLUTION) == (4, 14, 21, 39)
    assert (v1.POOLING, v1.RELU, v1.ABSVAL, v1.THRESHOLD) == (17, 18, 35, 31)


def test_scalar_blob_as_caffe_writes_it():
    """Caffe stores a 0-axis blob with neither `shape` nor num/channels/height/width."""
    net = caffe_pb2.NetParameter()
    net.ParseFromString((FIXTURES / "neurons" / "weights.caffemodel").read_bytes())
    (blob,) = next(layer for layer in net.layer if layer.name == "prelu_s").blobs
    assert not blob.HasField("shape") and not blob.HasField("num")
    assert len(blob.data) == 1
