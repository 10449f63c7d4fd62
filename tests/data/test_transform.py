"""Caffe's DataTransformer against a naive per-element loop of its formula."""

from __future__ import annotations

import numpy as np
import pytest

from nincc.data.records import blob_proto_bytes
from nincc.data.transform import DataTransformer, TransformParam
from nincc.errors import DataError


def naive(x, mean=None, mean_values=(), scale=1.0, crop=0, h_off=0, w_off=0, mirror=False):
    """out[c, h, w'] = (x[c, h_off+h, w_off+w] - mean) * scale, one element at a time in float32."""
    c_, hh, ww = x.shape
    h_out, w_out = (crop, crop) if crop else (hh, ww)
    out = np.zeros((c_, h_out, w_out), np.float32)
    for c in range(c_):
        for h in range(h_out):
            for w in range(w_out):
                v = np.float32(x[c, h_off + h, w_off + w])
                if mean is not None:
                    v = np.float32(v - np.float32(mean[c, h_off + h, w_off + w]))
                elif mean_values:
                    v = np.float32(v - np.float32(mean_values[c if len(mean_values) > 1 else 0]))
                v = np.float32(v * np.float32(scale))
                out[c, h, (w_out - 1 - w) if mirror else w] = v
    return out


@pytest.fixture
def records():
    rng = np.random.default_rng(3)
    return rng.integers(0, 256, (3, 3, 7, 9), dtype=np.uint8)


def _mean_file(tmp_path, shape):
    mean = np.random.default_rng(5).uniform(0, 255, shape).astype(np.float32)
    p = tmp_path / "mean.binaryproto"
    p.write_bytes(blob_proto_bytes(mean[None]))
    return str(p), mean


def test_plain_is_float_copy(records):
    out = DataTransformer(TransformParam())(records)
    assert out.dtype == np.float32
    for i in range(len(records)):
        np.testing.assert_array_equal(out[i], naive(records[i]))


def test_scale_mean_file_centre_crop(records, tmp_path):
    path, mean = _mean_file(tmp_path, (3, 7, 9))
    p = TransformParam(scale=0.00390625, crop_size=5, mean_file=path)
    out = DataTransformer(p, "TEST")(records)
    assert out.shape == (3, 3, 5, 5)
    for i in range(len(records)):
        ref = naive(records[i], mean, scale=0.00390625, crop=5, h_off=1, w_off=2)
        np.testing.assert_array_equal(out[i], ref)


@pytest.mark.parametrize("values", [(104.0,), (104.0, 117.0, 123.0)])
def test_mean_values_and_scale(records, values):
    p = TransformParam(scale=0.017, mean_values=values)
    out = DataTransformer(p, "TEST")(records)
    for i in range(len(records)):
        np.testing.assert_array_equal(out[i], naive(records[i], None, values, 0.017))


def test_float_records(records):
    x = records.astype(np.float32) / 7.0
    out = DataTransformer(TransformParam(scale=2.0, mean_values=(0.5,)))(x)
    for i in range(len(x)):
        np.testing.assert_array_equal(out[i], naive(x[i], None, (0.5,), 2.0))


def test_train_random_crop_and_mirror_cover_all_choices(records, tmp_path):
    path, mean = _mean_file(tmp_path, (3, 7, 9))
    p = TransformParam(scale=0.5, crop_size=5, mean_file=path, mirror=True)
    t = DataTransformer(p, "TRAIN", rng=11)
    candidates = {
        (h, w, m): naive(records[0], mean, (), 0.5, 5, h, w, m)
        for h in range(3)
        for w in range(5)
        for m in (False, True)
    }
    seen = set()
    for _ in range(60):
        out = t(records[:1].repeat(4, axis=0))
        for item in out:
            hits = [k for k, ref in candidates.items() if np.array_equal(item, ref)]
            assert hits, "output is not a crop of the record at any valid offset"
            seen.update(hits)
    assert seen == set(candidates)


def test_test_phase_mirror_is_random_but_crop_is_centred(records):
    p = TransformParam(crop_size=3, mirror=True)
    out = DataTransformer(p, "TEST", rng=0)(np.repeat(records[:1], 64, axis=0))
    plain = naive(records[0], crop=3, h_off=2, w_off=3)
    flipped = naive(records[0], crop=3, h_off=2, w_off=3, mirror=True)
    flips = [np.array_equal(o, flipped) for o in out]
    assert all(np.array_equal(o, plain) or f for o, f in zip(out, flips, strict=True))
    assert 10 < sum(flips) < 54


def test_seeded_generator_is_reproducible(records):
    p = TransformParam(crop_size=4, mirror=True)
    a = DataTransformer(p, "TRAIN", rng=7)(records)
    b = DataTransformer(p, "TRAIN", rng=7)(records)
    np.testing.assert_array_equal(a, b)


def test_errors(records, tmp_path):
    path, _ = _mean_file(tmp_path, (3, 6, 9))
    with pytest.raises(DataError, match="mean_file .* has shape"):
        DataTransformer(TransformParam(mean_file=path), layer="d")(records)
    with pytest.raises(DataError, match="both mean_file and mean_value"):
        DataTransformer(TransformParam(mean_file=path, mean_values=(1.0,)))
    with pytest.raises(DataError, match="crop_size 8 is larger"):
        DataTransformer(TransformParam(crop_size=8))(records)
    with pytest.raises(DataError, match="2 mean_value entries for 3-channel"):
        DataTransformer(TransformParam(mean_values=(1.0, 2.0)))(records)
    with pytest.raises(DataError, match="layer 'd': mean_file 'nope.binaryproto' not found"):
        DataTransformer(TransformParam(mean_file="nope.binaryproto"), layer="d")
    with pytest.raises(DataError, match="both force_color and force_gray"):
        DataTransformer(TransformParam(force_color=True, force_gray=True))
