"""Weights files without Caffe: binary .caffemodel, .caffemodel.h5, .npz and .safetensors.

Reading gives the stored layers as plain arrays (`read_weights`); fitting them to a net follows
Caffe's `Net::CopyTrainedLayersFrom` rules (`match_weights`); writing mirrors `Net::ToProto` /
`Net::ToHDF5` so Caffe loads the result. This module knows no layer type: the net's expectations
arrive as ``{layer name: [blob shapes]}``.

Params are ``{layer name: [float32 arrays in Caffe's blob order and shapes]}``; in .npz and
.safetensors files the key of blob ``i`` of layer ``L`` is ``"L/i"`` (split at the last ``/``, since
layer names may contain ``/``). Every write goes to a temporary file in the target directory that
replaces the target only once complete, so an error never leaves a partial file behind.
"""

from __future__ import annotations

import io
import math
import os
import sys
import tempfile
import warnings
import zipfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from google.protobuf.message import DecodeError

from . import caffe_pb2
from .errors import WeightsError

__all__ = [
    "StoredLayer",
    "WeightsReport",
    "StoredParams",
    "read_weights",
    "read_caffemodel",
    "read_caffemodel_h5",
    "read_npz",
    "read_safetensors",
    "match_weights",
    "write_caffemodel",
    "write_caffemodel_h5",
    "write_npz",
    "write_safetensors",
    "load_params",
    "save_params",
    "weights_format",
]

Params = Mapping[str, Sequence[Any]]

# Protobuf encodes sizes as signed 32-bit integers: a binary NetParameter cannot reach 2 GiB.
# (The Python runtime, upb, has no smaller default limit; Caffe raises its own reader to INT_MAX.)
MAX_PROTO_BYTES = 2**31 - 1

FORMATS = ("caffemodel", "hdf5", "npz", "safetensors")
_EXTENSIONS = {
    ".caffemodel.h5": "hdf5",
    ".h5": "hdf5",
    ".caffemodel": "caffemodel",
    ".npz": "npz",
    ".safetensors": "safetensors",
}

# Caffe's names for the V1 LayerType enum values (what its upgrade writes as `type`).
_V1_TYPES = {
    "NONE": "",
    "ABSVAL": "AbsVal",
    "ACCURACY": "Accuracy",
    "ARGMAX": "ArgMax",
    "BNLL": "BNLL",
    "CONCAT": "Concat",
    "CONTRASTIVE_LOSS": "ContrastiveLoss",
    "CONVOLUTION": "Convolution",
    "DATA": "Data",
    "DECONVOLUTION": "Deconvolution",
    "DROPOUT": "Dropout",
    "DUMMY_DATA": "DummyData",
    "EUCLIDEAN_LOSS": "EuclideanLoss",
    "ELTWISE": "Eltwise",
    "EXP": "Exp",
    "FLATTEN": "Flatten",
    "HDF5_DATA": "HDF5Data",
    "HDF5_OUTPUT": "HDF5Output",
    "HINGE_LOSS": "HingeLoss",
    "IM2COL": "Im2col",
    "IMAGE_DATA": "ImageData",
    "INFOGAIN_LOSS": "InfogainLoss",
    "INNER_PRODUCT": "InnerProduct",
    "LRN": "LRN",
    "MEMORY_DATA": "MemoryData",
    "MULTINOMIAL_LOGISTIC_LOSS": "MultinomialLogisticLoss",
    "MVN": "MVN",
    "POOLING": "Pooling",
    "POWER": "Power",
    "RELU": "ReLU",
    "SIGMOID": "Sigmoid",
    "SIGMOID_CROSS_ENTROPY_LOSS": "SigmoidCrossEntropyLoss",
    "SILENCE": "Silence",
    "SOFTMAX": "Softmax",
    "SOFTMAX_LOSS": "SoftmaxWithLoss",
    "SPLIT": "Split",
    "SLICE": "Slice",
    "TANH": "TanH",
    "WINDOW_DATA": "WindowData",
    "THRESHOLD": "Threshold",
}

# Caffe's names for the V0 layer type strings.
_V0_TYPES = {
    "accuracy": "Accuracy",
    "bnll": "BNLL",
    "concat": "Concat",
    "conv": "Convolution",
    "data": "Data",
    "dropout": "Dropout",
    "euclidean_loss": "EuclideanLoss",
    "flatten": "Flatten",
    "hdf5_data": "HDF5Data",
    "hdf5_output": "HDF5Output",
    "im2col": "Im2col",
    "images": "ImageData",
    "infogain_loss": "InfogainLoss",
    "innerproduct": "InnerProduct",
    "lrn": "LRN",
    "multinomial_logistic_loss": "MultinomialLogisticLoss",
    "pool": "Pooling",
    "relu": "ReLU",
    "sigmoid": "Sigmoid",
    "softmax": "Softmax",
    "softmax_loss": "SoftmaxWithLoss",
    "split": "Split",
    "tanh": "TanH",
    "window_data": "WindowData",
}

# Leading bytes of formats that are sometimes passed where another one is expected.
_MAGIC = (
    (b"PK\x03\x04", "a zip archive (an .npz file?)"),
    (b"\x89HDF\r\n\x1a\n", "an HDF5 file"),
    (b"\x93NUMPY", "a .npy array file"),
    (b"\x89PNG\r\n\x1a\n", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"GIF8", "a GIF image"),
)


@dataclass
class StoredLayer:
    """One layer of a weights file: its blobs as float32 arrays in their stored shapes.

    `legacy[i]` is true when blob i was stored with the deprecated num/channels/height/width
    fields (Caffe then accepts it for any net blob of at most 4 axes whose shape, left-padded with
    1s, equals it). In HDF5 files Caffe writes a blob shared between layers only under its owner,
    so an HDF5 layer may lack some blobs: those entries are None.
    """

    name: str
    type: str
    blobs: list[np.ndarray | None]
    legacy: tuple[bool, ...] = ()
    format: str = "caffemodel"

    def is_legacy(self, index: int) -> bool:
        return index < len(self.legacy) and self.legacy[index]


class StoredParams(dict):
    """`load_params`' result: ``{layer: [arrays in stored shapes]}`` that also keeps the layers
    as read (`layers`), so `match_weights` and `write_caffemodel` still know which blobs used the
    legacy 4-D fields."""

    def __init__(self, layers: Sequence[StoredLayer]):
        super().__init__()
        self.layers = list(layers)
        for layer in self.layers:
            if layer.blobs:
                self[layer.name] = layer.blobs  # a later duplicate wins, as in Caffe

    def is_legacy(self, name: str, index: int) -> bool:
        found = [layer for layer in self.layers if layer.name == name]
        return bool(found) and found[-1].is_legacy(index)


@dataclass
class WeightsReport:
    """What `match_weights` did; `lines()` renders it for a log or the CLI."""

    loaded: list[str] = field(default_factory=list)  # net layers given weights from the file
    skipped: list[str] = field(default_factory=list)  # file layers the net does not have
    missing: list[str] = field(default_factory=list)  # net layers (or "layer/i") left at init
    reshaped: list[str] = field(default_factory=list)  # legacy 4-D blobs fitted to the net
    nonfinite: list[str] = field(default_factory=list)  # "layer/i" holding NaN or Inf

    def __str__(self) -> str:
        return "\n".join(self.lines())

    def lines(self) -> list[str]:
        out = [f"loaded {len(self.loaded)} layer(s) from the weights file"]
        if self.skipped:
            out.append("ignored file layers not in the net: " + ", ".join(self.skipped))
        if self.missing:
            out.append("net layers without weights in the file: " + ", ".join(self.missing))
        if self.reshaped:
            out.append("legacy 4-D blobs reshaped: " + ", ".join(self.reshaped))
        if self.nonfinite:
            out.append("blobs with NaN/Inf values: " + ", ".join(self.nonfinite))
        return out


# ------------------------------------------------------------------------------------------------
# Format detection and atomic writes
# ------------------------------------------------------------------------------------------------


def weights_format(path: str | os.PathLike) -> str:
    """The weights format a file name implies: one of FORMATS, else WeightsError."""
    name = os.fspath(path).lower()
    for ext, kind in _EXTENSIONS.items():
        if name.endswith(ext):
            return kind
    allowed = ", ".join(_EXTENSIONS)
    raise WeightsError(f"{path}: unknown weights file extension (allowed: {allowed})")


def _describe_foreign(raw: bytes) -> str | None:
    """A name for content that is recognisably some other format, else None."""
    for magic, what in _MAGIC:
        if raw.startswith(magic):
            return what
    if len(raw) >= 10 and raw[8:10] == b'{"':
        return "a safetensors file"
    head = raw[:4096]
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.start < len(head) - 3:  # not merely a character cut at the end of the sample
            return None
        text = head[: exc.start].decode("utf-8")
    if text and all(ch.isprintable() or ch in "\t\r\n" for ch in text):
        return "a text file (a prototxt?)"
    return None


def _read_bytes(path: str | os.PathLike) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise WeightsError(f"{path}: cannot read weights file: {exc.strerror or exc}") from exc


def _file_mode(target: Path) -> int:
    """The permissions a plain open() would give: the existing file's, else 0o666 minus umask."""
    try:
        return target.stat().st_mode & 0o777
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def _atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> None:
    """Write through `write(handle)` into a temporary sibling file, then rename it over `path`."""
    target = Path(path)
    directory = target.parent if str(target.parent) else Path(".")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=directory)
    except OSError as exc:
        raise WeightsError(f"{path}: cannot write weights file: {exc.strerror or exc}") from exc
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, _file_mode(target))
        os.replace(tmp, target)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(exc, OSError):
            raise WeightsError(f"{path}: cannot write weights file: {exc.strerror or exc}") from exc
        raise


def _as_float32(array: Any) -> np.ndarray:
    """A C-ordered float32 copy or view, keeping 0-axis arrays 0-axis."""
    out = np.asarray(array, dtype=np.float32)
    return out if out.flags.c_contiguous else np.copy(out, order="C")


# ------------------------------------------------------------------------------------------------
# Binary .caffemodel
# ------------------------------------------------------------------------------------------------


def _blob_array(blob: caffe_pb2.BlobProto, where: str) -> tuple[np.ndarray, bool]:
    """A BlobProto as (float32 array, uses legacy 4-D fields), read as Blob::FromProto does."""
    legacy = any(blob.HasField(f) for f in ("num", "channels", "height", "width"))
    if legacy:
        shape: tuple[int, ...] = (blob.num, blob.channels, blob.height, blob.width)
    else:
        shape = tuple(blob.shape.dim)  # no dims: a 0-axis scalar
    if any(d < 0 for d in shape):
        raise WeightsError(f"{where}: negative dimension in stored shape {shape}")
    count = math.prod(shape)
    values = blob.double_data if len(blob.double_data) else blob.data
    if len(values) != count:
        raise WeightsError(
            f"{where}: stored shape {shape} needs {count} values, the file holds {len(values)}"
        )
    dtype = np.float64 if values is blob.double_data else np.float32
    array = np.fromiter(values, dtype=dtype, count=count).astype(np.float32, copy=False)
    return array.reshape(shape), legacy


def _stored_layer(name: str, type_: str, blobs: Iterable[caffe_pb2.BlobProto], src: str):
    arrays, legacy = [], []
    for i, blob in enumerate(blobs):
        array, is_legacy = _blob_array(blob, f"{src}: layer '{name}' blob {i}")
        arrays.append(array)
        legacy.append(is_legacy)
    return StoredLayer(name, type_, arrays, tuple(legacy), "caffemodel")


def read_caffemodel(path: str | os.PathLike) -> list[StoredLayer]:
    """Layers of a binary NetParameter file (current `layer`, V1 `layers` or V0), in file order."""
    raw = _read_bytes(path)
    if len(raw) > MAX_PROTO_BYTES:
        raise WeightsError(
            f"{path}: {len(raw)} bytes exceeds the 2 GiB limit of a binary protobuf message"
        )
    foreign = _describe_foreign(raw)
    if foreign is not None:
        raise WeightsError(f"{path}: is {foreign}, not a binary .caffemodel (NetParameter)")
    net = caffe_pb2.NetParameter()
    try:
        net.ParseFromString(raw)
    except DecodeError as exc:
        raise WeightsError(
            f"{path}: not a valid binary .caffemodel (truncated or corrupt): {exc}"
        ) from exc
    if len(net.layer) and len(net.layers):
        raise WeightsError(
            f"{path}: mixes current 'layer' and legacy 'layers' entries (Caffe refuses this)"
        )
    if not len(net.layer) and not len(net.layers):
        raise WeightsError(f"{path}: holds no layers (not a .caffemodel, or an empty net)")
    out = []
    for layer in net.layer:
        out.append(_stored_layer(layer.name, layer.type, layer.blobs, os.fspath(path)))
    for v1 in net.layers:
        if v1.HasField("layer"):  # V0: the definition and blobs sit in the nested message
            v0 = v1.layer
            type_ = _V0_TYPES.get(v0.type, v0.type)
            name = v0.name or v1.name
            blobs = v0.blobs if len(v0.blobs) else v1.blobs
            out.append(_stored_layer(name, type_, blobs, os.fspath(path)))
        else:
            type_ = _V1_TYPES.get(caffe_pb2.V1LayerParameter.LayerType.Name(v1.type), "")
            out.append(_stored_layer(v1.name, type_, v1.blobs, os.fspath(path)))
    return out


def _packed_floats(field_number: int, array: np.ndarray) -> bytes:
    """Wire bytes of a packed repeated float field holding `array` (little-endian float32)."""
    payload = array.astype("<f4", copy=False).tobytes()
    return _varint((field_number << 3) | 2) + _varint(len(payload)) + payload


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _fill_blob(blob: caffe_pb2.BlobProto, array: np.ndarray, legacy: bool = False) -> None:
    """Blob::ToProto: `shape` with every dim (none for a 0-axis blob) and float `data`; a blob
    read from the legacy 4-D fields is written back in them."""
    if array.size:
        # Merging pre-encoded bytes is orders of magnitude faster than appending floats one by one.
        blob.MergeFromString(_packed_floats(caffe_pb2.BlobProto.DATA_FIELD_NUMBER, array))
    if legacy and array.ndim == 4:
        blob.num, blob.channels, blob.height, blob.width = (int(d) for d in array.shape)
    elif array.ndim:
        blob.shape.dim.extend(int(d) for d in array.shape)


def _legacy_flag(params: Params) -> Callable[[str, int], bool]:
    if isinstance(params, StoredParams):
        return params.is_legacy
    return lambda name, index: False


def _check_params(params: Params, names: Iterable[str], path) -> dict[str, list[np.ndarray]]:
    known = set(names)
    unknown = [name for name in params if name not in known]
    if unknown:
        raise WeightsError(f"{path}: params for layers the net does not have: {', '.join(unknown)}")
    return {name: [_as_float32(b) for b in blobs] for name, blobs in params.items()}


def caffemodel_message(
    net: caffe_pb2.NetParameter | None, params: Params, path: str = "<net>"
) -> caffe_pb2.NetParameter:
    """The NetParameter Caffe's Net::ToProto would write: the net's name and its layer definitions
    with their blobs filled from `params` (net-level input fields are not written).

    Without a net, the layers are given by name only (enough for Caffe to copy weights by name).
    """
    out = caffe_pb2.NetParameter()
    legacy = _legacy_flag(params)
    if net is None:
        arrays = {name: [_as_float32(b) for b in blobs] for name, blobs in params.items()}
        for name, blobs in arrays.items():
            layer = out.layer.add()
            layer.name = name
            for index, array in enumerate(blobs):
                _fill_blob(layer.blobs.add(), array, legacy(name, index))
        return out
    if len(net.layers):
        raise WeightsError(
            f"{path}: the net definition uses legacy V1 'layers'; upgrade it before writing weights"
        )
    arrays = _check_params(params, (layer.name for layer in net.layer), path)
    if net.HasField("name"):
        out.name = net.name
    for definition in net.layer:
        layer = out.layer.add()
        layer.CopyFrom(definition)
        layer.ClearField("blobs")
        for index, array in enumerate(arrays.get(definition.name, [])):
            _fill_blob(layer.blobs.add(), array, legacy(definition.name, index))
    return out


def write_caffemodel(
    path: str | os.PathLike, net: caffe_pb2.NetParameter | None, params: Params
) -> None:
    """Write a binary .caffemodel as Caffe's Net::ToProto does (atomically)."""
    message = caffemodel_message(net, params, os.fspath(path))
    size = message.ByteSize()
    if size > MAX_PROTO_BYTES:
        raise WeightsError(
            f"{path}: {size} bytes exceeds the 2 GiB limit of a binary protobuf message; "
            "save as .caffemodel.h5, .npz or .safetensors instead"
        )
    raw = message.SerializeToString()
    _atomic_write(path, lambda handle: handle.write(raw))


# ------------------------------------------------------------------------------------------------
# HDF5 (.caffemodel.h5): /data/<layer>/<blob index>
# ------------------------------------------------------------------------------------------------


def _h5py():
    try:
        import h5py
    except ImportError as exc:
        raise WeightsError(
            "HDF5 weights files need the h5py package (pip install h5py, or nincc[h5])"
        ) from exc
    return h5py


def read_caffemodel_h5(path: str | os.PathLike) -> list[StoredLayer]:
    """Layers of a Caffe HDF5 weights file (`/data/<layer>/<i>` datasets)."""
    h5py = _h5py()
    raw_head = _read_bytes_head(path, 4096)
    if not raw_head.startswith(b"\x89HDF\r\n\x1a\n"):
        foreign = _describe_foreign(raw_head)
        what = f"is {foreign}" if foreign else "is not an HDF5 file"
        raise WeightsError(f"{path}: {what}, not a .caffemodel.h5")
    try:
        with h5py.File(path, "r") as handle:
            if "data" not in handle or not isinstance(handle["data"], h5py.Group):
                raise WeightsError(f"{path}: no /data group (not a Caffe HDF5 weights file)")
            layers: list[StoredLayer] = []
            _collect_h5_layers(h5py, handle["data"], "", layers, os.fspath(path))
            return layers
    except OSError as exc:
        raise WeightsError(
            f"{path}: cannot read HDF5 weights (truncated or corrupt): {exc}"
        ) from exc


def _read_bytes_head(path: str | os.PathLike, size: int) -> bytes:
    try:
        with open(path, "rb") as handle:
            return handle.read(size)
    except OSError as exc:
        raise WeightsError(f"{path}: cannot read weights file: {exc.strerror or exc}") from exc


def _collect_h5_layers(h5py, group, prefix: str, out: list[StoredLayer], src: str) -> None:
    """Groups holding datasets (or nothing) are layers; names with '/' appear as nested groups."""
    datasets, subgroups = {}, []
    for key, item in group.items():
        if isinstance(item, h5py.Dataset):
            if not key.isdigit():
                raise WeightsError(f"{src}: dataset '{item.name}' is not named by a blob index")
            datasets[int(key)] = item
        else:
            subgroups.append((key, item))
    name = prefix
    if name and (datasets or not subgroups):
        blobs: list[np.ndarray | None] = [None] * (max(datasets) + 1 if datasets else 0)
        for index, dataset in datasets.items():
            blobs[index] = np.asarray(dataset[()], dtype=np.float32)
        out.append(StoredLayer(name, "", blobs, (), "hdf5"))
    for key, item in subgroups:
        _collect_h5_layers(h5py, item, f"{prefix}/{key}" if prefix else key, out, src)


def write_caffemodel_h5(
    path: str | os.PathLike, net: caffe_pb2.NetParameter | None, params: Params
) -> None:
    """Write Caffe's HDF5 weights layout (atomically): a /data group per net layer (per params
    layer without a net) holding datasets "0", "1", ... in float32."""
    h5py = _h5py()
    if net is not None:
        names = [layer.name for layer in net.layer] or [layer.name for layer in net.layers]
        arrays = _check_params(params, names, path)
    else:
        names = list(params)
        arrays = {name: [_as_float32(b) for b in blobs] for name, blobs in params.items()}

    def write(handle: BinaryIO) -> None:
        buffer = io.BytesIO()
        with h5py.File(buffer, "w") as h5:
            data = h5.create_group("data")
            for name in names:
                group = data.require_group(name)
                for index, array in enumerate(arrays.get(name, [])):
                    group.create_dataset(str(index), data=array)
        handle.write(buffer.getbuffer())

    _atomic_write(path, write)


# ------------------------------------------------------------------------------------------------
# .npz and .safetensors: flat "<layer>/<i>" keys
# ------------------------------------------------------------------------------------------------


def _split_key(key: str, src: str) -> tuple[str, int]:
    layer, sep, index = key.rpartition("/")
    if not sep or not layer or not index.isdigit():
        raise WeightsError(f"{src}: key '{key}' is not of the form '<layer>/<blob index>'")
    return layer, int(index)


def _layers_from_flat(items: Iterable[tuple[str, np.ndarray]], src: str, fmt: str):
    grouped: dict[str, dict[int, np.ndarray]] = {}
    for key, array in items:
        layer, index = _split_key(key, src)
        grouped.setdefault(layer, {})[index] = np.asarray(array, dtype=np.float32)
    out = []
    for layer, blobs in grouped.items():
        if sorted(blobs) != list(range(len(blobs))):
            raise WeightsError(
                f"{src}: layer '{layer}' has blob indices {sorted(blobs)}, "
                f"expected 0..{len(blobs) - 1}"
            )
        out.append(StoredLayer(layer, "", [blobs[i] for i in range(len(blobs))], (), fmt))
    return out


def _flat(params: Params) -> dict[str, np.ndarray]:
    return {
        f"{name}/{index}": _as_float32(blob)
        for name, blobs in params.items()
        for index, blob in enumerate(blobs)
    }


def read_npz(path: str | os.PathLike) -> list[StoredLayer]:
    """Layers of an .npz file keyed "<layer>/<i>" (never unpickles)."""
    head = _read_bytes_head(path, 4096)
    if not head.startswith(b"PK"):
        foreign = _describe_foreign(head)
        what = f"is {foreign}" if foreign else "is not a zip archive"
        raise WeightsError(f"{path}: {what}, not an .npz file")
    try:
        with np.load(path, allow_pickle=False) as archive:
            items = [(key, archive[key]) for key in archive.files]
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise WeightsError(
            f"{path}: cannot read .npz (truncated, corrupt or pickled): {exc}"
        ) from exc
    for key, array in items:
        if not (np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_):
            raise WeightsError(f"{path}: array '{key}' has non-numeric dtype {array.dtype}")
    return _layers_from_flat(items, os.fspath(path), "npz")


def write_npz(path: str | os.PathLike, params: Params) -> None:
    """Write params to an uncompressed .npz keyed "<layer>/<i>" (atomically)."""
    flat = _flat(params)
    _atomic_write(path, lambda handle: np.savez(handle, **flat))


def _safetensors_numpy():
    try:
        from safetensors import numpy as st_numpy
    except ImportError as exc:
        raise WeightsError(
            "safetensors files need the safetensors package (pip install safetensors)"
        ) from exc
    return st_numpy


def read_safetensors(path: str | os.PathLike) -> list[StoredLayer]:
    """Layers of a .safetensors file keyed "<layer>/<i>"."""
    st_numpy = _safetensors_numpy()
    raw = _read_bytes(path)
    try:
        tensors = st_numpy.load(raw)
    except Exception as exc:  # the library raises its own SafetensorError for bad headers
        foreign = _describe_foreign(raw)
        what = f"is {foreign}, not" if foreign else "is not a valid"
        raise WeightsError(f"{path}: {what} .safetensors file: {exc}") from exc
    return _layers_from_flat(tensors.items(), os.fspath(path), "safetensors")


def write_safetensors(path: str | os.PathLike, params: Params) -> None:
    """Write params to .safetensors keyed "<layer>/<i>" (atomically)."""
    raw = _safetensors_numpy().save(_flat(params))
    _atomic_write(path, lambda handle: handle.write(raw))


# ------------------------------------------------------------------------------------------------
# Dispatch
# ------------------------------------------------------------------------------------------------

_READERS = {
    "caffemodel": read_caffemodel,
    "hdf5": read_caffemodel_h5,
    "npz": read_npz,
    "safetensors": read_safetensors,
}


def read_weights(path: str | os.PathLike) -> list[StoredLayer]:
    """Read any supported weights file, chosen by extension (see `weights_format`)."""
    return _READERS[weights_format(path)](path)


def load_params(path: str | os.PathLike) -> StoredParams:
    """Stored params by layer name, in stored shapes, for layers holding at least one blob.

    Legacy 4-D shapes are kept as stored (and remembered): `match_weights` fits them to a net,
    `save_params` to a .caffemodel writes them back in the legacy fields.
    """
    return StoredParams(read_weights(path))


def save_params(
    path: str | os.PathLike, params: Params, net: caffe_pb2.NetParameter | None = None
) -> None:
    """Write params in the format the extension names; `net` supplies the layer definitions of
    a .caffemodel and the layer groups of a .caffemodel.h5 (optional for both)."""
    kind = weights_format(path)
    if kind == "caffemodel":
        write_caffemodel(path, net, params)
    elif kind == "hdf5":
        write_caffemodel_h5(path, net, params)
    elif kind == "npz":
        write_npz(path, params)
    else:
        write_safetensors(path, params)


# ------------------------------------------------------------------------------------------------
# Fitting stored layers to a net (Net::CopyTrainedLayersFrom)
# ------------------------------------------------------------------------------------------------


def _legacy_fits(stored: tuple[int, ...], target: tuple[int, ...]) -> bool:
    """Caffe's Blob::ShapeEquals for legacy blobs: target (<= 4 axes) left-padded with 1s."""
    return len(target) <= 4 and (1,) * (4 - len(target)) + target == stored


def _as_stored(stored: Sequence[StoredLayer] | Mapping[str, Sequence[Any]]) -> list[StoredLayer]:
    if isinstance(stored, StoredParams):
        return stored.layers
    if isinstance(stored, Mapping):
        return [
            StoredLayer(name, "", [_as_float32(b) for b in blobs], (), "npz")
            for name, blobs in stored.items()
        ]
    return list(stored)


def match_weights(
    stored: Sequence[StoredLayer] | Mapping[str, Sequence[Any]],
    expected: Mapping[str, Sequence[Sequence[int] | None]],
    verbose: bool = False,
) -> tuple[dict[str, list[np.ndarray | None]], WeightsReport]:
    """Fit stored layers to a net whose layers expect `expected[name]` blob shapes.

    `stored` is `read_weights`' list, `load_params`' result, or any ``{layer: [arrays]}`` (whose
    shapes must then match exactly). Caffe's rules: layers are matched by name (file layers the
    net lacks are skipped; a name repeated in the file is copied again, so the last wins); the
    blob count must equal the net's (an HDF5 file may hold fewer, omitting shared copies); each
    shape must equal the net's, except that a blob stored with the legacy 4-D fields fits any net
    shape of at most 4 axes that equals it once left-padded with 1s, and is reshaped. Net layers
    with blobs but absent from the file are reported missing and keep their initial values.
    `expected` should list every net layer, those without blobs too (with []); a None entry marks
    a blob the layer shares from another layer: it counts, but is neither checked nor returned.
    Blobs holding NaN or Inf raise a RuntimeWarning naming them.

    Returns ({layer: [arrays in the net's shapes, shared entries left out]}, report); a blob an
    HDF5 file omits is None.
    """
    report = WeightsReport()
    params: dict[str, list[np.ndarray | None]] = {}
    absent: dict[str, list[int]] = {}

    def say(message: str) -> None:
        if verbose:
            print(f"nincc: weights: {message}", file=sys.stderr)

    for layer in _as_stored(stored):
        if layer.name not in expected:
            if layer.name not in report.skipped:
                report.skipped.append(layer.name)
            say(f"ignoring file layer '{layer.name}' (not in the net)")
            continue
        shapes = [None if s is None else tuple(int(d) for d in s) for s in expected[layer.name]]
        count_ok = (
            len(layer.blobs) <= len(shapes)
            if layer.format == "hdf5"
            else len(layer.blobs) == len(shapes)
        )
        if not count_ok:
            raise WeightsError(
                f"layer '{layer.name}': the weights file holds {len(layer.blobs)} blob(s), "
                f"the net expects {len(shapes)}"
            )
        fitted: list[np.ndarray | None] = []
        gaps: list[int] = []
        for index, target in enumerate(shapes):
            if target is None:
                continue  # shared: stored under its owner
            array = layer.blobs[index] if index < len(layer.blobs) else None
            if array is None:
                fitted.append(None)
                gaps.append(index)
                continue
            if array.shape != target:
                if layer.is_legacy(index) and _legacy_fits(array.shape, target):
                    report.reshaped.append(f"{layer.name}/{index}: {array.shape} -> {target}")
                    array = array.reshape(target)
                else:
                    raise WeightsError(
                        f"layer '{layer.name}' blob {index}: the weights file has shape "
                        f"{array.shape}, the net expects {target}"
                    )
            if not np.isfinite(array).all():
                key = f"{layer.name}/{index}"
                if key not in report.nonfinite:
                    report.nonfinite.append(key)
                warnings.warn(
                    f"weights of layer '{layer.name}' blob {index} contain NaN or Inf values",
                    RuntimeWarning,
                    stacklevel=2,
                )
            fitted.append(array)
        if all(array is None for array in fitted):
            continue  # nothing owned here, or an HDF5 layer whose blobs all sit elsewhere
        params[layer.name] = fitted
        absent[layer.name] = gaps
        if layer.name not in report.loaded:
            report.loaded.append(layer.name)
        say(f"copying layer '{layer.name}' ({len(layer.blobs)} blob(s))")

    for name, shapes in expected.items():
        if all(s is None for s in shapes):
            continue
        if name not in params:
            report.missing.append(name)
            say(f"net layer '{name}' has no weights in the file: keeping its initial values")
        else:
            report.missing.extend(f"{name}/{index}" for index in absent[name])
    return params, report
