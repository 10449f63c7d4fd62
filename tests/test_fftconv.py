"""nincc.fftconv: stride-1 convolutions through the FFT equal a naive float64 loop, the layer
table's lowering (forward and gradients) and real Caffe on NIN CIFAR-10; inference keeps
XLA's direct convolution."""

from __future__ import annotations

import os
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nincc import fast, fftconv, onednn

from .conftest import FIXTURES
from .test_fast import BWD_REL, FWD_REL, assert_close, compare, layer_attrs, randn

pytestmark = pytest.mark.usefixtures("xla_kernels")  # the FFT is an XLA-side path


def naive_correlation(x, w, padding):
    """Caffe's convolution (stride 1) as a loop over kernel taps in float64, channels-last."""
    x = np.asarray(x, np.float64)
    w = np.asarray(w, np.float64)
    (pt, pb), (pl, pr) = padding
    xp = np.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
    o, _, kh, kw = w.shape
    oh, ow = xp.shape[1] - kh + 1, xp.shape[2] - kw + 1
    y = np.zeros((x.shape[0], oh, ow, o))
    for i in range(kh):
        for j in range(kw):
            y += np.einsum("nhwc,oc->nhwo", xp[:, i : i + oh, j : j + ow, :], w[:, :, i, j])
    return y


@pytest.mark.parametrize("n", [1, 2, 7, 27, 31, 36, 97, 121])
def test_fft_size_is_the_next_7_smooth_size(n):
    def smooth(m):
        for p in (2, 3, 5, 7):
            while m % p == 0:
                m //= p
        return m == 1

    size = fftconv.fft_size(n)
    assert size >= n and smooth(size)
    assert not any(smooth(m) for m in range(n, size))


# (n, h, w, c, o, kh, kw, padding): NIN CIFAR-10's conv2 (shrunk), NIN ImageNet's conv2 plane
# (27 + 4 = 31, a prime, rounded up to 32), a rectangular kernel on a non-square plane with
# uneven padding, and no padding at all
CASES = [
    (2, 16, 16, 40, 12, 5, 5, ((2, 2), (2, 2))),
    (1, 27, 27, 32, 8, 5, 5, ((2, 2), (2, 2))),
    (2, 11, 9, 33, 5, 5, 7, ((1, 0), (3, 2))),
    (3, 8, 10, 32, 6, 6, 5, ((0, 0), (0, 0))),
]


@pytest.mark.parametrize("tiles", [1, 2, 3])
@pytest.mark.parametrize("n,h,w,c,o,kh,kw,padding", CASES)
def test_correlate_matches_a_naive_loop(n, h, w, c, o, kh, kw, padding, tiles):
    rng = np.random.default_rng(h * w + c)
    x, k = randn(rng, (n, h, w, c)), randn(rng, (o, c, kh, kw), 0.1)
    got = jax.jit(fftconv.correlate, static_argnums=(2, 3))(x, k, padding, tiles)
    assert_close(got, naive_correlation(x, k, padding), FWD_REL, "forward")


@pytest.mark.parametrize("tiles", [1, 2])
@pytest.mark.parametrize("n,h,w,c,o,kh,kw,padding", CASES)
def test_conv_gradients_match_the_naive_loops_transposes(n, h, w, c, o, kh, kw, padding, tiles):
    """dx and dw of the FFT path against the naive loop's adjoints, in float64."""
    rng = np.random.default_rng(h + w + c)
    x, k = randn(rng, (n, h, w, c)), randn(rng, (o, c, kh, kw), 0.1)
    y, pull = jax.vjp(lambda a, b: fftconv.conv(a, b, padding, tiles), x, k)
    dy = randn(rng, y.shape)
    dx, dk = jax.jit(pull)(dy)
    (pt, pb), (pl, pr) = padding
    g = np.asarray(dy, np.float64)
    xp = np.pad(np.asarray(x, np.float64), ((0, 0), (pt, pb), (pl, pr), (0, 0)))
    wk = np.asarray(k, np.float64)
    oh, ow = y.shape[1], y.shape[2]
    ref_dxp = np.zeros_like(xp)
    ref_dk = np.zeros_like(wk)
    for i in range(kh):
        for j in range(kw):
            ref_dxp[:, i : i + oh, j : j + ow, :] += np.einsum("nhwo,oc->nhwc", g, wk[:, :, i, j])
            ref_dk[:, :, i, j] = np.einsum("nhwo,nhwc->oc", g, xp[:, i : i + oh, j : j + ow, :])
    ref_dx = ref_dxp[:, pt : pt + h, pl : pl + w, :]
    assert_close(y, naive_correlation(x, k, padding), FWD_REL, "forward under differentiation")
    assert_close(dx, ref_dx, BWD_REL, "input gradient")
    assert_close(dk, ref_dk, BWD_REL, "weight gradient")


def test_inference_is_xla_direct_convolution():
    """Without differentiation the primal runs, with no FFT in the program."""
    x = jnp.ones((2, 8, 8, 32), jnp.float32)
    w = jnp.ones((4, 32, 5, 5), jnp.float32)
    pad = ((2, 2), (2, 2))
    plain = str(jax.make_jaxpr(lambda a, b: fftconv.conv(a, b, pad, 1))(x, w))
    assert "conv_general_dilated" in plain and "fft" not in plain
    loss = lambda a, b: fftconv.conv(a, b, pad, 1).sum()  # noqa: E731
    grad = str(jax.make_jaxpr(jax.grad(loss, (0, 1)))(x, w))
    assert "fft" in grad and "conv_general_dilated" not in grad


@pytest.mark.parametrize(
    "shape,out,kernel,stride,dilation,group,expected",
    [
        ((64, 16, 16, 96), (16, 16), (5, 5), (1, 1), (1, 1), 1, 1),  # NIN CIFAR-10 conv2
        ((32, 16, 16, 96), (16, 16), (7, 5), (1, 1), (1, 1), 1, 1),
        ((16, 16, 16, 96), (16, 16), (5, 5), (1, 1), (1, 1), 1, 0),  # tiles of 8: too small
        ((16, 27, 27, 96), (27, 27), (5, 5), (1, 1), (1, 1), 1, 2),  # NIN ImageNet conv2
        ((16, 27, 23, 96), (27, 23), (5, 5), (1, 1), (1, 1), 1, 0),
        ((8, 27, 27, 96), (27, 27), (5, 5), (1, 1), (1, 1), 1, 0),  # batch
        ((32, 56, 56, 64), (56, 56), (5, 5), (1, 1), (1, 1), 1, 2),  # tiles of at most 32
        ((32, 112, 112, 64), (112, 112), (5, 5), (1, 1), (1, 1), 1, 4),
        ((16, 100, 100, 64), (100, 100), (5, 5), (1, 1), (1, 1), 1, 4),
        ((32, 112, 112, 32), (112, 112), (5, 5), (1, 1), (1, 1), 1, 0),  # channels
        ((32, 16, 16, 96), (16, 16), (3, 3), (1, 1), (1, 1), 1, 0),  # kernel
        ((32, 16, 16, 96), (16, 16), (1, 5), (1, 1), (1, 1), 1, 0),
        ((32, 32, 32, 3), (32, 32), (5, 5), (1, 1), (1, 1), 1, 0),  # channels: a stem
        ((32, 16, 16, 96), (6, 6), (5, 5), (2, 2), (1, 1), 1, 0),  # stride
        ((32, 16, 16, 96), (8, 8), (5, 5), (1, 1), (2, 2), 1, 0),  # dilation
        ((32, 16, 16, 96), (16, 16), (5, 5), (1, 1), (1, 1), 2, 0),  # groups
    ],
)
def test_which_convolutions_take_the_fft(shape, out, kernel, stride, dilation, group, expected):
    assert fftconv.tiles_for(shape, out, kernel, stride, dilation, group) == expected


def _eqns(jaxpr):
    """Every equation of a jaxpr and of the jaxprs nested in its equations' params."""
    for eqn in jaxpr.eqns:
        yield eqn
        for v in eqn.params.values():
            for sub in v if isinstance(v, (tuple, list)) else [v]:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from _eqns(inner)


@pytest.mark.parametrize(
    "n,h,w,windows",
    [(fftconv.MIN_BATCH, 7, 6, 1), (fftconv.MIN_BATCH // 2, 2 * fftconv.MIN_TILE, 25, 4)],
)
def test_fast_convolution_takes_the_fft(n, h, w, windows):
    """The Convolution fast lowering through the FFT, as one plane and as 2 x 2 tiles, checked
    against the table's lowering (forward as inference and as differentiated, gradients)."""
    attrs = layer_attrs("Convolution", "convolution_param { num_output: 6 kernel_size: 5 pad: 2 }")
    rng = np.random.default_rng(5)
    c = fftconv.MIN_CHANNELS
    params = [randn(rng, (6, c, 5, 5), 0.1), randn(rng, (6,))]
    x = randn(rng, (n, c, h, w))
    lower = fast.lowering_for("Convolution", attrs, [x.shape])
    jaxpr = jax.make_jaxpr(jax.grad(lambda p, b: lower(attrs, p, b, None)[0].sum()))(params, [x])
    ffts = [e for e in _eqns(jaxpr.jaxpr) if e.primitive.name == "fft"]
    assert ffts and ffts[0].invars[0].aval.shape[0] == n * windows
    compare("Convolution", attrs, params, [x])


def _zoo_and_corpus_fft_layers():
    from .test_fast import _zoo_and_corpus_layers

    with mock.patch.dict(os.environ, {onednn.OPT_OUT: "0"}):
        return _fft_layers(_zoo_and_corpus_layers())


def _fft_layers(layers):
    out = []
    for p in layers:
        layer, shapes = p.values
        if layer.type != "Convolution" or len(shapes) != 1:
            continue
        if fast.fft_tiles(layer.attrs, (fftconv.MIN_BATCH, *shapes[0][1:])):
            out.append(p)
    return out


@pytest.mark.parametrize("layer,shapes", _zoo_and_corpus_fft_layers())
def test_fft_matches_table_on_zoo_and_corpus_shapes(layer, shapes, monkeypatch):
    """Every zoo and corpus layer the FFT path would take at a large batch, at batch 1."""
    monkeypatch.setattr(fftconv, "MIN_BATCH", 1)
    rng = np.random.default_rng(len(layer.name))
    params = [randn(rng, p.shape, 0.1) for p in layer.params]
    compare(layer.type, layer.attrs, params, [randn(rng, s) for s in shapes])


@pytest.mark.parametrize("case", ["nin_cifar10_deploy", "nin_cifar10_train"])
def test_fixture_case_through_the_fft(case, monkeypatch):
    """NIN CIFAR-10's conv2 (96 -> 192, 5x5) through the FFT at the fixtures' batch matches
    real Caffe's blobs, diffs and param diffs."""
    from .fixture_harness import run_case

    path = FIXTURES / case
    if not (path / "forward.npz").exists():
        pytest.skip(f"fixture {case} not found under {FIXTURES}")
    monkeypatch.setattr(fftconv, "MIN_BATCH", 1)
    calls = []
    real = fftconv.correlate
    monkeypatch.setattr(fftconv, "correlate", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.chdir(path)
    problems = run_case(path)
    assert not problems, "\n".join(problems[:20])
    assert calls, "no layer took the FFT path"


@pytest.mark.parametrize(
    "shape,note",
    [
        ((32, 64, 8, 8), "FFT"),
        ((16, 96, 27, 27), "FFT, 2x2 tiles"),
        ((2, 64, 8, 8), ""),
    ],
)
def test_backward_note_names_the_fft(shape, note):
    attrs = layer_attrs("Convolution", "convolution_param { num_output: 6 kernel_size: 5 pad: 2 }")
    assert fast.backward_note("Convolution", attrs, [shape]) == note
    pool = layer_attrs("Pooling", "pooling_param { pool: AVE kernel_size: 3 stride: 2 }")
    assert fast.backward_note("Pooling", pool, [shape]) == ""  # the FFT is for convolutions


@pytest.mark.parametrize(
    "env,backend,expected",
    [
        ({}, "cpu", True),
        ({"NINCC_FFT": "1"}, "cpu", True),
        ({"NINCC_FFT": "0"}, "cpu", False),
        ({"NINCC_FFT": " Off "}, "cpu", False),
        ({}, "gpu", False),
        ({}, "tpu", False),
    ],
)
def test_fft_only_on_the_cpu_unless_turned_off(env, backend, expected):
    assert fftconv.enabled(env, backend) is expected


def test_nincc_fft_0_keeps_the_direct_convolution(monkeypatch):
    """With NINCC_FFT=0 a layer the FFT would take is differentiated through XLA's direct
    convolution, and gives the same gradients."""
    attrs = layer_attrs("Convolution", "convolution_param { num_output: 6 kernel_size: 5 pad: 2 }")
    rng = np.random.default_rng(9)
    shape = (fftconv.MIN_BATCH, fftconv.MIN_CHANNELS, 7, 6)
    params = [randn(rng, (6, shape[1], 5, 5), 0.1), randn(rng, (6,))]
    x = randn(rng, shape)

    def grads():
        lower = fast.lowering_for("Convolution", attrs, [x.shape])
        loss = lambda p, b: (lower(attrs, p, b, None)[0] ** 2).sum()  # noqa: E731
        jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(params, [x])
        prims = {e.primitive.name for e in _eqns(jaxpr.jaxpr)}
        return prims, jax.grad(loss, argnums=(0, 1))(params, [x])

    assert fast.fft_tiles(attrs, shape) == 1
    with_fft, g_fft = grads()
    monkeypatch.setenv("NINCC_FFT", "0")
    assert fast.fft_tiles(attrs, shape) == 0
    without, g_direct = grads()
    assert "fft" in with_fft and "fft" not in without
    leaves = jax.tree_util.tree_leaves
    for a, b in zip(leaves(g_fft), leaves(g_direct), strict=True):
        assert_close(a, b, BWD_REL, "gradient")
