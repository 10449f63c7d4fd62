"""Image decoding and resizing with OpenCV's conventions (BGR order, INTER_LINEAR geometry)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from nincc.data.images import decode_image, read_list_file, resize_linear
from nincc.errors import DataError


def _encode(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def _naive_linear_1d(src: np.ndarray, dst: int) -> np.ndarray:
    """OpenCV's linear rule along one axis in exact arithmetic: half-pixel centres, clamped."""
    n = len(src)
    out = np.zeros(dst)
    for x in range(dst):
        f = (x + 0.5) * n / dst - 0.5
        i = int(np.floor(f))
        a = f - i
        if i < 0:
            i, a = 0, 0.0
        if i >= n - 1:
            i, a = n - 1, 0.0
        right = src[min(i + 1, n - 1)]
        out[x] = (1 - a) * src[i] + a * right
    return out


def test_resize_matches_the_linear_rule_on_rows():
    rng = np.random.default_rng(0)
    row = rng.integers(0, 256, 7).astype(np.uint8)
    img = np.repeat(row[None, :, None], 3, axis=0)  # 3 equal rows, 1 channel
    for width in (14, 28, 5, 3):
        got = resize_linear(img, 3, width)[1, :, 0]
        ref = np.floor(_naive_linear_1d(row.astype(np.float64), width) + 0.5)
        assert np.abs(got - ref).max() <= 1, width
    got = resize_linear(img, 3, 14)[0, :, 0]  # weights 3/4, 1/4 are exact in fixed point
    np.testing.assert_array_equal(got, np.floor(_naive_linear_1d(row, 14) + 0.5))


def test_resize_halving_is_the_rounded_block_average():
    img = np.random.default_rng(1).integers(0, 256, (6, 8, 3), dtype=np.uint8)
    got = resize_linear(img, 3, 4)
    blocks = img.astype(np.int64).reshape(3, 2, 4, 2, 3).sum(axis=(1, 3))
    np.testing.assert_array_equal(got, (blocks + 2) // 4)


def test_resize_identity_and_constant():
    img = np.random.default_rng(2).integers(0, 256, (5, 4, 1), dtype=np.uint8)
    np.testing.assert_array_equal(resize_linear(img, 5, 4), img)
    const = np.full((5, 7, 3), 77, np.uint8)
    assert (resize_linear(const, 11, 3) == 77).all()


def test_decode_modes():
    rng = np.random.default_rng(3)
    rgba = rng.integers(0, 256, (4, 5, 4), dtype=np.uint8)
    data = _encode(Image.fromarray(rgba, "RGBA"))
    np.testing.assert_array_equal(decode_image(data, "native", "x"), rgba[..., [2, 1, 0, 3]])
    np.testing.assert_array_equal(decode_image(data, "color", "x"), rgba[..., 2::-1])
    gray = decode_image(data, "gray", "x")
    ref = rgba[..., :3].astype(np.float64) @ [0.299, 0.587, 0.114]
    assert gray.shape == (4, 5, 1) and np.abs(gray[..., 0] - ref).max() <= 0.5 + 1e-9

    pal = Image.fromarray(rgba[..., :3]).convert("P")
    np.testing.assert_array_equal(
        decode_image(_encode(pal), "native", "x"), np.asarray(pal.convert("RGB"))[..., ::-1]
    )
    bits = Image.fromarray(rgba[..., 0] > 128)
    np.testing.assert_array_equal(
        decode_image(_encode(bits), "native", "x")[..., 0], (rgba[..., 0] > 128) * 255
    )
    deep = rng.integers(0, 65536, (3, 3)).astype(np.uint16)
    data16 = _encode(Image.fromarray(deep))
    np.testing.assert_array_equal(decode_image(data16, "gray", "x")[..., 0], deep >> 8)
    with pytest.raises(DataError, match="f.png: I;16 image is not 8-bit"):
        decode_image(data16, "native", "f.png")


def test_list_file_label_after_last_space(tmp_path):
    p = tmp_path / "l.txt"
    p.write_text("a b.jpg 3\r\n\nc.png 12\n")
    assert read_list_file(str(p), "t") == [("a b.jpg", 3), ("c.png", 12)]
