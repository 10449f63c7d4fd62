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
# Writing as Caffe does (the byte-for-byte comparison with Caffe's files is in test_netdef.py)
# ------------------------------------------------------------------------------------------------


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


# ------------------------------------------------------------------------------------------------
# The direct wire-format reader and streaming writer, against protobuf's own parser/serializer
# ------------------------------------------------------------------------------------------------


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        out.append((value & 0x7F) | (0x80 if value > 0x7F else 0))
        value >>= 7
        if not value:
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _protobuf_layers(raw: bytes) -> list[tuple[str, list[np.ndarray]]]:
    """Reference: parse with protobuf and convert each blob with a plain loop (Blob::FromProto)."""
    net = caffe_pb2.NetParameter.FromString(raw)
    out = []
    for layer in list(net.layer) + list(net.layers):
        arrays = []
        for blob in layer.blobs:
            values = list(blob.double_data) if len(blob.double_data) else list(blob.data)
            if any(blob.HasField(f) for f in ("num", "channels", "height", "width")):
                shape = (blob.num, blob.channels, blob.height, blob.width)
            else:
                shape = tuple(blob.shape.dim)
            arrays.append(np.array(values, dtype=np.float32).reshape(shape))
        out.append((layer.name, arrays))
    return out


def _odd_encodings() -> bytes:
    """A NetParameter whose blobs use every encoding protobuf accepts for BlobProto.data."""
    floats = np.arange(6, dtype="<f4") - 2.5
    shape = _field(7, _field(1, bytes([2, 3])))  # BlobShape { dim: [2, 3] } (packed int64)
    unpacked = b"".join(_varint(5 << 3 | 5) + f.tobytes() for f in floats)  # wire type 5
    split = _field(5, floats[:4].tobytes()) + _field(5, floats[4:].tobytes())  # two chunks
    doubles = _field(8, floats.astype("<f8").tobytes())  # double_data wins over data
    with_diff = _field(5, floats.tobytes()) + _field(6, bytes(24)) + shape
    blobs = [unpacked + shape, split + shape, _field(5, bytes(24)) + doubles + shape, with_diff]
    layer = _field(1, b"odd") + _field(2, b"InnerProduct")
    layer += b"".join(_field(7, blob) for blob in blobs)
    layer += _varint(10 << 3) + _varint(1)  # phase: TEST, after the blobs
    return _field(1, b"net") + _field(100, layer)


def test_reader_accepts_every_encoding(tmp_path):
    raw = _odd_encodings()
    path = tmp_path / "odd.caffemodel"
    path.write_bytes(raw)
    definitions, layers = cm.read_caffemodel_full(path)
    reference = _protobuf_layers(raw)
    assert [(layer.name, len(layer.blobs)) for layer in layers] == [("odd", 4)]
    for got, want in zip(layers[0].blobs, reference[0][1], strict=True):
        assert got.dtype == np.float32 and got.shape == (2, 3)
        assert np.array_equal(got, want)
    assert definitions.name == "net" and definitions.layer[0].phase == caffe_pb2.TEST
    assert not len(definitions.layer[0].blobs)


def test_reader_returns_arrays_that_own_their_memory(tmp_path):
    path = tmp_path / "w.caffemodel"
    cm.write_caffemodel(path, None, {"a": [np.ones((3, 4), np.float32)]})
    (layer,) = cm.read_caffemodel(path)
    root = layer.blobs[0]
    while isinstance(root.base, np.ndarray):
        root = root.base
    assert root.base is None and root.flags.owndata  # not a view pinning the file's bytes
    assert layer.blobs[0].flags.writeable


@pytest.mark.parametrize("cut", [0.5, 0.999, 3, 1])
def test_truncated_anywhere_is_one_line_error(tmp_path, cut):
    raw = (FIXTURES / "conv_group_dilation" / "weights.caffemodel").read_bytes()
    end = int(len(raw) * cut) if isinstance(cut, float) else len(raw) - cut
    with pytest.raises(Exception):  # noqa: B017 - the reference: protobuf refuses it too
        caffe_pb2.NetParameter.FromString(raw[:end])
    path = tmp_path / "cut.caffemodel"
    path.write_bytes(raw[:end])
    assert "truncated or corrupt" in _one_line_error(cm.load_params, path)


def test_count_mismatch_in_file(tmp_path):
    blob = _field(5, np.ones(5, "<f4").tobytes()) + _field(7, _field(1, bytes([2, 3])))
    path = tmp_path / "w.caffemodel"
    path.write_bytes(_field(100, _field(1, b"ip") + _field(7, blob)))
    message = _one_line_error(cm.load_params, path)
    assert "layer 'ip' blob 0" in message and "(2, 3) needs 6 values" in message
    assert "holds 5" in message
    odd = _field(5, bytes(7)) + _field(7, _field(1, bytes([2])))  # 7 bytes: not whole floats
    path.write_bytes(_field(100, _field(1, b"ip") + _field(7, odd)))
    assert "corrupt" in _one_line_error(cm.load_params, path)


def _rich_definition() -> caffe_pb2.LayerParameter:
    layer = caffe_pb2.LayerParameter(name="conv", type="Convolution", bottom=["x"], top=["y"])
    layer.param.add(lr_mult=1)
    layer.include.add(phase=caffe_pb2.TEST)  # fields numbered above blobs (7)
    layer.phase = caffe_pb2.TEST
    layer.convolution_param.num_output = 2
    layer.convolution_param.kernel_size.append(1)
    return layer


def test_streamed_file_equals_protobuf_serialization(tmp_path):
    """Reference: the same message built through protobuf's API, then serialized by it."""
    rng = np.random.default_rng(1)
    weight = rng.standard_normal((2, 3, 1, 1)).astype(np.float32)
    bias = np.array([np.nan, -0.0], np.float32)
    scalar = np.array(0.5, np.float32)
    empty = np.zeros((0, 3), np.float32)
    net = caffe_pb2.NetParameter(name="n", force_backward=True)
    net.layer.append(_rich_definition())
    net.layer.add(name="s", type="PReLU")
    net.layer.add(name="e", type="Parameter")
    params = {"conv": [weight, bias], "s": [scalar], "e": [empty]}
    path = tmp_path / "w.caffemodel"
    cm.write_caffemodel(path, net, params)

    reference = caffe_pb2.NetParameter()
    reference.CopyFrom(net)
    for layer, blobs in zip(reference.layer, params.values(), strict=True):
        for array in blobs:
            blob = layer.blobs.add()
            blob.data.extend(array.ravel().tolist())
            if array.ndim:  # Blob::ToProto touches `shape` only to add dims
                blob.shape.dim.extend(array.shape)
    assert path.read_bytes() == reference.SerializeToString()


def test_write_size_limit_checked_before_writing(tmp_path, monkeypatch):
    monkeypatch.setattr(cm, "MAX_PROTO_BYTES", 1000)
    path = tmp_path / "w.caffemodel"
    message = _one_line_error(cm.write_caffemodel, path, None, {"a": [np.zeros(300, np.float32)]})
    assert "2 GiB limit" in message and ".npz" in message
    assert os.listdir(tmp_path) == []


def test_read_and_write_hold_few_copies(tmp_path):
    """Reading holds the file's bytes and the arrays (two copies) at most; writing streams."""
    import tracemalloc

    params = {f"l{i}": [np.full((1000, 1000), i, np.float32)] for i in range(10)}  # 40 MB
    path = tmp_path / "w.caffemodel"
    tracemalloc.start()
    try:
        cm.write_caffemodel(path, None, params)
        _, write_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        before, _ = tracemalloc.get_traced_memory()
        loaded = cm.load_params(path)
        _, read_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    size = path.stat().st_size
    assert write_peak < 0.2 * size
    assert read_peak - before < 2.1 * size
    assert all(np.array_equal(loaded[k][0], v[0]) for k, v in params.items())


# ------------------------------------------------------------------------------------------------
# compare_weights / check_weights (inspect --weights)
# ------------------------------------------------------------------------------------------------


def test_compare_lists_every_problem_without_raising():
    stored = [
        _layer("a", np.ones((2, 3))),
        _layer("b", np.ones((4,)), np.ones(1)),  # count: the net expects 1 blob
        _layer("c", np.ones((2, 2)), np.ones(3)),  # blob 0 and blob 1 of the wrong shape
        _layer("old", np.ones(1)),
        _layer("ip", np.ones((1, 1, 3, 2)), np.ones((1, 1, 1, 3)), legacy=(True, True)),
        _layer("nan", [np.nan]),
    ]
    expected = {
        "a": [(2, 3)],
        "b": [(4,)],
        "c": [(2, 3), (4,)],
        "d": [(5,)],
        "ip": [(3, 2), (3,)],
        "nan": [(1,)],
        "relu": [],
    }
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the check itself stays quiet
        report = cm.compare_weights(stored, expected)
    assert report.loaded == ["a", "ip", "nan"]
    assert report.missing == ["d"]  # b and c are mismatched, not missing
    assert report.skipped == ["old"]
    assert report.nonfinite == ["nan/0"]
    assert len(report.reshaped) == 2
    assert report.mismatched == [
        "layer 'b': the weights file holds 2 blob(s), the net expects 1",
        "layer 'c' blob 0: the weights file has shape (2, 2), the net expects (2, 3)",
        "layer 'c' blob 1: the weights file has shape (3,), the net expects (4,)",
    ]


def test_check_weights_text(tmp_path):
    path = tmp_path / "w.npz"
    cm.save_params(path, {"a": [np.ones((2, 3))], "x": [np.ones(2)], "c": [np.ones(4)]})
    text = cm.check_weights({"a": [(2, 3)], "b": [(1,)], "c": [(5,)], "r": []}, path)
    lines = text.splitlines()
    assert lines[0].startswith(f"weights {path} (npz, 3 layer(s)")
    assert "1 of 3 net layer(s) with weights, 1 blob(s)" in lines[1]
    assert any(
        line.split() == ["missing", "b", "(keep", "their", "initial", "values)"] for line in lines
    )
    assert any("extra" in line and "x" in line for line in lines)
    assert any("mismatched  layer 'c' blob 0" in line for line in lines)
    assert "Caffe would refuse" in lines[-1]
    good = cm.check_weights({"a": [(2, 3)], "x": [(2,)], "c": [(4,)]}, path)
    assert good.splitlines()[-1].endswith("every blob of the net fits")
    other = cm.check_weights({"z": [(1,)]}, path)
    assert "another net" in other.splitlines()[-1]


def test_check_weights_takes_a_graph():
    import nincc

    graph = nincc.load_graph(FIXTURES / "nin_cifar10_deploy" / "net.prototxt")
    text = cm.check_weights(graph, FIXTURES / "v1_nin_cifar10" / "weights_v1.caffemodel")
    assert "matched     9 of 9 net layer(s) with weights, 18 blob(s)" in text
    assert "conv1/1: (1, 1, 1, 192) -> (192,)" in text
    assert text.splitlines()[-1].endswith("every blob of the net fits")


def test_check_weights_still_raises_on_unreadable_files(tmp_path):
    raw = (FIXTURES / "nin_cifar10_deploy" / "weights.caffemodel").read_bytes()
    path = tmp_path / "cut.caffemodel"
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(WeightsError, match="truncated"):
        cm.check_weights({"conv1": [(192, 3, 5, 5), (192,)]}, path)


# ------------------------------------------------------------------------------------------------
# convert
# ------------------------------------------------------------------------------------------------

EXTS = [".caffemodel", ".caffemodel.h5", ".npz", ".safetensors"]


def test_convert_v1_without_net_is_caffes_binary_upgrade(tmp_path):
    """No net: the file's own definitions, upgraded as upgrade_net_proto_binary does."""
    out = tmp_path / "up.caffemodel"
    cm.convert(FIXTURES / "v1_nin_cifar10" / "weights_v1.caffemodel", out)
    assert out.read_bytes() == (FIXTURES / "v1_nin_cifar10" / "upgraded.caffemodel").read_bytes()


def test_convert_v1_with_net_is_what_caffe_saves(tmp_path):
    """With the deploy net: legacy blobs take the net's shapes and the definitions are the
    net's, exactly the file Caffe wrote for that net (same weights)."""
    out = tmp_path / "deploy.caffemodel"
    report = cm.convert(
        FIXTURES / "v1_nin_cifar10" / "weights_v1.caffemodel",
        out,
        net=FIXTURES / "nin_cifar10_deploy" / "net.prototxt",
    )
    assert out.read_bytes() == (FIXTURES / "nin_cifar10_deploy" / "weights.caffemodel").read_bytes()
    assert len(report.reshaped) == 9 and report.missing == []


@pytest.mark.parametrize("dst_ext", EXTS)
@pytest.mark.parametrize("src_ext", EXTS)
def test_convert_any_direction(tmp_path, src_ext, dst_ext):
    """neurons (0-axis PReLU slope, layers without blobs): Caffe's file -> src -> dst, then
    read back and fitted to the net: Caffe's params exactly; a .caffemodel is Caffe's bytes."""
    pytest.importorskip("h5py")
    pytest.importorskip("safetensors")
    case = FIXTURES / "neurons"
    net = case / "net.prototxt"
    src = tmp_path / f"src{src_ext}"
    dst = tmp_path / f"dst{dst_ext}"
    cm.convert(case / "weights.caffemodel", src, net=net)
    cm.convert(src, dst, net=net)
    if dst_ext == ".caffemodel":
        assert dst.read_bytes() == (case / "weights.caffemodel").read_bytes()
    import nincc

    slots = nincc.load_graph(net).weight_slots()
    fitted, report = cm.match_weights(cm.load_params(dst), slots)
    _assert_same_params(fitted, _npz_params(case / "params.npz"))
    assert report.missing == []
    if src_ext != ".caffemodel" and dst_ext != ".caffemodel":  # and without the net
        plain = tmp_path / f"plain{dst_ext}"
        cm.convert(src, plain)
        _assert_same_params(dict(cm.load_params(plain)), _npz_params(case / "params.npz"))
    leftovers = [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
    assert leftovers == []


def test_convert_to_caffemodel_needs_a_net(tmp_path):
    src = tmp_path / "w.npz"
    cm.save_params(src, {"a": [np.ones(2, np.float32)]})
    message = _one_line_error(cm.convert, src, tmp_path / "w.caffemodel")
    assert "--net" in message and "w.npz" in message
    assert sorted(os.listdir(tmp_path)) == ["w.npz"]


def test_convert_for_another_net(tmp_path):
    message = _one_line_error(
        cm.convert,
        FIXTURES / "split_implicit" / "weights.caffemodel",
        tmp_path / "w.npz",
        FIXTURES / "nin_cifar10_deploy" / "net.prototxt",
    )
    assert "another net" in message or "conv1" in message
    assert os.listdir(tmp_path) == []


def test_convert_with_net_refuses_missing_layers(tmp_path):
    src = tmp_path / "part.npz"
    full = _npz_params(FIXTURES / "nin_cifar10_deploy" / "params.npz")
    cm.save_params(src, {k: v for k, v in full.items() if k != "cccp6"})
    message = _one_line_error(
        cm.convert, src, tmp_path / "w.npz", FIXTURES / "nin_cifar10_deploy" / "net.prototxt"
    )
    assert "cccp6" in message and "incomplete" in message
    assert os.listdir(tmp_path) == ["part.npz"]


def test_convert_verbose_lists_skipped_layers(tmp_path, capsys):
    src = tmp_path / "w.npz"
    params = _npz_params(FIXTURES / "nin_cifar10_deploy" / "params.npz")
    params["old_fc"] = [np.ones((3, 2), np.float32)]
    cm.save_params(src, params)
    report = cm.convert(
        src, tmp_path / "o.npz", FIXTURES / "nin_cifar10_deploy" / "net.prototxt", verbose=True
    )
    assert report.skipped == ["old_fc"]
    assert "ignoring file layer 'old_fc'" in capsys.readouterr().err
    assert "old_fc/0" not in np.load(tmp_path / "o.npz").files


def test_convert_warns_on_nonfinite(tmp_path):
    src = tmp_path / "w.npz"
    cm.save_params(src, {"ip": [np.array([1.0, np.inf], np.float32)]})
    with pytest.warns(RuntimeWarning, match=r"layer 'ip' blob 0"):
        report = cm.convert(src, tmp_path / "w.safetensors")
    assert report.nonfinite == ["ip/0"]


_SHARED_NET = """name: "s"
layer { name: "in" type: "Input" top: "x" input_param { shape { dim: 1 dim: 2 dim: 5 dim: 5 } } }
layer { name: "a" type: "Convolution" bottom: "x" top: "a"
        param { name: "w" } convolution_param { num_output: 3 kernel_size: 3 } }
layer { name: "b" type: "Convolution" bottom: "x" top: "b"
        param { name: "w" } convolution_param { num_output: 3 kernel_size: 3 } }
"""


def test_convert_shared_params(tmp_path):
    """Caffe writes a shared blob under both layers in a .caffemodel, only under its owner in
    HDF5 (Net::ToHDF5); converting back needs the net to fill the copy in."""
    h5py = pytest.importorskip("h5py")
    net = tmp_path / "net.prototxt"
    net.write_text(_SHARED_NET)
    rng = np.random.default_rng(2)
    w = rng.standard_normal((3, 2, 3, 3)).astype(np.float32)
    bias_a, bias_b = np.ones(3, np.float32), np.full(3, 2.0, np.float32)
    src = tmp_path / "w.npz"
    cm.save_params(src, {"a": [w, bias_a], "b": [w, bias_b]})
    cm.convert(src, tmp_path / "w.caffemodel.h5", net=net)
    with h5py.File(tmp_path / "w.caffemodel.h5", "r") as handle:
        assert sorted(handle["data/a"]) == ["0", "1"] and sorted(handle["data/b"]) == ["1"]
        assert sorted(handle["data"]) == ["a", "b", "in", "x_in_0_split"]  # every layer
    message = _one_line_error(cm.convert, tmp_path / "w.caffemodel.h5", tmp_path / "x.npz")
    assert "layer 'b' lacks blob 0" in message
    cm.convert(tmp_path / "w.caffemodel.h5", tmp_path / "x.caffemodel", net=net)
    stored = cm.load_params(tmp_path / "x.caffemodel")
    assert np.array_equal(stored["b"][0], w) and np.array_equal(stored["b"][1], bias_b)


def test_convert_unknown_extension_before_reading(tmp_path):
    assert "unknown weights file extension" in _one_line_error(
        cm.convert, tmp_path / "missing.caffemodel", tmp_path / "out.pt"
    )
