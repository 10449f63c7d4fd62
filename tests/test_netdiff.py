"""`nincc diff`: a legacy file and its upgrade are the same net; edits show up as layer, setting,
shape and parameter-count differences that agree with counts made by hand."""

from __future__ import annotations

from nincc import load_net_param, prototxt
from nincc.netdiff import diff_nets

from .conftest import REPO, fixture_case
from .test_inspect import run

ZOO = REPO / "zoo"


def test_v1_file_and_its_caffe_upgrade_show_no_difference(capsys):
    case = fixture_case("v1_nin_cifar10")
    code, out, err = run(
        capsys, "diff", case / "net.prototxt", case / "upgraded.prototxt", "--exit-code"
    )
    assert code == 0, err
    assert out.strip() == "no differences in phase TRAIN, TEST"


def _edited(tmp_path):
    """nin_cifar10_deploy with conv1 halved, drop3 removed and relu2 renamed."""
    net = load_net_param(ZOO / "nin_cifar10_deploy.prototxt")
    names = [layer.name for layer in net.layer]
    net.layer[names.index("conv1")].convolution_param.num_output = 96
    net.layer[names.index("relu2")].name = "relu2b"
    del net.layer[names.index("drop3")]
    path = tmp_path / "edited.prototxt"
    path.write_text(prototxt.to_text(net))
    return path


def test_edits_are_reported_with_hand_counted_parameters(capsys, tmp_path):
    edited = _edited(tmp_path)
    base = ZOO / "nin_cifar10_deploy.prototxt"
    code, out, err = run(capsys, "diff", base, edited, "--phase", "TEST", "--exit-code")
    assert code == 1, err
    # conv1: 192 -> 96 filters of 3x5x5 plus biases; cccp1 (160 1x1 filters) now reads 96 channels
    conv1 = (192 * 3 * 25 + 192, 96 * 3 * 25 + 96)
    cccp1 = (160 * 192 + 160, 160 * 96 + 160)
    assert "~ changed layer conv1 (Convolution)" in out
    assert "num_output: 192 -> 96" in out
    assert "param 0 shape: 192x3x5x5 -> 96x3x5x5" in out
    assert f"params: {conv1[0]:,} -> {conv1[1]:,}" in out
    assert f"params: {cccp1[0]:,} -> {cccp1[1]:,}" in out
    assert "~ conv1 1x192x32x32 -> 1x96x32x32" in out
    assert "- removed layer drop3 (Dropout)" in out
    assert "~ renamed layer relu2 (ReLU)" in out and "now named 'relu2b'" in out
    total = 966_986
    after = total + (conv1[1] - conv1[0]) + (cccp1[1] - cccp1[0])
    assert f"parameters: {total:,} -> {after:,} ({after - total:+,})" in out
    # the layers that did not change are not listed
    assert "cccp2" not in out and "conv3" not in out


def test_diff_api_compares_each_phase(tmp_path):
    diffs, notes = diff_nets(ZOO / "nin_cifar10_deploy.prototxt", _edited(tmp_path))
    assert [d.phase for d in diffs] == ["TRAIN", "TEST"] and notes == []
    for d in diffs:
        kinds = {(c.kind, c.name) for c in d.layers}
        assert kinds == {
            ("changed", "conv1"),
            ("changed", "cccp1"),
            ("removed", "drop3"),
            ("renamed", "relu2"),
        }
        assert not d.same


def test_a_phase_only_one_net_has_is_a_difference(capsys, tmp_path):
    deploy = tmp_path / "d.prototxt"
    deploy.write_text(
        'name: "d"\nlayer { name: "in" type: "Input" top: "x" input_param { shape { dim: 1 } } }\n'
    )
    test_only = tmp_path / "t.prototxt"
    test_only.write_text(
        'name: "d"\nlayer { name: "in" type: "Input" top: "x" include { phase: TEST }\n'
        "  input_param { shape { dim: 1 } } }\n"
    )
    code, out, err = run(capsys, "diff", deploy, test_only)
    assert code == 0, err
    assert "the second net has no layers in phase TRAIN" in out
    assert "no differences in phase TEST" in out
