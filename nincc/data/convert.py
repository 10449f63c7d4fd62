"""Building Datum databases from image files, and mean files from databases.

``convert_imageset`` follows Caffe's convert_imageset tool: keys ``%08d_<path>`` in list order
(after an optional shuffle), raw records as B, G, R planes (or grey), encoded records holding the
file's own bytes when no resize applies and the file already has the requested format.
``compute_mean`` follows compute_image_mean: a float32 running sum over records in key order,
divided by the record count, written as a 1 x C x H x W BlobProto with legacy dims.
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Callable, Sequence

import numpy as np

from ..errors import DataError
from .db import Writer, iter_records, write_file_atomic
from .images import decode_image, resize_linear
from .records import blob_proto_bytes, make_datum, make_encoded_datum, parse_datum

_FORMATS = {
    "jpg": "JPEG",
    "jpeg": "JPEG",
    "png": "PNG",
    "bmp": "BMP",
    "tif": "TIFF",
    "tiff": "TIFF",
    "ppm": "PPM",
    "pgm": "PPM",
    "webp": "WEBP",
}


def _encode(img: np.ndarray, ext: str, where: str) -> bytes:
    """An (H, W, C) BGR or grey uint8 image as file bytes of format ``ext`` (OpenCV imencode)."""
    from PIL import Image

    fmt = _FORMATS.get(ext.lower())
    if fmt is None:
        raise DataError(f"{where}: cannot encode as '{ext}'; use one of {sorted(_FORMATS)}")
    arr = img[..., 0] if img.shape[2] == 1 else img[..., 2::-1]
    buf = io.BytesIO()
    kwargs = {"quality": 95} if fmt == "JPEG" else {}
    Image.fromarray(np.ascontiguousarray(arr)).save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def image_record(
    path: str,
    label: int,
    is_color: bool = True,
    height: int = 0,
    width: int = 0,
    encoding: str | None = None,
) -> bytes:
    """One serialized Datum from an image file (Caffe's ReadImageToDatum).

    ``encoding``: None stores raw pixels; a format name ('png', 'jpg') stores an encoded image,
    the file's own bytes when no resize applies and its extension matches.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise DataError(f"cannot read image '{path}': {e.strerror or e}") from None
    img = decode_image(data, "color" if is_color else "gray", f"image '{path}'")
    resized = height > 0 and width > 0
    if resized:
        img = resize_linear(img, height, width)
    if encoding:
        ext = os.path.splitext(path)[1][1:].lower()
        same = ext == encoding.lower() or {ext, encoding.lower()} == {"jpg", "jpeg"}
        if not resized and same:
            return make_encoded_datum(data, label)
        return make_encoded_datum(_encode(img, encoding, f"image '{path}'"), label)
    return make_datum(np.ascontiguousarray(img.transpose(2, 0, 1)), label)


def convert_imageset(
    items: Sequence[tuple[str, int]],
    root: str,
    output: str,
    backend: str = "LMDB",
    is_color: bool = True,
    height: int = 0,
    width: int = 0,
    encoded: bool = False,
    encode_type: str = "",
    shuffle: bool = False,
    seed: int = 0,
    check_size: bool = False,
    skip_bad: bool = False,
    overwrite: bool = False,
    progress: Callable[[int], None] | None = None,
) -> int:
    """Write (path, label) items as a Datum database at ``output``; returns the record count.

    Paths are joined to ``root``. With ``skip_bad`` unreadable images are skipped with a
    warning (as Caffe's tool does); otherwise they are an error naming the file.
    """
    if (height > 0) != (width > 0):
        raise DataError(f"resize height and width must be given together, got {height}x{width}")
    order = list(items)
    if not order:
        raise DataError("no images to convert")
    if shuffle:
        order = [order[i] for i in np.random.default_rng(seed).permutation(len(order))]
    size = None
    with Writer(output, backend, overwrite) as w:
        for i, (name, label) in enumerate(order):
            path = os.path.join(root, name)
            enc = None
            if encoded:
                enc = encode_type or os.path.splitext(name)[1][1:].lower()
                if not enc:
                    raise DataError(f"cannot guess the encoding of '{name}'; give --encode-type")
            try:
                value = image_record(path, label, is_color, height, width, enc)
            except DataError as e:
                if not skip_bad:
                    raise
                warnings.warn(f"skipped: {e}", stacklevel=2)
                continue
            if check_size and not encoded:
                shape = parse_datum(value, path).array.shape
                if size is None:
                    size = shape
                elif shape != size:
                    raise DataError(
                        f"image '{path}' is {list(shape)} (C, H, W), the first was {list(size)}"
                    )
            w.put(f"{i:08d}_{name}", value)
            if progress is not None:
                progress(w.count)
        count = w.count
        if count == 0:
            raise DataError("no image could be read; nothing written")
    return count


def compute_mean(source: str, backend: str = "LMDB") -> tuple[np.ndarray, int]:
    """The per-pixel mean (1, C, H, W) float32 of a Datum database and its record count.

    Encoded records are decoded as stored. All records must have the first record's size.
    """
    total: np.ndarray | None = None
    count = 0
    for key, value in iter_records(source, backend, "compute_mean"):
        rec = parse_datum(value, f"record {key!r}")
        if total is None:
            total = np.zeros(rec.array.shape, np.float32)
        elif rec.array.shape != total.shape:
            raise DataError(
                f"record {key!r} is {list(rec.array.shape)} (C, H, W), the first record "
                f"{list(total.shape)}; a mean needs records of one size"
            )
        total += rec.array.astype(np.float32)
        count += 1
    if total is None:
        raise DataError(f"database '{source}' holds no records")
    return (total / np.float32(count))[None], count


def write_mean(mean: np.ndarray, path: str) -> None:
    """Write a (1, C, H, W) mean as a binary BlobProto, atomically."""
    write_file_atomic(path, blob_proto_bytes(mean))


def write_array_db(
    output: str,
    x: np.ndarray,
    y: np.ndarray,
    backend: str = "LMDB",
    key_digits: int = 8,
    overwrite: bool = False,
) -> int:
    """Write (N, C, H, W) records with labels as raw Datums keyed ``%0<key_digits>d``.

    uint8 arrays go to ``data``, any other dtype to ``float_data`` (float32).
    """
    if len(x) != len(y):
        raise DataError(f"{len(x)} records but {len(y)} labels")
    with Writer(output, backend, overwrite) as w:
        for i in range(len(x)):
            w.put(f"{i:0{key_digits}d}", make_datum(x[i], int(y[i])))
    return len(x)


def run_tool(prog: str, body: Callable[[], None]) -> int:
    """Run a dataset tool's body: 0 on success; a NinccError prints `prog: error: ...`, gives 1."""
    import sys

    from ..errors import NinccError

    try:
        body()
    except NinccError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1
    return 0
