"""Caffe's legacy upgrades against the text real Caffe 1.0 wrote (upgrade_net/solver_proto_text)."""

from __future__ import annotations

import csv

import pytest
from google.protobuf import text_format

from nincc import caffe_pb2, upgrade
from nincc.errors import UpgradeError
from nincc.prototxt import load_net, load_solver, parse_net_text, parse_solver_text, to_text

from .conftest import CORPUS, FIXTURES, fixture_case


def _sources() -> list[dict[str, str]]:
    path = FIXTURES / "upgrade_corpus" / "sources.tsv"
    if not path.exists():
        return []
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle, delimiter="\t"))


SOURCES = _sources()
NET_ROWS = [r for r in SOURCES if r["tool"] == "upgrade_net_proto_text"]
SOLVER_ROWS = [r for r in SOURCES if r["tool"] == "upgrade_solver_proto_text"]
UPGRADED = [r for r in NET_ROWS if r["exit_code"] == "0" and r["output"] != "-"]
CURRENT = [r for r in SOURCES if r["status"] == "already_current"]
# Files Caffe refused to upgrade because they mix `layer` and `layers` (none in the corpus today).
REFUSED = [r for r in NET_ROWS if r["exit_code"] != "0" and "Refusing" in r["caffe_messages"]]


def _net(text: str) -> caffe_pb2.NetParameter:
    return text_format.Parse(text, caffe_pb2.NetParameter())


def _row_id(row: dict[str, str]) -> str:
    return row["corpus_file"]


# ----------------------------------------------------------------------------- golden files


@pytest.mark.parametrize("row", UPGRADED, ids=_row_id)
def test_corpus_upgrade_equals_caffe(row):
    expected_path = fixture_case("upgrade_corpus") / row["output"]
    net = parse_net_text((CORPUS / row["corpus_file"]).read_text(), row["corpus_file"])
    assert upgrade.needs_upgrade(net)
    upgraded, notes = upgrade.upgrade_net(net)
    expected = parse_net_text(expected_path.read_text())
    assert upgraded == expected
    assert notes
    # Printing the result reproduces Caffe's own file byte for byte.
    assert to_text(upgraded) == expected_path.read_text()


@pytest.mark.parametrize("row", CURRENT, ids=_row_id)
def test_already_current_files_are_unchanged(row):
    text = (CORPUS / row["corpus_file"]).read_text()
    if row["tool"] == "upgrade_solver_proto_text":
        solver = parse_solver_text(text)
        assert not upgrade.needs_solver_upgrade(solver)
        assert upgrade.upgrade_solver(solver) == solver
    else:
        net = parse_net_text(text)
        assert not upgrade.needs_upgrade(net)
        upgraded, notes = upgrade.upgrade_net(net)
        assert upgraded == net and notes == []


@pytest.mark.parametrize("row", REFUSED, ids=_row_id)
def test_corpus_files_caffe_refused_are_refused(row):
    with pytest.raises(UpgradeError, match="mixes"):
        load_net(CORPUS / row["corpus_file"])


def test_upgrade_does_not_modify_its_argument():
    row = next(r for r in UPGRADED if r["corpus_file"].startswith("v0_"))
    net = parse_net_text((CORPUS / row["corpus_file"]).read_text())
    before = net.SerializeToString()
    upgrade.upgrade_net(net)
    assert net.SerializeToString() == before


@pytest.mark.parametrize("case", ["v0_upgrade", "v1_nin_cifar10"])
def test_fixture_net_upgrade_equals_caffe(case):
    path = fixture_case(case)
    upgraded = load_net(path / "net.prototxt")
    assert upgraded == parse_net_text((path / "upgraded.prototxt").read_text())
    assert to_text(upgraded) == (path / "upgraded.prototxt").read_text()


def test_v0_padding_layer_is_folded_into_the_conv():
    net = load_net(fixture_case("v0_upgrade") / "net.prototxt")
    names = [layer.name for layer in net.layer]
    assert "pad1" not in names and names[0] == "input"
    conv1 = net.layer[1]
    assert conv1.name == "conv1" and list(conv1.bottom) == ["data"]
    assert list(conv1.convolution_param.pad) == [1]


SOLVER_CASES = sorted(
    p.name
    for p in (FIXTURES / "upgrade_solver").glob("legacy_*.prototxt")
    if ".upgraded" not in p.name
)


@pytest.mark.parametrize("name", SOLVER_CASES)
def test_solver_upgrade_equals_caffe(name):
    path = fixture_case("upgrade_solver")
    original = parse_solver_text((path / name).read_text())
    assert upgrade.needs_solver_upgrade(original)
    upgraded = load_solver(path / name)
    expected_path = path / name.replace(".prototxt", ".upgraded.prototxt")
    assert upgraded == parse_solver_text(expected_path.read_text())
    assert not upgraded.HasField("solver_type")
    assert to_text(upgraded) == expected_path.read_text()


# ----------------------------------------------------------------------------- individual passes


def test_mixed_layer_and_layers_is_refused():
    net = _net('layer { name: "a" type: "ReLU" } layers { name: "b" type: RELU }')
    with pytest.raises(UpgradeError, match="mixes 1 current 'layer' and 1 V1 'layers'"):
        upgrade.upgrade_net(net)


def test_mixed_file_error_names_the_file(tmp_path):
    path = tmp_path / "mixed.prototxt"
    path.write_text('layer { name: "a" type: "ReLU" }\nlayers { name: "b" type: RELU }\n')
    with pytest.raises(UpgradeError, match=r"mixed\.prototxt: the net mixes"):
        load_net(path)


def test_v1_param_specs_share_modes_and_loss_weight():
    net = _net(
        """
        layers {
          name: "ip" type: INNER_PRODUCT bottom: "x" top: "y"
          param: "w" param: "b" blob_share_mode: PERMISSIVE
          blobs_lr: 1 blobs_lr: 2 blobs_lr: 3 weight_decay: 0.5
          inner_product_param { num_output: 4 }
          include { phase: TEST } exclude { stage: "deploy" }
        }
        layers { name: "loss" type: SOFTMAX_LOSS bottom: "y" bottom: "l" loss_weight: 0.25
                 loss_param { ignore_label: 3 } }
        """
    )
    out = upgrade.upgrade_v1_net(net)
    expected = _net(
        """
        layer {
          name: "ip" type: "InnerProduct" bottom: "x" top: "y"
          include { phase: TEST } exclude { stage: "deploy" }
          param { name: "w" share_mode: PERMISSIVE lr_mult: 1 decay_mult: 0.5 }
          param { name: "b" lr_mult: 2 }
          param { lr_mult: 3 }
          inner_product_param { num_output: 4 }
        }
        layer { name: "loss" type: "SoftmaxWithLoss" bottom: "y" bottom: "l" loss_weight: 0.25
                loss_param { ignore_label: 3 } }
        """
    )
    assert out == expected


def test_every_v1_type_has_a_current_name_and_every_v1_param_is_carried():
    assert set(upgrade.V1_TYPES) == set(caffe_pb2.V1LayerParameter.LayerType.keys())
    v1_fields = {f.name for f in caffe_pb2.V1LayerParameter.DESCRIPTOR.fields}
    current_fields = {f.name for f in caffe_pb2.LayerParameter.DESCRIPTOR.fields}
    carried = {name for name in v1_fields if name.endswith("_param")}
    assert carried == set(upgrade.V1_PARAMS)
    assert carried <= current_fields


def test_data_transformation_fields_move_to_transform_param():
    net = _net(
        """
        layers { name: "d" type: DATA top: "x"
                 data_param { source: "db" batch_size: 4 scale: 0.5 mean_file: "m.binaryproto"
                              crop_size: 3 mirror: true } }
        layers { name: "w" type: WINDOW_DATA top: "z" window_data_param { source: "w.txt" } }
        layers { name: "r" type: RELU bottom: "x" top: "x" }
        """
    )
    assert upgrade.needs_data_upgrade(net)
    out = upgrade.upgrade_data_transformation(net)
    d, w, r = out.layers
    assert d.data_param == caffe_pb2.DataParameter(source="db", batch_size=4)
    assert d.transform_param == caffe_pb2.TransformationParameter(
        scale=0.5, mean_file="m.binaryproto", crop_size=3, mirror=True
    )
    # Caffe touches every data layer's transform_param once any needs the upgrade.
    assert w.HasField("transform_param") and w.transform_param.ByteSize() == 0
    assert not r.HasField("transform_param")
    assert not upgrade.needs_data_upgrade(out)


def test_v0_data_layer_fields_and_fields_caffe_drops():
    net = _net(
        """
        layers { layer { name: "d" type: "data" source: "db" batchsize: 8 cropsize: 5 mirror: true
                         meanfile: "m" scale: 2 rand_skip: 3 } top: "x" top: "l" }
        layers { layer { name: "p" type: "pool" pool: AVE kernelsize: 2 stride: 2 pad: 1
                         num_output: 7 } bottom: "x" top: "y" }
        """
    )
    notes: list[str] = []
    out = upgrade.upgrade_v0_net(net, notes)
    d, p = out.layers
    assert d.type == caffe_pb2.V1LayerParameter.DATA
    assert d.data_param == caffe_pb2.DataParameter(source="db", batch_size=8, rand_skip=3)
    assert d.transform_param == caffe_pb2.TransformationParameter(
        scale=2, mean_file="m", crop_size=5, mirror=True
    )
    assert p.pooling_param == caffe_pb2.PoolingParameter(
        pool=caffe_pb2.PoolingParameter.AVE, kernel_size=2, stride=2, pad=1
    )
    assert notes == ["V0 layer 'p': num_output does not apply to type 'pool'; dropped"]


def test_unknown_v0_type_is_refused():
    net = _net('layers { layer { name: "q" type: "quux" } top: "x" }')
    with pytest.raises(UpgradeError, match="unknown V0 type 'quux'"):
        upgrade.upgrade_net(net)


def test_v0_padding_into_a_non_conv_layer_is_refused():
    net = _net(
        """
        input: "data"
        layers { layer { name: "pad" type: "padding" pad: 2 } bottom: "data" top: "p" }
        layers { layer { name: "r" type: "relu" } bottom: "p" top: "r" }
        """
    )
    with pytest.raises(UpgradeError, match="padding layer feeds type 'relu'"):
        upgrade.upgrade_net(net)


def test_v0_unknown_bottom_is_refused():
    net = _net('layers { layer { name: "r" type: "relu" } bottom: "nowhere" top: "r" }')
    with pytest.raises(UpgradeError, match="bottom 'nowhere'"):
        upgrade.upgrade_net(net)


def test_input_shape_becomes_first_input_layer():
    net = _net(
        """
        input: "a" input_shape { dim: 1 dim: 2 } input: "b" input_shape { dim: 3 }
        layer { name: "c" type: "Concat" bottom: "a" bottom: "b" top: "c" }
        """
    )
    out, notes = upgrade.upgrade_net(net)
    expected = _net(
        """
        layer { name: "input" type: "Input" top: "a" top: "b"
                input_param { shape { dim: 1 dim: 2 } shape { dim: 3 } } }
        layer { name: "c" type: "Concat" bottom: "a" bottom: "b" top: "c" }
        """
    )
    assert out == expected and len(notes) == 1


def test_input_dims_are_taken_four_per_input():
    net = _net('input: "a" input: "b" ' + " ".join(f"input_dim: {d}" for d in range(1, 9)))
    out = upgrade.upgrade_input(net)
    shapes = [list(s.dim) for s in out.layer[0].input_param.shape]
    assert shapes == [[1, 2, 3, 4], [5, 6, 7, 8]]
    assert list(out.layer[0].top) == ["a", "b"]


def test_input_without_shape_is_dropped():
    out = upgrade.upgrade_input(_net('input: "data" layer { name: "r" type: "ReLU" }'))
    assert len(out.input) == 0 and [layer.name for layer in out.layer] == ["r"]


def test_too_few_input_dims_is_refused():
    with pytest.raises(UpgradeError, match="4 per input"):
        upgrade.upgrade_input(_net('input: "a" input_dim: 1 input_dim: 2'))


def test_batchnorm_upgrade_only_touches_three_spec_batchnorms():
    net = _net(
        """
        layer { name: "bn" type: "BatchNorm" param { lr_mult: 0 } param { lr_mult: 0 }
                param { lr_mult: 0 name: "keep" } }
        layer { name: "bn2" type: "BatchNorm" param { lr_mult: 1 } }
        layer { name: "c" type: "Convolution" param { lr_mult: 1 } param { lr_mult: 2 }
                param { lr_mult: 3 } }
        """
    )
    out = upgrade.upgrade_batchnorm(net)
    assert [(p.lr_mult, p.decay_mult, p.name) for p in out.layer[0].param] == [
        (0, 0, ""),
        (0, 0, ""),
        (0, 0, "keep"),
    ]
    assert all(p.HasField("decay_mult") for p in out.layer[0].param)
    assert out.layer[1] == net.layer[1] and out.layer[2] == net.layer[2]


# ----------------------------------------------------------------------------- CCCP, solver


def test_cccp_rewrite_is_opt_in():
    net = _net(
        """
        layer { name: "cccp1" type: "CCCP" bottom: "x" top: "y"
                convolution_param { num_output: 8 kernel_size: 1 } }
        layer { name: "cccp2" type: "cccp" bottom: "y" top: "z"
                convolution_param { num_output: 8 kernel_size: 1 } }
        """
    )
    assert upgrade.needs_cccp_rewrite(net)
    kept, notes = upgrade.upgrade_net(net)
    assert [layer.type for layer in kept.layer] == ["CCCP", "cccp"] and notes == []
    rewritten, notes = upgrade.upgrade_net(net, cccp=True)
    assert [layer.type for layer in rewritten.layer] == ["Convolution", "Convolution"]
    assert len(notes) == 1
    assert rewritten.layer[0].convolution_param == net.layer[0].convolution_param
    assert upgrade.rewrite_cccp(net) == rewritten
    assert not upgrade.needs_cccp_rewrite(rewritten)


@pytest.mark.parametrize(
    "enum,name",
    [("SGD", "SGD"), ("NESTEROV", "Nesterov"), ("ADAGRAD", "AdaGrad"), ("RMSPROP", "RMSProp"),
     ("ADADELTA", "AdaDelta"), ("ADAM", "Adam")],
)  # fmt: skip
def test_every_solver_type_enum(enum, name):
    solver = parse_solver_text(f'net: "n" solver_type: {enum}')
    out = upgrade.upgrade_solver(solver)
    assert out.type == name and out.HasField("type") and not out.HasField("solver_type")


def test_solver_with_both_type_fields_is_refused():
    solver = parse_solver_text('solver_type: ADAM type: "Adam"')
    with pytest.raises(UpgradeError, match=r"^s\.prototxt: solver sets both"):
        upgrade.upgrade_solver(solver, path="s.prototxt")
