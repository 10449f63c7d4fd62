"""Weights I/O against Caffe's own files: reading, fitting (CopyTrainedLayersFrom), writing."""

from __future__ import annotations

import json
import os
import warnings

import numpy as np
import pytest
from google.protobuf import text_format

from nincc import caffe_pb2
from nincc import caffemodel as cm
from nincc.errors import WeightsError

from .conftest import FIXTURES

WEIGHT_CASES = sorted(
    p.parent.name
    for p in FIXTURES.glob("*/weights.caffemodel")
    if (p.parent / "params.npz").exists()
)


def _npz_params(path) -> dict[str, list[np.ndarray]]:
    """params.npz ("<layer>/<i>") regrouped per layer, blobs in index order."""
    with np.load(path, allow_pickle=False) as ref:
        flat = {key: ref[key] for key in ref.files}
    grouped: dict[str, dict[int, np.ndarray]] = {}
    for key, value in flat.items():
        layer, index = key.rsplit("/", 1)
        grouped.setdefault(layer, {})[int(index)] = value
    return {name: [blobs[i] for i in sorted(blobs)] for name, blobs in grouped.items()}


def _assert_same_params(got, want):
    assert list(got) == list(want) or set(got) == set(want)
    for name, blobs in want.items():
        assert len(got[name]) == len(blobs), name
        for a, b in zip(got[name], blobs, strict=True):
            assert a.dtype == np.float32 and a.shape == b.shape, name
            assert np.array_equal(a, b), name


def _caffe_held_definitions(case) -> caffe_pb2.NetParameter:
    """The layer definitions Caffe's Net holds after Init, rebuilt from the fixture's prototxt and
    manifest: layers in Caffe's order (Split layers included, bottoms renamed to split tops),
    `phase` set, and the fields layers fill in at setup (BatchNorm's three lr_mult 0 ParamSpecs,
    a loss layer's default loss_weight 1). Those edits are Caffe's, not the writer's."""
    manifest = json.loads((case / "manifest.json").read_text())
    source = case / "upgraded.prototxt"
    if not source.exists():
        source = case / "net.prototxt"
    net = text_format.Parse(source.read_text(), caffe_pb2.NetParameter())
    assert not len(net.layers), "legacy text needs the upgrader"
    defined = {layer.name: layer for layer in net.layer}
    held = caffe_pb2.NetParameter(name=net.name)
    for entry in manifest["layers"]:
        layer = held.layer.add()
        if entry["name"] in defined:
            layer.CopyFrom(defined[entry["name"]])
        else:
            layer.name, layer.type = entry["name"], entry["type"]
        del layer.bottom[:], layer.top[:]
        layer.bottom.extend(entry["bottoms"])
        layer.top.extend(entry["tops"])
        if not layer.HasField("phase"):
            layer.phase = caffe_pb2.Phase.Value(manifest["phase"])
        if layer.type == "BatchNorm" and not len(layer.param):
            for _ in range(3):
                layer.param.add(lr_mult=0)
        if layer.type.endswith("Loss") and not len(layer.loss_weight):
            layer.loss_weight.append(1.0)
    return held


def _expected(params) -> dict[str, list[tuple]]:
    return {name: [b.shape for b in blobs] for name, blobs in params.items()}


# ------------------------------------------------------------------------------------------------
# Reading Caffe's files
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", WEIGHT_CASES)
def test_read_matches_params_npz(case):
    stored = cm.read_caffemodel(FIXTURES / case / "weights.caffemodel")
    manifest = json.loads((FIXTURES / case / "manifest.json").read_text())
    assert [s.name for s in stored] == [x["name"] for x in manifest["layers"]]
    assert [s.type for s in stored] == [x["type"] for x in manifest["layers"]]
    got = {s.name: s.blobs for s in stored if s.blobs}
    _assert_same_params(got, _npz_params(FIXTURES / case / "params.npz"))


def test_scalar_blob_reads_as_0d():
    stored = {s.name: s for s in cm.read_caffemodel(FIXTURES / "neurons" / "weights.caffemodel")}
    (slope,) = stored["prelu_s"].blobs
    assert slope.shape == () and slope.dtype == np.float32
    assert stored["prelu_s"].legacy == (False,)


@pytest.mark.parametrize("name", ["weights_v1.caffemodel", "upgraded.caffemodel"])
def test_v1_weights_fit_the_deploy_net(name):
    """V1 file with legacy 4-D blobs (bias 1x1x1xN): Caffe loads it into the upgraded net."""
    stored = cm.read_caffemodel(FIXTURES / "v1_nin_cifar10" / name)
    by_name = {s.name: s for s in stored}
    assert by_name["conv1"].type == "Convolution"
    assert by_name["conv1"].blobs[1].shape == (1, 1, 1, 192)
    assert by_name["conv1"].legacy == (True, True)
    reference = _npz_params(FIXTURES / "nin_cifar10_deploy" / "params.npz")
    expected = _expected(reference)
    expected.update({s.name: [] for s in stored if not s.blobs})
    params, report = cm.match_weights(stored, expected)
    _assert_same_params(params, reference)
    assert "conv1/1: (1, 1, 1, 192) -> (192,)" in report.reshaped
    assert report.skipped == [] and report.missing == []


def test_load_params_keeps_legacy_layout(tmp_path):
    """load_params' dict still fits by the legacy rule, and writes back in the legacy fields
    (as Caffe's upgrade_net_proto_binary keeps them)."""
    params = cm.load_params(FIXTURES / "v1_nin_cifar10" / "weights_v1.caffemodel")
    assert params["cccp6"][1].shape == (1, 1, 1, 10)
    reference = _npz_params(FIXTURES / "nin_cifar10_deploy" / "params.npz")
    fitted, _ = cm.match_weights(params, _expected(reference))
    _assert_same_params(fitted, reference)
    out = tmp_path / "copy.caffemodel"
    cm.save_params(out, params)
    ours = {
        layer.name: layer for layer in caffe_pb2.NetParameter.FromString(out.read_bytes()).layer
    }
    upgraded = caffe_pb2.NetParameter.FromString(
        (FIXTURES / "v1_nin_cifar10" / "upgraded.caffemodel").read_bytes()
    )
    for layer in upgraded.layer:
        if len(layer.blobs):
            assert list(ours[layer.name].blobs) == list(layer.blobs), layer.name
    # A plain dict carries no legacy marks: exact shapes only, as for .npz files.
    with pytest.raises(WeightsError, match="layer 'conv1' blob 1"):
        cm.match_weights(dict(params), _expected(reference))


def test_hdf5_snapshot_matches_trajectory():
    case = FIXTURES / "solver_sgd_hdf5_snapshot"
    stored = cm.read_weights(case / "snapshot_iter_6.caffemodel.h5")
    assert {s.name for s in stored} == {"data", "conv1", "relu1", "pool1", "ip1", "loss"}
    with np.load(case / "trajectory.npz", allow_pickle=False) as trajectory:
        for layer in stored:
            for index, blob in enumerate(layer.blobs):
                assert np.array_equal(blob, trajectory[f"iter6/{layer.name}/{index}"])
    binary = cm.load_params(FIXTURES / "solver_sgd" / "snapshot_iter_6.caffemodel")
    assert set(binary) == {"conv1", "ip1"}


# ------------------------------------------------------------------------------------------------
# Writing as Caffe does
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", WEIGHT_CASES)
def test_write_reproduces_caffes_file(case, tmp_path):
    definitions = _caffe_held_definitions(FIXTURES / case)
    params = _npz_params(FIXTURES / case / "params.npz")
    out = tmp_path / "w.caffemodel"
    cm.write_caffemodel(out, definitions, params)
    ours = caffe_pb2.NetParameter.FromString(out.read_bytes())
    caffes = caffe_pb2.NetParameter.FromString(
        (FIXTURES / case / "weights.caffemodel").read_bytes()
    )
    assert ours.name == caffes.name
    for mine, theirs in zip(ours.layer, caffes.layer, strict=True):
        assert mine == theirs, mine.name
    assert out.read_bytes() == (FIXTURES / case / "weights.caffemodel").read_bytes()


def test_write_h5_like_caffe(tmp_path):
    h5py = pytest.importorskip("h5py")
    case = FIXTURES / "solver_sgd_hdf5_snapshot"
    net = text_format.Parse((case / "net.prototxt").read_text(), caffe_pb2.NetParameter())
    theirs = case / "snapshot_iter_6.caffemodel.h5"
    params = cm.load_params(theirs)
    out = tmp_path / "w.caffemodel.h5"
    cm.write_caffemodel_h5(out, net, params)

    def layout(path):
        items = {}
        with h5py.File(path, "r") as handle:
            handle.visititems(
                lambda n, o: (
                    items.setdefault(n, (o.shape, o.dtype.str, o[()].tobytes()))
                    if isinstance(o, h5py.Dataset)
                    else items.setdefault(n, "group")
                )
            )
        return items

    assert layout(out) == layout(theirs)


def _sample_params() -> dict[str, list[np.ndarray]]:
    rng = np.random.default_rng(3)
    return {
        "conv1": [rng.standard_normal((4, 3, 3, 3)).astype(np.float32), np.arange(4, dtype="f4")],
        "fire2/squeeze1x1": [rng.standard_normal((2, 4, 1, 1)).astype(np.float32)],
        "prelu": [np.array(0.25, dtype=np.float32)],
        "ip": [
            np.array([[np.nan, np.inf], [-0.0, 1e-45]], dtype=np.float32),
            np.zeros(2, np.float32),
        ],
    }


@pytest.mark.parametrize("ext", [".caffemodel", ".caffemodel.h5", ".h5", ".npz", ".safetensors"])
def test_round_trip_bit_identical(tmp_path, ext):
    if ext.endswith("h5"):
        pytest.importorskip("h5py")
    if ext == ".safetensors":
        pytest.importorskip("safetensors")
    params = _sample_params()
    path = tmp_path / f"w{ext}"
    cm.save_params(path, params)
    back = cm.load_params(path)
    assert set(back) == set(params)
    for name, blobs in params.items():
        for a, b in zip(back[name], blobs, strict=True):
            assert a.dtype == np.float32 and a.shape == b.shape
            assert a.tobytes() == b.tobytes()  # bit-identical, NaN and -0.0 included
    assert sorted(os.listdir(tmp_path)) == [path.name]
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # not the private temp-file mode


def test_write_without_net_gives_loadable_caffemodel(tmp_path):
    path = tmp_path / "w.caffemodel"
    cm.write_caffemodel(path, None, {"a": [np.ones((2, 3), np.float32)]})
    net = caffe_pb2.NetParameter.FromString(path.read_bytes())
    assert [layer.name for layer in net.layer] == ["a"]
    assert list(net.layer[0].blobs[0].shape.dim) == [2, 3]


def test_write_rejects_params_of_unknown_layers(tmp_path):
    net = caffe_pb2.NetParameter()
    net.layer.add(name="conv1", type="Convolution")
    with pytest.raises(WeightsError, match="conv9"):
        cm.write_caffemodel(tmp_path / "w.caffemodel", net, {"conv9": [np.zeros(1)]})
    assert os.listdir(tmp_path) == []


def test_large_caffemodel_round_trip(tmp_path):
    """Beyond C++ protobuf's old 64 MiB default limit: the Python runtime (upb) reads it."""
    big = np.random.default_rng(0).standard_normal(18_000_000).astype(np.float32)  # 72 MB
    path = tmp_path / "big.caffemodel"
    cm.write_caffemodel(path, None, {"fc": [big.reshape(18_000, 1_000)]})
    assert path.stat().st_size > 72_000_000
    (layer,) = cm.read_caffemodel(path)
    assert np.array_equal(layer.blobs[0].reshape(-1), big)


# ------------------------------------------------------------------------------------------------
# Fitting to a net
# ------------------------------------------------------------------------------------------------


def _layer(name, *blobs, legacy=(), fmt="caffemodel"):
    return cm.StoredLayer(name, "", [np.asarray(b, np.float32) for b in blobs], legacy, fmt)


def test_match_skips_and_reports_missing():
    stored = [_layer("a", np.ones((2, 3))), _layer("extra", np.ones(1)), _layer("relu", legacy=())]
    expected = {"a": [(2, 3)], "b": [(4,)], "relu": []}
    params, report = cm.match_weights(stored, expected)
    assert list(params) == ["a"] and params["a"][0].shape == (2, 3)
    assert report.loaded == ["a"] and report.skipped == ["extra"] and report.missing == ["b"]


def test_match_count_mismatch():
    with pytest.raises(WeightsError, match=r"layer 'ip'.*1 blob.*expects 2"):
        cm.match_weights([_layer("ip", np.ones((3, 2)))], {"ip": [(3, 2), (3,)]})
    with pytest.raises(WeightsError, match=r"layer 'relu'"):
        cm.match_weights([_layer("relu", np.ones(1))], {"relu": []})


def test_match_shape_mismatch_names_layer_blob_and_shapes():
    with pytest.raises(WeightsError, match=r"layer 'ip' blob 1.*\(4,\).*\(3,\)"):
        cm.match_weights([_layer("ip", np.ones((3, 2)), np.ones(4))], {"ip": [(3, 2), (3,)]})


def test_match_legacy_4d_rule():
    weight = np.arange(6, dtype=np.float32).reshape(1, 1, 3, 2)
    bias = np.arange(3, dtype=np.float32).reshape(1, 1, 1, 3)
    stored = [_layer("ip", weight, bias, legacy=(True, True))]
    params, report = cm.match_weights(stored, {"ip": [(3, 2), (3,)]})
    assert params["ip"][0].shape == (3, 2) and np.array_equal(
        params["ip"][0].ravel(), weight.ravel()
    )
    assert len(report.reshaped) == 2
    # Legacy dims count from the end: (1, 1, 2, 3) does not fit (3, 2) even with the same count.
    with pytest.raises(WeightsError, match="blob 0"):
        cm.match_weights(
            [_layer("ip", weight.reshape(1, 1, 2, 3), bias, legacy=(True, True))],
            {"ip": [(3, 2), (3,)]},
        )
    # The same 4-D shape stored with the `shape` field must match exactly.
    with pytest.raises(WeightsError, match="blob 0"):
        cm.match_weights([_layer("ip", weight, bias)], {"ip": [(3, 2), (3,)]})
    # More than 4 net axes never fit a legacy blob.
    with pytest.raises(WeightsError):
        cm.match_weights(
            [_layer("c", np.ones((1, 1, 1, 2)), legacy=(True,))], {"c": [(1, 1, 1, 1, 2)]}
        )


def test_match_hdf5_may_omit_shared_blobs():
    stored = [cm.StoredLayer("conv_p", "", [], (), "hdf5"), _layer("conv", np.ones(2), fmt="hdf5")]
    params, report = cm.match_weights(stored, {"conv": [(2,), (1,)], "conv_p": [(2,), (1,)]})
    assert params["conv"][1] is None and "conv_p" not in params
    assert report.missing == ["conv/1", "conv_p"]
    with pytest.raises(WeightsError):
        cm.match_weights([_layer("c", np.ones(1), np.ones(1), fmt="hdf5")], {"c": [(1,)]})


def test_match_shared_slots():
    """None marks a blob owned by another layer: counted, not checked, not returned."""
    stored = [_layer("conv_p", np.ones((2, 3)), np.ones(5))]
    params, report = cm.match_weights(stored, {"conv_p": [None, (5,)]})
    assert len(params["conv_p"]) == 1 and params["conv_p"][0].shape == (5,)
    assert "loaded 1 layer(s)" in str(report)
    with pytest.raises(WeightsError, match="expects 1"):
        cm.match_weights(stored, {"conv_p": [None]})


def test_match_warns_on_nonfinite():
    with pytest.warns(RuntimeWarning, match=r"layer 'ip' blob 0"):
        _, report = cm.match_weights([_layer("ip", [np.nan, 1.0])], {"ip": [(2,)]})
    assert report.nonfinite == ["ip/0"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cm.match_weights([_layer("ip", [0.0, 1.0])], {"ip": [(2,)]})


def test_duplicate_file_layer_last_wins():
    stored = [_layer("a", np.zeros(2)), _layer("a", np.ones(2))]
    params, report = cm.match_weights(stored, {"a": [(2,)]})
    assert np.array_equal(params["a"][0], np.ones(2)) and report.loaded == ["a"]


# ------------------------------------------------------------------------------------------------
# Bad files
# ------------------------------------------------------------------------------------------------


def _one_line_error(func, *args) -> str:
    with pytest.raises(WeightsError) as info:
        func(*args)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_unknown_extension(tmp_path):
    path = tmp_path / "w.pkl"
    path.write_bytes(b"x")
    assert "unknown weights file extension" in _one_line_error(cm.load_params, path)
    assert "unknown" in _one_line_error(cm.save_params, tmp_path / "w.bin", {})


def test_missing_file(tmp_path):
    assert "cannot read" in _one_line_error(cm.load_params, tmp_path / "nope.caffemodel")


def test_truncated_caffemodel(tmp_path):
    raw = (FIXTURES / "nin_cifar10_deploy" / "weights.caffemodel").read_bytes()
    path = tmp_path / "cut.caffemodel"
    path.write_bytes(raw[: len(raw) // 2])
    assert "truncated" in _one_line_error(cm.load_params, path)


@pytest.mark.parametrize(
    "content, word",
    [
        (b"\x89PNG\r\n\x1a\n" + bytes(64), "PNG"),
        (b"\xff\xd8\xff\xe0" + bytes(64), "JPEG"),
        (b'name: "LeNet"\nlayer {\n  name: "data"\n}\n', "text"),
        (None, "zip"),
    ],
)
def test_not_a_caffemodel(tmp_path, content, word):
    path = tmp_path / "w.caffemodel"
    if content is None:
        np.savez(tmp_path / "p.npz", **{"a/0": np.ones(3, np.float32)})
        os.replace(tmp_path / "p.npz", path)
    else:
        path.write_bytes(content)
    assert word in _one_line_error(cm.load_params, path)


def test_caffemodel_renamed_npz(tmp_path):
    path = tmp_path / "w.npz"
    path.write_bytes((FIXTURES / "neurons" / "weights.caffemodel").read_bytes())
    assert "not an .npz" in _one_line_error(cm.load_params, path)


def test_truncated_npz_and_h5(tmp_path):
    pytest.importorskip("h5py")
    params = _sample_params()
    for name in ("w.npz", "w.caffemodel.h5"):
        path = tmp_path / name
        cm.save_params(path, params)
        raw = path.read_bytes()
        path.write_bytes(raw[: len(raw) // 3])
        assert str(path) in _one_line_error(cm.load_params, path)


def test_pickled_npz_refused(tmp_path):
    path = tmp_path / "w.npz"
    np.savez(path, **{"a/0": np.array([{"x": 1}], dtype=object)})
    assert "pickled" in _one_line_error(cm.load_params, path)


def test_bad_npz_keys(tmp_path):
    path = tmp_path / "w.npz"
    np.savez(path, **{"conv1": np.ones(2, np.float32)})
    assert "'<layer>/<blob index>'" in _one_line_error(cm.load_params, path)
    np.savez(path, **{"conv1/1": np.ones(2, np.float32)})
    assert "blob indices" in _one_line_error(cm.load_params, path)


def test_h5_without_data_group(tmp_path):
    h5py = pytest.importorskip("h5py")
    path = tmp_path / "w.h5"
    with h5py.File(path, "w") as handle:
        handle.create_dataset("iter", data=3)
    assert "/data" in _one_line_error(cm.load_params, path)
    path.write_bytes(b'layer { name: "x" }')
    assert "text" in _one_line_error(cm.load_params, path)


def test_failed_write_keeps_old_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "w.caffemodel"
    path.write_bytes(b"old")

    def failing(handle):
        handle.write(b"partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        cm._atomic_write(path, failing)
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["w.caffemodel"]
    message = _one_line_error(cm.save_params, tmp_path / "no" / "dir" / "w.npz", _sample_params())
    assert "cannot write" in message
