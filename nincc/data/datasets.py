"""Readers for the small standard datasets, and the NIN paper's CIFAR-10 preprocessing.

CIFAR-10 (binary or python version, as a .tar.gz or an extracted folder), MNIST IDX files
(optionally gzipped) and scikit-learn's bundled 8x8 handwritten digits. Each reader returns
uint8 images (N, C, H, W) and integer labels (N,), in the dataset's own order.
"""

from __future__ import annotations

import gzip
import io
import os
import pickle
import struct
import tarfile
from collections.abc import Iterator

import numpy as np

from ..errors import DataError

CIFAR_TRAIN = [f"data_batch_{i}" for i in range(1, 6)]
CIFAR_TEST = ["test_batch"]
_CIFAR_ROW = 1 + 3 * 32 * 32

# ---------------------------------------------------------------- CIFAR-10


def _cifar_members(source: str) -> Iterator[tuple[str, bytes]]:
    """(base name, bytes) of every file in a CIFAR archive or folder (searched recursively)."""
    if os.path.isdir(source):
        for dirpath, _, files in os.walk(source):
            for f in sorted(files):
                with open(os.path.join(dirpath, f), "rb") as fh:
                    if f.startswith(("data_batch_", "test_batch")):
                        yield f, fh.read()
        return
    if not os.path.exists(source):
        raise DataError(
            f"CIFAR-10 source '{source}' not found; give cifar-10-binary.tar.gz, "
            "cifar-10-python.tar.gz or the folder extracted from one"
        )
    try:
        with tarfile.open(source, "r:*") as tar:
            for m in tar:
                name = os.path.basename(m.name)
                if m.isfile() and name.startswith(("data_batch_", "test_batch")):
                    f = tar.extractfile(m)
                    if f is not None:
                        yield name, f.read()
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DataError(f"cannot read CIFAR-10 archive '{source}': {e}") from None


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles only plain containers and NumPy arrays (the CIFAR python batches)."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # bytes pickled by Python 3 at protocol 2
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        if name == "_reconstruct":
            try:
                from numpy._core.multiarray import _reconstruct
            except ImportError:  # NumPy 1.x
                from numpy.core.multiarray import _reconstruct
            return _reconstruct
        if module == "_codecs":
            import codecs

            return codecs.encode
        return getattr(np, name)


def _cifar_python_batch(name: str, data: bytes) -> tuple[np.ndarray, np.ndarray]:
    try:
        d = _ArrayUnpickler(io.BytesIO(data), encoding="bytes").load()
        x = np.asarray(d[b"data"], np.uint8)
        y = np.asarray(d[b"labels"], np.int64)
    except Exception as e:  # malformed pickles raise many types
        raise DataError(f"CIFAR-10 python batch '{name}' cannot be read: {e}") from None
    if x.ndim != 2 or x.shape[1] != 3072 or len(y) != len(x):
        raise DataError(f"CIFAR-10 python batch '{name}' has data {x.shape}, labels {y.shape}")
    return x.reshape(-1, 3, 32, 32), y


def _cifar_binary_batch(name: str, data: bytes) -> tuple[np.ndarray, np.ndarray]:
    if len(data) % _CIFAR_ROW:
        raise DataError(
            f"CIFAR-10 binary batch '{name}' has {len(data)} bytes, not a multiple of "
            f"{_CIFAR_ROW} (1 label byte + 3072 pixel bytes per image)"
        )
    rows = np.frombuffer(data, np.uint8).reshape(-1, _CIFAR_ROW)
    return rows[:, 1:].reshape(-1, 3, 32, 32).copy(), rows[:, 0].astype(np.int64)


def read_cifar10(source: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{"train": (x, y), "test": (x, y)}: x uint8 (N, 3, 32, 32) in R, G, B planes, y in 0..9.

    Training batches 1..5 are concatenated in order, as Caffe's convert_cifar_data does.
    """
    batches: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for name, data in _cifar_members(source):
        stem, ext = os.path.splitext(name)
        if ext == ".bin":
            batches[stem] = _cifar_binary_batch(name, data)
        elif ext == "":
            batches[stem] = _cifar_python_batch(name, data)
    missing = [b for b in CIFAR_TRAIN + CIFAR_TEST if b not in batches]
    if missing:
        raise DataError(
            f"CIFAR-10 source '{source}' lacks {', '.join(missing)} (expected data_batch_1..5 "
            "and test_batch, .bin files or python pickles)"
        )
    out = {}
    for split, names in (("train", CIFAR_TRAIN), ("test", CIFAR_TEST)):
        xs, ys = zip(*(batches[n] for n in names), strict=True)
        x, y = np.concatenate(xs), np.concatenate(ys)
        if y.size and (y.min() < 0 or y.max() > 9):
            raise DataError(f"CIFAR-10 {split} labels lie outside 0..9")
        out[split] = (x, y)
    return out


# ---------------------------------------------------------------- GCN + ZCA (NIN paper)


def global_contrast_normalize(x: np.ndarray, scale: float = 55.0, eps: float = 1e-8) -> np.ndarray:
    """Per image: subtract its mean, divide by its L2 norm / ``scale`` (pylearn2's GCN defaults).

    ``x`` is (N, D); returns float64.
    """
    x = np.asarray(x, np.float64)
    x = x - x.mean(axis=1, keepdims=True)
    norm = np.sqrt((x * x).sum(axis=1, keepdims=True)) / scale
    norm[norm < eps] = 1.0
    return x / norm


def fit_zca(x: np.ndarray, bias: float = 0.1, chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """ZCA whitening fitted on ``x`` (N, D): (mean (D,), matrix (D, D)), pylearn2's rule.

    matrix = V diag(1 / sqrt(eig + bias)) V^T for the eigen-decomposition of the covariance
    (X - mean)^T (X - mean) / N; whitened = (x - mean) @ matrix.
    """
    n, d = x.shape
    mean = x.mean(axis=0, dtype=np.float64)
    cov = np.zeros((d, d), np.float64)
    for i in range(0, n, chunk):
        c = np.asarray(x[i : i + chunk], np.float64) - mean
        cov += c.T @ c
    cov /= n
    eig, vec = np.linalg.eigh(cov + bias * np.eye(d))
    return mean, (vec * (1.0 / np.sqrt(eig))) @ vec.T


def apply_zca(x: np.ndarray, mean: np.ndarray, matrix: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """(x - mean) @ matrix, as float32, in chunks."""
    out = np.empty(x.shape, np.float32)
    for i in range(0, len(x), chunk):
        out[i : i + chunk] = (np.asarray(x[i : i + chunk], np.float64) - mean) @ matrix
    return out


def gcn_zca(
    train: np.ndarray, test: np.ndarray, scale: float = 55.0, bias: float = 0.1
) -> tuple[np.ndarray, np.ndarray]:
    """The NIN paper's CIFAR-10 preprocessing: GCN, then ZCA fitted on the training set.

    Takes and returns (N, C, H, W) arrays; the outputs are float32.
    """
    tr = global_contrast_normalize(train.reshape(len(train), -1), scale)
    te = global_contrast_normalize(test.reshape(len(test), -1), scale)
    mean, matrix = fit_zca(tr, bias)
    return (
        apply_zca(tr, mean, matrix).reshape(train.shape),
        apply_zca(te, mean, matrix).reshape(test.shape),
    )


# ---------------------------------------------------------------- MNIST


def read_idx(path: str) -> np.ndarray:
    """An IDX file (MNIST's format), optionally gzipped, as a uint8 array of its dimensions."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise DataError(f"cannot read IDX file '{path}': {e}") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise DataError(f"'{path}' is not an IDX file (bad magic number)")
    if data[2] != 0x08:
        raise DataError(f"IDX file '{path}' holds type 0x{data[2]:02x}; only unsigned bytes")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"IDX file '{path}' is truncated")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    count = int(np.prod(dims)) if dims else 1
    if len(data) - header != count:
        raise DataError(
            f"IDX file '{path}' declares {list(dims)} ({count} bytes) but holds "
            f"{len(data) - header}"
        )
    return np.frombuffer(data, np.uint8, offset=header).reshape(dims)


def _find(folder: str, names: list[str]) -> str:
    for n in names:
        for candidate in (n, n + ".gz"):
            p = os.path.join(folder, candidate)
            if os.path.exists(p):
                return p
    raise DataError(f"'{folder}' has none of {names} (optionally .gz)")


def read_mnist(folder: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{"train": (x, y), "test": (x, y)} from MNIST's four IDX files; x is (N, 1, 28, 28)."""
    if not os.path.isdir(folder):
        raise DataError(f"MNIST folder '{folder}' not found")
    out = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        xi = read_idx(_find(folder, [f"{prefix}-images-idx3-ubyte", f"{prefix}-images.idx3-ubyte"]))
        yi = read_idx(_find(folder, [f"{prefix}-labels-idx1-ubyte", f"{prefix}-labels.idx1-ubyte"]))
        if xi.ndim != 3 or yi.ndim != 1 or len(xi) != len(yi):
            raise DataError(
                f"MNIST {split}: images {list(xi.shape)} and labels {list(yi.shape)} do not pair"
            )
        out[split] = (xi[:, None], yi.astype(np.int64))
    return out


# ---------------------------------------------------------------- scikit-learn digits


def read_digits(size: int = 8, test_count: int = 300, seed: int = 0):
    """scikit-learn's 1797 handwritten digits as uint8 (N, 1, size, size), split train/test.

    Values 0..16 become round(v * 255 / 16); ``size`` (a multiple of 8) enlarges each pixel to a
    block. The split is a seeded permutation: the first N - test_count for training.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DataError(
            "the digits dataset needs scikit-learn: pip install 'nincc[digits]'"
        ) from None
    if size < 8 or size % 8:
        raise DataError(f"size must be a positive multiple of 8, got {size}")
    d = load_digits()
    x = np.rint(np.asarray(d.images, np.float64) * (255.0 / 16.0)).astype(np.uint8)
    f = size // 8
    x = np.repeat(np.repeat(x, f, axis=1), f, axis=2)[:, None]
    y = np.asarray(d.target, np.int64)
    if not 0 < test_count < len(x):
        raise DataError(f"test count must lie in 1..{len(x) - 1}, got {test_count}")
    perm = np.random.default_rng(seed).permutation(len(x))
    tr, te = perm[: len(x) - test_count], perm[len(x) - test_count :]
    return {"train": (x[tr], y[tr]), "test": (x[te], y[te])}
