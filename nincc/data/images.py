"""Image files as Caffe reads them through OpenCV: HWC uint8 arrays in B, G, R order.

Decoding uses Pillow. OpenCV's rules are followed: colour reads give 3 channels B, G, R (alpha
dropped, grey replicated); grey reads give 1 channel; native reads keep 1, 3 (BGR) or 4 (BGRA)
channels; 16-bit images read as colour or grey keep their high byte. Resizing follows OpenCV's
INTER_LINEAR (half-pixel centres, clamped borders, 11-bit fixed-point weights). Grey conversion of
colour PNGs uses ITU-R 601 weights in fixed point and may differ from a given OpenCV/libpng build
by one grey level; JPEGs decode with the same libjpeg settings (Y plane for grey) but different
libjpeg builds can differ in the last bits.
"""

from __future__ import annotations

import io
import os

import numpy as np

from ..errors import DataError

_MODES = ("native", "color", "gray")


def _pil():
    try:
        from PIL import Image
    except ImportError:
        raise DataError("reading images needs Pillow: pip install 'nincc[data]'") from None
    return Image


def _gray_from_rgb(rgb: np.ndarray) -> np.ndarray:
    """RGB → grey with OpenCV's fixed-point ITU-R 601 weights (14 fractional bits)."""
    r, g, b = (rgb[..., i].astype(np.int32) for i in range(3))
    return ((r * 4899 + g * 9617 + b * 1868 + (1 << 13)) >> 14).astype(np.uint8)


def _to_8bit(img) -> np.ndarray:
    """A single-band image of any depth as uint8 (16-bit: high byte, as OpenCV without ANYDEPTH)."""
    a = np.asarray(img)
    if a.dtype == np.uint8:
        return a
    if a.dtype == bool:
        return a.astype(np.uint8) * 255
    if img.mode.startswith("I"):
        return (np.clip(a, 0, 65535).astype(np.uint32) >> 8).astype(np.uint8)
    return np.clip(a, 0, 255).astype(np.uint8)


def decode_image(data: bytes, mode: str, where: str) -> np.ndarray:
    """Decode image file bytes to an (H, W, C) uint8 array, C in B, G, R(, A) order.

    ``mode``: ``"color"`` (3 channels), ``"gray"`` (1 channel) or ``"native"`` (as stored).
    """
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
    Image = _pil()
    try:
        img = Image.open(io.BytesIO(data))
        if mode == "gray" and img.format == "JPEG":
            img.draft("L", img.size)  # libjpeg's own grey output (the Y plane), as OpenCV asks
        img.load()
    except Exception as e:  # Pillow raises many types for corrupt data
        raise DataError(f"{where}: cannot decode image ({type(e).__name__}: {e})") from None
    return _convert(img, mode, where)


def _convert(img, mode: str, where: str) -> np.ndarray:
    m = img.mode
    if m == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        m = img.mode
    if m == "CMYK" or m == "YCbCr" or m == "LAB" or m == "HSV":
        img, m = img.convert("RGB"), "RGB"
    if m in ("RGB", "RGBA", "RGBX"):
        rgb = np.asarray(img)[..., :3]
        if mode == "gray":
            return _gray_from_rgb(rgb)[..., None]
        if mode == "native" and m == "RGBA":
            return np.ascontiguousarray(np.asarray(img)[..., [2, 1, 0, 3]])
        return np.ascontiguousarray(rgb[..., ::-1])
    if m == "LA":
        la = np.asarray(img)
        if mode == "native":
            g = la[..., 0]
            return np.stack([g, g, g, la[..., 1]], axis=-1)
        img, m = img.getchannel("L"), "L"
    if m in ("L", "1", "I", "I;16", "I;16B", "I;16L", "F"):
        if mode == "native" and m not in ("L", "1"):
            raise DataError(
                f"{where}: {m} image is not 8-bit; Caffe's transformer accepts 8-bit images only"
            )
        g = _to_8bit(img)
        if mode == "color":
            return np.repeat(g[..., None], 3, axis=-1)
        return g[..., None]
    raise DataError(f"{where}: unsupported image mode {m}")


def read_image(path: str, is_color: bool = True, height: int = 0, width: int = 0) -> np.ndarray:
    """Caffe's ReadImageToCVMat: an image file as (H, W, C) uint8 BGR or grey, optionally resized.

    The size is changed only when both ``height`` and ``width`` are > 0.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise DataError(f"cannot read image '{path}': {e.strerror or e}") from None
    img = decode_image(data, "color" if is_color else "gray", f"image '{path}'")
    if height > 0 and width > 0:
        img = resize_linear(img, height, width)
    return img


# ---------------------------------------------------------------- OpenCV INTER_LINEAR

_COEF_BITS = 11
_COEF_SCALE = 1 << _COEF_BITS


def _linear_taps(src: int, dst: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per output index: the left source index, the right one and their fixed-point weights."""
    scale = 1.0 / (dst / src)
    f = ((np.arange(dst, dtype=np.float64) + 0.5) * scale - 0.5).astype(np.float32)
    i0 = np.floor(f).astype(np.int64)
    f = (f - i0.astype(np.float32)).astype(np.float32)
    low = i0 < 0
    f[low], i0[low] = 0, 0
    high = i0 >= src - 1
    f[high], i0[high] = 0, src - 1
    i1 = np.minimum(i0 + 1, src - 1)
    w0 = np.rint((np.float32(1) - f) * _COEF_SCALE).astype(np.int64)
    w1 = np.rint(f * _COEF_SCALE).astype(np.int64)
    return i0, i1, np.stack([w0, w1])


def resize_linear(img: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize an (H, W, C) uint8 image as OpenCV's cv::resize INTER_LINEAR does (integer path)."""
    h, w = img.shape[:2]
    if (h, w) == (height, width):
        return img
    x0, x1, wx = _linear_taps(w, width)
    y0, y1, wy = _linear_taps(h, height)
    src = img.astype(np.int64)
    rows = src[:, x0] * wx[0][None, :, None] + src[:, x1] * wx[1][None, :, None]
    out = rows[y0] * wy[0][:, None, None] + rows[y1] * wy[1][:, None, None]
    out = (out + (1 << (2 * _COEF_BITS - 1))) >> (2 * _COEF_BITS)
    return np.clip(out, 0, 255).astype(np.uint8)


# ---------------------------------------------------------------- list files


def read_list_file(path: str, what: str) -> list[tuple[str, int]]:
    """A Caffe image list: one ``path label`` per line; the label follows the LAST space.

    Paths may contain spaces (Caffe splits at the last one). Blank lines are skipped.
    """
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise DataError(f"{what}: cannot read list file '{path}': {e.strerror or e}") from None
    out: list[tuple[str, int]] = []
    for n, line in enumerate(lines, start=1):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        name, sep, label = line.rpartition(" ")
        try:
            value = int(label)
        except ValueError:
            value = None
        if not sep or not name or value is None:
            raise DataError(
                f"{what}: {path}:{n}: expected 'path label' (an integer label after the last "
                f"space), got {line!r}"
            )
        out.append((name, value))
    return out


def image_files_by_class(root: str) -> tuple[list[tuple[str, int]], list[str]]:
    """An image folder with one subfolder per class: (relative path, class index) sorted by name.

    Class indices follow the sorted subfolder names; the names are returned in that order.
    """
    exts = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm", ".webp"}
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
    items: list[tuple[str, int]] = []
    for label, cls in enumerate(classes):
        for dirpath, _, files in sorted(os.walk(os.path.join(root, cls))):
            for fname in sorted(files):
                if os.path.splitext(fname)[1].lower() in exts:
                    rel = os.path.relpath(os.path.join(dirpath, fname), root)
                    items.append((rel.replace(os.sep, "/"), label))
    return items, classes
