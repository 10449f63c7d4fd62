"""The dataset tools in tools/: round trips on small generated data, help and errors."""

from __future__ import annotations

import gzip
import io
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from nincc.data import iter_records, parse_datum, read_blob_proto
from nincc.data.datasets import gcn_zca

from .conftest import load_tool as tool

NAMES = ["make_lmdb", "compute_mean", "cifar10_to_lmdb", "mnist_to_lmdb", "digits_to_lmdb"]


def records(path, backend="lmdb"):
    out = []
    for key, value in iter_records(str(path), backend):
        r = parse_datum(value, key)
        out.append((key.decode(), r.array, r.label))
    return out


@pytest.mark.parametrize("name", NAMES)
def test_help(name, capsys):
    with pytest.raises(SystemExit) as e:
        tool(name).main(["--help"])
    assert e.value.code == 0
    assert "usage:" in capsys.readouterr().out


# ---------------------------------------------------------------- make_lmdb / compute_mean


@pytest.fixture
def image_folder(tmp_path):
    rng = np.random.default_rng(0)
    imgs = {}
    for cls in ("cat", "dog"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(3):
            a = rng.integers(0, 256, (4, 6, 3), dtype=np.uint8)
            Image.fromarray(a).save(tmp_path / "imgs" / cls / f"{i}.png")
            imgs[f"{cls}/{i}.png"] = a
    return tmp_path / "imgs", imgs


@pytest.mark.parametrize("backend", ["lmdb", "leveldb"])
def test_make_lmdb_from_folder(image_folder, tmp_path, backend, capsys):
    folder, imgs = image_folder
    out = tmp_path / "db"
    assert tool("make_lmdb").main([str(folder), str(out), "--backend", backend]) == 0
    got = records(out, backend)
    assert [k for k, _, _ in got] == [f"{i:08d}_{n}" for i, n in enumerate(sorted(imgs))]
    for key, arr, label in got:
        name = key.split("_", 1)[1]
        np.testing.assert_array_equal(arr, imgs[name][..., ::-1].transpose(2, 0, 1))
        assert label == (0 if name.startswith("cat") else 1)
    assert "class 1: dog" in capsys.readouterr().out


def test_make_lmdb_list_encoded_resize_gray_shuffle(image_folder, tmp_path):
    folder, imgs = image_folder
    names = sorted(imgs)
    lst = tmp_path / "list.txt"
    lst.write_text("".join(f"{n} {i}\n" for i, n in enumerate(names)))
    make = tool("make_lmdb").main
    assert make([str(lst), str(tmp_path / "enc"), "--root", str(folder), "--encoded"]) == 0
    from nincc import caffe_pb2

    for i, (_, value) in enumerate(iter_records(str(tmp_path / "enc"), "lmdb")):
        d = caffe_pb2.Datum.FromString(value)
        assert d.encoded and d.data == (folder / names[i]).read_bytes() and d.label == i
    args = [str(lst), str(tmp_path / "g"), "--root", str(folder), "--gray"]
    assert make([*args, "--resize-height", "2", "--resize-width", "3", "--shuffle"]) == 0
    got = records(tmp_path / "g")
    assert sorted(label for _, _, label in got) == list(range(6))
    assert [label for _, _, label in got] != list(range(6))
    for key, arr, label in got:
        assert key.endswith(names[label]) and arr.shape == (1, 2, 3)
        gray = imgs[names[label]].astype(np.float64) @ [0.299, 0.587, 0.114]
        block = gray.reshape(2, 2, 3, 2).mean(axis=(1, 3))
        assert np.abs(arr[0] - block).max() <= 1.5


def test_make_lmdb_errors_leave_nothing_behind(image_folder, tmp_path, capsys):
    folder, _ = image_folder
    (folder / "cat" / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "db"
    assert tool("make_lmdb").main([str(folder), str(out)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("make_lmdb.py: error:") and "broken.png" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["imgs"]
    with pytest.warns(UserWarning, match="broken.png"):
        assert tool("make_lmdb").main([str(folder), str(out), "--skip-bad"]) == 0
    assert len(records(out)) == 6
    assert tool("make_lmdb").main([str(folder), str(out), "--skip-bad"]) == 1
    assert "already exists" in capsys.readouterr().err
    with pytest.warns(UserWarning):
        assert tool("make_lmdb").main([str(folder), str(out), "--skip-bad", "--overwrite"]) == 0


def test_compute_mean_matches_numpy(image_folder, tmp_path, capsys):
    folder, imgs = image_folder
    db, mean_path = tmp_path / "db", tmp_path / "mean.binaryproto"
    assert tool("make_lmdb").main([str(folder), str(db)]) == 0
    assert tool("compute_mean").main([str(db), str(mean_path)]) == 0
    mean = read_blob_proto(mean_path)
    stack = np.stack([a[..., ::-1].transpose(2, 0, 1) for a in imgs.values()])
    assert mean.shape == (1, 3, 4, 6)
    np.testing.assert_allclose(mean[0], stack.astype(np.float64).mean(axis=0), rtol=1e-6)
    out = capsys.readouterr().out
    b_mean = stack[:, 0].astype(np.float64).mean()
    assert f"mean_value channel [0]: {b_mean:.6g}" in out
    assert tool("compute_mean").main([str(tmp_path / "missing")]) == 1
    assert "tools/make_lmdb.py" in capsys.readouterr().err


# ---------------------------------------------------------------- CIFAR-10


def _fake_cifar(rng, n_train=3, n_test=2):
    batches = {}
    for name, n in [*((f"data_batch_{i}", n_train) for i in range(1, 6)), ("test_batch", n_test)]:
        batches[name] = (
            rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            rng.integers(0, 10, n).astype(np.uint8),
        )
    return batches


def _tar(path: Path, files: dict[str, bytes]) -> None:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


@pytest.mark.parametrize("kind", ["binary", "python"])
def test_cifar10_archive(tmp_path, kind):
    b = _fake_cifar(np.random.default_rng(1))
    if kind == "binary":
        files = {
            f"cifar-10-batches-bin/{n}.bin": np.concatenate([y[:, None], x], axis=1).tobytes()
            for n, (x, y) in b.items()
        }
    else:
        files = {
            f"cifar-10-batches-py/{n}": pickle.dumps(
                {b"data": x, b"labels": [int(v) for v in y]}, protocol=2
            )
            for n, (x, y) in b.items()
        }
    _tar(tmp_path / "c.tar.gz", files)
    out = tmp_path / "out"
    assert tool("cifar10_to_lmdb").main([str(tmp_path / "c.tar.gz"), str(out), "--mean"]) == 0
    train = records(out / "cifar10_train_lmdb")
    xs = np.concatenate([b[f"data_batch_{i}"][0] for i in range(1, 6)])
    ys = np.concatenate([b[f"data_batch_{i}"][1] for i in range(1, 6)])
    assert [k for k, _, _ in train] == [f"{i:05d}" for i in range(15)]
    for (_, arr, label), x, y in zip(train, xs, ys, strict=True):
        assert arr.dtype == np.uint8 and label == y
        np.testing.assert_array_equal(arr, x.reshape(3, 32, 32))
    test = records(out / "cifar10_test_lmdb")
    np.testing.assert_array_equal(test[1][1].ravel(), b["test_batch"][0][1])
    mean = read_blob_proto(out / "mean.binaryproto")
    np.testing.assert_allclose(mean.ravel(), xs.astype(np.float64).mean(axis=0), rtol=1e-6)


def test_cifar10_gcn_zca_folder(tmp_path):
    b = _fake_cifar(np.random.default_rng(2), 2, 2)
    folder = tmp_path / "cifar-10-batches-bin"
    folder.mkdir()
    for n, (x, y) in b.items():
        (folder / f"{n}.bin").write_bytes(np.concatenate([y[:, None], x], axis=1).tobytes())
    out = tmp_path / "out"
    assert tool("cifar10_to_lmdb").main([str(tmp_path), str(out), "--gcn-zca"]) == 0
    train = records(out / "cifar10_train_lmdb")
    xs = np.concatenate([b[f"data_batch_{i}"][0] for i in range(1, 6)]).reshape(-1, 3, 32, 32)
    xt = b["test_batch"][0].reshape(-1, 3, 32, 32)
    ref_train, ref_test = gcn_zca(xs, xt)
    assert train[0][1].dtype == np.float32
    np.testing.assert_allclose(np.stack([a for _, a, _ in train]), ref_train, atol=1e-4)
    test = records(out / "cifar10_test_lmdb")
    np.testing.assert_allclose(np.stack([a for _, a, _ in test]), ref_test, atol=1e-4)


def test_gcn_zca_against_naive_loops():
    rng = np.random.default_rng(3)
    train = rng.integers(0, 256, (12, 2, 2, 2), dtype=np.uint8)
    test = rng.integers(0, 256, (3, 2, 2, 2), dtype=np.uint8)

    def gcn(v):
        v = v.astype(np.float64).ravel()
        v = v - sum(v) / len(v)
        return v / (np.sqrt(sum(e * e for e in v)) / 55.0)

    tr = np.array([gcn(v) for v in train])
    te = np.array([gcn(v) for v in test])
    mu = tr.mean(axis=0)
    cov = sum(np.outer(r - mu, r - mu) for r in tr) / len(tr)
    u, s, _ = np.linalg.svd(cov + 0.1 * np.eye(8))
    w = u @ np.diag(s**-0.5) @ u.T
    got_tr, got_te = gcn_zca(train, test)
    np.testing.assert_allclose(got_tr.reshape(12, -1), (tr - mu) @ w, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got_te.reshape(3, -1), (te - mu) @ w, rtol=1e-5, atol=1e-5)


def test_cifar10_errors(tmp_path, capsys):
    _tar(tmp_path / "c.tar.gz", {"cifar-10-batches-bin/data_batch_1.bin": b"\0" * 3073})
    assert tool("cifar10_to_lmdb").main([str(tmp_path / "c.tar.gz"), str(tmp_path / "o")]) == 1
    assert "lacks data_batch_2" in capsys.readouterr().err
    evil = pickle.dumps({b"data": print})
    _tar(tmp_path / "e.tar.gz", {"data_batch_1": evil})
    assert tool("cifar10_to_lmdb").main([str(tmp_path / "e.tar.gz"), str(tmp_path / "o")]) == 1
    assert "refusing to load builtins.print" in capsys.readouterr().err


# ---------------------------------------------------------------- MNIST


def _idx(arr: np.ndarray, gz: bool, path: Path) -> None:
    data = bytes([0, 0, 8, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        data = gzip.compress(data)
    path.write_bytes(data)


def test_mnist_idx(tmp_path, capsys):
    rng = np.random.default_rng(4)
    src = tmp_path / "mnist"
    src.mkdir()
    sets = {}
    for prefix, n, gz in (("train", 5, True), ("t10k", 3, False)):
        x = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        y = rng.integers(0, 10, n).astype(np.uint8)
        _idx(x, gz, src / f"{prefix}-images-idx3-ubyte")
        _idx(y, gz, src / f"{prefix}-labels-idx1-ubyte")
        sets[prefix] = (x, y)
    out = tmp_path / "out"
    assert tool("mnist_to_lmdb").main([str(src), str(out)]) == 0
    for split, prefix in (("train", "train"), ("test", "t10k")):
        got = records(out / f"mnist_{split}_lmdb")
        x, y = sets[prefix]
        assert [k for k, _, _ in got] == [f"{i:08d}" for i in range(len(x))]
        np.testing.assert_array_equal(np.stack([a for _, a, _ in got])[:, 0], x)
        assert [label for _, _, label in got] == y.tolist()
    (src / "t10k-labels-idx1-ubyte").write_bytes(b"\0\0\x08\x01\0\0\0\x09abc")
    assert tool("mnist_to_lmdb").main([str(src), str(tmp_path / "o2")]) == 1
    assert "declares [9] (9 bytes) but holds 3" in capsys.readouterr().err


# ---------------------------------------------------------------- digits


def test_digits(tmp_path):
    from sklearn.datasets import load_digits

    out = tmp_path / "out"
    assert tool("digits_to_lmdb").main([str(out), "--size", "16", "--mean"]) == 0
    train, test = records(out / "digits_train_lmdb"), records(out / "digits_test_lmdb")
    assert len(train) == 1497 and len(test) == 300
    d = load_digits()
    expect = sorted(
        (np.kron(np.rint(img * 255 / 16), np.ones((2, 2))).astype(np.uint8).tobytes(), int(t))
        for img, t in zip(d.images, d.target, strict=True)
    )
    got = sorted((a.tobytes(), label) for _, a, label in train + test)
    assert got == expect
    assert train[0][1].shape == (1, 16, 16) and train[0][1].dtype == np.uint8
    mean = read_blob_proto(out / "digits_mean.binaryproto")
    stack = np.stack([a for _, a, _ in train]).astype(np.float64)
    np.testing.assert_allclose(mean[0], stack.mean(axis=0), rtol=1e-5)
    again = tmp_path / "again"
    assert tool("digits_to_lmdb").main([str(again), "--size", "16"]) == 0
    assert [label for _, _, label in records(again / "digits_test_lmdb")] == [
        label for _, _, label in test
    ]
