"""Caffe's record formats: Datum (one image and its label) and BlobProto (mean files).

A Datum holds either raw pixels (``data``: uint8 bytes in C, H, W order; for colour images Caffe's
tools store B, G, R planes), 32-bit floats (``float_data``), or the bytes of an image file
(``encoded``: channels/height/width unset, decoded on read). A BlobProto holds a blob's shape
(``shape.dim`` or the legacy ``num``/``channels``/``height``/``width``) and its values.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from ..errors import DataError
from .images import decode_image


@dataclass(frozen=True)
class Record:
    """One decoded Datum: pixels (C, H, W) as uint8 or float32, and its integer label."""

    array: np.ndarray
    label: int


def _pb():
    from .. import caffe_pb2

    return caffe_pb2


def parse_datum(value: bytes, where: str, decode: str = "native") -> Record:
    """Decode one serialized Datum as Caffe's DataTransformer reads it.

    ``decode`` applies to encoded records: ``"native"`` keeps the file's channels (OpenCV's
    IMREAD_UNCHANGED), ``"color"``/``"gray"`` force 3 or 1 channels (transform_param
    force_color/force_gray). ``where`` names the record in error messages.
    """
    d = _pb().Datum()
    try:
        d.ParseFromString(value)
    except Exception as e:  # protobuf raises DecodeError, a plain Exception subclass
        raise DataError(f"{where}: not a Datum record ({e})") from None
    if d.encoded:
        img = decode_image(d.data, decode, where)
        return Record(np.ascontiguousarray(img.transpose(2, 0, 1)), int(d.label))
    c, h, w = int(d.channels), int(d.height), int(d.width)
    n = c * h * w
    if c <= 0 or h <= 0 or w <= 0:
        raise DataError(f"{where}: Datum has channels/height/width {c}/{h}/{w}; all must be > 0")
    if d.data:
        if len(d.data) != n:
            raise DataError(
                f"{where}: Datum holds {len(d.data)} bytes of data, {c}x{h}x{w} needs {n}"
            )
        arr = np.frombuffer(d.data, np.uint8).reshape(c, h, w)
    else:
        if len(d.float_data) != n:
            raise DataError(
                f"{where}: Datum holds {len(d.float_data)} float_data values, {c}x{h}x{w} needs {n}"
            )
        arr = np.asarray(d.float_data, np.float32).reshape(c, h, w)
    return Record(arr, int(d.label))


def make_datum(array: np.ndarray, label: int = 0) -> bytes:
    """Serialize a (C, H, W) array as a raw Datum: uint8 → ``data``, anything else → float_data."""
    a = np.asarray(array)
    if a.ndim != 3:
        raise DataError(f"a Datum holds a (C, H, W) array, got shape {list(a.shape)}")
    d = _pb().Datum()
    d.channels, d.height, d.width = (int(s) for s in a.shape)
    if a.dtype == np.uint8:
        d.data = np.ascontiguousarray(a).tobytes()
    else:
        d.float_data.extend(np.asarray(a, np.float32).ravel().tolist())
    d.label = int(label)
    return d.SerializeToString()


def make_encoded_datum(file_bytes: bytes, label: int = 0) -> bytes:
    """Serialize an image file's bytes as an encoded Datum (shape fields unset, as Caffe does)."""
    d = _pb().Datum()
    d.data = file_bytes
    d.encoded = True
    d.label = int(label)
    return d.SerializeToString()


# ---------------------------------------------------------------- BlobProto (mean files)


def read_blob_proto(path: str | os.PathLike, what: str = "blob file") -> np.ndarray:
    """A binary BlobProto as a float32 array with Caffe's Blob::FromProto shape rule.

    Any legacy dim field present → shape (num, channels, height, width); otherwise shape.dim.
    Values come from double_data when it is present, else from data.
    """
    try:
        raw = open(path, "rb").read()
    except OSError as e:
        raise DataError(f"cannot read {what} '{path}': {e.strerror or e}") from None
    b = _pb().BlobProto()
    try:
        b.ParseFromString(raw)
    except Exception as e:
        raise DataError(f"{what} '{path}' is not a binary BlobProto ({e})") from None
    legacy = ("num", "channels", "height", "width")
    if any(b.HasField(f) for f in legacy):
        shape = tuple(int(getattr(b, f)) for f in legacy)
    else:
        shape = tuple(int(d) for d in b.shape.dim)
    values = b.double_data if len(b.double_data) else b.data
    count = int(np.prod(shape)) if shape else 1
    if len(values) != count:
        raise DataError(
            f"{what} '{path}' has shape {list(shape)} ({count} values) but holds {len(values)}"
        )
    return np.asarray(values, np.float32).reshape(shape)


def blob_proto_bytes(array: np.ndarray, legacy_dims: bool = True) -> bytes:
    """Serialize a float array as a BlobProto (4-D arrays with legacy dims, as Caffe's tools)."""
    a = np.asarray(array, np.float32)
    b = _pb().BlobProto()
    if legacy_dims and a.ndim == 4:
        b.num, b.channels, b.height, b.width = (int(s) for s in a.shape)
    else:
        b.shape.dim.extend(int(s) for s in a.shape)
    b.data.extend(a.ravel().tolist())
    return b.SerializeToString()


def read_mean_file(path: str, layer: str) -> np.ndarray:
    """A transform_param mean_file as a (C, H, W) float32 array.

    Caffe reads the mean through the legacy channels/height/width accessors and uses the first
    item, so (1, C, H, W) and (N, C, H, W) files work; a (C, H, W) file is accepted too.
    """
    if not os.path.exists(path):
        raise DataError(
            f"layer '{layer}': mean_file '{path}' not found (relative paths are read from the "
            f"working directory {os.getcwd()}); create it with "
            f"`python tools/compute_mean.py <database> {path}`"
        )
    m = read_blob_proto(path, f"layer '{layer}': mean_file")
    if m.ndim == 4:
        return np.ascontiguousarray(m[0])
    if m.ndim == 3:
        return m
    raise DataError(
        f"layer '{layer}': mean_file '{path}' has shape {list(m.shape)}; expected (1, C, H, W)"
    )
