"""Weights files without Caffe: binary .caffemodel, .caffemodel.h5, .npz and .safetensors.

Reading gives the stored layers as plain arrays (`read_weights`); fitting them to a net follows
Caffe's `Net::CopyTrainedLayersFrom` rules (`match_weights`); writing mirrors `Net::ToProto` /
`Net::ToHDF5` so Caffe loads the result; `compare_weights`/`check_weights` report how a file fits
a net without raising, and `convert` rewrites a file in another format (fitting it to a net when
one is given). Only `convert` builds a net; the rest knows no layer type: the net's expectations
arrive as ``{layer name: [blob shapes]}``.

Params are ``{layer name: [float32 arrays in Caffe's blob order and shapes]}``; in .npz and
.safetensors files the key of blob ``i`` of layer ``L`` is ``"L/i"`` (split at the last ``/``, since
layer names may contain ``/``). Every write goes to a temporary file in the target directory that
replaces the target only once complete, so an error never leaves a partial file behind.
"""

from __future__ import annotations

import math
import os
import sys
import tempfile
import warnings
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from google.protobuf.message import DecodeError

from . import caffe_pb2
from .errors import WeightsError
from .upgrade import V1_TYPES

__all__ = [
    "StoredLayer",
    "WeightsReport",
    "StoredParams",
    "read_weights",
    "read_caffemodel",
    "read_caffemodel_full",
    "read_caffemodel_h5",
    "read_npz",
    "read_safetensors",
    "match_weights",
    "compare_weights",
    "check_weights",
    "convert",
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
    legacy 4-D fields, and, for a .caffemodel, the file's layer definitions without blobs
    (`definitions`, a NetParameter; None for other formats)."""

    def __init__(
        self,
        layers: Sequence[StoredLayer],
        definitions: caffe_pb2.NetParameter | None = None,
    ):
        super().__init__()
        self.layers = list(layers)
        self.definitions = definitions
        for layer in self.layers:
            if layer.blobs:
                self[layer.name] = layer.blobs  # a later duplicate wins, as in Caffe

    def is_legacy(self, name: str, index: int) -> bool:
        found = [layer for layer in self.layers if layer.name == name]
        return bool(found) and found[-1].is_legacy(index)


@dataclass
class WeightsReport:
    """What `match_weights` (or `compare_weights`, `convert`) did; `lines()` renders it."""

    loaded: list[str] = field(default_factory=list)  # net layers given weights from the file
    skipped: list[str] = field(default_factory=list)  # file layers the net does not have
    missing: list[str] = field(default_factory=list)  # net layers (or "layer/i") left at init
    reshaped: list[str] = field(default_factory=list)  # legacy 4-D blobs fitted to the net
    nonfinite: list[str] = field(default_factory=list)  # "layer/i" holding NaN or Inf
    mismatched: list[str] = field(default_factory=list)  # blobs Caffe would refuse (compare)

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
        out += [f"mismatch: {m}" for m in self.mismatched]
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
    """Write through `write(handle)` into a temporary sibling file (opened read-write, as HDF5
    needs), flush it to disk, then rename it over `path`; on any error the temporary goes."""
    target = Path(path)
    directory = target.parent if str(target.parent) else Path(".")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=directory)
    except OSError as exc:
        raise WeightsError(f"{path}: cannot write weights file: {exc.strerror or exc}") from exc
    try:
        with os.fdopen(fd, "w+b") as handle:
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
#
# A caffemodel is almost entirely packed float arrays. Parsing it whole with protobuf would hold
# the file's bytes, the parsed message and the arrays at once (three copies of the weights), so
# the reader walks the wire format itself: the layer definitions and blob headers (small) go
# through protobuf, each packed `data` field is copied straight from the file's bytes into its
# array. The writer likewise streams each blob's bytes into the file.

_WIRE_VARINT, _WIRE_I64, _WIRE_LEN, _WIRE_I32 = 0, 1, 2, 5
_NET_LAYER = caffe_pb2.NetParameter.LAYER_FIELD_NUMBER  # 100
_NET_V1_LAYERS = caffe_pb2.NetParameter.LAYERS_FIELD_NUMBER  # 2
_LAYER_BLOBS = caffe_pb2.LayerParameter.BLOBS_FIELD_NUMBER  # 7
_V1_BLOBS = caffe_pb2.V1LayerParameter.BLOBS_FIELD_NUMBER  # 6
_V1_V0_LAYER = caffe_pb2.V1LayerParameter.LAYER_FIELD_NUMBER  # 1
_BLOB_DATA = caffe_pb2.BlobProto.DATA_FIELD_NUMBER  # 5
_BLOB_DOUBLE_DATA = caffe_pb2.BlobProto.DOUBLE_DATA_FIELD_NUMBER  # 8
_BLOB_SHAPE = caffe_pb2.BlobProto.SHAPE_FIELD_NUMBER  # 7


class _Corrupt(Exception):
    """Bytes that are not a well-formed protobuf message."""


class _Unusual(Exception):
    """Well-formed but unusual encoding (unpacked floats, groups): left to protobuf."""


def _read_varint(buf: bytes, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= end:
            raise _Corrupt("a varint runs past the end of its message")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
        if shift >= 70:
            raise _Corrupt("a varint is longer than 10 bytes")


def _fields(buf: bytes, start: int, end: int) -> Iterator[tuple[int, int, int, int, int]]:
    """(field number, wire type, value start, value end, field start) of each field in
    buf[start:end]; for length-delimited fields the value excludes its length prefix."""
    pos = start
    while pos < end:
        field_start = pos
        key, pos = _read_varint(buf, pos, end)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise _Corrupt("field number 0")
        if wire == _WIRE_VARINT:
            value_start = pos
            _, pos = _read_varint(buf, pos, end)
        elif wire == _WIRE_LEN:
            length, value_start = _read_varint(buf, pos, end)
            pos = value_start + length
        elif wire == _WIRE_I64:
            value_start, pos = pos, pos + 8
        elif wire == _WIRE_I32:
            value_start, pos = pos, pos + 4
        elif wire in (3, 4):
            raise _Unusual("group fields")
        else:
            raise _Corrupt(f"invalid wire type {wire}")
        if pos > end:
            raise _Corrupt("a field runs past the end of its message (truncated file?)")
        yield number, wire, value_start, pos, field_start


def _blob_array(blob: caffe_pb2.BlobProto, where: str) -> tuple[np.ndarray, bool]:
    """A parsed BlobProto as (float32 array, uses legacy 4-D fields), as Blob::FromProto reads
    it (used for blobs whose encoding the direct reader leaves to protobuf)."""
    shape, legacy = _blob_shape(blob, where)
    values = blob.double_data if len(blob.double_data) else blob.data
    _check_count(shape, len(values), where)
    dtype = np.float64 if values is blob.double_data else np.float32
    array = np.fromiter(values, dtype=dtype, count=len(values)).astype(np.float32, copy=False)
    return array.reshape(shape), legacy


def _blob_shape(blob: caffe_pb2.BlobProto, where: str) -> tuple[tuple[int, ...], bool]:
    legacy = any(blob.HasField(f) for f in ("num", "channels", "height", "width"))
    if legacy:
        shape: tuple[int, ...] = (blob.num, blob.channels, blob.height, blob.width)
    else:
        shape = tuple(blob.shape.dim)  # no dims: a 0-axis scalar
    if any(d < 0 for d in shape):
        raise WeightsError(f"{where}: negative dimension in stored shape {shape}")
    return shape, legacy


def _check_count(shape: tuple[int, ...], found: int, where: str) -> None:
    count = math.prod(shape)
    if found != count:
        raise WeightsError(
            f"{where}: stored shape {shape} needs {count} values, the file holds {found}"
        )


def _packed_array(buf: bytes, ranges: list[tuple[int, int]], dtype: str, where: str) -> np.ndarray:
    """One float32 array from the packed chunks buf[a:b] (a repeated field may come in parts)."""
    size = np.dtype(dtype).itemsize
    parts = []
    for start, end in ranges:
        if (end - start) % size:
            raise _Corrupt(f"{where}: packed {np.dtype(dtype).name} data of {end - start} bytes")
        parts.append(np.frombuffer(buf, dtype=dtype, count=(end - start) // size, offset=start))
    joined = parts[0] if len(parts) == 1 else np.concatenate(parts)
    return joined.astype(np.float32)  # always a copy: the array must not pin the file's bytes


def _read_blob(buf: bytes, start: int, end: int, where: str) -> tuple[np.ndarray, bool]:
    """One BlobProto at buf[start:end]: header through protobuf, data copied directly."""
    header = bytearray()
    floats: list[tuple[int, int]] = []
    doubles: list[tuple[int, int]] = []
    try:
        for number, wire, value_start, value_end, field_start in _fields(buf, start, end):
            if number == _BLOB_DATA:
                if wire != _WIRE_LEN:
                    raise _Unusual("unpacked data")
                floats.append((value_start, value_end))
            elif number == _BLOB_DOUBLE_DATA:
                if wire != _WIRE_LEN:
                    raise _Unusual("unpacked double_data")
                doubles.append((value_start, value_end))
            elif number in (6, 9):  # diff, double_diff: Caffe's loader ignores them
                continue
            else:
                header += buf[field_start:value_end]
    except _Unusual:
        return _blob_array(caffe_pb2.BlobProto.FromString(buf[start:end]), where)
    shape, legacy = _blob_shape(caffe_pb2.BlobProto.FromString(bytes(header)), where)
    if doubles:  # Blob::FromProto prefers double_data when it has any values
        array = _packed_array(buf, doubles, "<f8", where)
        if not array.size and floats:
            array = _packed_array(buf, floats, "<f4", where)
    elif floats:
        array = _packed_array(buf, floats, "<f4", where)
    else:
        array = np.zeros(0, np.float32)
    _check_count(shape, array.size, where)
    return array.reshape(shape), legacy


def _read_layer(buf: bytes, start: int, end: int, v1: bool, src: str) -> tuple[Any, StoredLayer]:
    """One `layer` (or V1 `layers`) entry: (its definition without blobs, its stored blobs)."""
    blobs_field = _V1_BLOBS if v1 else _LAYER_BLOBS
    message_type = caffe_pb2.V1LayerParameter if v1 else caffe_pb2.LayerParameter
    definition = bytearray()
    blob_ranges: list[tuple[int, int]] = []
    for number, wire, value_start, value_end, field_start in _fields(buf, start, end):
        if number == blobs_field and wire == _WIRE_LEN:
            blob_ranges.append((value_start, value_end))
        else:
            definition += buf[field_start:value_end]
    msg = message_type.FromString(bytes(definition))
    if v1 and msg.HasField("layer"):  # V0: definition and blobs in the nested message
        full = caffe_pb2.V1LayerParameter.FromString(buf[start:end])
        v0 = full.layer
        name = v0.name or full.name
        blobs = v0.blobs if len(v0.blobs) else full.blobs
        stored = [_blob_array(b, f"{src}: layer '{name}' blob {i}") for i, b in enumerate(blobs)]
        full.ClearField("blobs")
        full.layer.ClearField("blobs")
        return full, _stored(name, _V0_TYPES.get(v0.type, v0.type), stored)
    if v1:
        name = msg.name
        type_ = V1_TYPES.get(caffe_pb2.V1LayerParameter.LayerType.Name(msg.type), "")
    else:
        name, type_ = msg.name, msg.type
    stored = [
        _read_blob(buf, a, b, f"{src}: layer '{name}' blob {i}")
        for i, (a, b) in enumerate(blob_ranges)
    ]
    return msg, _stored(name, type_, stored)


def _stored(name: str, type_: str, blobs: list[tuple[np.ndarray, bool]]) -> StoredLayer:
    return StoredLayer(
        name, type_, [a for a, _ in blobs], tuple(legacy for _, legacy in blobs), "caffemodel"
    )


def read_caffemodel_full(
    path: str | os.PathLike,
) -> tuple[caffe_pb2.NetParameter, list[StoredLayer]]:
    """A binary NetParameter file as (the net's definitions with every blob removed, its
    layers' blobs in file order). Current `layer`, V1 `layers` and V0 entries are read; at most
    about two copies of the weights are held at once (the file's bytes and the arrays)."""
    raw = _read_bytes(path)
    src = os.fspath(path)
    if len(raw) > MAX_PROTO_BYTES:
        raise WeightsError(
            f"{path}: {len(raw)} bytes exceeds the 2 GiB limit of a binary protobuf message"
        )
    foreign = _describe_foreign(raw)
    if foreign is not None:
        raise WeightsError(f"{path}: is {foreign}, not a binary .caffemodel (NetParameter)")
    header = bytearray()
    entries: list[tuple[int, int, bool]] = []
    try:
        for number, wire, value_start, value_end, field_start in _fields(raw, 0, len(raw)):
            if number in (_NET_LAYER, _NET_V1_LAYERS) and wire == _WIRE_LEN:
                entries.append((value_start, value_end, number == _NET_V1_LAYERS))
            else:
                header += raw[field_start:value_end]
        net = caffe_pb2.NetParameter.FromString(bytes(header))
        if any(v1 for *_, v1 in entries) and not all(v1 for *_, v1 in entries):
            raise WeightsError(
                f"{path}: mixes current 'layer' and legacy 'layers' entries (Caffe refuses this)"
            )
        if not entries:
            raise WeightsError(f"{path}: holds no layers (not a .caffemodel, or an empty net)")
        layers = []
        for start, end, v1 in entries:
            definition, stored = _read_layer(raw, start, end, v1, src)
            (net.layers if v1 else net.layer).append(definition)
            layers.append(stored)
    except (_Corrupt, _Unusual, DecodeError) as exc:
        raise WeightsError(
            f"{path}: not a valid binary .caffemodel (truncated or corrupt): {exc}"
        ) from None
    return net, layers


def read_caffemodel(path: str | os.PathLike) -> list[StoredLayer]:
    """Layers of a binary NetParameter file (current `layer`, V1 `layers` or V0), in file order."""
    return read_caffemodel_full(path)[1]


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


def _tag(number: int, wire: int) -> bytes:
    return _varint((number << 3) | wire)


def _blob_chunks(array: np.ndarray, legacy: bool) -> list[bytes | memoryview]:
    """Blob::ToProto's bytes, in field order: legacy dims (1-4), packed float data (5), shape
    (7, every dim; none for a 0-axis blob). A blob read from the legacy 4-D fields is written
    back in them. The data chunk is a view of the array, not a copy."""
    chunks: list[bytes | memoryview] = []
    if legacy and array.ndim == 4:
        num, channels, height, width = (int(d) for d in array.shape)
        dims = caffe_pb2.BlobProto(num=num, channels=channels, height=height, width=width)
        chunks.append(dims.SerializeToString())
    if array.size:
        data = array.astype("<f4", copy=False).reshape(-1)
        chunks += [_tag(_BLOB_DATA, _WIRE_LEN), _varint(data.nbytes), memoryview(data).cast("B")]
    if array.ndim and not (legacy and array.ndim == 4):
        shape = caffe_pb2.BlobShape(dim=[int(d) for d in array.shape]).SerializeToString()
        chunks += [_tag(_BLOB_SHAPE, _WIRE_LEN), _varint(len(shape)), shape]
    return chunks


def _split_at(raw: bytes, number: int) -> tuple[bytes, bytes]:
    """A serialized message cut before its first field numbered above `number` (protobuf
    writes known fields in number order), so a field `number` can be spliced in between."""
    for field_number, _, _, _, field_start in _fields(raw, 0, len(raw)):
        if field_number > number:
            return raw[:field_start], raw[field_start:]
    return raw, b""


def _layer_chunks(definition: Any, blobs: Sequence[np.ndarray], legacy) -> list:
    """Wire chunks of one `layer { ... }` entry of a NetParameter, blobs spliced in place."""
    plain = caffe_pb2.LayerParameter()
    plain.CopyFrom(definition)
    plain.ClearField("blobs")
    head, tail = _split_at(plain.SerializeToString(), _LAYER_BLOBS)
    body: list[bytes | memoryview] = [head]
    for index, array in enumerate(blobs):
        chunks = _blob_chunks(array, legacy(definition.name, index))
        body += [_tag(_LAYER_BLOBS, _WIRE_LEN), _varint(sum(len(c) for c in chunks)), *chunks]
    body.append(tail)
    size = sum(len(c) for c in body)
    return [_tag(_NET_LAYER, _WIRE_LEN), _varint(size), *body]


def _legacy_flag(params: Params) -> Callable[[str, int], bool]:
    if isinstance(params, StoredParams):
        return params.is_legacy
    return lambda name, index: False


def _check_params(params: Params, names: Iterable[str], path) -> None:
    known = set(names)
    unknown = [name for name in params if name not in known]
    if unknown:
        raise WeightsError(f"{path}: params for layers the net does not have: {', '.join(unknown)}")


def _present(name: str, blobs: Sequence[Any], path) -> list[np.ndarray]:
    if any(b is None for b in blobs):
        raise WeightsError(
            f"{path}: layer '{name}' lacks blob {[b is None for b in blobs].index(True)} (an HDF5 "
            "file stores a shared blob only under its owner); convert with the net to fill it in"
        )
    return [_as_float32(b) for b in blobs]


def write_caffemodel(
    path: str | os.PathLike, net: caffe_pb2.NetParameter | None, params: Params
) -> None:
    """Write a binary .caffemodel as Caffe's Net::ToProto does (atomically): the net message
    with each layer's blobs filled from `params` (layers absent from `params` get none).

    `net` gives the definitions (see `netdef.net_to_proto` for those Caffe holds after setup);
    its other fields are written as they are. Without a net, layers are given by name only
    (enough for Caffe to copy weights by name). Blobs are streamed, not copied into a message.
    """
    legacy = _legacy_flag(params)
    header = caffe_pb2.NetParameter()
    if net is None:
        definitions = [caffe_pb2.LayerParameter(name=name) for name in params]
        arrays = {name: _present(name, blobs, path) for name, blobs in params.items()}
    else:
        if len(net.layers):
            raise WeightsError(
                f"{path}: the net definition uses legacy V1 'layers'; upgrade it before writing "
                "weights"
            )
        header.CopyFrom(net)
        header.ClearField("layer")
        definitions = list(net.layer)
        _check_params(params, (d.name for d in definitions), path)
        arrays = {name: _present(name, blobs, path) for name, blobs in params.items()}
    chunks: list[bytes | memoryview] = [header.SerializeToString()]
    for definition in definitions:
        chunks += _layer_chunks(definition, arrays.get(definition.name, []), legacy)
    size = sum(len(c) for c in chunks)
    if size > MAX_PROTO_BYTES:
        raise WeightsError(
            f"{path}: {size} bytes exceeds the 2 GiB limit of a binary protobuf message; "
            "save as .caffemodel.h5, .npz or .safetensors instead"
        )

    def write(handle: BinaryIO) -> None:
        for chunk in chunks:
            handle.write(chunk)

    _atomic_write(path, write)


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
    layer without a net) holding datasets "0", "1", ... in float32. A None blob (one the layer
    shares from its owner, which Net::ToHDF5 writes only under the owner) gets no dataset."""
    h5py = _h5py()
    if net is not None:
        names = [layer.name for layer in net.layer] or [layer.name for layer in net.layers]
        _check_params(params, names, path)
    else:
        names = list(params)
    arrays = {
        name: [None if b is None else _as_float32(b) for b in blobs]
        for name, blobs in params.items()
    }

    def write(handle: BinaryIO) -> None:
        with h5py.File(handle, "w") as h5:
            data = h5.create_group("data")
            for name in names:
                group = data.require_group(name)
                for index, array in enumerate(arrays.get(name, [])):
                    if array is not None:
                        group.create_dataset(str(index), data=array)

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


def _flat(params: Params, path) -> dict[str, np.ndarray]:
    return {
        f"{name}/{index}": blob
        for name, blobs in params.items()
        for index, blob in enumerate(_present(name, blobs, path))
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
    flat = _flat(params, path)
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
    raw = _safetensors_numpy().save(_flat(params, path))
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
    if weights_format(path) == "caffemodel":
        definitions, layers = read_caffemodel_full(path)
        return StoredParams(layers, definitions)
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


def _all_finite(array: np.ndarray) -> bool:
    """No NaN or Inf in a float32 array: its float64 sum cannot overflow, and is finite exactly
    then (no boolean temporary the size of the array)."""
    return bool(np.isfinite(np.sum(array, dtype=np.float64)))


def _names(items: Sequence[str], limit: int = 12) -> str:
    """A comma-separated list, cut after `limit` names (an error message stays one short line)."""
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


def _fit(
    stored: Sequence[StoredLayer] | Mapping[str, Sequence[Any]],
    expected: Mapping[str, Sequence[Sequence[int] | None]],
    strict: bool,
    say: Callable[[str], None],
) -> tuple[dict[str, list[np.ndarray | None]], WeightsReport]:
    """Caffe's copy rules; a blob that does not fit raises WeightsError when `strict`, else it
    is listed in `report.mismatched` (and its layer is neither loaded nor missing)."""
    report = WeightsReport()
    params: dict[str, list[np.ndarray | None]] = {}
    absent: dict[str, list[int]] = {}
    refused: set[str] = set()

    def mismatch(message: str) -> None:
        if strict:
            raise WeightsError(message)
        report.mismatched.append(message)

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
            mismatch(
                f"layer '{layer.name}': the weights file holds {len(layer.blobs)} blob(s), "
                f"the net expects {len(shapes)}"
            )
            refused.add(layer.name)
            continue
        fitted: list[np.ndarray | None] = []
        gaps: list[int] = []
        fits = True
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
                    mismatch(
                        f"layer '{layer.name}' blob {index}: the weights file has shape "
                        f"{array.shape}, the net expects {target}"
                    )
                    fits = False
                    continue
            if not _all_finite(array):
                key = f"{layer.name}/{index}"
                if key not in report.nonfinite:
                    report.nonfinite.append(key)
                if strict:
                    warnings.warn(
                        f"weights of layer '{layer.name}' blob {index} contain NaN or Inf values",
                        RuntimeWarning,
                        stacklevel=3,
                    )
            fitted.append(array)
        if not fits:
            refused.add(layer.name)
            continue
        if all(array is None for array in fitted):
            continue  # nothing owned here, or an HDF5 layer whose blobs all sit elsewhere
        refused.discard(layer.name)
        params[layer.name] = fitted
        absent[layer.name] = gaps
        if layer.name not in report.loaded:
            report.loaded.append(layer.name)
        say(f"copying layer '{layer.name}' ({len(layer.blobs)} blob(s))")

    for name, shapes in expected.items():
        if all(s is None for s in shapes) or name in refused:
            continue
        if name not in params:
            report.missing.append(name)
            say(f"net layer '{name}' has no weights in the file: keeping its initial values")
        else:
            report.missing.extend(f"{name}/{index}" for index in absent[name])
    return params, report


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
    A blob that does not fit raises WeightsError naming layer, blob index and both shapes.
    Blobs holding NaN or Inf raise a RuntimeWarning naming them. With `verbose`, each copied,
    ignored and missing layer is logged to stderr.

    Returns ({layer: [arrays in the net's shapes, shared entries left out]}, report); a blob an
    HDF5 file omits is None.
    """

    def say(message: str) -> None:
        if verbose:
            print(f"nincc: weights: {message}", file=sys.stderr)

    return _fit(stored, expected, strict=True, say=say)


def compare_weights(
    stored: Sequence[StoredLayer] | Mapping[str, Sequence[Any]],
    expected: Mapping[str, Sequence[Sequence[int] | None]],
) -> WeightsReport:
    """`match_weights`' report without raising or warning: every blob that does not fit is
    listed in `mismatched` (its layer is then neither loaded nor missing)."""
    return _fit(stored, expected, strict=False, say=lambda message: None)[1]


def _slots(expected: Any) -> Mapping[str, Sequence[Sequence[int] | None]]:
    """A Graph's weight slots, or the mapping itself."""
    return expected.weight_slots() if hasattr(expected, "weight_slots") else expected


def check_weights(expected: Any, path: str | os.PathLike) -> str:
    """A text report of how a weights file fits a net, before any compute: matched, missing,
    extra (ignored) and mismatched blobs, legacy reshapes and NaN/Inf values, with a verdict.

    `expected` is a Graph (its `weight_slots()`) or the slots mapping `match_weights` takes. A
    file that cannot be read still raises WeightsError; a file that does not fit does not.
    """
    slots = _slots(expected)
    stored = load_params(path)
    report = compare_weights(stored, slots)
    wanted = [name for name, shapes in slots.items() if any(s is not None for s in shapes)]
    gaps = set(report.missing)
    blobs = sum(
        1
        for name in report.loaded
        for index, shape in enumerate(slots[name])
        if shape is not None and f"{name}/{index}" not in gaps
    )
    lines = [
        f"weights {os.fspath(path)} ({weights_format(path)}, "
        f"{len({layer.name for layer in stored.layers if layer.blobs})} layer(s) with blobs)",
        f"  matched     {len(report.loaded)} of {len(wanted)} net layer(s) with weights, "
        f"{blobs} blob(s)",
    ]
    if report.missing:
        lines.append(f"  missing     {_names(report.missing, 50)} (keep their initial values)")
    holding = {layer.name for layer in stored.layers if layer.blobs}
    extra = [name for name in report.skipped if name in holding]  # blobless ones do not matter
    if extra:
        lines.append(f"  extra       {_names(extra, 50)} (not in the net: ignored)")
    lines += [f"  mismatched  {message}" for message in report.mismatched]
    if report.reshaped:
        lines.append(f"  reshaped    {_names(report.reshaped, 50)} (legacy 4-D blobs)")
    if report.nonfinite:
        lines.append(f"  NaN/Inf     {_names(report.nonfinite, 50)}")
    if report.mismatched:
        verdict = f"Caffe would refuse this file: {len(report.mismatched)} mismatch(es)"
    elif wanted and not report.loaded:
        verdict = "no layer of the file is in the net (weights for another net?)"
    elif report.missing:
        verdict = "loads; the missing layers keep their initial values"
    else:
        verdict = "every blob of the net fits"
    lines.append(f"  result      {verdict}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# Converting between formats
# ------------------------------------------------------------------------------------------------


def _warn_nonfinite(params: Params, report: WeightsReport) -> None:
    for name, blobs in params.items():
        for index, array in enumerate(blobs):
            if array is not None and not _all_finite(array):
                report.nonfinite.append(f"{name}/{index}")
                warnings.warn(
                    f"weights of layer '{name}' blob {index} contain NaN or Inf values",
                    RuntimeWarning,
                    stacklevel=3,
                )


def convert(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    net: Any = None,
    verbose: bool = False,
    *,
    phase: str = "TEST",
    level: int | None = None,
    stages: Sequence[str] = (),
    input_shapes: Mapping[str, Sequence[int]] | None = None,
) -> WeightsReport:
    """Convert a weights file between .caffemodel, .caffemodel.h5, .npz and .safetensors (the
    extensions choose), writing `dst` atomically; returns what was copied.

    Without `net` the blobs pass through as stored. A .caffemodel output holds layer
    definitions, so it then needs a .caffemodel input: its definitions are kept, upgraded to the
    current format as Caffe's upgrade_net_proto_binary does (legacy 4-D blobs stay as they are).

    With `net` (a prototxt path, text or NetParameter, built for `phase`/`level`/`stages` with
    Caffe's Split layers), the blobs are first fitted to it by Caffe's copy rules, so legacy
    shapes become the net's; file layers the net lacks are dropped (logged with `verbose`) and a
    net layer the file lacks is an error. The output then holds every blob of the net: a
    .caffemodel with the definitions Caffe's Net::ToProto writes, a .caffemodel.h5 with a group
    per layer and shared blobs under their owners only (Net::ToHDF5), .npz/.safetensors with
    every layer's blobs under Caffe's indices (shared ones copied).
    Blobs holding NaN or Inf raise a RuntimeWarning naming them.
    """
    out_kind = weights_format(dst)
    in_kind = weights_format(src)
    if net is None:
        if out_kind == "caffemodel" and in_kind != "caffemodel":
            raise WeightsError(
                f"{dst}: a .caffemodel holds the net's layer definitions, which {src} lacks; "
                "give the net (--net NET.prototxt)"
            )
        stored = load_params(src)
        report = WeightsReport(loaded=list(stored))
        _warn_nonfinite(stored, report)
        if out_kind == "caffemodel":
            from .upgrade import upgrade_net

            definitions, _ = upgrade_net(stored.definitions, path=os.fspath(src))
            write_caffemodel(dst, definitions, stored)
        else:
            save_params(dst, stored)
        return report
    return _convert_with_net(src, dst, out_kind, net, verbose, phase, level, stages, input_shapes)


def _convert_with_net(src, dst, out_kind, net, verbose, phase, level, stages, input_shapes):
    from . import load_net_param
    from .build import build_graph
    from .netdef import full_blobs, net_to_proto, owned_blobs

    net_param = load_net_param(net)
    graph = build_graph(
        net_param,
        phase=phase,
        level=level,
        stages=stages,
        input_shapes=input_shapes,
        insert_splits=True,
    )
    stored = load_params(src)
    slots = graph.weight_slots()
    fitted, report = match_weights(stored, slots, verbose=verbose)
    wanted = [name for name, shapes in slots.items() if any(s is not None for s in shapes)]
    if wanted and not report.loaded:
        holding = [layer.name for layer in stored.layers if layer.blobs]
        raise WeightsError(
            f"{src}: none of its layers ({_names(holding, 6)}) is a layer with weights of net "
            f"'{graph.name}' ({_names(wanted, 6)}): weights for another net?"
        )
    if report.missing:
        raise WeightsError(
            f"{src}: no weights for {_names(report.missing, 8)} of net '{graph.name}'; "
            "the converted file would be incomplete"
        )
    if out_kind == "caffemodel":
        write_caffemodel(dst, net_to_proto(net_param, graph), full_blobs(graph, fitted))
    elif out_kind == "hdf5":
        write_caffemodel_h5(dst, net_to_proto(net_param, graph), owned_blobs(graph, fitted))
    else:
        save_params(dst, full_blobs(graph, fitted))
    return report
