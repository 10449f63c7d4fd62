"""Neuron layers against naive NumPy formulas of Caffe's Forward/Backward and Caffe fixtures."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from google.protobuf import text_format

from nincc import caffe_pb2
from nincc.errors import GraphError, ShapeError
from nincc.layers.base import REGISTRY, Filler, LowerCtx
from nincc.layers.neuron import DropoutAttrs, keep_mask

from ..conftest import fixture_case, manifest

RNG = np.random.default_rng(0)

# ---------------------------------------------------------------- helpers


def layer(text: str) -> caffe_pb2.LayerParameter:
    return text_format.Parse(text, caffe_pb2.LayerParameter())


def entry_attrs(text: str):
    msg = layer(text)
    entry = REGISTRY[msg.type]
    return entry, entry.attrs(msg)


def run(entry, attrs, x, params=(), topdiff=None, phase="TEST", key=None):
    """Top (and with topdiff the bottom and param diffs) of one layer, as float64 arrays."""
    ctx = LowerCtx(phase, "l", key=key)
    xs = jnp.asarray(x, jnp.float32)
    ps = [jnp.asarray(p, jnp.float32) for p in params]

    def f(x, ps):
        return entry.lower(attrs, ps, [x], ctx)[0]

    if topdiff is None:
        return np.asarray(f(xs, ps), np.float64)
    y, vjp = jax.vjp(f, xs, ps)
    dx, dps = vjp(jnp.asarray(topdiff, jnp.float32))
    return (
        np.asarray(y, np.float64),
        np.asarray(dx, np.float64),
        [np.asarray(d, np.float64) for d in dps],
    )


def close(got, ref, rel):
    """The fixtures' rule: |got - ref| <= rel * max|ref| elementwise (exact 0 if ref is all 0)."""
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    assert got.shape == ref.shape
    scale = np.abs(ref).max() if ref.size else 0.0
    np.testing.assert_array_less(np.abs(got - ref), rel * scale + (0 if scale else 1e-30))


def naive(x, fn):
    """Apply a scalar Python formula to every element, in float64."""
    flat = np.asarray(x, np.float64).reshape(-1)
    return np.array([fn(v) for v in flat]).reshape(np.shape(x))


# ---------------------------------------------------------------- real-Caffe fixture

CASE = "neurons"


def _case():
    path = fixture_case(CASE)
    net = text_format.Parse((path / "net.prototxt").read_text(), caffe_pb2.NetParameter())
    npz = {f: np.load(path / f"{f}.npz") for f in ("forward", "backward", "params")}
    return {lay.name: lay for lay in net.layer}, npz, manifest(CASE)


SINGLE = [
    "relu_leaky", "relu", "prelu_c", "prelu_s", "elu", "sigmoid", "tanh", "absval",
    "power_sqrt", "exp_e", "exp_2", "log_e", "log_10", "bnll", "clip", "swish",
]  # fmt: skip


@pytest.mark.parametrize("name", SINGLE)
def test_fixture_single_layer(name):
    layers, npz, man = _case()
    fwd, bwd, prm = npz["forward"], npz["backward"], npz["params"]
    tol = man["tolerances"]
    msg = layers[name]
    entry = REGISTRY[msg.type]
    attrs = entry.attrs(msg)
    # the fixture's bottom is a Split top (one consumer each), so its diff is this layer's alone
    bottom = next(lay["bottoms"][0] for lay in man["layers"] if lay["name"] == name)
    top = msg.top[0]
    params = [prm[f"{name}/{i}"] for i in range(len(entry.blobs(attrs, [fwd[bottom].shape])))]
    y, dx, dps = run(entry, attrs, fwd[bottom], params, bwd[f"topdiff/{top}"])
    close(y, fwd[top], tol["forward_rel"])
    close(dx, bwd[f"diff/{bottom}"], tol["backward_rel"])
    for i, d in enumerate(dps):
        close(d, bwd[f"param_diff/{name}/{i}"], tol["backward_rel"])


def test_fixture_power_then_inplace_tanh():
    """Blob 'power' is written by Power then an in-place TanH: compose the two lowers."""
    layers, npz, man = _case()
    fwd, bwd, tol = npz["forward"], npz["backward"], man["tolerances"]
    e_pow, a_pow = REGISTRY["Power"], REGISTRY["Power"].attrs(layers["power"])
    e_tanh, a_tanh = REGISTRY["TanH"], REGISTRY["TanH"].attrs(layers["tanh_inplace"])
    ctx = LowerCtx("TEST", "power")
    x = jnp.asarray(fwd["x_input_0_split_8"])

    def chain(x):
        return e_tanh.lower(a_tanh, [], e_pow.lower(a_pow, [], [x], ctx), ctx)[0]

    y, vjp = jax.vjp(chain, x)
    close(y, fwd["power"], tol["forward_rel"])
    close(vjp(jnp.asarray(bwd["topdiff/power"]))[0], bwd["diff/x_input_0_split_8"],
          tol["backward_rel"])  # fmt: skip


def test_fixture_threshold_forward():
    layers, npz, man = _case()
    fwd = npz["forward"]
    entry = REGISTRY["Threshold"]
    y = run(entry, entry.attrs(layers["threshold"]), fwd["x_input_0_split_14"])
    np.testing.assert_array_equal(y, fwd["threshold"])
    assert entry.backward is False


# ---------------------------------------------------------------- naive formulas, ties at 0

X = np.array([[-2.5, -1.0, -1e-3, 0.0, 1e-3, 0.5, 3.0, 60.0, -60.0, 100.0]], np.float32)


def check(text, fwd, grad, x=X, rtol=1e-6, atol=1e-7):
    """Forward against fwd(v) and the bottom diff against topdiff * grad(v), elementwise."""
    entry, attrs = entry_attrs(text)
    g = np.random.default_rng(1).standard_normal(x.shape).astype(np.float32)
    y, dx, _ = run(entry, attrs, x, topdiff=g)
    np.testing.assert_allclose(y, naive(x, fwd), rtol=rtol, atol=atol)
    np.testing.assert_allclose(dx, g * naive(x, grad), rtol=rtol, atol=atol)


def test_relu_leaky_gradient_at_zero_is_slope():
    s = np.float64(np.float32(0.2))
    check(
        'type: "ReLU" relu_param { negative_slope: 0.2 }',
        lambda v: v if v > 0 else s * v,
        lambda v: 1.0 if v > 0 else s,
    )


def test_elu_gradient_at_zero_is_alpha():
    check(
        'type: "ELU" elu_param { alpha: 0.5 }',
        lambda v: v if v > 0 else 0.5 * (np.exp(v) - 1),
        lambda v: 1.0 if v > 0 else 0.5 * np.exp(v),
    )


def test_sigmoid_tanh():
    sig = lambda v: 1 / (1 + np.exp(-v))  # noqa: E731
    check('type: "Sigmoid"', sig, lambda v: sig(v) * (1 - sig(v)))
    check('type: "TanH"', np.tanh, lambda v: 1 - np.tanh(v) ** 2)


def test_absval_gradient_is_sign_with_zero_at_zero():
    check('type: "AbsVal"', abs, lambda v: float(np.sign(v)))


def test_absval_refuses_in_place():
    with pytest.raises(GraphError, match="in-place"):
        entry_attrs('type: "AbsVal" bottom: "a" top: "a"')


def test_bnll_is_stable_and_uses_caffe_backward():
    def fwd(v):
        return v + np.log1p(np.exp(-v)) if v > 0 else np.log1p(np.exp(v))

    def grad(v):
        e = np.exp(min(v, 50.0))
        return e / (e + 1.0)

    check('type: "BNLL"', fwd, grad)


def test_clip_passes_diff_on_closed_interval():
    x = np.array([[-1.0, -0.5, -0.49, 0.0, 0.7, 0.71, 2.0]], np.float32)
    lo, hi = np.float64(np.float32(-0.5)), np.float64(np.float32(0.7))
    entry, attrs = entry_attrs('type: "Clip" clip_param { min: -0.5 max: 0.7 }')
    g = np.ones_like(x)
    y, dx, _ = run(entry, attrs, x, topdiff=g)
    np.testing.assert_array_equal(y, naive(x, lambda v: max(lo, min(v, hi))).astype(np.float32))
    np.testing.assert_array_equal(dx, naive(x, lambda v: float(lo <= v <= hi)))


def test_swish():
    b = 1.5
    sig = lambda v: 1 / (1 + np.exp(-b * v))  # noqa: E731
    check(
        'type: "Swish" swish_param { beta: 1.5 }',
        lambda v: v * sig(v),
        lambda v: sig(v) + b * v * sig(v) * (1 - sig(v)),
        rtol=1e-5,
    )


def test_threshold_strictly_greater():
    entry, attrs = entry_attrs('type: "Threshold" threshold_param { threshold: 0.5 }')
    y = run(entry, attrs, X)
    np.testing.assert_array_equal(y, naive(X, lambda v: float(v > 0.5)))


# ---------------------------------------------------------------- PReLU


def test_prelu_forward_backward_per_channel_and_shared():
    x = RNG.standard_normal((2, 3, 2, 2)).astype(np.float32)
    x[0, 1, 0, 0] = 0.0  # Caffe's x <= 0 branch at the tie
    g = RNG.standard_normal(x.shape).astype(np.float32)
    for shared in (False, True):
        entry, attrs = entry_attrs(
            f'type: "PReLU" prelu_param {{ channel_shared: {str(shared).lower()} }}'
        )
        slope = np.array(0.3 if shared else [0.1, -0.2, 0.4], np.float32)
        y, dx, (ds,) = run(entry, attrs, x, [slope], g)
        yr, dxr = np.zeros(x.shape), np.zeros(x.shape)
        dsr = np.zeros(slope.shape)
        for n, c, h, w in np.ndindex(*x.shape):
            a = slope if shared else slope[c]
            v = float(x[n, c, h, w])
            yr[n, c, h, w] = max(v, 0) + a * min(v, 0)
            dxr[n, c, h, w] = g[n, c, h, w] * (1.0 if v > 0 else a)
            if shared:
                dsr += g[n, c, h, w] * v * (v <= 0)
            else:
                dsr[c] += g[n, c, h, w] * v * (v <= 0)
        np.testing.assert_allclose(y, yr, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(dx, dxr, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(ds, dsr, rtol=1e-5, atol=1e-6)


def test_prelu_blobs_and_default_filler():
    entry, attrs = entry_attrs('type: "PReLU"')
    (spec,) = entry.blobs(attrs, [(2, 5, 3)])
    assert spec.shape == (5,) and spec.filler == Filler("constant", 0.25)
    entry, attrs = entry_attrs(
        'type: "PReLU" prelu_param { channel_shared: true filler { type: "uniform" max: 2 } }'
    )
    (spec,) = entry.blobs(attrs, [(2, 5, 3)])
    assert spec.shape == () and spec.filler.type == "uniform" and spec.filler.max == 2.0
    with pytest.raises(ShapeError):
        entry.shape(attrs, [(7,)])


# ---------------------------------------------------------------- Power, Exp, Log

POS = np.array([[0.1, 0.5, 1.0, 2.0, 3.5]], np.float32)
X_NZ = X[:, X[0] != 0]  # shift 0 divides by x (see the zero-base test)


@pytest.mark.parametrize(
    "power,scale,shift,x",
    [(2.0, 0.5, 1.0, X), (3.0, 1.5, 0.0, X_NZ), (0.5, 2.0, 0.1, POS), (-1.5, 1.0, 0.2, POS),
     (1.0, -2.0, 0.5, X)],
)  # fmt: skip
def test_power(power, scale, shift, x):
    p, s, t = (np.float64(np.float32(v)) for v in (power, scale, shift))
    check(
        f'type: "Power" power_param {{ power: {power} scale: {scale} shift: {shift} }}',
        lambda v: (t + s * v) ** p,
        lambda v: p * s * (t + s * v) ** (p - 1),
        x=x,
        rtol=2e-6,
        atol=1e-6,
    )


def test_power_zero_base_follows_caffe_division():
    """shift 0: Caffe's diff is power * y / x, so x == 0 gives NaN (0/0), not the true 0."""
    entry, attrs = entry_attrs('type: "Power" power_param { power: 3 }')
    _, dx, _ = run(entry, attrs, np.array([0.0, 2.0], np.float32), topdiff=np.ones(2, np.float32))
    assert np.isnan(dx[0]) and dx[1] == pytest.approx(12.0)


@pytest.mark.parametrize("text,value", [("scale: 0 shift: 2 power: 3", 8.0), ("power: 0", 1.0)])
def test_power_ignoring_input_is_constant_with_zero_diff(text, value):
    entry, attrs = entry_attrs(f'type: "Power" power_param {{ {text} }}')
    x = np.array([1.0, np.inf, -3.0], np.float32)
    y, dx, _ = run(entry, attrs, x, topdiff=np.ones(3, np.float32))
    np.testing.assert_array_equal(y, [value] * 3)
    np.testing.assert_array_equal(dx, [0.0] * 3)
    assert entry.flops(attrs, [(3,)], [(3,)]) == 0


def test_power_flops_count_the_ops_caffe_runs():
    entry, attrs = entry_attrs('type: "Power" power_param { power: 2 scale: 0.5 shift: 1 }')
    assert entry.flops(attrs, [(2, 3)], [(2, 3)]) == 3 * 6
    entry, attrs = entry_attrs('type: "Power"')  # identity
    assert entry.flops(attrs, [(2, 3)], [(2, 3)]) == 0


@pytest.mark.parametrize(
    "base,scale,shift", [(-1, 1, 0), (-1, 0.7, -0.2), (2, 1, 0), (10, -0.5, 1)]
)
def test_exp(base, scale, shift):
    b = np.e if base == -1 else float(base)
    s, t = np.float64(np.float32(scale)), np.float64(np.float32(shift))
    x = X[:, :7]
    check(
        f'type: "Exp" exp_param {{ base: {base} scale: {scale} shift: {shift} }}',
        lambda v: b ** (t + s * v),
        lambda v: np.log(b) * s * b ** (t + s * v),
        x=x,
        rtol=3e-6,
    )


@pytest.mark.parametrize("base,scale,shift", [(-1, 1, 0), (10, 2, 0.5), (2, 0.5, 0)])
def test_log(base, scale, shift):
    b = np.e if base == -1 else float(base)
    s, t = np.float64(np.float32(scale)), np.float64(np.float32(shift))
    check(
        f'type: "Log" log_param {{ base: {base} scale: {scale} shift: {shift} }}',
        lambda v: np.log(t + s * v) / np.log(b),
        lambda v: s / ((t + s * v) * np.log(b)),
        x=POS,
        rtol=2e-6,
    )


@pytest.mark.parametrize(
    "text", ['type: "Exp" exp_param { base: -2 }', 'type: "Log" log_param { base: 0 }',
             'type: "Log" log_param { base: 1 }']
)  # fmt: skip
def test_bad_base_is_an_error(text):
    with pytest.raises(ShapeError, match="base"):
        entry_attrs(text)


# ---------------------------------------------------------------- Dropout


def test_dropout_test_phase_is_identity():
    entry, attrs = entry_attrs('type: "Dropout" dropout_param { dropout_ratio: 0.3 }')
    x = RNG.standard_normal((2, 3)).astype(np.float32)
    y, dx, _ = run(entry, attrs, x, topdiff=np.ones_like(x))
    np.testing.assert_array_equal(y, x)
    np.testing.assert_array_equal(dx, np.ones_like(x))


@pytest.mark.parametrize("ratio", [0.3, 0.5])
def test_dropout_train_keeps_with_prob_and_scales(ratio):
    entry, attrs = entry_attrs(f'type: "Dropout" dropout_param {{ dropout_ratio: {ratio} }}')
    n = 200_000
    x = np.full((n,), 2.0, np.float32)
    key = jax.random.PRNGKey(3)
    y, dx, _ = run(entry, attrs, x, topdiff=np.ones_like(x), phase="TRAIN", key=key)
    kept = y != 0
    scale = np.float32(1.0 / (1.0 - np.float32(ratio)))
    np.testing.assert_array_equal(y[kept], np.float32(2.0) * scale)
    np.testing.assert_array_equal(dx, kept * scale)  # diff = top_diff * mask * scale
    p = 1 - ratio
    assert abs(kept.mean() - p) < 5 * np.sqrt(p * (1 - p) / n)
    y2 = run(entry, attrs, x, phase="TRAIN", key=key)
    np.testing.assert_array_equal(y, y2)  # same key, same mask


def _mask_from_words(words: np.ndarray, bits: int, threshold: int, n: int) -> np.ndarray:
    """keep_mask's rule written out: word i holds elements i*per to i*per+per-1, low bits first."""
    per = 32 // bits
    out = np.zeros(n, bool)
    for e in range(n):
        field = (int(words[e // per]) >> (bits * (e % per))) & ((1 << bits) - 1)
        out[e] = field < threshold
    return out


@pytest.mark.parametrize(
    ("keep", "bits", "threshold"),
    [(0.5, 1, 1), (0.75, 2, 3), (0.25, 2, 1), (0.125, 4, 2), (0.6875, 4, 11), (3 / 256, 8, 3)],
)
def test_keep_mask_reads_the_bits_its_probability_needs(keep, bits, threshold):
    key, shape = jax.random.PRNGKey(7), (3, 5, 7)  # 105 elements: the last word is partly used
    n, per = 105, 32 // bits
    words = np.asarray(jax.random.bits(key, (-(-n // per),), jnp.uint32))
    expected = _mask_from_words(words, bits, threshold, n).reshape(shape)
    np.testing.assert_array_equal(np.asarray(keep_mask(key, keep, shape)), expected)


def test_keep_mask_other_probabilities_are_bernoulli_draws():
    key = jax.random.PRNGKey(1)
    for keep in (0.7, 0.9, 1 / 3):
        np.testing.assert_array_equal(
            np.asarray(keep_mask(key, keep, (40, 9))),
            np.asarray(jax.random.bernoulli(key, keep, (40, 9))),
        )


@pytest.mark.parametrize("keep", [0.5, 0.75, 0.125, 0.7])
def test_keep_mask_frequency_and_independence(keep):
    n = 400_000
    m = np.asarray(keep_mask(jax.random.PRNGKey(11), keep, (n,))).astype(np.float64)
    sigma = np.sqrt(keep * (1 - keep) / n)
    assert abs(m.mean() - keep) < 5 * sigma
    # elements that share a random word must not be correlated
    c = m - m.mean()
    for lag in (1, 2, 31, 32):
        corr = (c[:-lag] * c[lag:]).mean() / m.var()
        assert abs(corr) < 5 / np.sqrt(n), (lag, corr)


def test_dropout_without_train_scaling_scales_at_test():
    entry = REGISTRY["Dropout"]
    attrs = DropoutAttrs(0.25, scale_train=False)
    x = np.linspace(-1, 1, 1000, dtype=np.float32)
    np.testing.assert_allclose(run(entry, attrs, x), x * 0.75, rtol=1e-7)
    y = run(entry, attrs, x, phase="TRAIN", key=jax.random.PRNGKey(0))
    kept = y != 0
    np.testing.assert_array_equal(y[kept], x[kept])


def test_dropout_ratio_out_of_range_and_default():
    with pytest.raises(ShapeError, match="dropout_ratio"):
        entry_attrs('type: "Dropout" dropout_param { dropout_ratio: 1.5 }')
    _, attrs = entry_attrs('type: "Dropout"')
    assert attrs.ratio == 0.5 and attrs.scale_train


# ---------------------------------------------------------------- table facts


def test_every_neuron_keeps_shape_and_counts_flops():
    names = ["ReLU", "PReLU", "ELU", "Sigmoid", "TanH", "AbsVal", "Power", "Exp", "Log", "BNLL",
             "Threshold", "Clip", "Swish", "Dropout"]  # fmt: skip
    shape = (2, 3, 4)
    for name in names:
        entry = REGISTRY[name]
        assert entry.family == "neuron"
        attrs = entry.attrs(layer(f'type: "{name}" clip_param {{ min: 0 max: 1 }}'))
        assert entry.shape(attrs, [shape]) == [shape]
        flops = entry.flops(attrs, [shape], [shape])
        assert flops >= 0 and flops % 24 == 0
