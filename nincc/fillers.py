"""Caffe 1.0's weight fillers (include/caffe/filler.hpp), drawn from a numpy Generator.

The distributions, fan rules and checks are Caffe's; the random streams are numpy's, so values are
not bit-identical to Caffe's (which used boost's mt19937), only identically distributed.

Fan rules (Xavier, MSRA): ``fan_in = count / shape[0]`` and ``fan_out = count / shape[1]``, a
missing axis counting as 1 (Caffe's ``num()``/``channels()``). Caffe refuses these legacy accessors
on blobs with more than 4 axes; here the same rule simply extends to them.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from .errors import GraphError, NinccError, ShapeError
from .layers.base import BlobSpec, Filler, count

_Fill = Callable[[Filler, tuple[int, ...], np.random.Generator], np.ndarray]


def _dim(shape: tuple[int, ...], axis: int) -> int:
    """Caffe's LegacyShape(axis) for axis 0..3: a missing axis counts as 1."""
    return int(shape[axis]) if axis < len(shape) else 1


def _no_sparse(f: Filler) -> None:
    if f.sparse != -1:
        raise GraphError(f"filler '{f.type}' does not support sparse (got sparse: {f.sparse})")


def _gaussian(rng: np.random.Generator, mean: float, std: float, n: int) -> np.ndarray:
    if not std > 0:  # Caffe's caffe_rng_gaussian checks sigma > 0
        raise GraphError(f"gaussian filler needs std > 0, got {std}")
    return rng.normal(mean, std, n).astype(np.float32)


def _fan_n(f: Filler, shape: tuple[int, ...]) -> np.float32:
    """The n of Xavier/MSRA: fan_in, fan_out or their average, per variance_norm."""
    n_all = count(shape)
    fan_in, fan_out = n_all // _dim(shape, 0), n_all // _dim(shape, 1)
    if f.variance_norm == "AVERAGE":
        return np.float32((fan_in + fan_out) / 2.0)
    if f.variance_norm == "FAN_OUT":
        return np.float32(fan_out)
    return np.float32(fan_in)


def _constant(f: Filler, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    _no_sparse(f)
    return np.full(count(shape), f.value, np.float32)


def _uniform(f: Filler, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    _no_sparse(f)
    if f.min > f.max:
        raise GraphError(f"uniform filler needs min <= max, got min {f.min} > max {f.max}")
    return rng.uniform(f.min, f.max, count(shape)).astype(np.float32)


def _gaussian_filler(f: Filler, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    data = _gaussian(rng, f.mean, f.std, count(shape))
    if f.sparse < -1:
        raise GraphError(f"gaussian filler needs sparse >= -1, got {f.sparse}")
    if f.sparse >= 0:
        # Each weight is kept with probability sparse / num_outputs (num_outputs = shape[0]).
        if not shape:
            raise ShapeError("sparse gaussian filler needs a blob with >= 1 axis, got a scalar")
        p = float(np.float32(f.sparse) / np.float32(shape[0]))
        if p > 1.0:
            raise ShapeError(
                f"sparse gaussian filler: sparse {f.sparse} exceeds the {shape[0]} outputs "
                f"of shape {list(shape)}"
            )
        data *= (rng.random(data.size) < p).astype(np.float32)
    return data


def _positive_unitball(f: Filler, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    _no_sparse(f)
    rows = _dim(shape, 0)
    data = rng.uniform(0.0, 1.0, count(shape)).astype(np.float32).reshape(rows, -1)
    return (data / data.sum(axis=1, keepdims=True, dtype=np.float32)).reshape(-1)


def _xavier(f: Filler, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    _no_sparse(f)
    scale = np.sqrt(np.float32(3.0) / _fan_n(f, shape))
    return rng.uniform(-scale, scale, count(shape)).astype(np.float32)


def _msra(f: Filler, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    _no_sparse(f)
    std = np.sqrt(np.float32(2.0) / _fan_n(f, shape))
    return _gaussian(rng, 0.0, float(std), count(shape))


def _bilinear(f: Filler, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """The FCN upsampling kernel, the same (K, K) bilinear weights in every (out, in) slice."""
    _no_sparse(f)
    if len(shape) != 4:
        raise ShapeError(f"bilinear filler needs a 4-axis blob, got shape {list(shape)}")
    height, width = int(shape[2]), int(shape[3])
    if height != width:
        raise ShapeError(f"bilinear filler needs a square kernel, got {height} x {width}")
    fk = math.ceil(width / 2.0)
    c = np.float32((2 * fk - 1 - fk % 2) / (2.0 * fk))
    pos = np.arange(width, dtype=np.float32) / np.float32(fk)
    w1 = np.float32(1.0) - np.abs(pos - c)  # weight along one axis
    kernel = w1[:, None] * w1[None, :]
    return np.broadcast_to(kernel, shape).reshape(-1).astype(np.float32)


FILLERS: dict[str, _Fill] = {
    "constant": _constant,
    "uniform": _uniform,
    "gaussian": _gaussian_filler,
    "positive_unitball": _positive_unitball,
    "xavier": _xavier,
    "msra": _msra,
    "bilinear": _bilinear,
}


def fill(filler: Filler, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """A float32 array of ``shape`` filled as Caffe's filler of ``filler.type`` would fill it."""
    fn = FILLERS.get(filler.type)
    if fn is None:
        raise GraphError(
            f"unknown filler type '{filler.type}'; Caffe's fillers are: {', '.join(FILLERS)}"
        )
    shape = tuple(int(d) for d in shape)
    if count(shape) == 0:
        raise ShapeError(f"filler '{filler.type}' needs a non-empty blob, got shape {list(shape)}")
    return fn(filler, shape, rng).reshape(shape)


def init_params(
    blob_specs_by_layer: dict[str, list[BlobSpec]], seed: int
) -> dict[str, list[np.ndarray]]:
    """Every layer's blobs filled in order (layers in dict order) from one seeded Generator.

    Layers without blobs are left out, as in a net's parameter dict.
    """
    rng = np.random.default_rng(seed)
    out: dict[str, list[np.ndarray]] = {}
    for layer, specs in blob_specs_by_layer.items():
        arrays = []
        for i, spec in enumerate(specs):
            try:
                arrays.append(fill(spec.filler, spec.shape, rng))
            except NinccError as e:
                raise type(e)(f"layer '{layer}' blob {i}: {e}") from None
        if arrays:
            out[layer] = arrays
    return out
