"""Batch sources: record order, wrap-around, encoded records, ImageData, HDF5 shuffle, MemoryData,
prefetching and the errors a user meets."""

from __future__ import annotations

import io
import os
import threading

import numpy as np
import pytest
from PIL import Image

import nincc
from nincc.data import (
    BatchSource,
    DataSource,
    HDF5Source,
    ImageDataSource,
    MemorySource,
    Prefetcher,
    TransformParam,
    Writer,
    make_datum,
    make_encoded_datum,
    sources_for,
)
from nincc.data.sources import data_record_shape
from nincc.errors import DataError


def _write_db(path, records, labels, backend="LMDB", encoded=False):
    with Writer(str(path), backend) as w:
        for i, (r, y) in enumerate(zip(records, labels, strict=True)):
            w.put(f"{i:08d}", make_encoded_datum(r, y) if encoded else make_datum(r, y))


def _png(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def records():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (7, 3, 5, 6), dtype=np.uint8), np.arange(7) * 3 % 10


@pytest.mark.parametrize("backend", ["LMDB", "LEVELDB"])
def test_data_source_order_and_wrap(tmp_path, records, backend):
    x, y = records
    _write_db(tmp_path / "db", x, y, backend)
    src = DataSource("d", str(tmp_path / "db"), backend, 3, ("data", "label"))
    order = []
    for _ in range(5):
        b = src.next()
        assert b["data"].dtype == np.float32 and b["label"].dtype == np.float32
        for item, label in zip(b["data"], b["label"], strict=True):
            i = int(np.flatnonzero([np.array_equal(item, r) for r in x])[0])
            assert label == y[i]
            order.append(i)
    src.close()
    assert order == [i % 7 for i in range(15)]


def test_float_data_records(tmp_path):
    x = np.random.default_rng(1).normal(size=(4, 2, 3, 3)).astype(np.float32)
    _write_db(tmp_path / "db", x, [0, 1, 2, 3])
    src = DataSource("d", str(tmp_path / "db"), "LMDB", 4, ("data",), TransformParam(scale=2.0))
    b = src.next()
    assert set(b) == {"data"}
    np.testing.assert_array_equal(b["data"], x * np.float32(2.0))


def test_encoded_records_decode_to_bgr_and_forced_channels(tmp_path):
    rng = np.random.default_rng(2)
    rgb = rng.integers(0, 256, (3, 4, 5, 3), dtype=np.uint8)
    _write_db(tmp_path / "db", [_png(a) for a in rgb], [0, 1, 2], encoded=True)
    db = str(tmp_path / "db")
    b = DataSource("d", db, "LMDB", 3, ("data", "label")).next()
    np.testing.assert_array_equal(b["data"], rgb[..., ::-1].transpose(0, 3, 1, 2))
    g = DataSource("d", db, "LMDB", 3, ("data",), TransformParam(force_gray=True)).next()["data"]
    weights = np.array([0.299, 0.587, 0.114])
    ref = rgb.astype(np.float64) @ weights
    assert g.shape == (3, 1, 4, 5)
    assert np.abs(g[:, 0] - ref).max() <= 0.5 + 1e-6
    assert data_record_shape(db, "LMDB", TransformParam(force_gray=True, crop_size=3)) == (1, 3, 3)

    gray = rng.integers(0, 256, (2, 4, 4), dtype=np.uint8)
    _write_db(tmp_path / "g", [_png(a) for a in gray], [0, 1], encoded=True)
    native = DataSource("d", str(tmp_path / "g"), "LMDB", 2, ("data",)).next()["data"]
    np.testing.assert_array_equal(native[:, 0], gray)
    color = DataSource(
        "d", str(tmp_path / "g"), "LMDB", 2, ("data",), TransformParam(force_color=True)
    ).next()["data"]
    np.testing.assert_array_equal(color, np.repeat(gray[:, None], 3, axis=1))


def test_undecodable_record_names_the_key(tmp_path):
    _write_db(tmp_path / "db", [b"not an image"], [0], encoded=True)
    src = DataSource("mydata", str(tmp_path / "db"), "LMDB", 1, ("data",))
    with pytest.raises(DataError, match="layer 'mydata': record b'00000000': cannot decode"):
        src.next()


def test_missing_and_empty_databases(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError) as e:
        DataSource("train_data", "missing_lmdb", "LMDB", 2, ("data",))
    msg = str(e.value)
    assert "layer 'train_data'" in msg and "'missing_lmdb' not found" in msg
    assert "tools/make_lmdb.py" in msg and str(tmp_path) in msg
    import lmdb

    lmdb.open(str(tmp_path / "empty")).close()
    with pytest.raises(DataError, match="layer 'x': LMDB database '.*empty' is empty"):
        DataSource("x", str(tmp_path / "empty"), "LMDB", 2, ("data",))


def test_records_of_different_shapes_in_one_batch(tmp_path):
    with Writer(str(tmp_path / "db")) as w:
        w.put("0", make_datum(np.zeros((1, 2, 2), np.uint8)))
        w.put("1", make_datum(np.zeros((1, 3, 2), np.uint8)))
    src = DataSource("d", str(tmp_path / "db"), "LMDB", 2, ("data",))
    with pytest.raises(DataError, match="record b'1' has shape \\[1, 3, 2\\]"):
        src.next()


NET = """
name: "n"
layer { name: "data" type: "Data" top: "data" top: "label" include { phase: TRAIN }
  data_param { source: "train_db" batch_size: 2 backend: LMDB } }
layer { name: "data" type: "Data" top: "data" top: "label" include { phase: TEST }
  transform_param { crop_size: 3 }
  data_param { source: "test_db" batch_size: 2 backend: LMDB } }
"""


def test_sources_for_picks_the_phase_layer_and_checks_shapes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    x = np.arange(4 * 2 * 4 * 4, dtype=np.uint8).reshape(4, 2, 4, 4)
    _write_db(tmp_path / "train_db", x, [1, 1, 1, 1])
    _write_db(tmp_path / "test_db", x, [7, 7, 7, 7])
    net_param = nincc.load_net_param(NET)
    for phase, label, shape in (("TRAIN", 1, (2, 2, 4, 4)), ("TEST", 7, (2, 2, 3, 3))):
        shapes = {"data": shape, "label": (2,)}
        graph = nincc.build_graph(net_param, phase=phase, input_shapes=shapes)
        (src,) = sources_for(graph, net_param)
        b = src.next()
        assert b["data"].shape == shape and (b["label"] == label).all()
        src.close()
    graph = nincc.build_graph(
        net_param, phase="TRAIN", input_shapes={"data": (2, 2, 5, 5), "label": (2,)}
    )
    (src,) = sources_for(graph, net_param)
    with pytest.raises(DataError, match="blob 'data' shape \\[2, 2, 4, 4\\], the net was built"):
        src.next()
    src.close()


# ---------------------------------------------------------------- ImageData


def _image_folder(tmp_path, n=5, size=(6, 8)):
    rng = np.random.default_rng(4)
    imgs = rng.integers(0, 256, (n, *size, 3), dtype=np.uint8)
    (tmp_path / "img").mkdir()
    lines = []
    for i, a in enumerate(imgs):
        Image.fromarray(a).save(tmp_path / "img" / f"im {i}.png")
        lines.append(f"im {i}.png {i + 10}")
    (tmp_path / "list.txt").write_text("\n".join(lines) + "\n")
    return imgs


def test_image_data_order_resize_and_gray(tmp_path):
    imgs = _image_folder(tmp_path)
    root = str(tmp_path / "img") + "/"
    src = ImageDataSource("im", str(tmp_path / "list.txt"), 2, ("data", "label"), root)
    got = [src.next() for _ in range(3)]
    labels = np.concatenate([b["label"] for b in got])
    assert labels.tolist() == [10, 11, 12, 13, 14, 10]
    np.testing.assert_array_equal(got[0]["data"][1], imgs[1][..., ::-1].transpose(2, 0, 1))
    half = ImageDataSource(
        "im", str(tmp_path / "list.txt"), 1, ("data",), root, 3, 4, is_color=False
    ).next()["data"]
    gray = np.rint(imgs[0].astype(np.float64) @ [0.299, 0.587, 0.114])
    # a 2x downscale with OpenCV's linear rule is the rounded 2x2 block average
    block = gray.reshape(3, 2, 4, 2).sum(axis=(1, 3))
    assert half.shape == (1, 1, 3, 4)
    assert np.abs(half[0, 0] - np.floor((block + 2) / 4)).max() <= 1


def test_image_data_shuffle_covers_every_image_each_pass(tmp_path):
    _image_folder(tmp_path)
    root = str(tmp_path / "img") + "/"
    src = ImageDataSource(
        "im", str(tmp_path / "list.txt"), 5, ("data", "label"), root, shuffle=True, seed=3
    )
    passes = [src.next()["label"].tolist() for _ in range(4)]
    assert all(sorted(p) == [10, 11, 12, 13, 14] for p in passes)
    assert len({tuple(p) for p in passes}) > 1


def test_image_data_errors(tmp_path):
    _image_folder(tmp_path)
    lst = str(tmp_path / "list.txt")
    with pytest.raises(DataError, match="root_folder is prepended as is"):
        ImageDataSource("im", lst, 1, ("data",), str(tmp_path / "img")).next()
    (tmp_path / "img" / "im 0.png").write_bytes(b"garbage")
    with pytest.raises(DataError, match="im 0.png'.*cannot decode"):
        ImageDataSource("im", lst, 1, ("data",), str(tmp_path / "img") + "/").next()
    (tmp_path / "bad.txt").write_text("a.png 1\nnolabel\n")
    with pytest.raises(DataError, match="bad.txt:2: expected 'path label'"):
        ImageDataSource("im", str(tmp_path / "bad.txt"), 1, ("data",))
    with pytest.raises(DataError, match="layer 'im': image list 'nope.txt' not found"):
        ImageDataSource("im", "nope.txt", 1, ("data",))


# ---------------------------------------------------------------- HDF5


def _h5_files(tmp_path, sizes):
    import h5py

    names, start = [], 0
    for k, n in enumerate(sizes):
        p = tmp_path / f"part{k}.h5"
        with h5py.File(p, "w") as h:
            h["data"] = np.arange(start, start + n, dtype=np.float64)[:, None]
            h["label"] = np.arange(start, start + n, dtype=np.float32)
        names.append(str(p))
        start += n
    (tmp_path / "list.txt").write_text("\n".join(names) + "\n")
    return str(tmp_path / "list.txt")


def test_hdf5_in_order_across_files(tmp_path):
    lst = _h5_files(tmp_path, [3, 2])
    src = HDF5Source("h", lst, ("data", "label"), 4)
    rows = np.concatenate([src.next()["label"] for _ in range(3)])
    assert rows.tolist() == [i % 5 for i in range(12)]


@pytest.mark.parametrize("sizes", [[6, 5], [7]])
def test_hdf5_shuffle_visits_each_row_once_per_pass(tmp_path, sizes):
    lst = _h5_files(tmp_path, sizes)
    src = HDF5Source("h", lst, ("data", "label"), 1, shuffle=True, seed=1)
    n = sum(sizes)
    seq = [int(src.next()["label"][0]) for _ in range(3 * n)]
    passes = [seq[i : i + n] for i in range(0, 3 * n, n)]
    assert all(sorted(p) == list(range(n)) for p in passes)
    assert len({tuple(p) for p in passes}) > 1
    bounds = np.cumsum([0, *sizes])
    for p in passes:  # a file's rows are read together
        files = [int(np.searchsorted(bounds, r, side="right")) - 1 for r in p]
        assert files == sorted(files, key=files.index)


def test_hdf5_errors(tmp_path):
    lst = _h5_files(tmp_path, [3])
    with pytest.raises(DataError, match="has no dataset 'aux'"):
        HDF5Source("h", lst, ("data", "aux"), 1)
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(DataError, match="names no files"):
        HDF5Source("h", str(tmp_path / "empty.txt"), ("data",), 1)


# ---------------------------------------------------------------- MemoryData


def test_memory_data_reset_and_add():
    src = MemorySource("m", 2, (1, 2, 2), ("data", "label"), TransformParam(scale=0.5))
    with pytest.raises(DataError, match="source.reset"):
        src.next()
    x = np.arange(16, dtype=np.float32).reshape(4, 1, 2, 2)
    src.reset(x, [0, 1, 2, 3])
    got = [src.next() for _ in range(3)]
    np.testing.assert_array_equal(got[0]["data"], x[:2])  # Reset does not transform
    np.testing.assert_array_equal(got[2]["label"], [0, 1])
    src.add(x.astype(np.uint8), [5, 6, 7, 8])
    np.testing.assert_array_equal(src.next()["data"], x[:2] * 0.5)
    with pytest.raises(DataError, match="positive multiple of batch_size 2"):
        src.reset(x[:3], [0, 1, 2])
    with pytest.raises(DataError, match="shape \\[4, 2, 2, 2\\] given"):
        src.reset(np.zeros((4, 2, 2, 2)), [0, 1, 2, 3])


# ---------------------------------------------------------------- prefetch


def test_prefetcher_keeps_order_and_stops(tmp_path, records):
    x, y = records
    _write_db(tmp_path / "db", x, y)
    plain = DataSource("d", str(tmp_path / "db"), "LMDB", 3, ("data", "label"))
    ref = [plain.next() for _ in range(6)]
    plain.close()
    pre = Prefetcher(DataSource("d", str(tmp_path / "db"), "LMDB", 3, ("data", "label")), 2)
    for r in ref:
        b = pre.next()
        np.testing.assert_array_equal(b["data"], r["data"])
        np.testing.assert_array_equal(b["label"], r["label"])
    pre.close()
    assert not any(t.name.startswith("nincc-prefetch") for t in threading.enumerate())


class _Failing(BatchSource):
    layer = "f"

    def __init__(self):
        self.n = 0

    def produce(self):
        self.n += 1
        if self.n > 2:
            raise DataError("layer 'f': broken record")
        return {"x": np.full(1, self.n)}


def test_prefetcher_raises_source_errors_in_the_consumer():
    pre = Prefetcher(_Failing(), 4)
    assert [int(pre.next()["x"][0]) for _ in range(2)] == [1, 2]
    with pytest.raises(DataError, match="broken record"):
        pre.next()
    pre.close()


def test_writer_is_atomic(tmp_path):
    with pytest.raises(RuntimeError), Writer(str(tmp_path / "db")) as w:
        w.put("0", make_datum(np.zeros((1, 1, 1), np.uint8)))
        raise RuntimeError("interrupted")
    assert os.listdir(tmp_path) == []
    _write_db(tmp_path / "db", [np.zeros((1, 1, 1), np.uint8)], [0])
    with pytest.raises(DataError, match="already exists"):
        Writer(str(tmp_path / "db"))
