"""Caffe's fillers: exact values where deterministic, distribution statistics otherwise.

Statistical bounds are 6 standard errors of the estimate for the sample size used, so a correct
filler fails with negligible probability (and the seeds are fixed anyway), while a wrong scale,
fan rule or keep probability is many standard errors off.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from nincc.errors import GraphError, ShapeError
from nincc.fillers import fill, init_params
from nincc.layers.base import BlobSpec, Filler

Z = 6.0  # standard errors allowed


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def assert_mean_var(w: np.ndarray, mean: float, var: float, mu4: float) -> None:
    """Sample mean and variance against the distribution's, within Z standard errors.

    ``mu4`` is the fourth central moment (the variance of the sample variance is (mu4 - var^2)/n).
    """
    x = w.astype(np.float64).reshape(-1)
    n = x.size
    assert abs(x.mean() - mean) <= Z * math.sqrt(var / n)
    assert abs(x.var() - var) <= Z * math.sqrt((mu4 - var**2) / n)


def uniform_moments(a: float, b: float) -> tuple[float, float, float]:
    w = b - a
    return (a + b) / 2, w**2 / 12, w**4 / 80


# ---------------------------------------------------------------- constant, uniform, gaussian


def test_constant_exact():
    w = fill(Filler("constant", value=0.37), (3, 4), rng())
    assert w.dtype == np.float32 and w.shape == (3, 4)
    np.testing.assert_array_equal(w, np.full((3, 4), np.float32(0.37)))
    assert fill(Filler(), (), rng()).shape == ()


def test_uniform_range_and_moments():
    w = fill(Filler("uniform", min=-0.5, max=2.0), (400, 500), rng(1))
    assert w.dtype == np.float32 and w.min() >= -0.5 and w.max() <= 2.0
    assert_mean_var(w, *uniform_moments(-0.5, 2.0))


def test_gaussian_moments():
    w = fill(Filler("gaussian", mean=1.5, std=0.2), (200, 1000), rng(2))
    assert_mean_var(w, 1.5, 0.04, 3 * 0.04**2)


def test_sparse_gaussian_keeps_sparse_over_num_outputs():
    # p = sparse / shape[0] = 30 / 100: the expected zero fraction is 0.7
    shape = (100, 2000)
    w = fill(Filler("gaussian", std=1.0, sparse=30), shape, rng(3))
    n = w.size
    p = 30 / 100
    zero = (w == 0).mean()
    assert abs(zero - (1 - p)) <= Z * math.sqrt(p * (1 - p) / n)
    kept = w[w != 0]
    assert_mean_var(kept, 0.0, 1.0, 3.0)


def test_sparse_gaussian_rejects_probability_above_one():
    with pytest.raises(ShapeError, match="sparse"):
        fill(Filler("gaussian", sparse=11), (10, 4), rng())


# ---------------------------------------------------------------- positive_unitball


@pytest.mark.parametrize("shape", [(6, 3, 2, 2), (5,), (4, 50)])
def test_positive_unitball_rows_sum_to_one(shape):
    w = fill(Filler("positive_unitball"), shape, rng(4))
    rows = w.reshape(shape[0], -1).astype(np.float64)
    assert (rows >= 0).all()
    np.testing.assert_allclose(rows.sum(axis=1), 1.0, rtol=1e-6)


# ---------------------------------------------------------------- xavier and msra


def fans(shape: tuple[int, ...]) -> tuple[int, int]:
    """Caffe's rule, written out: fan_in = count / num, fan_out = count / channels."""
    n = int(np.prod(shape))
    num = shape[0] if len(shape) > 0 else 1
    channels = shape[1] if len(shape) > 1 else 1
    return n // num, n // channels


def n_for(norm: str, shape: tuple[int, ...]) -> float:
    fan_in, fan_out = fans(shape)
    return {"FAN_IN": fan_in, "FAN_OUT": fan_out, "AVERAGE": (fan_in + fan_out) / 2}[norm]


SHAPES = [(64, 32, 3, 3), (300, 700), (1000,)]


@pytest.mark.parametrize("norm", ["FAN_IN", "FAN_OUT", "AVERAGE"])
@pytest.mark.parametrize("shape", SHAPES)
def test_xavier_bounds_and_variance(norm, shape):
    w = fill(Filler("xavier", variance_norm=norm), shape, rng(5))
    bound = math.sqrt(3.0 / n_for(norm, shape))
    assert np.abs(w).max() <= bound * (1 + 1e-6)
    assert np.abs(w).max() >= bound * 0.99  # the whole range is used
    assert_mean_var(w, *uniform_moments(-bound, bound))


@pytest.mark.parametrize("norm", ["FAN_IN", "FAN_OUT", "AVERAGE"])
@pytest.mark.parametrize("shape", SHAPES)
def test_msra_variance(norm, shape):
    w = fill(Filler("msra", variance_norm=norm), shape, rng(6))
    var = 2.0 / n_for(norm, shape)
    assert_mean_var(w, 0.0, var, 3 * var**2)


def test_xavier_fan_rules_differ_per_norm():
    shape = (8, 200, 3, 3)  # fan_in 1800, fan_out 72: the norms give clearly different scales
    stds = [
        fill(Filler("xavier", variance_norm=v), shape, rng()).std() for v in ("FAN_IN", "FAN_OUT")
    ]
    assert stds[1] / stds[0] == pytest.approx(math.sqrt(1800 / 72), rel=0.05)


# ---------------------------------------------------------------- bilinear


@pytest.mark.parametrize("shape", [(2, 1, 4, 4), (3, 2, 3, 3), (1, 1, 5, 5), (1, 1, 1, 1)])
def test_bilinear_matches_fcn_formula(shape):
    w = fill(Filler("bilinear"), shape, rng())
    width, height = shape[3], shape[2]
    f = math.ceil(width / 2)
    c = (2 * f - 1 - f % 2) / (2 * f)
    ref = np.empty(int(np.prod(shape)))
    for i in range(ref.size):
        x, y = i % width, (i // width) % height
        ref[i] = (1 - abs(x / f - c)) * (1 - abs(y / f - c))
    np.testing.assert_allclose(w.reshape(-1), ref, rtol=1e-6, atol=1e-7)


def test_bilinear_upsampling_by_two_kernel():
    # factor 2: kernel 4, the classic [0.25, 0.75, 0.75, 0.25] outer product
    w = fill(Filler("bilinear"), (1, 1, 4, 4), rng())[0, 0]
    k = np.array([0.25, 0.75, 0.75, 0.25])
    np.testing.assert_allclose(w, np.outer(k, k), rtol=1e-6)


@pytest.mark.parametrize("shape", [(1, 1, 3, 4), (3, 3, 3), (1, 1, 1, 2, 2)])
def test_bilinear_rejects_non_square_or_not_4d(shape):
    with pytest.raises(ShapeError, match="bilinear"):
        fill(Filler("bilinear"), shape, rng())


# ---------------------------------------------------------------- errors


def test_unknown_type_is_a_clear_error():
    with pytest.raises(GraphError, match="unknown filler type 'orthogonal'"):
        fill(Filler("orthogonal"), (2, 2), rng())


@pytest.mark.parametrize("kind", ["constant", "uniform", "xavier", "msra", "positive_unitball"])
def test_sparse_only_for_gaussian(kind):
    with pytest.raises(GraphError, match="sparse"):
        fill(Filler(kind, sparse=2), (4, 4), rng())


def test_gaussian_needs_positive_std_and_uniform_ordered_bounds():
    with pytest.raises(GraphError, match="std"):
        fill(Filler("gaussian", std=0.0), (2,), rng())
    with pytest.raises(GraphError, match="min"):
        fill(Filler("uniform", min=1.0, max=0.0), (2,), rng())


# ---------------------------------------------------------------- init_params


SPECS = {
    "conv": [BlobSpec((4, 3, 2, 2), Filler("xavier")), BlobSpec((4,), Filler("constant", 0.1))],
    "relu": [],
    "ip": [BlobSpec((5, 16), Filler("gaussian", std=0.01)), BlobSpec((5,), Filler("uniform"))],
}


def test_init_params_is_deterministic_and_sequential():
    a, b = init_params(SPECS, seed=7), init_params(SPECS, seed=7)
    assert list(a) == ["conv", "ip"]  # layers without blobs are left out
    for name in a:
        for x, y in zip(a[name], b[name], strict=True):
            np.testing.assert_array_equal(x, y)
    # one generator, blobs filled in order
    g = rng(7)
    manual = [fill(s.filler, s.shape, g) for name in SPECS for s in SPECS[name]]
    got = [w for name in a for w in a[name]]
    for x, y in zip(got, manual, strict=True):
        np.testing.assert_array_equal(x, y)
    c = init_params(SPECS, seed=8)
    assert not np.array_equal(a["ip"][0], c["ip"][0])


def test_init_params_names_the_layer_on_error():
    specs = {"up": [BlobSpec((1, 1, 2, 3), Filler("bilinear"))]}
    with pytest.raises(ShapeError, match="layer 'up' blob 0"):
        init_params(specs, seed=0)
